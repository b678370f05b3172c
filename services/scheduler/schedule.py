"""What the scheduler fires, and when (cron expressions evaluated with croniter): maintenance
jobs (the storage lifecycle's among them), and the replication rules with a cron trigger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from croniter import croniter

from shared import jobs
from shared.lifecycle.runs import evicted_projects, retained_projects
from shared.replication.rules import CronTrigger
from shared.replication.triggers import replicate_args
from shared.settings import Settings


@dataclass(frozen=True)
class Trigger:
    name: str
    cron: str
    job: jobs.Job  # what to enqueue
    args: tuple[Any, ...] = ()  # the message's arguments

    @property
    def actor(self) -> str:
        return self.job.actor

    def due_between(self, since: datetime, now: datetime) -> bool:
        """True when a firing time falls in (since, now]."""
        following: datetime = croniter(self.cron, since).get_next(datetime)
        return following <= now


MAINTENANCE = [Trigger("purge-expired-uploads", "17 * * * *", jobs.PURGE_EXPIRED_UPLOADS)]


def maintenance(settings: Settings) -> list[Trigger]:
    """The fixed maintenance triggers, plus the scrub on `scrub.schedule` unless it is off,
    plus the storage lifecycle's jobs."""
    triggers = list(MAINTENANCE)
    if settings.scrub.schedule:
        triggers.append(Trigger("scrub-blobs", settings.scrub.schedule, jobs.SCRUB_BLOBS))
    return triggers + lifecycle(settings)


def lifecycle(settings: Settings) -> list[Trigger]:
    """Garbage collection on `lifecycle.gc_schedule`; eviction of each proxy project with a
    cache policy on `eviction_schedule`; retention of each hosted project with rules on
    `retention_schedule`. A `null` schedule turns that job off. The workers run them one
    at a time (a lease); one that finds another running comes back a little later."""
    schedules = settings.lifecycle
    triggers = []
    if schedules.gc_schedule:
        triggers.append(Trigger("gc", schedules.gc_schedule, jobs.COLLECT_GARBAGE, (0,)))
    if schedules.eviction_schedule:
        triggers += [
            Trigger(f"evict-{name}", schedules.eviction_schedule, jobs.EVICT_CACHE, (name, 0))
            for name in evicted_projects(settings)
        ]
    if schedules.retention_schedule:
        triggers += [
            Trigger(f"retention-{name}", schedules.retention_schedule, jobs.APPLY_RETENTION, (name, 0))
            for name in retained_projects(settings)
        ]
    return triggers


def replication(settings: Settings) -> list[Trigger]:
    """A trigger per enabled replication rule with a cron trigger: a run of the rule."""
    triggers = []
    for rule in settings.replication:
        if rule.enabled and isinstance(rule.trigger, CronTrigger):
            args = replicate_args(rule.name, "cron")
            triggers.append(Trigger(f"replicate-{rule.name}", rule.trigger.schedule, jobs.REPLICATE, args))
    return triggers
