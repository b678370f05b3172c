"""UpstreamFailure: every way an upstream can fail, how an answer or an exception is classified
into one, and the OCI error a client sees."""

from __future__ import annotations

import errno
import json
import math
import time
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp

from shared.oci.errors import RegistryError
from shared.upstream.headers import RateLimit

# Retry-After sent to clients on a 429 when the upstream did not say when it reopens.
DEFAULT_RETRY_AFTER = 60.0
KINDS = frozenset(
    {
        "timeout",
        "refused",
        "network",
        "status",
        "auth",
        "quota",
        "abuse",
        "not_found",
        "governor",
        "unsupported",
    }
)


class UpstreamFailure(Exception):
    """Every way an upstream can fail, classified.

    `kind` is one of: "timeout" (no answer in time), "refused" (connection refused),
    "network" (any other transport failure, a cut body, a TLS error), "status" (an
    unexpected HTTP status or a malformed answer), "auth" (the token endpoint failed or the
    upstream kept answering 401), "quota" (a 429 with a JSON errors envelope: the pull
    quota), "abuse" (a plain-text 429), "not_found" (a blob the upstream does not have),
    "governor" (held back by the rate-limit governor), "unsupported" (the upstream does not
    offer what was asked, e.g. a catalog).
    `status` is the HTTP status or None for transport failures; `retry_after` is seconds
    from when the failure was raised (Retry-After), or None when the upstream did not say.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        upstream: str,
        status: int | None = None,
        retry_after: float | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown upstream failure kind {kind!r}")
        self.kind = kind
        self.message = message
        self.upstream = upstream
        self.status = status
        self.retry_after = retry_after
        self.rate_limit = rate_limit
        self.reopens_at = time.time() + retry_after if retry_after is not None else None
        super().__init__(f"upstream {upstream}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments: rebuild explicitly so the exception survives pickling.
        return (
            _rebuild_failure,
            (
                self.kind,
                self.message,
                self.upstream,
                self.status,
                self.retry_after,
                self.rate_limit,
                self.reopens_at,
            ),
        )

    def seconds_until_reopen(self, now: float | None = None) -> float | None:
        if self.reopens_at is None:
            return None
        return max(0.0, self.reopens_at - (time.time() if now is None else now))

    def to_registry_error(
        self, not_found_code: str = "MANIFEST_UNKNOWN", *, retry_after: float | None = None
    ) -> RegistryError:
        """The OCI error a client should see.

        quota/abuse -> 429 TOOMANYREQUESTS with `Retry-After` (integer seconds, at least 1:
        `retry_after` if given, else what the upstream said, else DEFAULT_RETRY_AFTER);
        timeout -> 504 UPSTREAM_TIMEOUT; refused/network -> 503 UNAVAILABLE;
        not_found -> `not_found_code` (MANIFEST_UNKNOWN or BLOB_UNKNOWN);
        status/auth -> 502 UPSTREAM_ERROR.
        """
        name = self.upstream
        if self.kind in ("quota", "abuse"):
            wait = retry_after if retry_after is not None else self.seconds_until_reopen()
            if wait is None:
                wait = DEFAULT_RETRY_AFTER
            seconds = max(1, math.ceil(wait))
            reopens = datetime.fromtimestamp(time.time() + seconds, UTC)
            at = reopens.isoformat(timespec="seconds").replace("+00:00", "Z")
            what = "pull rate limit reached" if self.kind == "quota" else "too many requests"
            return RegistryError(
                "TOOMANYREQUESTS",
                f"upstream {name}: {what}; it reopens in {seconds} s (at {at})",
                detail={"upstream": name, "retry_after": seconds, "reopens_at": at},
                headers={"Retry-After": str(seconds)},
            )
        if self.kind == "governor":
            wait = self.seconds_until_reopen() or DEFAULT_RETRY_AFTER
            seconds = max(1, math.ceil(wait))
            at = datetime.fromtimestamp(time.time() + seconds, UTC).isoformat(timespec="seconds")
            at = at.replace("+00:00", "Z")
            return RegistryError(
                "TOOMANYREQUESTS",
                f"Seawall is holding back requests to upstream {name}: {self.message}; "
                f"it refills in {seconds} s (at {at})",
                detail={"upstream": name, "retry_after": seconds, "reopens_at": at},
                headers={"Retry-After": str(seconds)},
            )
        if self.kind == "timeout":
            return RegistryError(
                "UPSTREAM_TIMEOUT", f"upstream {name} did not answer in time: {self.message}"
            )
        if self.kind in ("refused", "network"):
            return RegistryError("UNAVAILABLE", f"upstream {name} is unreachable: {self.message}")
        if self.kind == "not_found":
            return RegistryError(not_found_code, f"not found on upstream {name}: {self.message}")
        if self.kind == "auth" and "insufficient_scope" in self.message:
            # Docker Hub's answer for a repository that does not exist (and for a private
            # one our credentials may not read): the client should hear "unknown name".
            return RegistryError(
                "NAME_UNKNOWN",
                f"upstream {name} has no such repository, or its credentials may not pull it",
            )
        return RegistryError("UPSTREAM_ERROR", f"upstream {name} failed: {self.message}")


def _rebuild_failure(
    kind: str,
    message: str,
    upstream: str,
    status: int | None,
    retry_after: float | None,
    rate_limit: RateLimit | None,
    reopens_at: float | None,
) -> UpstreamFailure:
    failure = UpstreamFailure(
        kind,
        message,
        upstream=upstream,
        status=status,
        retry_after=retry_after,
        rate_limit=rate_limit,
    )
    failure.reopens_at = reopens_at
    return failure


def transport_failure(upstream: str, exc: BaseException, what: str) -> UpstreamFailure:
    """A request that got no (complete) answer: timeout, refused, or any other network failure."""
    if isinstance(exc, TimeoutError):
        return UpstreamFailure("timeout", f"{what}: timed out", upstream=upstream)
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError) or os_error.errno == errno.ECONNREFUSED:
            return UpstreamFailure("refused", f"{what}: connection refused", upstream=upstream)
        reason = os_error.strerror or os_error
        return UpstreamFailure("network", f"{what}: cannot connect ({reason})", upstream=upstream)
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamFailure("refused", f"{what}: connection refused", upstream=upstream)
    return UpstreamFailure("network", f"{what}: {type(exc).__name__}: {exc}", upstream=upstream)


def limit_kind(content_type: str, body: bytes) -> Literal["quota", "abuse"]:
    """Which limit a 429 stands for: the pull quota answers with a JSON errors envelope
    ("quota"), the abuse limiter with plain text ("abuse")."""
    if not body:
        # HEAD (or an empty body): all we have is the content type.
        return "quota" if content_type == "application/json" else "abuse"
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return "abuse"
    if isinstance(document, dict) and isinstance(document.get("errors"), list):
        return "quota"
    return "abuse"


def rate_limited(
    upstream: str,
    what: str,
    kind: Literal["quota", "abuse"],
    *,
    retry_after: float | None,
    rate_limit: RateLimit | None,
) -> UpstreamFailure:
    """A 429 of the given `limit_kind`."""
    text = "pull rate limit reached" if kind == "quota" else "too many requests (abuse limit)"
    return UpstreamFailure(
        kind, f"{what}: {text}", upstream=upstream, status=429, retry_after=retry_after, rate_limit=rate_limit
    )


def status_failure(
    upstream: str,
    what: str,
    status: int,
    body: bytes,
    *,
    retry_after: float | None,
    rate_limit: RateLimit | None,
) -> UpstreamFailure:
    """An unwanted answer other than a 429: a 401 is "auth", anything else "status"."""
    if status == 401:
        return UpstreamFailure("auth", f"{what}: 401{error_excerpt(body)}", upstream=upstream, status=status)
    return UpstreamFailure(
        "status",
        f"{what}: {status}{error_excerpt(body)}",
        upstream=upstream,
        status=status,
        retry_after=retry_after,
        rate_limit=rate_limit,
    )


def error_excerpt(body: bytes) -> str:
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
