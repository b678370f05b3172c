"""Run the edge: `python -m services.edge --config seawall.yaml`."""

from __future__ import annotations

import asyncio

import click

from services.edge.server import serve
from shared.eventloop import use_uvloop
from shared.logging import configure_logging, get_logger
from shared.settings import load_settings


@click.command()
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="seawall.yaml")
def main(config: str | None) -> None:
    settings = load_settings(config)
    configure_logging(settings.log_format, settings.log_level)
    use_uvloop()
    log = get_logger("edge")
    log.info("edge_starting", listen=settings.listen)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
