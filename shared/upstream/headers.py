"""What upstream responses say: quota headers, Retry-After, auth challenges, dates."""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any


def _parse_quota_value(value: str | None) -> tuple[int | None, float | None]:
    """`100;w=21600` (possibly several comma-separated policies) -> (100, 21600.0)."""
    if not value:
        return None, None
    number: int | None = None
    window: float | None = None
    # Older Docker Hub answers read `100, 100;w=21600`: the number first, then the policy.
    for policy in value.split(","):
        parts = [p.strip() for p in policy.split(";")]
        if number is None:
            with contextlib.suppress(ValueError):
                number = int(parts[0])
        for param in parts[1:]:
            key, _, raw = param.partition("=")
            if key.strip().lower() == "w" and window is None:
                with contextlib.suppress(ValueError):
                    window = float(raw.strip().strip('"'))
        if number is not None and window is not None:
            break
    return number, window


@dataclass(frozen=True)
class RateLimit:
    """Docker Hub's pull quota as the last response reported it."""

    limit: int | None
    remaining: int | None
    window: float | None  # seconds
    source: str | None  # docker-ratelimit-source: the IP or account charged

    @classmethod
    def from_headers(cls, headers: Mapping[str, str]) -> RateLimit | None:
        """None when the response has no ratelimit-* headers (the request was not counted)."""
        lowered = {k.lower(): v for k, v in headers.items()}
        raw_limit = lowered.get("ratelimit-limit")
        raw_remaining = lowered.get("ratelimit-remaining")
        if raw_limit is None and raw_remaining is None:
            return None
        limit, window = _parse_quota_value(raw_limit)
        remaining, remaining_window = _parse_quota_value(raw_remaining)
        source = lowered.get("docker-ratelimit-source")
        return cls(limit, remaining, window if window is not None else remaining_window, source)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds from `now` (unix time) that a Retry-After value names, or None if unparseable.

    Accepts delta-seconds, a unix epoch (an integer above 10^9, as Docker Hub has been seen
    to send) and an HTTP-date. Times in the past give 0.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number):
            return None
        if number > 1e9:
            return max(0.0, number - now)
        return max(0.0, number)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"\s*,*\s*({_TOKEN})")
_PARAM_RE = re.compile(rf"[\s,]*({_TOKEN})\s*=\s*")
_BARE_VALUE_RE = re.compile(r"[^\s,]*")
_TOKEN68_RE = re.compile(r"\s+[A-Za-z0-9._~+/-]+=*\s*(?:,|$)")


def parse_challenges(values: str | list[str]) -> list[tuple[str, dict[str, str]]]:
    """Parse WWW-Authenticate header value(s) into [(scheme in lower case, {param: value})].

    Handles several challenges in one header, quoted values containing commas and escaped
    quotes, and unquoted token values. Parameter names are lower-cased.
    """
    headers = [values] if isinstance(values, str) else list(values)
    challenges: list[tuple[str, dict[str, str]]] = []
    for header in headers:
        pos = 0
        length = len(header)
        while pos < length:
            match = _SCHEME_RE.match(header, pos)
            if not match:
                break
            scheme = match[1].lower()
            pos = match.end()
            params: dict[str, str] = {}
            token68 = _TOKEN68_RE.match(header, pos)
            if token68:  # e.g. `Negotiate abc==`: no parameters
                pos = token68.end()
                challenges.append((scheme, params))
                continue
            while pos < length:
                param = _PARAM_RE.match(header, pos)
                if not param:
                    break
                # "Basic realm=..." after a comma is a new challenge, not a parameter
                # named "Basic": _PARAM_RE needs the name to be followed by "=".
                key = param[1].lower()
                pos = param.end()
                if pos < length and header[pos] == '"':
                    pos += 1
                    chars: list[str] = []
                    while pos < length and header[pos] != '"':
                        if header[pos] == "\\" and pos + 1 < length:
                            pos += 1
                        chars.append(header[pos])
                        pos += 1
                    pos += 1  # the closing quote
                    params[key] = "".join(chars)
                else:
                    bare = _BARE_VALUE_RE.match(header, pos)
                    assert bare is not None
                    params[key] = bare[0]
                    pos = bare.end()
            # Skip a token68 or anything unparseable up to the next comma.
            if pos < length and not re.match(r"[\s,]", header[pos]):
                nxt = header.find(",", pos)
                pos = length if nxt < 0 else nxt
            challenges.append((scheme, params))
    return challenges


def parse_rfc3339(value: Any) -> float | None:
    """Unix time of an RFC 3339 timestamp (a token's issued_at), None if it is not one."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    # Python wants at most 6 fractional digits; Go writes up to 9.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text)
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()
