"""Every actor module, imported after the broker is set up (`dramatiq workers.actors`)."""

from workers.broker import setup_broker
from workers.runtime import settings

broker = setup_broker(settings())

from workers.actors import fills, maintenance, warm  # noqa: E402

__all__ = ["broker", "fills", "maintenance", "warm"]
