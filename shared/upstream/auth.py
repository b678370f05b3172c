"""The registry auth dance with one upstream: Bearer tokens from the challenge's realm (cached
per scope and shared with other processes through Redis), or Basic credentials."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

from shared.auth.upstream_tokens import SharedTokens
from shared.settings import Upstream
from shared.upstream.failures import UpstreamFailure, error_excerpt
from shared.upstream.headers import parse_challenges, parse_rfc3339
from shared.upstream.transport import MAX_ERROR_BODY, Transport

# Token lifetime when the token endpoint does not say (the token spec's default).
DEFAULT_TOKEN_TTL = 60.0
# A token is dropped this long before it expires (at most; a tenth of short lifetimes).
TOKEN_MARGIN = 10.0


def pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


def push_scope(repository: str) -> str:
    return f"repository:{repository}:pull,push"


def requested_scopes(challenged: str | None, wanted: str) -> list[str]:
    """The scopes to ask the token service for: the challenge's and the request's own, each
    once. A scope string may name several, separated by spaces (a mount needs push on one
    repository and pull on another); each becomes a `scope` parameter of its own."""
    scopes: list[str] = []
    for item in (challenged or "").split() + wanted.split():
        if item not in scopes:
            scopes.append(item)
    return scopes


class Rechallenged(Exception):
    """The upstream answered 401 to a request whose streamed body cannot be sent again.

    The challenge has been answered (the credentials are ready for the next request); the
    caller sends the request again from wherever its body can start over.
    """


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic()


class UpstreamAuth:
    """Sends requests to one upstream with the credentials it wants, answering its challenges."""

    def __init__(
        self, upstream: Upstream, transport: Transport, shared_tokens: SharedTokens | None = None
    ) -> None:
        self.upstream = upstream
        self._transport = transport
        self._shared_tokens = shared_tokens
        self._name = upstream.name
        self._log = transport.log
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

    def _failure(self, message: str, status: int | None = None) -> UpstreamFailure:
        return UpstreamFailure("auth", message, upstream=self._name, status=status)

    async def send(
        self,
        method: str,
        url: URL,
        *,
        kind: str,
        scope: str,
        headers: dict[str, str],
        data: object = None,
    ) -> aiohttp.ClientResponse:
        """A request with the auth dance: cached credentials, else answer one challenge.

        `data` is the request's body: bytes are sent again after a challenge; anything else
        (a stream) cannot be, so a 401 to it raises Rechallenged once the challenge is
        answered.
        """
        sent = self._authorization(scope) or await self._bearer_up_front(scope)
        request_headers = dict(headers)
        if sent is not None:
            request_headers["Authorization"] = sent
        response = await self._transport.exchange(method, url, kind=kind, headers=request_headers, data=data)
        if response.status != 401:
            if sent is None:
                self._serves_anonymously = True
            return response
        challenges = parse_challenges(response.headers.getall("WWW-Authenticate", []))
        await self._transport.discard(response)
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
                raise self._failure("upstream asks for Basic credentials; none configured", 401)
            if sent == credentials:
                raise self._failure("upstream rejected the Basic credentials", 401)
            self._basic = True
            request_headers["Authorization"] = credentials
        else:
            raise self._failure("upstream answered 401 without a usable challenge", 401)
        if data is not None and not isinstance(data, bytes):
            raise Rechallenged(f"{method} {kind}: challenged; the body must be sent again")
        response = await self._transport.exchange(method, url, kind=kind, headers=request_headers, data=data)
        if response.status == 401:
            # Docker Hub answers this way (error="insufficient_scope") for a repository
            # that does not exist as well as for one we may not pull: say which it claimed.
            again = parse_challenges(response.headers.getall("WWW-Authenticate", []))
            await self._transport.discard(response)
            error = next((p["error"] for _, p in again if p.get("error")), None)
            if bearer is not None:
                self._tokens.pop(scope, None)
            self._log.warning("upstream_auth_rejected", kind=kind, method=method, error=error)
            reason = f" ({error})" if error else ""
            raise self._failure(f"upstream rejected our credentials for {scope}{reason}", 401)
        return response

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
            raise self._failure(f"bearer challenge without a usable realm: {realm!r}")
        query: list[tuple[str, str]] = list(url.query.items())
        if challenge.get("service"):
            query.append(("service", challenge["service"]))
        query.extend(("scope", item) for item in requested_scopes(challenge.get("scope"), scope))
        url = url.with_query(query)
        headers = {"Accept": "application/json"}
        basic = self._basic_header()
        if basic is not None:
            headers["Authorization"] = basic
        response = await self._transport.exchange("GET", url, kind="token", headers=headers)
        try:
            status = response.status
            if status == 429:
                await self._transport.raise_for_status(response, "token request")
            body = await self._transport.read_limited(response, MAX_ERROR_BODY, "token request")
        finally:
            response.release()
        if status != 200:
            self._log.warning("upstream_token_failed", status=status, realm=str(url.with_query(None)))
            raise self._failure(f"token endpoint answered {status}{error_excerpt(body)}", status)
        token, ttl = self._read_token_answer(body)
        self._log.debug("upstream_token_fetched", scope=scope, expires_in=round(ttl, 1))
        return token, ttl

    def _read_token_answer(self, body: bytes) -> tuple[str, float]:
        """(token, seconds it stays valid from now) from the token endpoint's JSON."""
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            document = None
        if not isinstance(document, dict):
            raise self._failure("token endpoint answered with something other than JSON")
        token = document.get("token") or document.get("access_token")
        if not isinstance(token, str) or not token:
            raise self._failure("token endpoint answered without a token")
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
        return token, ttl
