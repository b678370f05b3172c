"""The client of one upstream registry: manifests, blobs, auth, quota headers."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import math
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from shared.auth.upstream_tokens import SharedTokens
from shared.logging import get_logger
from shared.metrics import DIGEST_MISMATCHES, UPSTREAM_429, UPSTREAM_REQUESTS
from shared.oci.mediatypes import ACCEPT
from shared.ratelimit import Governor, QuotaRefused
from shared.settings import Upstream
from shared.upstream.blobstream import CONTENT_RANGE, BlobStream
from shared.upstream.failures import UpstreamFailure
from shared.upstream.headers import RateLimit, parse_challenges, parse_retry_after, parse_rfc3339

log = get_logger(__name__)
USER_AGENT = "seawall/0.1"
CONNECTION_LIMIT = 64
MAX_REDIRECTS = 5
# A manifest larger than this is refused (the edge's own limit is usually lower).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
# Error bodies are read only this far (for the message and the 429 classification).
MAX_ERROR_BODY = 64 * 1024
# Token lifetime when the token endpoint does not say (the token spec's default).
DEFAULT_TOKEN_TTL = 60.0
# A token is dropped this long before it expires (at most; a tenth of short lifetimes).
TOKEN_MARGIN = 10.0
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@dataclass(frozen=True)
class ManifestHead:
    digest: str | None
    media_type: str | None
    size: int | None
    rate_limit: RateLimit | None


@dataclass(frozen=True)
class FetchedManifest:
    body: bytes
    media_type: str
    digest: str  # Docker-Content-Digest if sent (and verified), else sha256 of the body
    rate_limit: RateLimit | None


# -------------------------------------------------------------------------- failure
@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic()


class UpstreamClient:
    """The client of one upstream registry. `await start()` before use, `await close()` after
    (or `async with UpstreamClient(...) as client`)."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        on_rate_limit: Callable[[RateLimit], Awaitable[None]] | None = None,
        governor: Governor | None = None,
        shared_tokens: SharedTokens | None = None,
    ) -> None:
        self.upstream = upstream
        self._governor = governor
        self._shared_tokens = shared_tokens
        self.name = upstream.name
        self.base_url = upstream.url.rstrip("/")
        self._on_rate_limit = on_rate_limit
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[str, _Token] = {}
        self._token_locks: dict[str, asyncio.Lock] = {}
        # The last Bearer challenge per scope: an expired token is renewed before the
        # request instead of after a 401.
        self._challenges: dict[str, dict[str, str]] = {}
        # The token service (realm, service) of the last Bearer challenge: a repository seen
        # for the first time gets its token before its first request, not after a 401 (as
        # docker and containerd do), which saves a round trip on every new image.
        self._token_service: dict[str, str] | None = None
        # The upstream answered a request that carried no credentials with something other
        # than a 401: it serves without tokens, so there is no use asking Redis for one.
        self._serves_anonymously = False
        self._basic = False  # the upstream challenged for Basic credentials
        self._connect_timeout = upstream.connect_timeout.total_seconds()
        self._read_timeout = upstream.read_timeout.total_seconds()
        self._head_timeout = upstream.head_timeout.total_seconds()
        self._log = log.bind(upstream=self.name)

    # ------------------------------------------------------------------ lifecycle
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

    async def __aenter__(self) -> UpstreamClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=None, sock_connect=self._connect_timeout, sock_read=self._read_timeout
        )

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"upstream client {self.name} is not started")
        return self._session

    # ------------------------------------------------------------------- failures
    def _failure(self, kind: str, message: str, **fields: Any) -> UpstreamFailure:
        return UpstreamFailure(kind, message, upstream=self.name, **fields)

    def _transport_failure(self, exc: BaseException, what: str) -> UpstreamFailure:
        if isinstance(exc, TimeoutError):
            return self._failure("timeout", f"{what}: timed out")
        if isinstance(exc, aiohttp.ClientConnectorError):
            os_error = exc.os_error
            if isinstance(os_error, ConnectionRefusedError) or os_error.errno == errno.ECONNREFUSED:
                return self._failure("refused", f"{what}: connection refused")
            return self._failure("network", f"{what}: cannot connect ({os_error.strerror or os_error})")
        if isinstance(exc, ConnectionRefusedError):
            return self._failure("refused", f"{what}: connection refused")
        return self._failure("network", f"{what}: {type(exc).__name__}: {exc}")

    # ----------------------------------------------------------------------- auth
    @staticmethod
    def _scope(repository: str) -> str:
        return f"repository:{repository}:pull"

    def _basic_header(self) -> str | None:
        password = self.upstream.password()
        if not self.upstream.username or password is None:
            return None
        raw = f"{self.upstream.username}:{password.get_secret_value()}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def _cached_token(self, scope: str) -> str | None:
        token = self._tokens.get(scope)
        if token is None:
            return None
        if token.expires <= time.monotonic():
            del self._tokens[scope]
            return None
        return token.value

    def _authorization(self, scope: str) -> str | None:
        token = self._cached_token(scope)
        if token is not None:
            return f"Bearer {token}"
        if self._basic:
            return self._basic_header()
        return None

    async def _obtain_token(self, scope: str, challenge: dict[str, str], stale: str | None) -> str:
        """A token for `scope`: one fetch per scope at a time, shared by concurrent callers."""
        lock = self._token_locks.get(scope)
        if lock is None:
            lock = self._token_locks[scope] = asyncio.Lock()
        async with lock:
            cached = self._cached_token(scope)
            if cached is not None and cached != stale:
                return cached
            self._tokens.pop(scope, None)
            shared = await self._token_from_others(scope, stale)
            if shared is not None:
                return shared
            value, ttl = await self._fetch_token(challenge, scope)
            valid_for = ttl - min(TOKEN_MARGIN, ttl / 10)
            self._tokens[scope] = _Token(value, time.monotonic() + valid_for)
            if self._shared_tokens is not None:
                await self._shared_tokens.put(scope, value, valid_for)
            return value

    async def _token_from_others(self, scope: str, stale: str | None = None) -> str | None:
        """A token another process got for `scope` (not `stale`, one the upstream refused),
        kept here for as long as it stays valid."""
        shared = await self._shared_tokens.get(scope) if self._shared_tokens else None
        if shared is None or shared[0] == stale:
            return None
        value, valid_for = shared
        self._tokens[scope] = _Token(value, time.monotonic() + valid_for)
        return value

    async def _bearer_up_front(self, scope: str) -> str | None:
        """Authorization for a request we hold no credentials for, without waiting for a 401:
        a token from the token service this upstream named before (an expired token's
        scope, or a new one), else, while we do not know whether it wants tokens at all (a
        new process), one another process got."""
        challenge = self._challenges.get(scope, self._token_service)
        if challenge is not None:
            token: str | None = await self._obtain_token(scope, challenge, None)
        elif not self._serves_anonymously:
            token = await self._token_from_others(scope)
        else:
            token = None
        return None if token is None else f"Bearer {token}"

    async def _fetch_token(self, challenge: dict[str, str], scope: str) -> tuple[str, float]:
        """(token, seconds it stays valid from now) from the challenge's realm."""
        realm = challenge.get("realm")
        try:
            url = URL(realm) if realm else None
        except ValueError:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise self._failure("auth", f"bearer challenge without a usable realm: {realm!r}")
        query: list[tuple[str, str]] = list(url.query.items())
        if challenge.get("service"):
            query.append(("service", challenge["service"]))
        query.append(("scope", challenge.get("scope") or scope))
        url = url.with_query(query)
        headers = {"Accept": "application/json"}
        basic = self._basic_header()
        if basic is not None:
            headers["Authorization"] = basic
        response = await self._exchange("GET", url, kind="token", headers=headers)
        try:
            status = response.status
            if status == 429:
                await self._raise_for_status(response, "token request")
            body = await self._read_limited(response, MAX_ERROR_BODY, "token request")
        finally:
            response.release()
        if status != 200:
            self._log.warning("upstream_token_failed", status=status, realm=str(url.with_query(None)))
            raise self._failure(
                "auth",
                f"token endpoint answered {status}{self._excerpt(body)}",
                status=status,
            )
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            raise self._failure("auth", "token endpoint answered with something other than JSON")
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._failure("auth", "token endpoint answered without a token")
        try:
            ttl = float(document.get("expires_in") or DEFAULT_TOKEN_TTL)
        except (TypeError, ValueError):
            ttl = DEFAULT_TOKEN_TTL
        if not math.isfinite(ttl) or ttl <= 0:
            ttl = DEFAULT_TOKEN_TTL
        now = time.time()
        issued = parse_rfc3339(document.get("issued_at"))
        # Count from issued_at when it is plausible (not in the future, not older than the
        # lifetime: clocks differ); otherwise from now.
        if issued is not None and now - ttl < issued <= now:
            ttl -= now - issued
        self._log.debug("upstream_token_fetched", scope=scope, expires_in=round(ttl, 1))
        return token, ttl

    # ------------------------------------------------------------------- requests
    async def _exchange(
        self,
        method: str,
        url: URL,
        *,
        kind: str,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        """One request, following redirects by hand; the response is the caller's to release.

        Authorization is dropped when a redirect leaves the origin (Docker Hub sends blobs
        to a CDN). Transport errors become UpstreamFailure.
        """
        session = self._require_session()
        if self._governor is not None:
            try:
                # A pull is what the upstream counts: a manifest GET. Redirect hops (a
                # blob's CDN) are part of the same request and are not admitted again.
                await self._governor.admit(pull=kind == "manifest" and method == "GET")
            except QuotaRefused as refused:
                raise self._failure("governor", str(refused), retry_after=refused.retry_after) from None
        current_method, current_url, current_headers = method, url, dict(headers)
        for _ in range(MAX_REDIRECTS + 1):
            try:
                response = await session.request(
                    current_method,
                    current_url,
                    headers=current_headers,
                    allow_redirects=False,
                    timeout=self._timeout(),
                )
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                UPSTREAM_REQUESTS.labels(self.name, kind, current_method, "error").inc()
                failure = self._transport_failure(exc, f"{current_method} {kind}")
                self._log.info(
                    "upstream_request_failed",
                    kind=kind,
                    method=current_method,
                    failure=failure.kind,
                    error=failure.message,
                )
                raise failure from exc
            UPSTREAM_REQUESTS.labels(self.name, kind, current_method, str(response.status)).inc()
            location = response.headers.get("Location")
            if response.status not in _REDIRECTS or not location:
                return response
            await self._discard(response)
            try:
                target = current_url.join(URL(location))
            except ValueError as exc:
                raise self._failure(
                    "status", f"bad redirect location {location[:200]!r}", status=response.status
                ) from exc
            if target.origin() != current_url.origin():
                current_headers.pop("Authorization", None)
            if response.status == 303 and current_method != "HEAD":
                current_method = "GET"
            self._log.debug("upstream_redirect", kind=kind, status=response.status, to=target.host)
            current_url = target
        raise self._failure("status", f"more than {MAX_REDIRECTS} redirects for {kind}")

    async def _send(
        self,
        method: str,
        url: URL,
        *,
        kind: str,
        scope: str,
        headers: dict[str, str],
    ) -> aiohttp.ClientResponse:
        """A request with the auth dance: cached credentials, else answer one challenge."""
        sent = self._authorization(scope) or await self._bearer_up_front(scope)
        request_headers = dict(headers)
        if sent is not None:
            request_headers["Authorization"] = sent
        response = await self._exchange(method, url, kind=kind, headers=request_headers)
        if response.status != 401:
            if sent is None:
                self._serves_anonymously = True
            return response
        challenges = parse_challenges(response.headers.getall("WWW-Authenticate", []))
        await self._discard(response)
        bearer = next((p for s, p in challenges if s == "bearer"), None)
        basic = any(s == "basic" for s, _ in challenges)
        if bearer is not None:
            stale = sent[7:] if sent and sent.startswith("Bearer ") else None
            token = await self._obtain_token(scope, bearer, stale)
            self._challenges[scope] = bearer
            self._token_service = {k: v for k, v in bearer.items() if k in ("realm", "service")}
            request_headers["Authorization"] = f"Bearer {token}"
        elif basic:
            credentials = self._basic_header()
            if credentials is None:
                raise self._failure(
                    "auth", "upstream asks for Basic credentials; none configured", status=401
                )
            if sent == credentials:
                raise self._failure("auth", "upstream rejected the Basic credentials", status=401)
            self._basic = True
            request_headers["Authorization"] = credentials
        else:
            raise self._failure("auth", "upstream answered 401 without a usable challenge", status=401)
        response = await self._exchange(method, url, kind=kind, headers=request_headers)
        if response.status == 401:
            # Docker Hub answers this way (error="insufficient_scope") for a repository
            # that does not exist as well as for one we may not pull: say which it claimed.
            again = parse_challenges(response.headers.getall("WWW-Authenticate", []))
            await self._discard(response)
            error = next((p["error"] for _, p in again if p.get("error")), None)
            if bearer is not None:
                self._tokens.pop(scope, None)
            self._log.warning("upstream_auth_rejected", kind=kind, method=method, error=error)
            reason = f" ({error})" if error else ""
            raise self._failure("auth", f"upstream rejected our credentials for {scope}{reason}", status=401)
        return response

    async def _discard(self, response: aiohttp.ClientResponse) -> None:
        """Release a response we do not need, reading a small body to keep the connection."""
        try:
            length = response.content_length
            if response.method != "HEAD" and length is not None and length <= MAX_ERROR_BODY:
                await response.read()
        except (aiohttp.ClientError, TimeoutError, OSError):
            response.close()
        finally:
            response.release()

    async def _read_limited(self, response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
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
            raise self._transport_failure(exc, what) from exc
        return bytes(buffer)

    @staticmethod
    def _excerpt(body: bytes) -> str:
        """`: <message>` from an OCI error envelope, else a short text excerpt."""
        if not body:
            return ""
        try:
            document = json.loads(body)
            errors = document.get("errors") if isinstance(document, dict) else None
            if errors and isinstance(errors[0], dict):
                first = errors[0]
                return f": {first.get('code', '')} {first.get('message', '')}".rstrip()
            if isinstance(document, dict) and document.get("details"):
                return f": {str(document['details'])[:200]}"
        except (ValueError, AttributeError, IndexError, TypeError, RecursionError):
            pass
        text = body[:200].decode("utf-8", "replace").strip()
        return f": {text}" if text else ""

    async def _report_rate_limit(self, response: aiohttp.ClientResponse) -> RateLimit | None:
        rate_limit = RateLimit.from_headers(response.headers)
        if rate_limit is not None and self._governor is not None:
            await self._governor.observe(rate_limit.remaining, rate_limit.limit, rate_limit.window)
        if rate_limit is not None and self._on_rate_limit is not None:
            try:
                await self._on_rate_limit(rate_limit)
            except Exception:
                self._log.exception("rate_limit_callback_failed")
        return rate_limit

    async def _raise_for_status(
        self,
        response: aiohttp.ClientResponse,
        what: str,
        rate_limit: RateLimit | None = None,
    ) -> None:
        """Raise the UpstreamFailure for an unwanted answer (the caller releases it)."""
        status = response.status
        body = await self._read_limited(response, MAX_ERROR_BODY, what)
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        if status == 429:
            kind = "quota" if self._has_error_envelope(response, body) else "abuse"
            UPSTREAM_429.labels(self.name, kind).inc()
            if self._governor is not None:
                # Hold the identity closed: never retry a 429 blindly.
                retry_after = await self._governor.close(abuse=kind == "abuse", retry_after=retry_after)
            self._log.warning(
                "upstream_rate_limited",
                what=what,
                limit_kind=kind,
                retry_after=retry_after,
                remaining=rate_limit.remaining if rate_limit else None,
            )
            text = "pull rate limit reached" if kind == "quota" else "too many requests (abuse limit)"
            raise self._failure(
                kind, f"{what}: {text}", status=429, retry_after=retry_after, rate_limit=rate_limit
            )
        if status == 401:
            raise self._failure("auth", f"{what}: 401{self._excerpt(body)}", status=status)
        self._log.info("upstream_status", what=what, status=status)
        raise self._failure(
            "status",
            f"{what}: {status}{self._excerpt(body)}",
            status=status,
            retry_after=retry_after,
            rate_limit=rate_limit,
        )

    @staticmethod
    def _has_error_envelope(response: aiohttp.ClientResponse, body: bytes) -> bool:
        if not body:
            # HEAD (or an empty body): all we have is the content type.
            return response.content_type == "application/json"
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            return False
        return isinstance(document, dict) and isinstance(document.get("errors"), list)

    def _url(self, repository: str, kind: str, reference: str) -> URL:
        return URL(f"{self.base_url}/v2/{repository}/{kind}/{reference}")

    # ---------------------------------------------------------------- manifests
    async def _manifest_request(self, method: str, repository: str, reference: str) -> aiohttp.ClientResponse:
        return await self._send(
            method,
            self._url(repository, "manifests", reference),
            kind="manifest",
            scope=self._scope(repository),
            headers={"Accept": ACCEPT},
        )

    async def head_manifest(
        self,
        repository: str,
        reference: str,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - bounds the auth dance too
    ) -> ManifestHead | None:
        """Digest, media type and size of a manifest without spending quota; None on 404.

        The whole operation (auth included) is bounded by `timeout`, by default the
        upstream's head_timeout.
        """
        limit = self._head_timeout if timeout is None else timeout
        what = f"HEAD manifest {repository}:{reference}"
        try:
            async with asyncio.timeout(limit):
                response = await self._manifest_request("HEAD", repository, reference)
                try:
                    rate_limit = await self._report_rate_limit(response)
                    if response.status == 404:
                        return None
                    if response.status != 200:
                        await self._raise_for_status(response, what, rate_limit)
                    length = response.headers.get("Content-Length")
                    has_type = bool(response.headers.get("Content-Type"))
                    return ManifestHead(
                        digest=response.headers.get("Docker-Content-Digest"),
                        media_type=response.content_type if has_type else None,
                        size=int(length) if length and length.isdigit() else None,
                        rate_limit=rate_limit,
                    )
                finally:
                    response.release()
        except TimeoutError as exc:
            self._log.info("upstream_head_timeout", repository=repository, timeout=limit)
            raise self._failure("timeout", f"{what}: no answer within {limit:g} s") from exc

    async def get_manifest(
        self, repository: str, reference: str, *, max_bytes: int = MAX_MANIFEST_BYTES
    ) -> FetchedManifest | None:
        """The manifest's exact bytes (spends one pull on Docker Hub); None on 404.

        The body is verified: against the reference when it is a digest, and against
        Docker-Content-Digest when the upstream sends one.
        """
        what = f"GET manifest {repository}:{reference}"
        response = await self._manifest_request("GET", repository, reference)
        try:
            rate_limit = await self._report_rate_limit(response)
            if response.status == 404:
                await self._discard(response)
                return None
            if response.status != 200:
                await self._raise_for_status(response, what, rate_limit)
            length = response.content_length
            if length is not None and length > max_bytes:
                raise self._failure(
                    "status", f"{what}: manifest of {length} bytes exceeds {max_bytes}", status=200
                )
            body = await self._read_limited(response, max_bytes + 1, what)
            if len(body) > max_bytes:
                raise self._failure("status", f"{what}: manifest exceeds {max_bytes} bytes", status=200)
            if length is not None and len(body) != length:
                raise self._failure(
                    "network", f"{what}: body ended after {len(body)} of {length} bytes", status=200
                )
            header_digest = response.headers.get("Docker-Content-Digest")
            media_type = response.content_type if response.headers.get("Content-Type") else ""
        finally:
            response.release()
        digest = self._verify(what, body, header_digest, reference)
        if not media_type or media_type == "application/octet-stream":
            media_type = _sniff_media_type(body) or media_type or "application/octet-stream"
        return FetchedManifest(body=body, media_type=media_type, digest=digest, rate_limit=rate_limit)

    def _verify(self, what: str, body: bytes, header_digest: str | None, reference: str) -> str:
        computed: dict[str, str] = {}

        def digest_with(algorithm: str) -> str | None:
            if algorithm not in ("sha256", "sha512"):
                return None
            if algorithm not in computed:
                computed[algorithm] = f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"
            return computed[algorithm]

        for claimed, source in ((reference, "reference"), (header_digest, "Docker-Content-Digest")):
            if not claimed or ":" not in claimed:
                continue
            actual = digest_with(claimed.split(":", 1)[0])
            if actual is not None and actual != claimed:
                DIGEST_MISMATCHES.labels("upstream").inc()
                self._log.warning("upstream_digest_mismatch", what=what, source=source)
                raise self._failure(
                    "status", f"{what}: body does not match its {source} {claimed}", status=200
                )
        if header_digest:
            return header_digest
        if ":" in reference and digest_with(reference.split(":", 1)[0]):
            return reference
        return digest_with("sha256") or ""

    # ------------------------------------------------------------------------ blobs
    async def head_blob(self, repository: str, digest: str) -> int | None:
        """The size of a blob the upstream serves in `repository`, None on 404 (free on
        Docker Hub: no pull is counted). Bounded by the upstream's head_timeout."""
        what = f"HEAD blob {repository}@{digest}"
        try:
            async with asyncio.timeout(self._head_timeout):
                response = await self._send(
                    "HEAD",
                    self._url(repository, "blobs", digest),
                    kind="blob",
                    scope=self._scope(repository),
                    headers={"Accept": "*/*"},
                )
                try:
                    if response.status == 404:
                        return None
                    if response.status != 200:
                        await self._raise_for_status(response, what)
                    length = response.headers.get("Content-Length", "")
                    return int(length) if length.isascii() and length.isdigit() else 0
                finally:
                    response.release()
        except TimeoutError as exc:
            raise self._failure("timeout", f"{what}: no answer within {self._head_timeout:g} s") from exc

    @asynccontextmanager
    async def open_blob(self, repository: str, digest: str, *, offset: int = 0) -> AsyncIterator[BlobStream]:
        """Stream a blob from `offset` (with `Range: bytes=<offset>-` when offset > 0).

        Redirects are followed (Authorization dropped across origins). A 404 raises
        UpstreamFailure(kind="not_found"). The connection goes back to the pool only if
        the body was read to the end; otherwise it is closed on exit.
        """
        if offset < 0:
            raise ValueError("offset must not be negative")
        what = f"GET blob {repository}@{digest}"
        headers = {"Accept": "*/*"}
        if offset > 0:
            headers["Range"] = f"bytes={offset}-"
        response = await self._send(
            "GET",
            self._url(repository, "blobs", digest),
            kind="blob",
            scope=self._scope(repository),
            headers=headers,
        )
        stream: BlobStream | None = None
        try:
            if response.status == 404:
                raise self._failure("not_found", f"{what}: blob unknown", status=404)
            if response.status not in (200, 206):
                await self._raise_for_status(response, what)
            length = response.content_length
            if response.status == 206:
                content_range = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
                if content_range is None:
                    raise self._failure("status", f"{what}: 206 without a usable Content-Range", status=206)
                start, _end, total = content_range.groups()
                if int(start) != offset:
                    raise self._failure(
                        "status",
                        f"{what}: asked for bytes from {offset}, got from {start}",
                        status=206,
                    )
                total_size = int(total) if total != "*" else None
                if total_size is None and length is not None:
                    total_size = offset + length
                stream = BlobStream(self, response, offset=offset, total_size=total_size, digest=digest)
            else:
                stream = BlobStream(self, response, offset=offset, total_size=length, digest=digest)
                if offset > 0:
                    if length is not None and offset > length:
                        raise self._failure(
                            "status",
                            f"{what}: offset {offset} beyond the blob's {length} bytes",
                            status=200,
                        )
                    # The upstream ignored Range: skip to the offset so callers always get
                    # the body from where they asked.
                    self._log.debug("upstream_range_ignored", digest=digest, offset=offset)
                    await stream._skip(offset)
            yield stream
        finally:
            if stream is not None and stream.complete:
                response.release()
            else:
                response.close()


def _sniff_media_type(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    media_type = document.get("mediaType") if isinstance(document, dict) else None
    return media_type if isinstance(media_type, str) else None
