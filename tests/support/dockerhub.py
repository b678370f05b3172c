"""A Docker Hub (registry-1.docker.io + auth.docker.io) emulator in front of a real Distribution.

An aiohttp reverse proxy that adds what Docker Hub does and Distribution does not: bearer-token
auth with a /token endpoint, the pull quota (a manifest GET is a pull; HEAD and blob GETs are
free) with its `ratelimit-*` headers and 429s, and scriptable upstream trouble. Tests count
exactly what reached "Docker Hub":

    with DockerHubEmulator(registry_url) as hub:
        ...  # point the code under test at hub.url
        assert hub.count("GET", "manifest") == 2

Names are not rewritten: Docker Hub's official images live at `library/<x>`, so the client must
ask for `/v2/library/alpine/...`. Run standalone (for benchmarks) with
`python -m tests.support.dockerhub --upstream URL --port N`; its control API lives under
`/_emulator/` and calls the same `HubState` methods the in-process API does.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import re
import signal
import threading
import time
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from tests.support.dockerhub_faults import (
    ANONYMOUS,
    CONTROL_METHODS,
    TOOMANYREQUESTS_MESSAGE,
    Fault,
    HubState,
    RequestRecord,
    retry_after_value,
)

SERVICE = "registry.docker.io"
INDEX_MEDIA_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
        "date",
        "server",
    }
)
ERROR_CODES = {
    401: "UNAUTHORIZED",
    403: "DENIED",
    404: "NOT_FOUND",
    429: "TOOMANYREQUESTS",
    503: "UNAVAILABLE",
}
CHUNK = 64 * 1024
_INVERT = bytes(255 - i for i in range(256))

_NAME = r"(?P<name>[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*)"
_ROUTES = [
    ("manifest", re.compile(rf"^/v2/{_NAME}/manifests/(?P<ref>[^/]+)$")),
    ("other", re.compile(rf"^/v2/{_NAME}/blobs/uploads(?:/.*)?$")),
    ("blob", re.compile(rf"^/v2/{_NAME}/blobs/(?P<digest>[A-Za-z0-9_+.-]+:[A-Za-z0-9=_-]+)$")),
    ("tags", re.compile(rf"^/v2/{_NAME}/tags/list$")),
    ("other", re.compile(rf"^/v2/{_NAME}/(?:referrers|blobs)/.*$")),
]


def classify(path: str) -> tuple[str, str | None, str | None]:
    """(kind, repository name, blob digest) of a request path."""
    if path == "/token":
        return "token", None, None
    if path in ("/v2", "/v2/"):
        return "base", None, None
    for kind, pattern in _ROUTES:
        m = pattern.match(path)
        if m:
            return kind, m.group("name"), m.groupdict().get("digest")
    return "other", None, None


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


def _registry_error(status: int, message: str, detail: Any = None) -> dict[str, Any]:
    code = ERROR_CODES.get(status, "UNKNOWN")
    return {"errors": [{"code": code, "message": message, "detail": detail}]}


class DockerHubEmulator(HubState):
    """Docker Hub in front of `upstream_url`, served from a background thread on 127.0.0.1."""

    def __init__(
        self,
        upstream_url: str,
        *,
        quota_limit: int = 100,
        window_seconds: float = 21600,
        token_ttl: float = 60,
        accounts: dict[str, str] | None = None,
        port: int = 0,
        require_auth: bool = True,
        count_index_gets: bool = False,
        shutdown_timeout: float = 0.5,
    ) -> None:
        super().__init__(
            quota_limit=quota_limit,
            window_seconds=window_seconds,
            token_ttl=token_ttl,
            accounts=accounts,
            count_index_gets=count_index_gets,
        )
        self.upstream = upstream_url.rstrip("/")
        self.require_auth = require_auth
        self.port = port
        self._shutdown_timeout = shutdown_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._startup_error: BaseException | None = None

    # --------------------------------------------------------------- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> DockerHubEmulator:
        """Serve in a background thread; a restart reuses the port of the first start."""
        if self._thread is not None:
            raise RuntimeError("emulator already running")
        ready = threading.Event()
        self._startup_error = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._serve, args=(ready,), daemon=True, name=f"dockerhub-emulator-{self.port}"
        )
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("emulator did not start within 30s")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        return self

    def stop(self) -> None:
        """Stop listening (connections are then refused); in-flight requests are cut."""
        thread, loop = self._thread, self._loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> DockerHubEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _serve(self, ready: threading.Event) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        try:
            try:
                loop.run_until_complete(self._astart())
            except BaseException as exc:
                self._startup_error = exc
                loop.run_until_complete(self._astop())
                return
            finally:
                ready.set()
            loop.run_forever()
            loop.run_until_complete(self._astop())
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _astart(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
            auto_decompress=False,
        )
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---------------------------------------------------------------- requests
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return await self._control(request)
        kind, name, digest = classify(request.path)
        headers = request.headers
        rec = self.record(
            RequestRecord(
                request.method,
                request.path,
                kind,
                time.time(),
                name=name,
                range=headers.get("Range"),
                accept=", ".join(headers.getall("Accept", [])) or None,
                user_agent=headers.get("User-Agent"),
            )
        )
        started = time.monotonic()
        try:
            resp = await self._dispatch(request, rec, kind, name, digest)
            rec.status = resp.status if rec.status is None else rec.status
            return resp
        except (ConnectionError, asyncio.CancelledError):
            rec.status = rec.status if rec.status is not None else 0
            raise
        finally:
            rec.duration = time.monotonic() - started

    async def _dispatch(
        self,
        request: web.Request,
        rec: RequestRecord,
        kind: str,
        name: str | None,
        digest: str | None,
    ) -> web.StreamResponse:
        if self.abuse_exceeded():
            rec.fault = "abuse"
            return web.Response(status=429, text="Too Many Requests", content_type="text/plain")
        identity = ANONYMOUS
        if kind == "token":
            pass  # the token endpoint authenticates with Basic credentials itself
        elif not request.path.startswith("/v2"):
            return _json(404, _registry_error(404, "page not found"))
        elif self.require_auth:
            who = self._authorize(request, name)
            if isinstance(who, web.Response):
                return who
            identity = who
        rec.identity = identity
        delay = self.take_stall(request.method, kind)
        if delay:
            rec.fault = f"stall:{delay:g}"
            await asyncio.sleep(delay)
        fault = self.take_fault(request.method, kind, request.path)
        if fault is not None:
            return self._fault_response(request, rec, fault)
        if kind == "token":
            return self._token(request, rec)
        return await self._proxy(request, rec, kind, digest, identity)

    # -------------------------------------------------------------------- auth
    def _challenge(self, scope: str | None, error: str | None, detail: Any) -> web.Response:
        value = f'Bearer realm="{self.url}/token",service="{SERVICE}"'
        if scope:
            value += f',scope="{scope}"'
        if error:
            value += f',error="{error}"'
        body = _registry_error(401, "authentication required", detail)
        headers = {"WWW-Authenticate": value, "Docker-Distribution-Api-Version": "registry/2.0"}
        return _json(401, body, headers)

    def _authorize(self, request: web.Request, name: str | None) -> str | web.Response:
        method = request.method
        need = "pull" if method in ("GET", "HEAD") else "delete" if method == "DELETE" else "push"
        asked = "pull,push" if need == "push" else need
        scope = f"repository:{name}:{asked}" if name else None
        detail = [{"Type": "repository", "Class": "", "Name": name, "Action": need}] if name else None
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() != "bearer ":
            return self._challenge(scope, None, detail)
        info = self.lookup_token(auth[7:].strip())
        if info is None:
            return self._challenge(scope, "invalid_token", detail)
        if name is not None and not info.scopes.get(name, set()) & {need, "*"}:
            return self._challenge(scope, "insufficient_scope", detail)
        return info.identity

    def _token(self, request: web.Request, rec: RequestRecord) -> web.Response:
        if request.method != "GET":
            return _json(405, {"details": "method not allowed"})
        identity = ANONYMOUS
        auth = request.headers.get("Authorization", "")
        if auth[:6].lower() == "basic ":
            try:
                user, _, password = base64.b64decode(auth[6:].strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user, password = "", ""
            if not self.check_credentials(user, password):
                return _json(401, {"details": "incorrect username or password"})
            identity = user
        rec.identity = identity
        service = request.query.get("service")
        if service is not None and service != SERVICE:
            return _json(400, {"details": f"unknown service {service!r}"})
        allowed = {"pull"} if identity == ANONYMOUS else {"pull", "push", "delete", "*"}
        scopes: dict[str, set[str]] = {}
        for raw in request.query.getall("scope", []):
            for item in raw.split():
                rtype, _, rest = item.partition(":")
                rname, _, actions = rest.rpartition(":")
                if rtype.split("(")[0] == "repository" and rname:
                    granted = set(actions.split(",")) & allowed
                    scopes.setdefault(rname, set()).update(granted)
        token, info = self.issue_token(identity, scopes)
        return _json(
            200,
            {
                "token": token,
                "access_token": token,
                "expires_in": int(info.expires_at - info.issued_at),
                "issued_at": self.iso8601(info.issued_at),
            },
        )

    # ------------------------------------------------------------------ faults
    def _fault_response(self, request: web.Request, rec: RequestRecord, fault: Fault) -> web.StreamResponse:
        rec.fault = f"fail:{fault.status}"
        if fault.status == 0:  # drop the connection without an answer
            rec.status = 0
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)
        headers = dict(fault.headers or {})
        retry = retry_after_value(fault.retry_after, fault.retry_after_format)
        if retry is not None:
            headers["Retry-After"] = retry
        body = fault.body
        if body is None and fault.status == 429 and fault.plain_text:
            body = "Too Many Requests"
        elif body is None and fault.status == 429:
            body = {"errors": [{"code": "TOOMANYREQUESTS", "message": TOOMANYREQUESTS_MESSAGE}]}
        elif body is None:
            body = _registry_error(fault.status, f"emulated failure {fault.status}")
        if isinstance(body, dict | list):
            return _json(fault.status, body, headers)
        if isinstance(body, bytes):
            return web.Response(
                status=fault.status,
                body=body,
                headers=headers,
                content_type="application/octet-stream",
            )
        return web.Response(status=fault.status, text=str(body), headers=headers, content_type="text/plain")

    def _quota_headers(self, identity: str, remaining: int | None, ip: str | None) -> dict[str, str]:
        policy = self.policy(identity)
        if not policy.send_headers or remaining is None:
            return {}
        window = f"w={policy.window:g}"
        return {
            "ratelimit-limit": f"{policy.limit};{window}",
            "ratelimit-remaining": f"{remaining};{window}",
            "docker-ratelimit-source": (ip or "127.0.0.1") if identity == ANONYMOUS else identity,
        }

    # ------------------------------------------------------------------- proxy
    async def _proxy(
        self,
        request: web.Request,
        rec: RequestRecord,
        kind: str,
        digest: str | None,
        identity: str,
    ) -> web.StreamResponse:
        method = request.method
        quota: dict[str, str] = {}
        charged = False
        if kind == "manifest" and method == "GET":
            allowed, remaining, wait = self.reserve_pull(identity)
            quota = self._quota_headers(identity, remaining, request.remote)
            if not allowed:
                rec.fault = "quota"
                retry_format = self.policy(identity).retry_after
                if retry_format is not None:
                    quota["Retry-After"] = str(retry_after_value(wait, retry_format))
                body = {"errors": [{"code": "TOOMANYREQUESTS", "message": TOOMANYREQUESTS_MESSAGE}]}
                return _json(429, body, quota)
            charged = True
        elif kind == "manifest" and method == "HEAD":
            quota = self._quota_headers(identity, self.remaining(identity), request.remote)

        assert self._session is not None
        out_headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        skip = {
            h for h in ("Accept", "Accept-Encoding", "User-Agent", "Content-Type") if h not in request.headers
        }
        url = URL(self.upstream + request.raw_path, encoded=True)
        resp: web.StreamResponse | None = None
        try:
            async with self._session.request(
                method,
                url,
                headers=out_headers,
                skip_auto_headers=skip,
                allow_redirects=False,
                data=request.content if request.body_exists else None,
            ) as up:
                media_type = up.headers.get("Content-Type", "").split(";")[0].strip()
                if charged and (
                    not 200 <= up.status < 300
                    or (media_type in INDEX_MEDIA_TYPES and not self.count_index_gets)
                ):
                    self.refund_pull(identity)
                    quota = self._quota_headers(identity, self.remaining(identity), request.remote)
                resp = web.StreamResponse(status=up.status, reason=up.reason)
                for k, v in up.headers.items():
                    if k.lower() in HOP_BY_HOP:
                        continue
                    if k.lower() == "location" and v.startswith(self.upstream):
                        v = self.url + v[len(self.upstream) :]
                    resp.headers.add(k, v)
                resp.headers.update(quota)
                rec.status = up.status
                await resp.prepare(request)
                if method != "HEAD":
                    effects = self.blob_effects(digest) if kind == "blob" and digest else None
                    if effects is not None and up.status in (200, 206):
                        if await self._stream_blob(request, resp, up, rec, effects):
                            return resp  # cut: aiohttp sees the closed transport and stops
                    else:
                        async for chunk in up.content.iter_chunked(CHUNK):
                            await resp.write(chunk)
                            rec.bytes_sent += len(chunk)
                await resp.write_eof()
                return resp
        except aiohttp.ClientConnectionError as exc:
            if resp is not None and resp.prepared:
                # upstream died mid-body, or our client went away: drop the connection
                if request.transport is not None:
                    request.transport.close()
                return resp
            if charged:
                self.refund_pull(identity)
            rec.fault = rec.fault or "upstream-unreachable"
            return _json(502, _registry_error(502, f"upstream unreachable: {exc}"))

    async def _stream_blob(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        up: aiohttp.ClientResponse,
        rec: RequestRecord,
        effects: Any,
    ) -> bool:
        """Stream a blob body with the scripted effects; True if the connection was cut."""
        rate = effects.bytes_per_second
        piece = max(1, int(rate // 20)) if rate else CHUNK
        if effects.corrupt:
            rec.fault = "corrupt"
        started = time.monotonic()
        async for chunk in up.content.iter_chunked(CHUNK):
            for i in range(0, len(chunk), piece):
                data = chunk[i : i + piece]
                if effects.corrupt:
                    data = data.translate(_INVERT)
                if effects.cut_after is not None and rec.bytes_sent + len(data) >= effects.cut_after:
                    data = data[: effects.cut_after - rec.bytes_sent]
                    await resp.write(data)
                    rec.bytes_sent += len(data)
                    rec.fault = f"cut:{effects.cut_after}"
                    if request.transport is not None:
                        request.transport.close()  # flushes what was written, then closes
                    return True
                await resp.write(data)
                rec.bytes_sent += len(data)
                if rate:
                    ahead = rec.bytes_sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        return False

    # ------------------------------------------------------------- control API
    async def _control(self, request: web.Request) -> web.Response:
        op = request.path[len("/_emulator/") :].strip("/")
        method = request.method
        try:
            payload: Any = await request.json() if request.body_exists else {}
            if not isinstance(payload, dict):
                raise TypeError("the JSON body must be an object of keyword arguments")
            if method == "GET" and op == "counts":
                return _json(200, self.snapshot())
            if method == "GET" and op == "requests":
                return _json(200, [r.to_json() for r in self.requests])
            if method == "GET" and op == "quota":
                who = request.query.get("identity", ANONYMOUS)
                return _json(200, {"identity": who, "remaining": self.remaining(who)})
            name = {
                ("POST", "reset"): "reset_counters",
                ("POST", "faults"): "fail_always" if payload.pop("always", False) else "fail_next",
                ("DELETE", "faults"): "clear_faults",
                ("POST", "faults/clear"): "clear_faults",
                ("POST", "quota"): "set_quota",
            }.get((method, op))
            if method == "POST" and op.startswith("call/"):
                name = op[5:]
            if name not in CONTROL_METHODS:
                return _json(404, {"error": f"no control operation {method} {op}"})
            result = getattr(self, name)(**payload)
        except (TypeError, ValueError) as exc:
            return _json(400, {"error": str(exc)})
        return _json(200, {"ok": True, "result": result})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="Distribution base URL")
    parser.add_argument("--port", type=int, default=0, help="listen port (0: a free one)")
    parser.add_argument("--quota", type=int, default=100, help="pulls per window")
    parser.add_argument("--window", type=float, default=21600, help="quota window, seconds")
    parser.add_argument("--token-ttl", type=float, default=60)
    parser.add_argument("--account", action="append", default=[], metavar="USER:PASSWORD")
    parser.add_argument("--no-auth", action="store_true", help="serve /v2 without tokens")
    parser.add_argument("--unlimited", action="store_true", help="no quota, no ratelimit headers")
    args = parser.parse_args(argv)
    emulator = DockerHubEmulator(
        args.upstream,
        port=args.port,
        quota_limit=args.quota,
        window_seconds=args.window,
        token_ttl=args.token_ttl,
        require_auth=not args.no_auth,
        accounts=dict(a.split(":", 1) for a in args.account),
    )
    if args.unlimited:
        emulator.set_quota(send_headers=False)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    emulator.start()
    print(f"dockerhub emulator listening on {emulator.url}", flush=True)
    while not stop.wait(0.5):
        pass
    emulator.stop()


if __name__ == "__main__":
    main()
