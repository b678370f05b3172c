"""Checks that a refused request was refused properly: its OCI error envelope, the edge's
count of errors by code, and a bucket that holds nothing new."""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
from minio import Minio

from tests.fixtures.edge import EdgeServer
from tests.support.raw_http import Raw


class Bucket:
    """The test's bucket as the minio client lists it, to prove nothing was stored."""

    def __init__(self, client: Minio, name: str) -> None:
        self.client = client
        self.name = name
        self.before: set[str] = set()

    def listing(self) -> set[str]:
        return {o.object_name for o in self.client.list_objects(self.name, recursive=True) if o.object_name}

    def snapshot(self) -> None:
        self.before = self.listing()

    def assert_unchanged(self, http: httpx.Client, live: dict[str, str] | None = None) -> None:
        """No object appeared or vanished, except objects of the live sessions in `live`
        (a session keeps its state under `uploads/<id>/` and its parts under `extents/<id>/`).

        `live` maps an upload id to its repository; a session with objects left must
        still answer its status request (it was not abandoned half-written).
        """
        live = live or {}
        now = self.listing()
        for key in sorted(now ^ self.before):
            session = key.startswith(("uploads/", "extents/"))
            assert session, f"{key} {'appeared' if key in now else 'vanished'}"
        for upload_id in {k.split("/")[1] for k in now - self.before}:
            assert upload_id in live, f"objects of unknown upload session {upload_id}"
            status = http.get(f"/v2/{live[upload_id]}/blobs/uploads/{upload_id}")
            assert status.status_code == 204, f"upload {upload_id} left objects but is not live"


def assert_error(response: httpx.Response | Raw, status: int, code: str) -> dict[str, Any]:
    """The status, and the OCI envelope naming `code` (HEAD answers carry no body)."""
    if isinstance(response, Raw):
        method, status_code, body = response.method, response.status, response.body
    else:
        method, status_code, body = response.request.method, response.status_code, response.content
    assert status_code == status, (status_code, body[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    if method == "HEAD":
        assert not body
        return {}
    envelope = json.loads(body)
    assert isinstance(envelope, dict)
    assert isinstance(envelope.get("errors"), list)
    assert envelope["errors"], envelope
    for error in envelope["errors"]:
        assert isinstance(error.get("code"), str), error
        assert isinstance(error.get("message"), str), error
    assert envelope["errors"][0]["code"] == code, envelope
    return envelope["errors"][0]


def error_count(edge: EdgeServer, code: str) -> float:
    """How many `code` errors the edge (in this process) has answered, from /metrics."""
    assert edge.metrics_url is not None
    text = httpx.get(f"{edge.metrics_url}/metrics", timeout=60).text
    match = re.search(rf'^seawall_errors_total\{{code="{code}"\}} (\S+)$', text, re.MULTILINE)
    return float(match[1]) if match else 0.0


def wait_for_errors(edge: EdgeServer, code: str, above: float, timeout: float = 15.0) -> None:
    """Wait until the edge has finished a request that failed with `code`.

    A client that hangs up gets no answer, so the metric is how the test learns that the
    handler has given up (and whatever it was writing has been aborted).
    """
    deadline = time.monotonic() + timeout
    while error_count(edge, code) <= above:
        assert time.monotonic() < deadline, f"the edge never answered {code}"
        time.sleep(0.05)
