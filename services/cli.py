"""The `seawall` command: run the all-in-one stack, hash passwords, check a configuration,
warm and scrub the cache, start and follow replication runs, collect garbage, evict, apply
retention and show each project's bytes."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

import click
import yaml
from argon2 import PasswordHasher
from pydantic import ValidationError

from shared.settings import Settings, config_path, load_settings

if TYPE_CHECKING:
    from rich.console import Console

_CONFIG_OPTION = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="seawall.yaml to read (default: $SEAWALL_CONFIG, else settings from SEAWALL_* only).",
)


def _describe_error(exc: Exception) -> str:
    """A configuration error as lines a person can act on."""
    if isinstance(exc, ValidationError):
        lines = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: {message}" if where else message)
        return "\n".join(lines)
    return str(exc)


def _load_or_exit(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except (FileNotFoundError, ValidationError, yaml.YAMLError) as exc:
        click.echo(f"error: invalid configuration\n{_describe_error(exc)}", err=True)
        sys.exit(1)


def _masked(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


@click.group()
@click.version_option(package_name="seawall")
def main() -> None:
    """Seawall: a container-image pull-through cache and registry."""


@main.command()
@_CONFIG_OPTION
def up(config: Path | None) -> None:
    """Run edge, workers and scheduler (plus embedded Redis/S3 if none are configured)."""
    from services.up import run_stack  # rich and the servers are only needed here

    settings = _load_or_exit(config)
    sys.exit(run_stack(settings, config_path(config)))


@main.command()
@_CONFIG_OPTION
def worker(config: Path | None) -> None:
    """Run the Dramatiq workers (`worker_processes` x `worker_threads`) with their metrics."""
    settings = _load_or_exit(config)
    env = os.environ
    if config is not None:
        env["SEAWALL_CONFIG"] = str(config.resolve())
    if settings.worker_metrics_listen:
        # prometheus_client picks multi-process mode when it is imported, so the directory
        # must be in the environment before dramatiq starts and imports the actors.
        metrics_dir = (settings.data_dir / "worker-metrics").resolve()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        host, _, port = settings.worker_metrics_listen.rpartition(":")
        env |= {
            "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            "dramatiq_prom_db": str(metrics_dir),
            "dramatiq_prom_host": host,
            "dramatiq_prom_port": port,
        }
    argv = [
        sys.executable, "-m", "dramatiq", "workers.actors",
        "--processes", str(settings.worker_processes),
        "--threads", str(settings.worker_threads),
    ]  # fmt: skip
    os.execvpe(sys.executable, argv, env)


@main.command("hash-password")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def hash_password(password_stdin: bool) -> None:
    """Print an argon2id hash for a `users` entry's password_hash."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    if not password:
        raise click.ClickException("the password is empty")
    click.echo(PasswordHasher().hash(password))


def _summary(settings: Settings) -> list[str]:
    lines = [
        f"listen:    {settings.listen}",
        f"data_dir:  {settings.data_dir}",
        f"redis:     {_masked(settings.redis_url) if settings.redis_url else 'embedded'}",
        "s3:        "
        + (f"{settings.s3.endpoint} bucket {settings.s3.bucket}" if settings.s3 else "embedded"),
        f"users:     {', '.join(u.name for u in settings.users) or 'none'}",
        f"projects:  {len(settings.projects)}",
    ]
    for project in settings.projects:
        via = f" of {', '.join(project.upstreams)} (tag_ttl {project.tag_ttl})" if project.upstreams else ""
        access = "public" if project.public else "private"
        lines.append(f"  {project.name}: {project.type}{via}, {access}")
    lines.append(f"upstreams: {len(settings.upstreams)}")
    lines += [f"  {u.name}: {u.url}" for u in settings.upstreams]
    routes = ", ".join(f"{ns} -> {p}" for ns, p in settings.mirror.namespaces.items())
    lines.append(f"mirror:    default {settings.mirror.default or 'none'}; {routes or 'no routes'}")
    return lines


@main.command("check-config")
@_CONFIG_OPTION
def check_config(config: Path | None) -> None:
    """Validate the configuration and summarise it."""
    settings = _load_or_exit(config)
    source = config_path(config)
    click.echo(f"config:    {source if source else '(none, SEAWALL_* variables only)'}")
    for line in _summary(settings):
        click.echo(line)
    click.echo("configuration OK")


def _redis_url(settings: Settings) -> str:
    """The configured Redis, else the embedded one of a running `seawall up`."""
    if settings.redis_url:
        return settings.redis_url
    from services.running import embedded_redis_file

    found = embedded_redis_file(settings.data_dir)
    if not found.is_file():
        raise click.ClickException("no redis_url configured and no running `seawall up` found")
    return found.read_text().strip()


@main.command()
@_CONFIG_OPTION
def quota(config: Path | None) -> None:
    """Show each upstream's pull quota: remaining, window, reopening time, when it runs out."""
    from services.quota import quota_table

    settings = _load_or_exit(config)
    sys.exit(asyncio.run(quota_table(settings, _redis_url(settings))))


@main.command()
@_CONFIG_OPTION
@click.argument("references", nargs=-1, required=True)
def warm(config: Path | None, references: tuple[str, ...]) -> None:
    """Fetch images into a proxy project ahead of use: `seawall warm dockerhub/library/alpine:3.20`.

    Workers fetch them at background priority, so they never eat the pull quota's reserve
    for client pulls.
    """
    from services.quota import enqueue_warm

    settings = _load_or_exit(config)
    try:
        for line in enqueue_warm(settings, _redis_url(settings), references):
            click.echo(line)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@_CONFIG_OPTION
@click.option(
    "--rate",
    default=None,
    help="Read at most this many bytes per second (e.g. 200MiB; 0: no cap). Default: scrub.bytes_per_second.",
)
def scrub(config: Path | None, rate: str | None) -> None:
    """Re-hash every stored blob; quarantine and list those that do not match their digest.

    Exits 0 when every blob is sound, 2 when some were quarantined.
    """
    from services.scrub import run_scrub

    settings = _load_or_exit(config)
    try:
        sys.exit(asyncio.run(run_scrub(settings, rate)))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


_DRY_RUN_OPTION = click.option("--dry-run", is_flag=True, help="Delete nothing; list what would be deleted.")


def _lifecycle(
    config: Path | None, job: Literal["gc", "eviction", "retention"], project: str | None, dry_run: bool
) -> None:
    """Run a storage lifecycle job here and print its report; exit 0 when it succeeded, 1 when
    it failed, 3 when another lifecycle job was running (2: the project cannot have this job)."""
    from services.lifecycle_cli import run_command
    from shared.lifecycle.runs import policy_problem
    from shared.logging import configure_logging

    settings = _load_or_exit(config)
    if project is not None and (problem := policy_problem(settings, job, project)) is not None:
        raise click.BadParameter(problem, param_hint="'PROJECT'")
    # The job's log lines go to stderr, and only its warnings and errors: the report is the output.
    configure_logging(settings.log_format, "warning")
    try:
        sys.exit(asyncio.run(run_command(settings, _redis_url(settings), job, project, dry_run)))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@_CONFIG_OPTION
@_DRY_RUN_OPTION
def gc(config: Path | None, dry_run: bool) -> None:
    """Collect garbage now: delete the blobs, manifests and leftovers nothing references.

    Exits 0 when it succeeded, 1 when it failed, 3 when another lifecycle job was running.
    """
    _lifecycle(config, "gc", None, dry_run)


@main.command()
@_CONFIG_OPTION
@_DRY_RUN_OPTION
@click.argument("project")
def evict(config: Path | None, dry_run: bool, project: str) -> None:
    """Evict a proxy project's least recently pulled images down to its cache policy.

    Exits 0 when it succeeded, 1 when it failed, 3 when another lifecycle job was running.
    """
    _lifecycle(config, "eviction", project, dry_run)


@main.command()
@_CONFIG_OPTION
@_DRY_RUN_OPTION
@click.argument("project")
def retention(config: Path | None, dry_run: bool, project: str) -> None:
    """Delete the tags of a hosted project that no retention rule keeps.

    Exits 0 when it succeeded, 1 when it failed, 3 when another lifecycle job was running.
    """
    _lifecycle(config, "retention", project, dry_run)


@main.command()
@_CONFIG_OPTION
def stats(config: Path | None) -> None:
    """Show each project's bytes: a hosted project's usage against its quota, a proxy
    project's cache against its max_bytes."""
    from redis.exceptions import RedisError
    from rich.console import Console as RichConsole

    from services.lifecycle_cli import show_stats
    from shared.logging import configure_logging

    settings = _load_or_exit(config)
    configure_logging(settings.log_format, "warning")  # the table is the output
    console = RichConsole() if sys.stdout.isatty() else RichConsole(width=200)
    try:
        sys.exit(asyncio.run(show_stats(settings, _redis_url(settings), console)))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    except RedisError as exc:
        raise click.ClickException(f"cannot read the usage from Redis: {exc}") from None


def _replication(
    settings: Settings, command: Callable[[Settings, str, Console], Coroutine[Any, Any, int]]
) -> None:
    """Run a replication command against the execution records; exit with its code."""
    from rich.console import Console as RichConsole

    from services.replication_cli import CommandError

    try:
        # Wide when not on a terminal, so that ids and names in tables stay whole for scripts.
        console = RichConsole() if sys.stdout.isatty() else RichConsole(width=200)
        sys.exit(asyncio.run(command(settings, _redis_url(settings), console)))
    except CommandError as exc:
        raise click.ClickException(str(exc)) from None


@main.command("replicate")
@_CONFIG_OPTION
@click.argument("rule")
@click.option(
    "--wait",
    is_flag=True,
    help="Follow the run (tasks done, bytes, rate) until it ends; exit 0 when it succeeded, "
    "1 when it failed or was stopped, 2 when it was skipped (another run of the rule was running).",
)
def replicate_command(config: Path | None, rule: str, wait: bool) -> None:
    """Start a run of a replication rule now: `seawall replicate python-slim --wait`."""
    from services.replication_cli import replicate

    _replication(_load_or_exit(config), lambda s, url, console: replicate(s, url, rule, wait, console))


@main.command("executions")
@_CONFIG_OPTION
@click.argument("rule", required=False)
@click.option("--limit", default=50, show_default=True, help="Show at most this many, newest first.")
def executions_command(config: Path | None, rule: str | None, limit: int) -> None:
    """List replication executions, newest first (of one rule, or of all)."""
    from services.replication_cli import list_executions

    _replication(_load_or_exit(config), lambda s, url, console: list_executions(s, url, rule, limit, console))


class _ExecutionCommands(click.Group):
    """`seawall execution ID` shows the execution: a first word that is no subcommand is an id."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["show", *args]
        return super().parse_args(ctx, args)


@main.group("execution", cls=_ExecutionCommands)
def execution_commands() -> None:
    """One replication execution: `seawall execution ID` shows its tasks and their logs;
    `seawall execution stop ID` stops it; `seawall execution retry ID` runs its failed tasks again."""


@execution_commands.command("show")
@_CONFIG_OPTION
@click.argument("execution_id")
def execution_show(config: Path | None, execution_id: str) -> None:
    """Show an execution: its tasks, then each task's log."""
    from services.replication_cli import show_execution

    _replication(_load_or_exit(config), lambda s, url, console: show_execution(s, url, execution_id, console))


@execution_commands.command("stop")
@_CONFIG_OPTION
@click.argument("execution_id")
def execution_stop(config: Path | None, execution_id: str) -> None:
    """Stop a running execution: tasks not yet running stop now, running ones within seconds."""
    from services.replication_cli import stop_execution

    _replication(_load_or_exit(config), lambda s, url, console: stop_execution(s, url, execution_id, console))


@execution_commands.command("retry")
@_CONFIG_OPTION
@click.argument("execution_id")
def execution_retry(config: Path | None, execution_id: str) -> None:
    """Run the failed tasks of an execution again (reopening it if it had finished)."""
    from services.replication_cli import retry_execution

    _replication(
        _load_or_exit(config), lambda s, url, console: retry_execution(s, url, execution_id, console)
    )


if __name__ == "__main__":
    main()
