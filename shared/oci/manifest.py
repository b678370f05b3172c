"""Parsing and validating manifests and indexes as received (the bytes are kept verbatim)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from shared.oci import mediatypes
from shared.oci.digest import Digest
from shared.oci.errors import RegistryError


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    platform: dict[str, Any] | None = None

    @classmethod
    def parse(cls, raw: Any, where: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise RegistryError("MANIFEST_INVALID", f"{where} must be a descriptor object")
        size = raw.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RegistryError("MANIFEST_INVALID", f"{where} has an invalid size")
        media_type = raw.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise RegistryError("MANIFEST_INVALID", f"{where} has no mediaType")
        digest_text = raw.get("digest")
        if not isinstance(digest_text, str):
            raise RegistryError("MANIFEST_INVALID", f"{where} has no digest")
        annotations = raw.get("annotations")
        platform = raw.get("platform")
        return cls(
            media_type=media_type,
            digest=Digest.parse(digest_text),
            size=size,
            artifact_type=raw.get("artifactType") if isinstance(raw.get("artifactType"), str) else None,
            annotations=annotations if isinstance(annotations, dict) else None,
            platform=platform if isinstance(platform, dict) else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        if self.annotations:
            out["annotations"] = self.annotations
        if self.platform:
            out["platform"] = self.platform
        return out


@dataclass(frozen=True, slots=True)
class Manifest:
    """What Seawall needs to know about a manifest; `raw` stays the exact bytes received."""

    raw: bytes
    media_type: str
    config: Descriptor | None = None
    layers: tuple[Descriptor, ...] = ()
    manifests: tuple[Descriptor, ...] = ()
    subject: Descriptor | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def is_index(self) -> bool:
        return self.media_type in mediatypes.INDEXES

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Descriptors that must exist as blobs before this manifest is accepted."""
        return ((self.config,) if self.config else ()) + self.layers

    @property
    def referrer_artifact_type(self) -> str | None:
        # image-spec: with no artifactType, a manifest's referrer type is its config's.
        if self.artifact_type:
            return self.artifact_type
        if self.config and not self.is_index:
            return self.config.media_type
        return None


def parse_manifest(raw: bytes, content_type: str | None) -> Manifest:
    """Validate a manifest body against its declared media type."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RegistryError("MANIFEST_INVALID", f"manifest is not valid JSON: {exc}") from None
    except RecursionError:
        # Thousands of nested arrays: valid JSON, but deeper than any manifest could be.
        raise RegistryError("MANIFEST_INVALID", "manifest JSON is nested too deeply") from None
    if not isinstance(document, dict):
        raise RegistryError("MANIFEST_INVALID", "manifest must be a JSON object")
    if document.get("schemaVersion") != 2:
        raise RegistryError("MANIFEST_INVALID", "only schemaVersion 2 manifests are supported")

    declared = (content_type or "").split(";")[0].strip().lower()
    body_type = document.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise RegistryError("MANIFEST_INVALID", "mediaType must be a string")
    if body_type and declared and declared in mediatypes.MANIFESTS and body_type != declared:
        raise RegistryError(
            "MANIFEST_INVALID",
            f"Content-Type {declared!r} does not match the manifest's mediaType {body_type!r}",
        )
    media_type = body_type or (declared if declared in mediatypes.MANIFESTS else None)
    if media_type is None:
        media_type = mediatypes.OCI_INDEX if "manifests" in document else mediatypes.OCI_MANIFEST
    if media_type not in mediatypes.MANIFESTS:
        raise RegistryError("MANIFEST_INVALID", f"unsupported manifest media type {media_type!r}")

    subject = document.get("subject")
    artifact_type = document.get("artifactType")
    annotations = document.get("annotations")
    common: dict[str, Any] = {
        "raw": raw,
        "media_type": media_type,
        "subject": Descriptor.parse(subject, "subject") if subject is not None else None,
        "artifact_type": artifact_type if isinstance(artifact_type, str) else None,
        "annotations": annotations if isinstance(annotations, dict) else {},
    }
    if media_type in mediatypes.INDEXES:
        children = document.get("manifests")
        if not isinstance(children, list):
            raise RegistryError("MANIFEST_INVALID", "an index needs a manifests array")
        return Manifest(
            manifests=tuple(Descriptor.parse(c, f"manifests[{i}]") for i, c in enumerate(children)),
            **common,
        )
    layers = document.get("layers")
    if not isinstance(layers, list):
        raise RegistryError("MANIFEST_INVALID", "an image manifest needs a layers array")
    return Manifest(
        config=Descriptor.parse(document.get("config"), "config"),
        layers=tuple(Descriptor.parse(layer, f"layers[{i}]") for i, layer in enumerate(layers)),
        **common,
    )
