"""What the scheduler fires, and when (cron expressions evaluated with croniter)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from croniter import croniter

from shared import jobs
from shared.settings import Settings


@dataclass(frozen=True)
class Trigger:
    name: str
    cron: str
    job: jobs.Job  # what to enqueue

    @property
    def actor(self) -> str:
        return self.job.actor

    def due_between(self, since: datetime, now: datetime) -> bool:
        """True when a firing time falls in (since, now]."""
        following: datetime = croniter(self.cron, since).get_next(datetime)
        return following <= now


MAINTENANCE = [Trigger("purge-expired-uploads", "17 * * * *", jobs.PURGE_EXPIRED_UPLOADS)]


def maintenance(settings: Settings) -> list[Trigger]:
    """The fixed maintenance triggers, plus the scrub on `scrub.schedule` unless it is off."""
    triggers = list(MAINTENANCE)
    if settings.scrub.schedule:
        triggers.append(Trigger("scrub-blobs", settings.scrub.schedule, jobs.SCRUB_BLOBS))
    return triggers
