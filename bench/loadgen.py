"""The benchmark's load generator, run as a process of its own so load never shares the server's CPU time
slice or event loop:

    python -m bench.loadgen get  URL [URL ...] -c 64 --duration 8 [-H 'Accept: ...']
    python -m bench.loadgen pull BASE_URL NAME:TAG -c 50 --requests 50 [--verify]
    python -m bench.loadgen ttfb URL

`get` repeats GETs (round robin over the URLs) on N concurrent connections for a duration or a
request count; bytes are counted as they arrive, so a run that ends inside a large body still
counts what it read. `pull` does what a client pull does, once per request: the manifest by tag,
then the config and layers (three at a time). `ttfb` times one streaming GET to its first body
byte. Bearer challenges (the Docker Hub emulator) are answered with an anonymous token fetched
before any timing starts. Prints one JSON object: requests, rps, bytes, mib_s, latency
percentiles (ms), errors, statuses; `ttfb` adds headers_s, ttfb_s and total_s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
import time
from collections import Counter
from typing import Any

import aiohttp
from yarl import URL

CHUNK = 1024 * 1024
ACCEPT = ", ".join(
    [
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]
)
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
_PARAM = re.compile(r'(\w+)="([^"]*)"')


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.bytes = 0
        self.errors = 0
        self.statuses: Counter[str] = Counter()
        self.error_samples: list[str] = []

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what[:300])


class Auth:
    """Anonymous bearer tokens per challenge scope, fetched once and shared by all workers."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._tokens: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def header(self, url: str) -> dict[str, str]:
        token = self._tokens.get(_repo_key(url))
        return {"Authorization": f"Bearer {token}"} if token else {}

    async def answer(self, url: str, challenge: str) -> bool:
        """Fetch a token for a Bearer challenge; False if it is not one we can answer."""
        if not challenge.lower().startswith("bearer "):
            return False
        params = dict(_PARAM.findall(challenge))
        realm = params.pop("realm", None)
        if realm is None:
            return False
        params.pop("error", None)
        async with self._lock:
            async with self._session.get(realm, params=params) as response:
                if response.status != 200:
                    return False
                body = await response.json(content_type=None)
            self._tokens[_repo_key(url)] = body.get("token") or body.get("access_token")
        return True


def _repo_key(url: str) -> str:
    """The repository part of a registry URL (tokens are scoped to a repository)."""
    path = URL(url).path
    for marker in ("/manifests/", "/blobs/", "/tags/"):
        if marker in path:
            return path.split(marker, 1)[0]
    return path


async def fetch(
    session: aiohttp.ClientSession,
    auth: Auth,
    url: str,
    headers: dict[str, str],
    stats: Stats,
    *,
    keep: bool = False,
    digest: str | None = None,
) -> tuple[int, bytes, str]:
    """GET url, reading the body in chunks and counting bytes; (status, body if keep, type)."""
    for _attempt in range(2):
        async with session.get(url, headers={**headers, **auth.header(url)}) as response:
            if response.status == 401 and await auth.answer(
                url, response.headers.get("WWW-Authenticate", "")
            ):
                await response.read()
                continue
            stats.statuses[str(response.status)] += 1
            hasher = hashlib.sha256() if digest else None
            parts: list[bytes] = []
            while True:
                chunk = await response.content.readany()
                if not chunk:
                    break
                stats.bytes += len(chunk)
                if hasher is not None:
                    hasher.update(chunk)
                if keep:
                    parts.append(chunk)
            if hasher is not None and response.status == 200 and f"sha256:{hasher.hexdigest()}" != digest:
                raise ValueError(f"digest mismatch on {url}")
            return response.status, b"".join(parts), response.headers.get("Content-Type", "")
    return 401, b"", ""


async def one_get(
    session: aiohttp.ClientSession, auth: Auth, url: str, headers: dict[str, str], stats: Stats
) -> bool:
    status, _, _ = await fetch(session, auth, url, headers, stats)
    if status >= 400:
        stats.error(f"GET {url}: {status}")
        return False
    return True


async def one_pull(
    session: aiohttp.ClientSession, auth: Auth, base: str, ref: str, stats: Stats, verify: bool
) -> bool:
    name, _, tag = ref.rpartition(":")
    manifest_url = f"{base}/v2/{name}/manifests/{tag}"
    status, body, media_type = await fetch(session, auth, manifest_url, {"Accept": ACCEPT}, stats, keep=True)
    if status != 200:
        stats.error(f"GET {manifest_url}: {status} {body[:200]!r}")
        return False
    manifest = json.loads(body)
    if media_type.split(";")[0] in INDEX_TYPES or "manifests" in manifest:
        digest = manifest["manifests"][0]["digest"]
        url = f"{base}/v2/{name}/manifests/{digest}"
        status, body, _ = await fetch(session, auth, url, {"Accept": ACCEPT}, stats, keep=True)
        if status != 200:
            stats.error(f"GET {url}: {status}")
            return False
        manifest = json.loads(body)
    digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    gate = asyncio.Semaphore(3)  # docker and containerd fetch three layers at a time

    async def blob(digest: str) -> bool:
        async with gate:
            url = f"{base}/v2/{name}/blobs/{digest}"
            status, _, _ = await fetch(session, auth, url, {}, stats, digest=digest if verify else None)
            if status != 200:
                stats.error(f"GET {url}: {status}")
            return status == 200

    return all(await asyncio.gather(*(blob(d) for d in digests)))


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    headers = dict(h.split(":", 1) for h in args.header)
    headers = {k.strip(): v.strip() for k, v in headers.items()}
    stats = Stats()
    connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        auth = Auth(session)
        targets = args.target
        if args.mode == "pull":
            base, ref = targets[0].rstrip("/"), targets[1]

            async def request(i: int) -> bool:
                return await one_pull(session, auth, base, ref, stats, args.verify)
        else:
            # Answer any token challenge now, outside the timed part.
            if args.warmup_auth:
                await fetch(session, auth, targets[0], headers, Stats())

            async def request(i: int) -> bool:
                return await one_get(session, auth, targets[i % len(targets)], headers, stats)

        issued = 0
        started = time.perf_counter()
        deadline = started + args.duration if args.duration else None

        def next_index() -> int | None:
            nonlocal issued
            if args.requests and issued >= args.requests:
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            issued += 1
            return issued - 1

        async def worker() -> None:
            while (i := next_index()) is not None:
                t0 = time.perf_counter()
                try:
                    ok = await request(i)
                except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as exc:
                    stats.error(f"{type(exc).__name__}: {exc}")
                    continue
                if ok:
                    stats.latencies.append(time.perf_counter() - t0)

        workers = [asyncio.create_task(worker()) for _ in range(args.connections)]
        if deadline is not None:
            # Requests still in flight at the deadline are cut; their bytes so far count.
            done, pending = await asyncio.wait(workers, timeout=args.duration)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()
        else:
            await asyncio.gather(*workers)
        elapsed = time.perf_counter() - started
    return summary(stats, elapsed)


def summary(stats: Stats, elapsed: float) -> dict[str, Any]:
    lat = sorted(stats.latencies)

    def pct(p: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 3) if lat else None

    return {
        "requests": len(lat),
        "elapsed_s": round(elapsed, 4),
        "rps": round(len(lat) / elapsed, 2) if elapsed else 0.0,
        "bytes": stats.bytes,
        "mib_s": round(stats.bytes / elapsed / 2**20, 2) if elapsed else 0.0,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": pct(100)},
        "errors": stats.errors,
        "error_samples": stats.error_samples,
        "statuses": dict(stats.statuses),
    }


async def run_ttfb(args: argparse.Namespace) -> dict[str, Any]:
    url = args.target[0]
    headers = {k.strip(): v.strip() for k, v in (h.split(":", 1) for h in args.header)}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as tokens:
        auth = Auth(tokens)
        # A HEAD answers the challenge: the token is in hand before the clock starts.
        async with tokens.head(url, headers=headers) as probe:
            if probe.status == 401:
                await auth.answer(url, probe.headers.get("WWW-Authenticate", ""))
    # A fresh session: the timed request opens its own connection, like a client would.
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        started = time.perf_counter()
        async with session.get(url, headers={**headers, **auth.header(url)}) as response:
            headers_s = time.perf_counter() - started
            first = await response.content.readany()
            ttfb_s = time.perf_counter() - started
            total = len(first)
            while args.read_all and (chunk := await response.content.readany()):
                total += len(chunk)
            total_s = time.perf_counter() - started
            return {
                "status": response.status,
                "headers_s": round(headers_s, 5),
                "ttfb_s": round(ttfb_s, 5),
                "total_s": round(total_s, 4),
                "bytes": total,
                "cache": response.headers.get("X-Seawall-Cache"),
            }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["get", "pull", "ttfb"])
    parser.add_argument("target", nargs="+", help="URLs (get, ttfb) or BASE_URL NAME:TAG (pull)")
    parser.add_argument("-c", "--connections", type=int, default=1)
    parser.add_argument("-d", "--duration", type=float, default=0.0, help="seconds (0: until --requests)")
    parser.add_argument("-n", "--requests", type=int, default=0, help="request (or pull) count")
    parser.add_argument("-H", "--header", action="append", default=[], metavar="NAME: VALUE")
    parser.add_argument("--verify", action="store_true", help="pull: check every blob's sha256")
    parser.add_argument("--timeout", type=float, default=120.0, help="socket read timeout, seconds")
    parser.add_argument("--no-warmup-auth", dest="warmup_auth", action="store_false")
    parser.add_argument(
        "--no-read-all", dest="read_all", action="store_false", help="ttfb: stop at the first byte"
    )
    args = parser.parse_args(argv)
    if args.mode != "ttfb" and not (args.duration or args.requests):
        parser.error("give --duration or --requests")
    if args.mode == "pull" and len(args.target) != 2:
        parser.error("pull takes BASE_URL NAME:TAG")
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    coroutine = run_ttfb(args) if args.mode == "ttfb" else run_load(args)
    result = asyncio.run(coroutine)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
