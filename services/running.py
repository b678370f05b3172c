"""How commands find a running `seawall up`: the files it leaves in `data_dir` naming its
embedded Redis and S3, read when the configuration names neither.

Kept apart from services/up.py and the commands' own modules, so that a short command (say,
`seawall replicate`) does not import the stack or the scrubber to start.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.settings import S3Settings, Settings


def embedded_s3_file(data_dir: Path) -> Path:
    """Where a running `seawall up` leaves its embedded S3's endpoint and keys (owner-only)."""
    return data_dir / "embedded-s3.json"


def embedded_redis_file(data_dir: Path) -> Path:
    return data_dir / "embedded-redis-url"


def s3_settings(settings: Settings) -> S3Settings:
    """The configured store, else the embedded one of a running `seawall up`."""
    if settings.s3 is not None:
        return settings.s3
    found = embedded_s3_file(settings.data_dir)
    if not found.is_file():
        raise ValueError("no s3 configured and no running `seawall up` found in data_dir")
    return S3Settings.model_validate(json.loads(found.read_text()))
