"""What starts a replication run: the REPLICATE job the scheduler (cron), the edge (on push) and
`seawall replicate` (manual) publish, which rules a push fires, and which tags a rule copies.

A run is one message: `jobs.REPLICATE` with the rule's name, the trigger and, for an
on-push run, the repository and tag pushed. The worker that takes it plans the execution
(workers/replication.py).
"""

from __future__ import annotations

import asyncio
import re

from dramatiq.brokers.redis import RedisBroker

from shared import jobs
from shared.replication.rules import ReplicationRule, TriggerType
from shared.settings import Settings

# The tag scheme of cosign and others: `sha256-<hex>.sig` (`.att`, `.sbom`) next to the
# image it refers to. Such tags travel with that image (shared/replication/copy.py).
_REFERRER_TAG = re.compile(r"^sha256-[0-9a-f]{64}\.(?:sig|att|sbom)$")


def is_referrer_tag(tag: str) -> bool:
    """A tag of the referrer tag scheme: a signature, attestation or SBOM of a digest."""
    return bool(_REFERRER_TAG.match(tag))


def wanted_tag(rule: ReplicationRule, tag: str) -> bool:
    """Whether a run of `rule` copies `tag` as a tag of its own (a referrer-scheme tag
    travels with its image instead)."""
    return not is_referrer_tag(tag) and rule.filters.matches_tag(tag)


def fires_on_push(rule: ReplicationRule, project: str, repository: str, tag: str) -> bool:
    """Whether pushing `repository:tag` (a full name) to `project` runs `rule`.

    A signature, attestation or SBOM pushed under the referrer tag scheme runs the rules
    that copy referrers: its image may have travelled before it was signed.
    """
    if not rule.enabled or rule.trigger.type != "on_push" or rule.source != project:
        return False
    if not rule.filters.matches_repository(repository):
        return False
    return wanted_tag(rule, tag) or (rule.copy_referrers and is_referrer_tag(tag))


def replicate_args(
    rule: str, trigger: TriggerType, repository: str | None = None, tag: str | None = None
) -> tuple[str, str, str | None, str | None]:
    """The arguments of a REPLICATE message."""
    return (rule, trigger, repository, tag)


def publish_run(
    broker: RedisBroker,
    rule: str,
    trigger: TriggerType,
    repository: str | None = None,
    tag: str | None = None,
) -> None:
    """Ask the workers for a run of `rule`. Blocking: on an event loop, run it on a thread."""
    jobs.enqueue(broker, jobs.REPLICATE, replicate_args(rule, trigger, repository, tag))


class PushEvents:
    """Publishes the on-push runs a push to a hosted project fires, with the edge's broker."""

    def __init__(self, settings: Settings, broker: RedisBroker) -> None:
        self._rules = [rule for rule in settings.replication if rule.trigger.type == "on_push"]
        self._broker = broker

    def rules_fired(self, project: str, repository: str, tag: str) -> list[ReplicationRule]:
        return [rule for rule in self._rules if fires_on_push(rule, project, repository, tag)]

    async def pushed(self, project: str, repository: str, tag: str) -> list[str]:
        """A tag was stored: publish a run of each rule it fires; their names."""
        fired = self.rules_fired(project, repository, tag)
        if fired:
            # The broker's client is synchronous; keep the event loop free meanwhile.
            await asyncio.to_thread(self._publish, [rule.name for rule in fired], repository, tag)
        return [rule.name for rule in fired]

    def _publish(self, rules: list[str], repository: str, tag: str) -> None:
        for rule in rules:
            publish_run(self._broker, rule, "on_push", repository, tag)

    def close(self) -> None:
        self._broker.close()
