"""A fill's staged segments in the bucket, as the worker and the edges that follow it see them.

Each segment is written once under a key of its own (`layout.fill_segment`): a fill that
lost its lease and writes late can add segments, never replace one a blob record names.
So a listing may hold two segments that start at the same byte (two attempts); both hold
the upstream's bytes at those offsets, and readers take the first.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.oci.digest import Digest
from shared.registry import layout
from shared.registry.storage import ObjectStore


@dataclass(frozen=True, slots=True)
class Segment:
    key: str
    start: int
    size: int

    @property
    def end(self) -> int:
        return self.start + self.size


async def staged_segments(objects: ObjectStore, digest: Digest) -> list[Segment]:
    """Every staged segment of the fill of `digest`, by first byte."""
    listing = await objects.list_objects(layout.fill_segments(digest))
    found = [Segment(o.key, layout.start_of(o.key), o.size) for o in listing]
    return sorted(found, key=lambda s: (s.start, s.key))


def contiguous(segments: list[Segment]) -> list[Segment]:
    """The segments that continue each other from byte 0, one per start, up to the first gap."""
    chain: list[Segment] = []
    for segment in segments:
        end = chain[-1].end if chain else 0
        if segment.start == end and segment.size:
            chain.append(segment)
    return chain
