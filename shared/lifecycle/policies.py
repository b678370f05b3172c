"""What an operator configures for the storage lifecycle: garbage collection, proxy cache
eviction, tag retention and project quotas (docs/storage.md).

Plain models: the configuration file names them today; a later admin API serves and edits
the same shapes.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from croniter import croniter
from pydantic import BaseModel, ByteSize, Field, field_validator, model_validator

from shared.durations import Duration
from shared.globs import Patterns, matches, name_globs, tag_globs


def _cron(value: str | None) -> str | None:
    if value is not None and not croniter.is_valid(value):
        raise ValueError(f"invalid cron expression {value!r}: use five fields, e.g. '0 4 * * *'")
    return value


class ProjectGC(BaseModel):
    """A project's garbage-collection choices."""

    # Manifests no tag, index or referrer reaches are deleted (after the grace period).
    delete_untagged: bool = False


class CachePolicy(BaseModel):
    """A proxy project's cache bounds: least recently pulled images go first."""

    # Keep the project's cached bytes under this (evicting down to `1 - headroom` of it).
    max_bytes: ByteSize | None = None
    # Evict images not pulled within this long.
    evict_after: Duration | None = None


class RetentionRule(BaseModel):
    """One rule of a hosted project's tag retention; a tag survives if any rule keeps it.

    Exactly one of `keep_most_recent` (the N most recently pushed matching tags of each
    repository), `keep_pulled_within` (tags pulled within that long) and `keep: always`.
    """

    repositories: Patterns = Field(default_factory=lambda: ["**"])
    tags: Patterns = Field(default_factory=lambda: ["**"])
    keep_most_recent: int | None = Field(default=None, ge=0)
    keep_pulled_within: Duration | None = None
    keep: Literal["always"] | None = None

    @field_validator("repositories")
    @classmethod
    def _repository_globs(cls, patterns: list[str]) -> list[str]:
        return name_globs(patterns)

    @field_validator("tags")
    @classmethod
    def _tag_globs(cls, patterns: list[str]) -> list[str]:
        return tag_globs(patterns)

    @model_validator(mode="after")
    def _one_way_to_keep(self) -> RetentionRule:
        chosen = [
            name
            for name, value in (
                ("keep_most_recent", self.keep_most_recent),
                ("keep_pulled_within", self.keep_pulled_within),
                ("keep", self.keep),
            )
            if value is not None
        ]
        if len(chosen) != 1:
            raise ValueError(
                "a retention rule needs exactly one of keep_most_recent, keep_pulled_within, "
                f"keep: always (it has {', '.join(chosen) or 'none'})"
            )
        return self

    def matches(self, repository: str, tag: str) -> bool:
        """`repository` is the path inside the project (without the project's name)."""
        return matches(repository, self.repositories) and matches(tag, self.tags)


class LifecycleSettings(BaseModel):
    """When the scheduler runs each lifecycle job (one at a time cluster-wide); a `null`
    schedule turns that job off."""

    gc_schedule: str | None = "0 4 * * *"
    # A blob (or orphan) younger than this is never collected: a blob pushed just before
    # its manifest, an upload or a fill in progress.
    gc_grace: Duration = timedelta(hours=1)
    # Garbage collection's requests to the store per second (0: no cap), so that a collection
    # over a large bucket never crowds out the clients' pulls.
    gc_requests_per_second: int = Field(default=400, ge=0)
    eviction_schedule: str | None = "*/10 * * * *"
    # Eviction brings a project over `max_bytes` down to (1 - headroom) * max_bytes.
    eviction_headroom: float = Field(default=0.1, ge=0, lt=1)
    retention_schedule: str | None = "30 4 * * *"

    _schedules = field_validator("gc_schedule", "eviction_schedule", "retention_schedule")(_cron)
