"""The HTTP side of one upstream: its session and timeouts, requests through the governor with
redirects followed by hand, quota headers reported, and unwanted answers raised as failures."""

from __future__ import annotations

import ssl
import time
from typing import Any, NoReturn

import aiohttp
from yarl import URL

from shared.logging import get_logger
from shared.metrics import UPSTREAM_429, UPSTREAM_REQUESTS
from shared.ratelimit import Governor, QuotaRefused
from shared.settings import Upstream
from shared.upstream.failures import (
    UpstreamFailure,
    limit_kind,
    rate_limited,
    status_failure,
    transport_failure,
)
from shared.upstream.headers import RateLimit, parse_retry_after

log = get_logger(__name__)
USER_AGENT = "seawall/0.1"
CONNECTION_LIMIT = 64
MAX_REDIRECTS = 5
# Error bodies are read only this far (for the message and the 429 classification).
MAX_ERROR_BODY = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


class Transport:
    """The aiohttp session of one upstream and every request sent through it.

    `await start()` before use, `await close()` after. Responses are the caller's to
    release; `aiohttp.ClientError` never escapes (it becomes UpstreamFailure).
    """

    def __init__(self, upstream: Upstream, governor: Governor | None = None) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self.base_url = upstream.url.rstrip("/")
        self.head_timeout = upstream.head_timeout.total_seconds()
        self._governor = governor
        self._session: aiohttp.ClientSession | None = None
        self._connect_timeout = upstream.connect_timeout.total_seconds()
        self._read_timeout = upstream.read_timeout.total_seconds()
        self.log = log.bind(upstream=self.name)

    async def start(self) -> None:
        if self._session is not None:
            return
        ssl_option: ssl.SSLContext | bool
        if not self.upstream.tls_verify:
            ssl_option = False
        elif self.upstream.ca_file is not None:
            ssl_option = ssl.create_default_context(cafile=str(self.upstream.ca_file))
        else:
            ssl_option = True
        connector = aiohttp.TCPConnector(limit=CONNECTION_LIMIT, ssl=ssl_option)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout(),
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
        )

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
        )

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"upstream client {self.name} is not started")
        return self._session

    def url(self, repository: str, kind: str, reference: str) -> URL:
        return URL(f"{self.base_url}/v2/{repository}/{kind}/{reference}")

    async def exchange(
        self,
        method: str,
        url: URL,
        *,
        kind: str,
        headers: dict[str, str],
        data: Any = None,
    ) -> aiohttp.ClientResponse:
        """One request, following redirects by hand; the response is the caller's to release.

        Authorization is dropped when a redirect leaves the origin (Docker Hub sends blobs
        to a CDN). A request with a body (`data`, as aiohttp takes it) is not redirected:
        a streamed body cannot be sent twice, so the redirect is the caller's answer.
        Transport errors become UpstreamFailure.
        """
        session = self._require_session()
        if self._governor is not None:
            try:
                # A pull is what the upstream counts: a manifest GET. Redirect hops (a
                # blob's CDN) are part of the same request and are not admitted again.
                await self._governor.admit(pull=kind == "manifest" and method == "GET")
            except QuotaRefused as refused:
                raise UpstreamFailure(
                    "governor", str(refused), upstream=self.name, retry_after=refused.retry_after
                ) from None
        current_method, current_url, current_headers = method, url, dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await session.request(
                    current_method,
                    current_url,
                    headers=current_headers,
                    data=data,
                    allow_redirects=False,
                    timeout=self._timeout(),
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                UPSTREAM_REQUESTS.labels(self.name, kind, current_method, "error").inc()
                failure = transport_failure(self.name, exc, f"{current_method} {kind}")
                self.log.info(
                    "upstream_request_failed",
                    kind=kind,
                    method=current_method,
                    failure=failure.kind,
                    error=failure.message,
                )
                raise failure from exc
            UPSTREAM_REQUESTS.labels(self.name, kind, current_method, str(response.status)).inc()
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location or data is not None:
                return response
            await self.discard(response)
            try:
                target = current_url.join(URL(location))
            except ValueError as exc:
                raise UpstreamFailure(
                    "status",
                    f"bad redirect location {location[:200]!r}",
                    upstream=self.name,
                    status=response.status,
                ) from exc
            if target.origin() != current_url.origin():
                current_headers.pop("Authorization", None)
            if response.status == 303 and current_method != "HEAD":
                current_method = "GET"
            self.log.debug("upstream_redirect", kind=kind, status=response.status, to=target.host)
            current_url = target
        raise UpstreamFailure("status", f"more than {MAX_REDIRECTS} redirects for {kind}", upstream=self.name)

    async def discard(self, response: aiohttp.ClientResponse) -> None:
        """Release a response we do not need, reading a small body to keep the connection."""
        try:
            length = response.content_length
            if response.method != "HEAD" and length is not None and length <= MAX_ERROR_BODY:
                await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            response.close()
        finally:
            response.release()

    async def read_limited(self, response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
        """The body, at most `limit` bytes (more is cut off, the rest left unread)."""
        if response.method == "HEAD":
            return b""
        buffer = bytearray()
        try:
            while len(buffer) < limit:
                data = await response.content.read(limit - len(buffer))
                if not data:
                    break
                buffer += data
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise transport_failure(self.name, exc, what) from exc
        return bytes(buffer)

    async def report_rate_limit(self, response: aiohttp.ClientResponse) -> RateLimit | None:
        """The quota headers of a response, if any; the governor corrects its bucket to them."""
        rate_limit = RateLimit.from_headers(response.headers)
        if rate_limit is not None and self._governor is not None:
            await self._governor.observe(rate_limit.remaining, rate_limit.limit, rate_limit.window)
        return rate_limit

    async def raise_for_status(
        self,
        response: aiohttp.ClientResponse,
        what: str,
        rate_limit: RateLimit | None = None,
    ) -> NoReturn:
        """Raise the UpstreamFailure for an unwanted answer (the caller releases it)."""
        status = response.status
        body = await self.read_limited(response, MAX_ERROR_BODY, what)
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        if status == 429:
            kind = limit_kind(response.content_type, body)
            UPSTREAM_429.labels(self.name, kind).inc()
            if self._governor is not None:
                # Hold the identity closed: never retry a 429 blindly.
                retry_after = await self._governor.close(abuse=kind == "abuse", retry_after=retry_after)
            self.log.warning(
                "upstream_rate_limited",
                what=what,
                limit_kind=kind,
                retry_after=retry_after,
                remaining=rate_limit.remaining if rate_limit else None,
            )
            raise rate_limited(self.name, what, kind, retry_after=retry_after, rate_limit=rate_limit)
        if status != 401:
            self.log.info("upstream_status", what=what, status=status)
        raise status_failure(self.name, what, status, body, retry_after=retry_after, rate_limit=rate_limit)
