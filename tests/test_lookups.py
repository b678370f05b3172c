"""Tag and revision lookups: a hot entry that expires costs the bucket one read, not one per request."""

from __future__ import annotations

import asyncio

from shared.oci.digest import Digest
from shared.registry.layout import tag as tag_key
from shared.registry.repositories import RepositoryStore
from shared.registry.storage import ObjectStore
from shared.settings import S3Settings


class CountingStore(ObjectStore):
    """The real store, counting the small reads it is asked for."""

    def __init__(self, settings: S3Settings) -> None:
        super().__init__(settings)
        self.reads: list[str] = []

    async def get_bytes(self, key: str) -> bytes:
        self.reads.append(key)
        return await super().get_bytes(key)


def test_concurrent_lookups_of_one_tag_share_one_bucket_read(s3_settings: S3Settings) -> None:
    digest = Digest.of(b"a manifest")

    async def scenario() -> tuple[list[Digest | None], list[str]]:
        store = CountingStore(s3_settings)
        try:
            repositories = RepositoryStore(store)  # no Redis: every lookup misses the cache
            await repositories.set_tag("local/hot", "v1", digest)
            store.reads.clear()
            found = await asyncio.gather(*(repositories.resolve_tag("local/hot", "v1") for _ in range(50)))
            missing = await asyncio.gather(
                *(repositories.resolve_tag("local/hot", "nope") for _ in range(20))
            )
            return [*found, *missing], store.reads
        finally:
            store.close()

    found, reads = asyncio.run(scenario())
    assert found == [digest] * 50 + [None] * 20
    assert reads == [tag_key("local/hot", "v1"), tag_key("local/hot", "nope")]
