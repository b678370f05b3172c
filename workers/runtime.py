"""Per-process resources for actors: settings and storage, opened on the worker's event loop."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from shared.blobs import BlobStore
from shared.logging import configure_logging
from shared.repositories import RepositoryStore
from shared.settings import Settings, load_settings
from shared.storage import ObjectStore
from shared.uploads import UploadStore


@cache
def settings() -> Settings:
    loaded = load_settings()
    configure_logging(loaded.log_format, loaded.log_level)
    return loaded


@dataclass(frozen=True)
class Stores:
    objects: ObjectStore
    blobs: BlobStore
    repositories: RepositoryStore
    uploads: UploadStore


@cache
def stores() -> Stores:
    s3 = settings().s3
    if s3 is None:
        raise RuntimeError("workers need s3 settings (set them, or start them with `seawall up`)")
    objects = ObjectStore(s3)
    blobs = BlobStore(objects)
    return Stores(objects, blobs, RepositoryStore(objects), UploadStore(objects, blobs))
