"""Operator commands on upstream quotas: the `seawall quota` table and `seawall warm` jobs."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime

from redis.asyncio import Redis
from rich.console import Console
from rich.table import Table

from shared import jobs
from shared.oci.errors import RegistryError
from shared.oci.reference import validate_name, validate_tag
from shared.ratelimit import Governor
from shared.routing import resolve
from shared.settings import Settings


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not at this pace"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


async def quota_table(settings: Settings, redis_url: str) -> int:
    redis = Redis.from_url(redis_url)
    table = Table(
        "upstream", "identity", "remaining", "limit", "window", "reopens at", "spent (1h)", "runs out in"
    )
    try:
        for upstream in settings.upstreams:
            status = await Governor(redis, upstream).status()
            if status.limit is None:
                table.add_row(
                    upstream.name,
                    status.identity,
                    "unlimited",
                    "-",
                    "-",
                    _when(status.closed_until),
                    str(status.spent_last_hour),
                    "-",
                )
                continue
            table.add_row(
                upstream.name,
                status.identity,
                f"{status.remaining:.0f}",
                str(status.limit),
                _duration(status.window),
                _when(status.closed_until),
                str(status.spent_last_hour),
                _duration(status.runs_out_in),
            )
    finally:
        await redis.aclose()
    Console(width=160).print(table)
    return 0


def enqueue_warm(settings: Settings, redis_url: str, references: Iterable[str]) -> list[str]:
    """Queue a background fetch of each `<project>/<repository>:<tag>`; lines to print."""
    broker = jobs.make_broker(redis_url)
    lines = []
    try:
        for reference in references:
            name, _, tag = reference.rpartition(":")
            if not name or "/" in tag:
                raise ValueError(f"{reference!r}: expected <project>/<repository>:<tag>")
            try:
                validate_name(name)
                validate_tag(tag)
                target = resolve(settings, name)
            except RegistryError as exc:
                raise ValueError(f"{reference!r}: {exc.message}") from None
            if target.project.type != "proxy":
                raise ValueError(f"{reference!r}: {target.project.name} is not a proxy project")
            jobs.enqueue(broker, jobs.WARM, (target.project.name, target.path, tag))
            lines.append(f"queued {target.project.name}/{target.path}:{tag} at {time.strftime('%H:%M:%S')}")
    finally:
        broker.close()
    return lines
