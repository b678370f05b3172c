"""What the Docker Hub emulator's own tests pull through it: a Distribution seeded with
`library/alpine` (schema 2, one 300 KiB layer) and `library/multi` (an OCI index of two
platforms), and the bearer-token dance a client does against the emulator."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import httpx

from tests.support.images import OCI_INDEX, OCI_MANIFEST, sha256

REPO = "library/alpine"
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT_ALL = ", ".join([SCHEMA2, OCI_MANIFEST, OCI_INDEX])
ALPINE_MANIFEST = f"/v2/{REPO}/manifests/latest"
PLATFORMS = ("amd64", "arm64")


@dataclass
class Seeded:
    """The seeded registry's URL and the digests (and layer bytes) the tests check against."""

    url: str
    manifest_digest: str
    layer: bytes
    layer_digest: str
    index_digest: str
    platform_digests: list[str]


def push_blob(client: httpx.Client, name: str, data: bytes) -> str:
    digest = sha256(data)
    r = client.post(f"/v2/{name}/blobs/uploads/")
    assert r.status_code == 202, r.text
    location = httpx.URL(r.headers["Location"]).copy_merge_params({"digest": digest})
    r = client.put(location, content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return digest


def push_manifest(client: httpx.Client, name: str, ref: str, doc: dict[str, Any], media_type: str) -> str:
    body = json.dumps(doc).encode()
    r = client.put(f"/v2/{name}/manifests/{ref}", content=body, headers={"Content-Type": media_type})
    assert r.status_code == 201, r.text
    return sha256(body)


def push_image(client: httpx.Client, name: str, layer: bytes, arch: str, media_type: str) -> str:
    """An image of one (raw, not gzipped) layer, by digest: the manifest's digest."""
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]},
        }
    ).encode()
    oci = media_type == OCI_MANIFEST
    doc = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json"
            if oci
            else "application/vnd.docker.container.image.v1+json",
            "size": len(config),
            "digest": push_blob(client, name, config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"
                if oci
                else "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": len(layer),
                "digest": push_blob(client, name, layer),
            }
        ],
    }
    return push_manifest(client, name, sha256(json.dumps(doc).encode()), doc, media_type)


def seed(url: str) -> Seeded:
    """Push `library/alpine:latest` and the two-platform `library/multi:latest` to the registry at url."""
    with httpx.Client(base_url=url, timeout=10) as client:
        layer = os.urandom(300 * 1024)
        manifest = push_image(client, REPO, layer, "amd64", SCHEMA2)
        client.put(
            f"/v2/{REPO}/manifests/latest",
            content=client.get(f"/v2/{REPO}/manifests/{manifest}", headers={"Accept": SCHEMA2}).content,
            headers={"Content-Type": SCHEMA2},
        ).raise_for_status()
        platforms = [
            push_image(client, "library/multi", os.urandom(1024), arch, OCI_MANIFEST) for arch in PLATFORMS
        ]
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": d,
                    "size": len(
                        client.get(
                            f"/v2/library/multi/manifests/{d}", headers={"Accept": OCI_MANIFEST}
                        ).content
                    ),
                    "platform": {"architecture": arch, "os": "linux"},
                }
                for d, arch in zip(platforms, PLATFORMS, strict=True)
            ],
        }
        index_digest = push_manifest(client, "library/multi", "latest", index, OCI_INDEX)
    return Seeded(url, manifest, layer, sha256(layer), index_digest, platforms)


def token(client: httpx.Client, *scopes: str, auth: tuple[str, str] | None = None) -> str:
    """A token from the emulator's /token for scopes, anonymous unless auth is given."""
    params: list[tuple[str, str | int | float | bool | None]] = [("service", "registry.docker.io")]
    params += [("scope", s) for s in scopes]
    r = client.get("/token", params=params, auth=auth)
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def bearer(client: httpx.Client, repo: str = REPO, auth: tuple[str, str] | None = None) -> dict[str, str]:
    """Headers that pull repo: a bearer token for it and an Accept of every manifest type."""
    return {
        "Authorization": "Bearer " + token(client, f"repository:{repo}:pull", auth=auth),
        "Accept": ACCEPT_ALL,
    }
