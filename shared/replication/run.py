"""Running a rule: what an execution copies (`plan`), the tags it deletes (`delete_missing`),
and stopping an execution or retrying its failed tasks by hand.

Planning lists the source at background priority, so the listing requests of a run take
the governor's request rate behind client pulls: the catalog where the source has one
(else the literal names of the rule's name filter: Docker Hub has no catalog), then each
repository's tags, kept when the filters match. Tags of the referrer tag scheme
(`sha256-<hex>.sig`, `.att`, `.sbom`) are not planned on their own: they travel with the
image they refer to (see shared/replication/copy.py). When the rule copies referrers, the
listing keeps those tags per repository, so that the tasks look up only the ones the
source has rather than asking it for each with a HEAD.

The workers (workers/replication.py) and the CLI share the rest: what a stop or a retry
does to the records is the same whoever asks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field
from functools import partial

from shared.ratelimit import background
from shared.replication.copy import QuotaWait, is_scheme_tag, quota_wait
from shared.replication.endpoints import Destination, ListingUnsupported, Source
from shared.replication.records import Task, TaskStatus, task_id
from shared.replication.rules import ReplicationRule
from shared.replication.store import ExecutionStore
from shared.replication.triggers import is_referrer_tag, wanted_tag

# A listing the governor holds back (its request rate) is started again this many times,
# after waiting as long as the governor says, when that is no longer than this.
LISTING_ATTEMPTS = 5
LISTING_WAIT_SECONDS = 120.0

Log = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Only:
    """An on-push run: the one repository (its full name at the source) and tag pushed."""

    repository: str
    tag: str


@dataclass
class Listing:
    """What a run found at the source: each repository listed, with its tags to copy."""

    tags: dict[str, list[str]] = field(default_factory=dict)
    # The referrer tag-scheme tags found in each repository listed (when the rule copies
    # referrers); a repository missing here was not listed (an on-push run).
    scheme_tags: dict[str, list[str]] = field(default_factory=dict)
    # False when only part of the source was looked at (an on-push run): nothing may be
    # deleted at the destination on its account.
    complete: bool = True


class ListingFailed(Exception):
    """The source (or the destination, for `delete_missing`) could not be listed."""


async def _listed(items: Callable[[], AsyncIterator[str]], what: str) -> list[str]:
    """Everything `items()` yields, in order, without repeats. Started again while the
    governor holds the listing back for a short while (results already seen are kept)."""
    seen: dict[str, None] = {}
    for attempt in range(1, LISTING_ATTEMPTS + 1):
        try:
            async for item in items():
                seen.setdefault(item, None)
            return list(seen)
        except ListingUnsupported:
            raise
        except Exception as exc:
            wait = exc if isinstance(exc, QuotaWait) else quota_wait(exc)
            if wait is None:
                raise ListingFailed(f"listing {what} failed: {exc}") from exc
            seconds = max(0.0, wait.reopens_at - time.time())
            if attempt == LISTING_ATTEMPTS or seconds > LISTING_WAIT_SECONDS:
                raise ListingFailed(f"listing {what} failed: {wait}") from exc
            await asyncio.sleep(seconds)
    raise AssertionError("unreachable")


async def list_source(rule: ReplicationRule, source: Source, only: Only | None = None) -> Listing:
    """The repositories and tags of `source` that `rule` copies (see the module's docstring).

    For an on-push run only the tag pushed is looked at, without listing anything. A
    signature, attestation or SBOM pushed under the referrer tag scheme is copied as it
    is when the rule copies referrers (its image may already be at the destination).
    """
    filters = rule.filters
    if only is not None:
        copied = wanted_tag(rule, only.tag) or (rule.copy_referrers and is_referrer_tag(only.tag))
        if filters.matches_repository(only.repository) and copied:
            return Listing({only.repository: [only.tag]}, complete=False)
        return Listing(complete=False)
    with background():
        try:
            listed = await _listed(source.repositories, f"the repositories of {source.name}")
            names = sorted(name for name in listed if filters.matches_repository(name))
        except ListingUnsupported:
            names = sorted(filters.literal_names())
            if not names:
                raise ListingFailed(
                    f"{source.name} cannot list its repositories: the rule's name filter must"
                    " name repositories without glob characters (e.g. library/python)"
                ) from None
        listing = Listing()
        for name in names:
            tags = await _listed(partial(source.tags, name), f"the tags of {name}")
            listing.tags[name] = sorted(tag for tag in tags if wanted_tag(rule, tag))
            if rule.copy_referrers:
                listing.scheme_tags[name] = sorted(tag for tag in tags if is_scheme_tag(tag))
    return listing


def tasks_for(rule: ReplicationRule, listing: Listing, execution: str = "") -> list[Task]:
    """One pending task per tag listed, numbered in order within `execution`."""
    tasks: list[Task] = []
    for repository, tags in listing.tags.items():
        for tag in tags:
            tasks.append(
                Task(
                    id=task_id(execution, len(tasks)),
                    execution=execution,
                    rule=rule.name,
                    source_repository=repository,
                    tag=tag,
                    destination_repository=rule.destination_repository(repository),
                )
            )
    return tasks


async def plan(
    rule: ReplicationRule, source: Source, only: Only | None = None, *, execution: str = ""
) -> list[Task]:
    """The tasks of a run of `rule`: one per tag to copy (see `list_source`)."""
    return tasks_for(rule, await list_source(rule, source, only), execution)


async def delete_missing(
    rule: ReplicationRule, listing: Listing, destination: Destination, log: Log
) -> list[str]:
    """Delete the destination tags whose source is gone; the `repository:tag`s deleted.

    Only in the destination repositories the listing maps to, only tags the rule's tag
    filters match (a tag the rule does not copy is not the rule's to delete), never a tag
    of the referrer tag scheme, and only after a complete listing of the source.
    """
    if not rule.delete_missing or not listing.complete:
        return []
    kept: dict[str, set[str]] = {}
    for repository, tags in listing.tags.items():
        kept.setdefault(rule.destination_repository(repository), set()).update(tags)
    deleted = []
    with background():
        for repository in sorted(kept):
            present = await _listed(partial(destination.tags, repository), f"the tags of {repository}")
            for tag in sorted(present):
                if tag in kept[repository] or not wanted_tag(rule, tag):
                    continue
                await destination.delete_tag(repository, tag)
                deleted.append(f"{repository}:{tag}")
                log(f"deleted {repository}:{tag}: the source no longer has it")
    return deleted


class CannotRetry(Exception):
    """The execution's failed tasks cannot run again now (the message says why)."""


async def retry_failed(
    store: ExecutionStore, execution_id: str, task_ids: Collection[str] | None = None
) -> list[Task]:
    """Make the failed tasks of an execution (those of `task_ids`, else all) pending again,
    reopening the execution if it finished; the tasks to publish (one REPLICATE_TASK each).
    Their attempts are counted afresh.

    A step that is not a tag's copy (listing the source, deleting tags) is not retried:
    a new run does it again.
    """
    execution = await store.execution(execution_id)
    if execution is None:
        raise CannotRetry(f"no execution {execution_id}")
    failed = [
        task
        for task in await store.tasks(execution_id)
        if task.status is TaskStatus.FAILED and (task_ids is None or task.id in task_ids)
    ]
    copies = [task for task in failed if task.tag]
    if not copies:
        steps = " (a failed listing or deletion is not retried: start a new run)" if failed else ""
        raise CannotRetry(f"execution {execution_id} has no failed task to retry{steps}")
    if await store.reopen(execution_id) is None:
        raise CannotRetry(f"another execution of rule {execution.rule!r} is running: retry once it is over")
    for task in copies:
        task.status = TaskStatus.PENDING
        task.attempts = 0
        task.error = None
        task.finished = None
        task.waiting_until = None
        task.note("retried by hand")
        await store.update_task(task)
    return copies
