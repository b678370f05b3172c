"""Builders for real image content: layers as tar.gz, configs, manifests, indexes, OCI layouts."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def make_layer(files: dict[str, bytes] | None = None, *, size: int = 0, seed: str = "") -> bytes:
    """A gzipped tar layer; `size` adds a file of incompressible bytes of that length."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        contents = dict(files or {})
        if size:
            contents[f"payload-{seed}.bin"] = random_bytes(size, seed)
        for name, data in sorted(contents.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    # mtime=0 so the same files give the same digest.
    return gzip.compress(buffer.getvalue(), compresslevel=1, mtime=0)


def random_bytes(size: int, seed: str) -> bytes:
    """Incompressible, reproducible bytes (gzip cannot shrink them)."""
    return random.Random(seed).randbytes(size)


@dataclass
class Image:
    """An image's blobs and manifest, ready to push or to write as an OCI layout."""

    config: bytes
    layers: list[bytes]
    manifest: bytes
    blobs: dict[str, bytes] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return sha256(self.manifest)


def make_image(
    layers: list[bytes] | None = None,
    *,
    architecture: str = "amd64",
    os_name: str = "linux",
    label: str = "",
) -> Image:
    layers = layers if layers is not None else [make_layer({"hello.txt": f"hello {label}".encode()})]
    diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest() for layer in layers]
    config = canonical(
        {
            "architecture": architecture,
            "os": os_name,
            "config": {"Labels": {"seawall.test": label}} if label else {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    )
    manifest = canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": sha256(layer), "size": len(layer)} for layer in layers
            ],
        }
    )
    blobs = {sha256(config): config, **{sha256(layer): layer for layer in layers}}
    return Image(config, layers, manifest, blobs)


def make_index(images: list[tuple[Image, str, str]]) -> bytes:
    """An OCI index over (image, os, architecture) entries."""
    return canonical(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": image.digest,
                    "size": len(image.manifest),
                    "platform": {"os": os_name, "architecture": arch},
                }
                for image, os_name, arch in images
            ],
        }
    )


def write_oci_layout(
    path: Path, images: list[Image], index: bytes | None = None, tag: str = "latest"
) -> None:
    """An OCI image layout directory that `skopeo copy oci:<path>:<tag>` reads."""
    blob_dir = path / "blobs" / "sha256"
    blob_dir.mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    def put(data: bytes) -> None:
        target = blob_dir / sha256(data).removeprefix("sha256:")
        if not target.exists():
            target.write_bytes(data)

    for image in images:
        for data in [image.config, *image.layers, image.manifest]:
            put(data)
    if index is not None:
        put(index)
        top = {"mediaType": OCI_INDEX, "digest": sha256(index), "size": len(index)}
    else:
        top = {"mediaType": OCI_MANIFEST, "digest": images[0].digest, "size": len(images[0].manifest)}
    top["annotations"] = {"org.opencontainers.image.ref.name": tag}
    (path / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [top]})
    )


def layout_blob_paths(path: Path) -> list[str]:
    return sorted(os.listdir(path / "blobs" / "sha256"))
