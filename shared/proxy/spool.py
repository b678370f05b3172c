"""Fills spooled to local disk, so the edges beside the worker stream them at disk speed.

A worker writes the upstream's bytes to `<cache>/spool/<alg>/<hex>` as they arrive (hashed
on the way), and cuts the bucket's segments from that file in the background: a slow
bucket then holds back neither the download nor the clients. The fill's state names the
spool's node, a random id kept in the directory; an edge that finds the same id in its
own spool directory shares the disk and reads the file directly. Other edges follow the
staged segments in the bucket. Once the blob is committed the file moves into the disk
tier (or is deleted), so the spool only ever holds fills in flight or interrupted.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from shared.oci.digest import Digest


class Spool:
    """The spool directory of this machine; `create=False` (edges) only looks for the one
    a worker made, so an edge alone writes nothing to disk."""

    def __init__(self, root: Path, *, create: bool = True) -> None:
        self.dir = root / "spool"
        self._node: str | None = None
        if create:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._node = self._create_node_id()

    def _create_node_id(self) -> str:
        """This directory's id, created by whichever process comes first."""
        file = self.dir / "node"
        with contextlib.suppress(FileNotFoundError):
            return file.read_text().strip()
        candidate = self.dir / f".node-{secrets.token_hex(8)}"
        candidate.write_text(secrets.token_hex(16))
        with contextlib.suppress(FileExistsError):
            os.link(candidate, file)  # atomic: exactly one candidate becomes the id
        candidate.unlink()
        return file.read_text().strip()

    @property
    def node(self) -> str | None:
        if self._node is None:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                self._node = (self.dir / "node").read_text().strip() or None
        return self._node

    def path(self, digest: Digest) -> Path:
        return self.dir / digest.algorithm / digest.hex

    def is_local(self, node: str | None) -> bool:
        return node is not None and node == self.node
