"""Content digests (`algorithm:hex`) and incremental hashing of streamed bytes."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from shared.oci.errors import RegistryError

# The OCI image-spec's registered algorithms and their exact encoded lengths.
_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^([a-z0-9]+(?:[+._-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, value: str) -> Digest:
        """Parse and validate; anything malformed or unsupported is DIGEST_INVALID."""
        match = _DIGEST.match(value or "")
        if not match:
            raise RegistryError("DIGEST_INVALID", f"invalid digest {value[:200]!r}")
        algorithm, encoded = match[1], match[2]
        length = _ALGORITHMS.get(algorithm)
        if length is None:
            raise RegistryError("DIGEST_INVALID", f"unsupported digest algorithm {algorithm!r}")
        if len(encoded) != length or not re.fullmatch(r"[a-f0-9]+", encoded):
            raise RegistryError("DIGEST_INVALID", f"invalid {algorithm} digest {value[:200]!r}")
        return cls(algorithm, encoded)

    @classmethod
    def is_digest(cls, value: str) -> bool:
        return ":" in value

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"
