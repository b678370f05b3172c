"""Put images into a registry over HTTP (monolithic uploads), for upstreams and hosted projects."""

from __future__ import annotations

import httpx

from tests.support.images import OCI_INDEX, OCI_MANIFEST, Image


def push_blob(client: httpx.Client, repo: str, digest: str, data: bytes) -> None:
    if client.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
        return
    started = client.post(f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    separator = "&" if "?" in location else "?"
    done = client.put(
        f"{location}{separator}digest={digest}",
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert done.status_code == 201, done.text


def push_manifest(client: httpx.Client, repo: str, reference: str, body: bytes, media_type: str) -> None:
    response = client.put(
        f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type}
    )
    assert response.status_code == 201, response.text


def push_image(
    base_url: str, repo: str, image: Image, tag: str | None = "latest", auth: tuple[str, str] | None = None
) -> None:
    with httpx.Client(base_url=base_url, auth=auth, timeout=60) as client:
        for digest, data in image.blobs.items():
            push_blob(client, repo, digest, data)
        push_manifest(client, repo, tag or image.digest, image.manifest, OCI_MANIFEST)


def push_index(
    base_url: str,
    repo: str,
    images: list[Image],
    index: bytes,
    tag: str = "latest",
    auth: tuple[str, str] | None = None,
) -> None:
    for image in images:
        push_image(base_url, repo, image, tag=None, auth=auth)
    with httpx.Client(base_url=base_url, auth=auth, timeout=60) as client:
        push_manifest(client, repo, tag, index, OCI_INDEX)
