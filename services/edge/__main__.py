"""Run the edge: `python -m services.edge --config seawall.yaml`."""

from __future__ import annotations

import click
from aiohttp import web

from services.edge.app import create_app
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
    web.run_app(
        create_app(settings),
        host=settings.listen_host,
        port=settings.listen_port,
        print=None,
        access_log=None,
        reuse_port=settings.edge_processes > 1,
    )


if __name__ == "__main__":
    main()
