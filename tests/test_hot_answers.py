"""Warm manifest answers repeated in front of the app (services/edge/hot.py): a repeat answers
what the handler would, for the same credentials only, counted and noted like any pull, and a
write through the edge is served at once."""

from __future__ import annotations

import time

import httpx
import pytest

from shared import validity
from shared.auth.tokens import InvalidToken, TokenSigner
from shared.localcache import LocalCache
from shared.metrics import REQUEST_SECONDS, REQUESTS
from tests.fixtures.edge import USERS, EdgeFactory
from tests.support.images import Image, make_image, make_layer
from tests.support.seed import push_image

ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
ALICE = ("alice", USERS["alice"])
BOB = ("bob", USERS["bob"])
REPEATS = 5


def _image(label: str) -> Image:
    return make_image([make_layer(size=256, seed=label)], label=label)


def _pushed(edge_factory: EdgeFactory, label: str, repository: str) -> tuple[str, Image, str]:
    """A new edge with one image pushed as `repository:1.0`: its URL, the image and the tag's path."""
    edge = edge_factory()
    image = _image(label)
    push_image(edge.url, repository, image, "1.0", auth=ALICE)
    return edge.url, image, f"/v2/{repository}/manifests/1.0"


def _sample(metric: object, *labels: str, suffix: str = "_total") -> float:
    name = metric._name + suffix  # type: ignore[attr-defined]
    wanted = dict(zip(metric._labelnames, labels, strict=True))  # type: ignore[attr-defined]
    for family in metric.collect():  # type: ignore[attr-defined]
        for sample in family.samples:
            if sample.name == name and sample.labels.items() >= wanted.items():
                return float(sample.value)
    return 0.0


def test_repeats_are_counted_timed_and_get_their_own_request_ids(edge_factory: EdgeFactory) -> None:
    url, image, path = _pushed(edge_factory, "hot-count", "local/hot")
    hits = _sample(REQUESTS, "local", "manifest", "hit")
    timed = _sample(REQUEST_SECONDS, "manifest", "GET", suffix="_count")
    served = []
    with httpx.Client(base_url=url, headers=ACCEPT, timeout=10) as http:
        for _ in range(REPEATS):
            response = http.get(path)
            assert response.status_code == 200
            assert response.content == image.manifest
            assert response.headers["Docker-Content-Digest"] == image.digest
            assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
            served.append(response.headers["X-Request-Id"])
        assert http.get(path, headers={"X-Request-Id": "mine"}).headers["X-Request-Id"] == "mine"
    assert len(set(served)) == REPEATS
    assert _sample(REQUESTS, "local", "manifest", "hit") - hits == REPEATS + 1
    assert _sample(REQUEST_SECONDS, "manifest", "GET", suffix="_count") - timed == REPEATS + 1


def test_a_repeat_needs_the_same_credentials(edge_factory: EdgeFactory) -> None:
    url, image, path = _pushed(edge_factory, "hot-private", "private/hot")
    with httpx.Client(base_url=url, headers=ACCEPT, timeout=10) as http:
        for _ in range(REPEATS):
            assert http.get(path, auth=BOB).status_code == 200
        anonymous = http.get(path)
        assert anonymous.status_code == 401
        assert anonymous.json()["errors"][0]["code"] == "UNAUTHORIZED"
        assert http.get(path, auth=("bob", "wrong")).status_code == 401
        anonymous_token = http.get("/token", params={"service": "seawall"}).json()["token"]
        bearer = {"Authorization": f"Bearer {anonymous_token}"}
        assert http.get(path, headers=bearer).status_code == 401
        assert http.get(path, auth=BOB).content == image.manifest


def test_head_and_get_are_kept_apart(edge_factory: EdgeFactory) -> None:
    url, image, path = _pushed(edge_factory, "hot-head", "local/hothead")
    with httpx.Client(base_url=url, headers=ACCEPT, timeout=10) as http:
        for _ in range(REPEATS):
            head = http.head(path)
            assert head.status_code == 200
            assert head.content == b""
            assert int(head.headers["Content-Length"]) == len(image.manifest)
        for _ in range(REPEATS):
            assert http.get(path).content == image.manifest
        assert http.head(path).content == b""


def test_a_write_through_the_edge_is_served_at_once(edge_factory: EdgeFactory) -> None:
    edge = edge_factory()
    old, new = _image("hot-old"), _image("hot-new")
    push_image(edge.url, "local/hotmove", old, "1.0", auth=ALICE)
    path = "/v2/local/hotmove/manifests/1.0"
    with httpx.Client(base_url=edge.url, headers=ACCEPT, timeout=10) as http:
        for _ in range(REPEATS):
            assert http.get(path).headers["Docker-Content-Digest"] == old.digest
        push_image(edge.url, "local/hotmove", new, "1.0", auth=ALICE)
        assert http.get(path).headers["Docker-Content-Digest"] == new.digest
        for _ in range(REPEATS):
            assert http.get(path).status_code == 200
        assert http.delete(path, auth=ALICE).status_code == 202
        gone = http.get(path)
        assert gone.status_code == 404
        assert gone.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"


def test_an_answer_is_kept_until_the_earliest_local_entry_expires() -> None:
    cache: LocalCache[str, int] = LocalCache(ttl=1.0)
    cache.put("long", 1)
    cache.put("short", 2, ttl=0.25)
    tracked, token = validity.track()
    try:
        started = time.monotonic()
        assert cache.get("long") == 1
        assert cache.get("short") == 2
    finally:
        validity.untrack(token)
    assert tracked.complete
    assert 0.2 < tracked.keepable_for(started) <= 0.25
    # Tracking ends with the request: later lookups tell nobody.
    cache.get("missing")
    assert tracked.complete


def test_an_answer_that_read_anything_else_is_not_kept() -> None:
    cache: LocalCache[str, int] = LocalCache(ttl=1.0)
    cache.put("held", 1)
    cache.put("lapsed", 2, ttl=0.01)
    time.sleep(0.02)
    for missing in ("absent", "lapsed"):
        tracked, token = validity.track()
        try:
            assert cache.get("held") == 1
            assert cache.get(missing) is None
        finally:
            validity.untrack(token)
        assert not tracked.complete
        assert tracked.keepable_for(time.monotonic()) == 0.0
    tracked, token = validity.track()
    validity.untrack(token)
    assert tracked.keepable_for(time.monotonic()) == 0.0  # it depended on nothing that expires


def test_an_answer_is_never_kept_past_its_token() -> None:
    signer = TokenSigner(b"k" * 32, ttl=300)
    token_text = signer.issue(None, now=time.time() + 1.5 - 300)  # expires in 0.5 to 1.5 s
    expires = int(time.time() + 1.5)
    tracked, token = validity.track()
    try:
        assert signer.verify(token_text, {}) is None
    finally:
        validity.untrack(token)
    left = expires - time.time()
    assert abs(tracked.keepable_for(time.monotonic()) - left) < 0.1
    with pytest.raises(InvalidToken):
        signer.verify(token_text, {}, now=expires + 1)
