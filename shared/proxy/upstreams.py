"""One upstream client per configured upstream, opened on first use and closed together."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from shared.auth.upstream_tokens import SharedTokens
from shared.oci.errors import RegistryError
from shared.ratelimit import Governor
from shared.settings import Settings
from shared.upstream import UpstreamClient


class UpstreamPool:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self._settings = settings
        self._redis = redis
        self._clients: dict[str, UpstreamClient] = {}
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

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()
