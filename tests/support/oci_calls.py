"""Registry calls that set up a case against the edge, through an httpx client whose
base_url is the edge: monolithic blob pushes, image pushes, an upload session, the catalog."""

from __future__ import annotations

import httpx

from tests.support.images import OCI_MANIFEST, Image, sha256


def push_blob(http: httpx.Client, repo: str, data: bytes) -> str:
    digest = sha256(data)
    response = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert response.status_code == 201, response.text
    return digest


def push_image(http: httpx.Client, repo: str, image: Image, tag: str | None = None) -> None:
    for data in image.blobs.values():
        push_blob(http, repo, data)
    response = http.put(
        f"/v2/{repo}/manifests/{tag or image.digest}",
        content=image.manifest,
        headers={"Content-Type": OCI_MANIFEST},
    )
    assert response.status_code == 201, response.text


def catalog(http: httpx.Client) -> list[str]:
    return list(http.get("/v2/_catalog").json()["repositories"])


def start_upload(http: httpx.Client, repo: str) -> str:
    response = http.post(f"/v2/{repo}/blobs/uploads/")
    assert response.status_code == 202, response.text
    return str(response.headers["Docker-Upload-UUID"])
