"""What an upstream's answers say (quota headers, Retry-After, auth challenges) and the
UpstreamFailure each kind of trouble becomes, down to the OCI error a client sees.

Pure functions: no server. The client that applies them is tested in test_upstream.py.
"""

from __future__ import annotations

import errno
import json
import pickle
from email.utils import formatdate

import aiohttp
import pytest

from shared.upstream import RateLimit, UpstreamFailure, parse_challenges, parse_retry_after
from shared.upstream.failures import (
    error_excerpt,
    limit_kind,
    rate_limited,
    status_failure,
    transport_failure,
)


def test_parse_retry_after_forms() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120
    assert parse_retry_after(" 0 ", now) == 0
    assert parse_retry_after(str(int(now) + 300), now) == pytest.approx(300)
    assert parse_retry_after(str(int(now) - 300), now) == 0  # an epoch in the past
    assert parse_retry_after(formatdate(now + 90, usegmt=True), now) == pytest.approx(90)
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after("soon", now) is None


def test_rate_limit_from_headers() -> None:
    rl = RateLimit.from_headers(
        {
            "RateLimit-Limit": "100;w=21600",
            "ratelimit-remaining": "76;w=21600",
            "docker-ratelimit-source": "203.0.113.7",
        }
    )
    assert rl == RateLimit(limit=100, remaining=76, window=21600.0, source="203.0.113.7")
    assert RateLimit.from_headers({"Content-Type": "application/json"}) is None
    several = RateLimit.from_headers({"ratelimit-limit": "100, 100;w=21600"})
    assert several is not None
    assert several.limit == 100
    assert several.window == 21600.0


def test_parse_challenges() -> None:
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:library/alpine:pull,push repository:x/y:pull",'
        'error="insufficient_scope", '
        'Basic realm="a \\"quoted\\", realm"'
    )
    challenges = parse_challenges(header)
    assert [scheme for scheme, _ in challenges] == ["bearer", "basic"]
    bearer = challenges[0][1]
    assert bearer["realm"] == "https://auth.example/token"
    assert bearer["service"] == "registry.example"
    assert bearer["scope"] == "repository:library/alpine:pull,push repository:x/y:pull"
    assert bearer["error"] == "insufficient_scope"
    assert challenges[1][1] == {"realm": 'a "quoted", realm'}
    assert parse_challenges(["Basic realm=plain", "Negotiate abc123=="]) == [
        ("basic", {"realm": "plain"}),
        ("negotiate", {}),
    ]


def test_to_registry_error_mapping() -> None:
    quota = UpstreamFailure("quota", "pulls", upstream="dockerhub", status=429, retry_after=41.2)
    error = quota.to_registry_error()
    assert (error.code, error.status) == ("TOOMANYREQUESTS", 429)
    assert 1 <= int(error.headers["Retry-After"]) <= 42
    assert "dockerhub" in error.message
    assert "reopens" in error.message
    unknown = UpstreamFailure("abuse", "x", upstream="dockerhub", status=429).to_registry_error()
    assert unknown.code == "TOOMANYREQUESTS"
    assert int(unknown.headers["Retry-After"]) >= 1
    soon = UpstreamFailure("quota", "x", upstream="u", retry_after=0.01).to_registry_error()
    assert soon.headers["Retry-After"] == "1"
    table = {
        "timeout": ("UPSTREAM_TIMEOUT", 504),
        "refused": ("UNAVAILABLE", 503),
        "network": ("UNAVAILABLE", 503),
        "status": ("UPSTREAM_ERROR", 502),
        "auth": ("UPSTREAM_ERROR", 502),
        "not_found": ("MANIFEST_UNKNOWN", 404),
    }
    for kind, expected in table.items():
        mapped = UpstreamFailure(kind, "m", upstream="u").to_registry_error()
        assert (mapped.code, mapped.status) == expected, kind
    blob = UpstreamFailure("not_found", "m", upstream="u", status=404).to_registry_error("BLOB_UNKNOWN")
    assert (blob.code, blob.status) == ("BLOB_UNKNOWN", 404)
    copy = pickle.loads(pickle.dumps(quota))
    assert (copy.kind, copy.upstream, copy.status, copy.reopens_at) == (
        "quota",
        "dockerhub",
        429,
        quota.reopens_at,
    )


def test_insufficient_scope_means_the_repository_is_unknown_upstream() -> None:
    missing = UpstreamFailure(
        "auth", "upstream rejected our credentials for repository:x:pull (insufficient_scope)", upstream="hub"
    )
    error = missing.to_registry_error()
    assert error.code == "NAME_UNKNOWN"
    assert error.status == 404
    bad_password = UpstreamFailure("auth", "upstream rejected the Basic credentials", upstream="hub")
    assert bad_password.to_registry_error().code == "UPSTREAM_ERROR"


def test_a_429_with_an_errors_envelope_is_the_quota_and_any_other_is_abuse() -> None:
    envelope = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": "pulls"}]}).encode()
    assert limit_kind("application/json", envelope) == "quota"
    assert limit_kind("text/plain", envelope) == "quota"  # the body decides when there is one
    assert limit_kind("text/plain", b"Too Many Requests") == "abuse"
    assert limit_kind("application/json", b'{"errors": "not a list"}') == "abuse"
    # A HEAD has no body: the content type is all there is.
    assert limit_kind("application/json", b"") == "quota"
    assert limit_kind("text/plain", b"") == "abuse"
    quota = rate_limited("hub", "GET manifest a:b", "quota", retry_after=30.0, rate_limit=None)
    assert (quota.kind, quota.status, quota.retry_after) == ("quota", 429, 30.0)
    assert quota.message == "GET manifest a:b: pull rate limit reached"


def test_an_unwanted_status_carries_the_upstreams_message() -> None:
    envelope = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "who are you"}]}).encode()
    assert error_excerpt(envelope) == ": UNAUTHORIZED who are you"
    assert error_excerpt(b'{"details": "token expired"}') == ": token expired"
    assert error_excerpt(b"  upstream on fire  ") == ": upstream on fire"
    assert error_excerpt(b"x" * 500) == ": " + "x" * 200
    assert error_excerpt(b"") == ""
    auth = status_failure("hub", "HEAD manifest a:b", 401, envelope, retry_after=5.0, rate_limit=None)
    assert (auth.kind, auth.status, auth.retry_after) == ("auth", 401, None)
    assert auth.message == "HEAD manifest a:b: 401: UNAUTHORIZED who are you"
    limit = RateLimit(limit=100, remaining=3, window=21600.0, source=None)
    server = status_failure("hub", "GET manifest a:b", 503, b"busy", retry_after=5.0, rate_limit=limit)
    assert (server.kind, server.status, server.retry_after, server.rate_limit) == ("status", 503, 5.0, limit)
    assert server.message == "GET manifest a:b: 503: busy"


def test_a_request_without_an_answer_is_a_timeout_refused_or_network_failure() -> None:
    def kind(exc: BaseException) -> str:
        failure = transport_failure("hub", exc, "GET blob")
        assert failure.upstream == "hub"
        assert failure.status is None
        return failure.kind

    assert kind(TimeoutError()) == "timeout"
    assert kind(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) == "refused"
    assert kind(aiohttp.ServerDisconnectedError()) == "network"
    assert kind(ConnectionResetError(errno.ECONNRESET, "reset")) == "network"
