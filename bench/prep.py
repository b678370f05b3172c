"""Content for the workloads: random blobs and images pushed straight into the upstream
Distribution (not through the emulator, so nothing is counted), and waits for caches to settle."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator

import httpx

from tests.support.images import Image, make_image, make_layer
from tests.support.seed import push_image

PIECE = 4 * 1024 * 1024
MiB = 2**20


def random_pieces(size: int, seed: str) -> Iterator[bytes]:
    """`size` incompressible, reproducible bytes, in pieces (a 1 GiB blob is never held whole)."""
    rng = random.Random(seed)
    left = size
    while left:
        n = min(PIECE, left)
        yield rng.randbytes(n)
        left -= n


def blob_digest(size: int, seed: str) -> str:
    hasher = hashlib.sha256()
    for piece in random_pieces(size, seed):
        hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


def push_random_blob(base_url: str, repo: str, size: int, seed: str) -> str:
    """Push a random blob of `size` bytes with a streamed PATCH; its digest."""
    digest = blob_digest(size, seed)
    with httpx.Client(base_url=base_url, timeout=300) as client:
        started = client.post(f"/v2/{repo}/blobs/uploads/")
        started.raise_for_status()
        location = started.headers["Location"]
        patched = client.patch(
            location,
            content=random_pieces(size, seed),
            headers={"Content-Type": "application/octet-stream"},
        )
        patched.raise_for_status()
        location = patched.headers["Location"]
        separator = "&" if "?" in location else "?"
        done = client.put(f"{location}{separator}digest={digest}")
        if done.status_code != 201:
            raise RuntimeError(f"blob push to {repo} failed: {done.status_code} {done.text[:300]}")
    return digest


def bench_image(layers: int, layer_size: int, seed: str) -> Image:
    """An image of `layers` layers of incompressible bytes, `layer_size` each (before tar+gzip)."""
    return make_image([make_layer(size=layer_size, seed=f"{seed}-{i}") for i in range(layers)], label=seed)


def push(base_url: str, repos: list[str], image: Image, tag: str = "1.0") -> None:
    for repo in repos:
        push_image(base_url, repo, image, tag)


def image_size(image: Image) -> int:
    return sum(len(b) for b in image.blobs.values())


def wait_committed(edge_url: str, path: str, digests: list[str], timeout: float = 120) -> None:
    """Wait until Seawall serves every blob from storage (no `X-Seawall-Cache: miss`)."""
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=edge_url, timeout=30) as client:
        pending = list(digests)
        while pending:
            response = client.head(f"/v2/{path}/blobs/{pending[0]}")
            if response.status_code == 200 and response.headers.get("X-Seawall-Cache") is None:
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}@{pending[0]} not committed after {timeout:.0f}s")
            time.sleep(0.1)


def read_blob(base_url: str, path: str, digest: str) -> int:
    """GET a blob whole (to warm a cache); bytes read."""
    total = 0
    with (
        httpx.Client(base_url=base_url, timeout=300) as client,
        client.stream("GET", f"/v2/{path}/blobs/{digest}") as response,
    ):
        if response.status_code != 200:
            raise RuntimeError(f"GET {base_url}/v2/{path}/blobs/{digest}: {response.status_code}")
        for chunk in response.iter_raw(MiB):
            total += len(chunk)
    return total
