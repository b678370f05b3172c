"""Every actor module, imported after the broker is set up (`dramatiq workers.actors`).

Settings are loaded and logging configured here, once per process, as the broker is
built; the worker context middleware then builds the jobs' clients as the worker boots.
"""

from shared.lifecycle.runs import project_limits, scheduled_jobs
from shared.logging import configure_logging
from shared.metrics import declare_lifecycle_series, declare_replication_series, declare_series
from shared.settings import load_settings
from workers.broker import setup_broker
from workers.context import WorkerContextMiddleware

settings = load_settings()
configure_logging(settings.log_format, settings.log_level)
declare_series([p.name for p in settings.projects], [u.name for u in settings.upstreams])
declare_replication_series([r.name for r in settings.replication])
declare_lifecycle_series(list(scheduled_jobs(settings)), project_limits(settings))
broker = setup_broker(settings)
broker.add_middleware(WorkerContextMiddleware(settings))

from workers.actors import fills, lifecycle, maintenance, replication, warm  # noqa: E402

__all__ = ["broker", "fills", "lifecycle", "maintenance", "replication", "warm"]
