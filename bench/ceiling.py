"""The framework's ceiling for P1: a bare aiohttp app answering every manifest GET with fixed bytes.

No middleware, routing by one pattern, no lookups, no metrics, no access log: what aiohttp
itself costs, on the edge's event loop (uvloop), to answer the same GET with the same body,
Content-Type and digest headers on this machine. P1 runs it alternately with Seawall
(`python -m bench.ceiling`, a process of its own like every server of the bench).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

from aiohttp import web

from bench.stack import TIMEOUT
from services.processes import ManagedProcess, free_port
from shared.eventloop import use_uvloop


def make_app(body: bytes, media_type: str) -> web.Application:
    headers = {
        "Content-Type": media_type,
        "Docker-Content-Digest": f"sha256:{hashlib.sha256(body).hexdigest()}",
    }

    async def manifest(request: web.Request) -> web.Response:
        return web.Response(body=body, headers=headers)

    app = web.Application()
    app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifest)
    return app


class Ceiling(ManagedProcess):
    """The bare app as a process on a free port, serving `body` as `media_type`."""

    def __init__(self, body: bytes, media_type: str, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        body_file = work / "ceiling-body"
        body_file.write_bytes(body)
        argv = [
            sys.executable, "-m", "bench.ceiling",
            "--port", str(self.port), "--body", str(body_file), "--media-type", media_type,
        ]  # fmt: skip
        super().__init__("ceiling", argv, work / "ceiling.log", {**os.environ, "PYTHONUNBUFFERED": "1"})
        self.wait_ready(self._answers, TIMEOUT, "ceiling")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/x/manifests/1", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True)
    parser.add_argument("--media-type", required=True)
    args = parser.parse_args()
    app = make_app(args.body.read_bytes(), args.media_type)
    use_uvloop()  # the edge's loop
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
