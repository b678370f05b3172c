"""One upstream client per configured upstream, opened on first use and closed together;
a proxy project's upstreams as a chain, asked in order of preference.

A chain (an edge site's `upstreams: [central, dockerhub]`) asks its first upstream, and
the next one only when the one before is unreachable or failing: a connection refused or
cut, a timeout, a 5xx, a 429, or the governor holding requests to it back. An answer, even
"not found" or "denied", is the answer: falling back then would spend the next upstream's
quota on what the first one knows does not exist. Each upstream keeps its own client and
governor bucket, so only the leg that reaches Docker Hub spends Docker Hub's quota.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from redis.asyncio import Redis

from shared.auth.upstream_tokens import SharedTokens
from shared.metrics import UPSTREAM_FALLBACKS
from shared.oci.errors import RegistryError
from shared.ratelimit import Governor
from shared.settings import Project, Settings
from shared.upstream import UpstreamClient, UpstreamFailure

log = structlog.get_logger("proxy")
T = TypeVar("T")

# Failures that say the upstream is unreachable, overloaded or closed for now.
UNAVAILABLE_KINDS = frozenset({"timeout", "refused", "network", "quota", "abuse", "governor"})


def falls_back(failure: UpstreamFailure) -> bool:
    """Whether a chain asks its next upstream after `failure` of the one before."""
    if failure.kind in UNAVAILABLE_KINDS:
        return True
    # "status" is an unwanted status or an answer that cannot be used. A 4xx answers the
    # request (a bad name, a denial); a 5xx or a broken answer (a body that does not
    # match its digest, a bad Content-Range) is the upstream failing.
    if failure.kind != "status":
        return False
    return failure.status is None or not 400 <= failure.status < 500


@dataclass(frozen=True)
class UpstreamChain:
    """A proxy project's upstream clients in order of preference (never empty)."""

    project: str
    clients: tuple[UpstreamClient, ...]

    @property
    def names(self) -> list[str]:
        return [client.name for client in self.clients]

    async def first(self, what: str, call: Callable[[UpstreamClient], Awaitable[T]]) -> T:
        """`call` on the first upstream that answers.

        An UpstreamFailure that `falls_back` moves on to the next upstream (counted and
        logged); any other, or the last upstream's, is raised. `what` names the request
        in the log.
        """
        *preferred, last = self.clients
        for index, client in enumerate(preferred):
            try:
                return await call(client)
            except UpstreamFailure as failure:
                if not falls_back(failure):
                    raise
                self._fell_back(client, self.clients[index + 1], failure, what)
        return await call(last)

    def _fell_back(
        self, failed: UpstreamClient, to: UpstreamClient, failure: UpstreamFailure, what: str
    ) -> None:
        UPSTREAM_FALLBACKS.labels(self.project, failed.name, to.name).inc()
        log.warning(
            "upstream_fallback",
            project=self.project,
            from_upstream=failed.name,
            to_upstream=to.name,
            request=what,
            reason=str(failure),
        )


class UpstreamPool:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self._settings = settings
        self._redis = redis
        self._clients: dict[str, UpstreamClient] = {}
        self._chains: dict[str, UpstreamChain] = {}
        self._lock = asyncio.Lock()

    async def client(self, name: str) -> UpstreamClient:
        client = self._clients.get(name)
        if client is not None:
            return client
        async with self._lock:
            if name not in self._clients:
                upstream = self._settings.upstream(name)
                if upstream is None:
                    raise RegistryError("NAME_UNKNOWN", f"no upstream named {name!r}")
                client = UpstreamClient(
                    upstream,
                    governor=Governor(self._redis, upstream),
                    shared_tokens=SharedTokens(self._redis, upstream),
                )
                await client.start()
                self._clients[name] = client
            return self._clients[name]

    async def chain(self, project: Project) -> UpstreamChain:
        """The clients of `project`'s upstreams, in its order of preference."""
        chain = self._chains.get(project.name)
        if chain is not None:
            return chain
        if not project.upstreams:
            raise RegistryError("NAME_UNKNOWN", f"project {project.name!r} has no upstream")
        clients = tuple([await self.client(name) for name in project.upstreams])
        # Each fallback the chain can take, at zero, so `rate()` sees its first occurrence.
        for failed, to in zip(project.upstreams, project.upstreams[1:], strict=False):
            UPSTREAM_FALLBACKS.labels(project.name, failed, to)
        chain = self._chains[project.name] = UpstreamChain(project.name, clients)
        return chain

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
        self._chains.clear()
