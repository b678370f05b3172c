"""Reading and writing the test bucket directly, behind the registry's back (to damage it)."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from services.embedded import S3Server
from shared.oci.digest import Digest
from shared.registry import layout


def objects(s3_server: S3Server, bucket: str, prefix: str) -> list[str]:
    return [o.object_name or "" for o in s3_server.client().list_objects(bucket, prefix, recursive=True)]


def read(s3_server: S3Server, bucket: str, key: str) -> bytes:
    response = s3_server.client().get_object(bucket, key)
    try:
        return bytes(response.read())
    finally:
        response.close()
        response.release_conn()


def write(s3_server: S3Server, bucket: str, key: str, data: bytes, **kwargs: Any) -> None:
    s3_server.client().put_object(bucket, key, io.BytesIO(data), len(data), **kwargs)


def damage(s3_server: S3Server, bucket: str, digest: str) -> tuple[str, bytes]:
    """Overwrite the bytes of a stored one-extent blob with others of the same length."""
    record = json.loads(read(s3_server, bucket, layout.blob(Digest.parse(digest))))
    [(key, size)] = record["extents"]
    damaged = os.urandom(size)
    write(s3_server, bucket, key, damaged)
    return key, damaged
