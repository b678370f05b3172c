"""Thread-safe state of the Docker Hub emulator: counters, quota, tokens and scripted faults.

`HubState` is plain Python (no event loop). `tests.support.dockerhub.DockerHubEmulator`
inherits it, so tests call `emulator.fail_next(...)` directly, and the emulator's HTTP
control API (`/_emulator/...`) dispatches to the very same methods.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from typing import Any

KINDS = ("manifest", "blob", "tags", "token", "base", "other")
ANONYMOUS = "anonymous"

TOOMANYREQUESTS_MESSAGE = (
    "You have reached your pull rate limit. You may increase the limit by authenticating "
    "and upgrading: https://www.docker.com/increase-rate-limit"
)

# Methods the generic control endpoint POST /_emulator/call/<name> may invoke.
CONTROL_METHODS = frozenset(
    {
        "fail_next",
        "fail_always",
        "clear_faults",
        "stall",
        "corrupt_blob",
        "throttle_blob",
        "cut_blob_after",
        "set_quota",
        "remaining",
        "set_abuse_limit",
        "set_token_ttl",
        "revoke_tokens",
        "reset_counters",
        "count",
        "pulls",
        "snapshot",
    }
)


def retry_after_value(value: float | str | None, fmt: str = "seconds") -> str | None:
    """Render a Retry-After header: `fmt` is "seconds", "epoch" (unix time) or "http-date"."""
    if value is None or isinstance(value, str):
        return value
    if fmt == "seconds":
        return str(max(0, round(value)))
    if fmt == "epoch":
        return str(int(time.time() + value))
    if fmt == "http-date":
        return formatdate(time.time() + value, usegmt=True)
    raise ValueError(f"unknown retry_after format {fmt!r}")


@dataclass
class Fault:
    status: int
    kind: str = "any"
    method: str | None = None
    path: str | None = None  # substring of the request path
    remaining: int | None = 1  # None: until clear_faults()
    retry_after: float | str | None = None
    retry_after_format: str = "seconds"
    plain_text: bool = False
    body: Any = None  # str | bytes | dict | list | None (None: a registry-style JSON error)
    headers: dict[str, str] | None = None

    def matches(self, method: str, kind: str, path: str) -> bool:
        return (
            (self.kind == "any" or self.kind == kind)
            and (self.method is None or self.method.upper() == method)
            and (self.path is None or self.path in path)
        )


@dataclass
class Stall:
    kind: str
    seconds: float
    method: str | None = None
    remaining: int | None = None  # None: until clear_faults()


@dataclass
class QuotaPolicy:
    limit: int
    window: float
    send_headers: bool = True  # False: paid/unlimited account, no headers, never 429
    retry_after: str | None = None  # None | "seconds" | "epoch" | "http-date"


@dataclass
class TokenInfo:
    identity: str
    scopes: dict[str, set[str]]  # repository name -> granted actions
    issued_at: float
    expires_at: float


@dataclass
class RequestRecord:
    method: str
    path: str
    kind: str
    time: float
    name: str | None = None
    identity: str | None = None
    range: str | None = None
    accept: str | None = None
    user_agent: str | None = None
    status: int | None = None  # None while in flight
    fault: str | None = None  # e.g. "fail:500", "stall:2.0", "cut:100", "corrupt"
    bytes_sent: int = 0
    duration: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BlobEffects:
    corrupt: bool = False
    bytes_per_second: float | None = None
    cut_after: int | None = None


class HubState:
    """Everything the emulator remembers. All public methods are thread-safe."""

    def __init__(
        self,
        *,
        quota_limit: int = 100,
        window_seconds: float = 21600,
        token_ttl: float = 60,
        accounts: dict[str, str] | None = None,
        count_index_gets: bool = False,
        max_records: int = 10_000,
    ) -> None:
        self._lock = threading.RLock()
        self.accounts: dict[str, str] = dict(accounts or {})
        self.token_ttl = token_ttl
        self.count_index_gets = count_index_gets
        self._by_kind: Counter[tuple[str, str]] = Counter()
        self._by_path: Counter[tuple[str, str]] = Counter()
        self._pulls: Counter[str] = Counter()
        self._records: deque[RequestRecord] = deque(maxlen=max_records)
        self._faults: list[Fault] = []
        self._stalls: list[Stall] = []
        self._blob_effects: dict[str | None, BlobEffects] = {}
        self._tokens: dict[str, TokenInfo] = {}
        self._tokens_issued = 0
        self._abuse: tuple[int, float] | None = None
        self._abuse_hits: deque[float] = deque()
        self._policy = QuotaPolicy(quota_limit, window_seconds)
        self._policies: dict[str, QuotaPolicy] = {}
        self._usage: dict[str, deque[float]] = {}
        self._prefill: dict[str | None, tuple[int, float]] = {}

    # ---------------------------------------------------------------- counters
    def record(self, rec: RequestRecord) -> RequestRecord:
        with self._lock:
            self._by_kind[(rec.method, rec.kind)] += 1
            self._by_path[(rec.method, rec.path)] += 1
            self._records.append(rec)
        return rec

    def count(
        self,
        method: str,
        kind: str | None = None,
        *,
        path: str | None = None,
        status: int | None = None,
    ) -> int:
        """Requests that reached the emulator, by (method, kind) or (method, exact path).

        Every arrival counts (401 challenges, faults and 429s included); pass `status`
        to count only requests answered with that status (from the `requests` list).
        """
        method = method.upper()
        with self._lock:
            if status is not None:
                return sum(
                    1
                    for r in self._records
                    if r.method == method
                    and r.status == status
                    and (kind is None or r.kind == kind)
                    and (path is None or r.path == path)
                )
            if path is not None:
                n = self._by_path[(method, path)]
                if kind is None:
                    return n
                return sum(1 for r in self._records if (r.method, r.path, r.kind) == (method, path, kind))
            if kind is None:
                return sum(n for (m, _), n in self._by_kind.items() if m == method)
            return self._by_kind[(method, kind)]

    @property
    def counts(self) -> dict[tuple[str, str], int]:
        """Snapshot {(method, kind): n}."""
        with self._lock:
            return dict(self._by_kind)

    @property
    def path_counts(self) -> dict[tuple[str, str], int]:
        """Snapshot {(method, path): n}."""
        with self._lock:
            return dict(self._by_path)

    @property
    def requests(self) -> list[RequestRecord]:
        """Recent requests, oldest first (a copy; records of in-flight requests get updated)."""
        with self._lock:
            return list(self._records)

    def blob_gets(self, digest: str) -> list[RequestRecord]:
        """GETs of a blob that were not turned away for credentials: in flight, answered or
        cut off, oldest first."""
        with self._lock:
            return [
                r
                for r in self._records
                if (r.method, r.kind) == ("GET", "blob") and r.path.endswith(digest) and r.status != 401
            ]

    def pulls(self, identity: str | None = None) -> int:
        """Pulls charged to `identity` (all identities if None) since the last reset."""
        with self._lock:
            return sum(self._pulls.values()) if identity is None else self._pulls[identity]

    def reset_counters(self) -> None:
        """Forget counters, pulls charged and recorded requests (not quota usage or faults)."""
        with self._lock:
            self._by_kind.clear()
            self._by_path.clear()
            self._pulls.clear()
            self._records.clear()
            self._tokens_issued = 0

    def snapshot(self) -> dict[str, Any]:
        """JSON-able view of the counters (served at GET /_emulator/counts)."""
        with self._lock:
            identities = {ANONYMOUS, *self.accounts, *self._usage}
            return {
                "by_kind": {f"{m} {k}": n for (m, k), n in sorted(self._by_kind.items())},
                "by_path": {f"{m} {p}": n for (m, p), n in sorted(self._by_path.items())},
                "pulls": dict(self._pulls),
                "remaining": {i: self.remaining(i) for i in sorted(identities)},
                "tokens_issued": self._tokens_issued,
                "requests": len(self._records),
            }

    # ------------------------------------------------------------------ faults
    def fail_next(
        self,
        n: int | None = 1,
        status: int = 500,
        kind: str = "any",
        method: str | None = None,
        retry_after: float | str | None = None,
        plain_text: bool = False,
        body: Any = None,
        *,
        retry_after_format: str = "seconds",
        path: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next `n` matching requests (None: all, until clear_faults) get `status`.

        `kind` is manifest|blob|tags|token|base|other|any, `method` None matches any, `path`
        is a substring filter. Status 0 drops the connection unanswered. 429 gets Docker
        Hub's JSON TOOMANYREQUESTS body unless `plain_text` (the abuse limiter's "Too Many
        Requests"); `body` (str, bytes, dict/list as JSON) overrides. `retry_after`: seconds,
        rendered per `retry_after_format` ("seconds", "epoch", "http-date"), or a literal
        header string. Faults apply after auth, so a 401 challenge does not use one up.
        """
        if kind not in (*KINDS, "any"):
            raise ValueError(f"unknown kind {kind!r}")
        retry_after_value(0, retry_after_format)  # validate the format now
        fault = Fault(
            status,
            kind,
            method,
            path,
            n,
            retry_after,
            retry_after_format,
            plain_text,
            body,
            headers,
        )
        with self._lock:
            self._faults.append(fault)

    def fail_always(
        self,
        status: int = 500,
        kind: str = "any",
        method: str | None = None,
        retry_after: float | str | None = None,
        plain_text: bool = False,
        body: Any = None,
        **options: Any,
    ) -> None:
        """Like fail_next, for every matching request until clear_faults()."""
        self.fail_next(None, status, kind, method, retry_after, plain_text, body, **options)

    def stall(
        self, kind: str, seconds: float, *, method: str | None = None, times: int | None = None
    ) -> None:
        """Matching requests ("any" for all) wait `seconds` before being answered."""
        if kind not in (*KINDS, "any"):
            raise ValueError(f"unknown kind {kind!r}")
        with self._lock:
            self._stalls.append(Stall(kind, float(seconds), method, times))

    def corrupt_blob(self, digest: str) -> None:
        """Serve different bytes of the same length for that blob (GET, with or without Range)."""
        with self._lock:
            self._blob_effects.setdefault(digest, BlobEffects()).corrupt = True

    def throttle_blob(self, digest: str | None, bytes_per_second: float | None) -> None:
        """Stream that blob (every blob if None) at most this fast; None removes the throttle."""
        with self._lock:
            self._blob_effects.setdefault(digest, BlobEffects()).bytes_per_second = bytes_per_second

    def cut_blob_after(self, digest: str | None, nbytes: int) -> None:
        """Close the connection after sending `nbytes` of that blob's body (None: every blob)."""
        with self._lock:
            self._blob_effects.setdefault(digest, BlobEffects()).cut_after = int(nbytes)

    def set_abuse_limit(self, max_requests: int | None, window_seconds: float = 60.0) -> None:
        """Over `max_requests` requests of any kind within the window: plain-text 429."""
        with self._lock:
            self._abuse = None if max_requests is None else (int(max_requests), window_seconds)
            self._abuse_hits.clear()

    def clear_faults(self) -> None:
        """Remove scripted faults, stalls, blob effects and the abuse limit."""
        with self._lock:
            self._faults.clear()
            self._stalls.clear()
            self._blob_effects.clear()
            self._abuse = None
            self._abuse_hits.clear()

    def take_fault(self, method: str, kind: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, kind, path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def take_stall(self, method: str, kind: str) -> float:
        with self._lock:
            for s in self._stalls:
                if (s.kind in ("any", kind)) and (s.method is None or s.method.upper() == method):
                    if s.remaining is not None:
                        s.remaining -= 1
                        if s.remaining <= 0:
                            self._stalls.remove(s)
                    return s.seconds
        return 0.0

    def blob_effects(self, digest: str) -> BlobEffects:
        with self._lock:
            specific = self._blob_effects.get(digest, BlobEffects())
            general = self._blob_effects.get(None, BlobEffects())
            return BlobEffects(
                corrupt=specific.corrupt,
                bytes_per_second=specific.bytes_per_second or general.bytes_per_second,
                cut_after=specific.cut_after if specific.cut_after is not None else general.cut_after,
            )

    def abuse_exceeded(self) -> bool:
        with self._lock:
            if self._abuse is None:
                return False
            limit, window = self._abuse
            now = time.monotonic()
            while self._abuse_hits and self._abuse_hits[0] <= now - window:
                self._abuse_hits.popleft()
            self._abuse_hits.append(now)
            return len(self._abuse_hits) > limit

    # ------------------------------------------------------------------- quota
    def set_quota(
        self,
        limit: int | None = None,
        window_seconds: float | None = None,
        remaining: int | None = None,
        send_headers: bool = True,
        *,
        identity: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        """Set the pull quota and reset usage (for `identity` only, or the default for all).

        `remaining` pre-spends `limit - remaining` pulls now; `send_headers=False` models a
        paid account (no ratelimit headers, never 429); `retry_after` adds Retry-After to the
        quota 429 as "seconds", "epoch" or "http-date" (time until a pull frees up).
        """
        with self._lock:
            base = self._policy if identity is None else self._policies.get(identity, self._policy)
            policy = QuotaPolicy(
                base.limit if limit is None else int(limit),
                base.window if window_seconds is None else float(window_seconds),
                send_headers,
                retry_after,
            )
            if retry_after is not None:
                retry_after_value(0, retry_after)
            now = time.monotonic()
            prefill = (0 if remaining is None else max(0, policy.limit - int(remaining)), now)
            if identity is None:
                self._policy = policy
                self._policies.clear()
                self._usage.clear()
                self._prefill = {None: prefill}
            else:
                self._policies[identity] = policy
                self._usage.pop(identity, None)
                self._prefill[identity] = prefill

    def policy(self, identity: str) -> QuotaPolicy:
        with self._lock:
            return self._policies.get(identity, self._policy)

    def _window(self, identity: str, policy: QuotaPolicy, now: float) -> deque[float]:
        usage = self._usage.get(identity)
        if usage is None:
            n, at = self._prefill.get(identity, self._prefill.get(None, (0, now)))
            usage = self._usage[identity] = deque([at] * n)
        while usage and usage[0] <= now - policy.window:
            usage.popleft()
        return usage

    def remaining(self, identity: str = ANONYMOUS) -> int | None:
        """Pulls left in the current window; None for an unlimited (no-headers) identity."""
        with self._lock:
            policy = self.policy(identity)
            if not policy.send_headers:
                return None
            return max(0, policy.limit - len(self._window(identity, policy, time.monotonic())))

    def reserve_pull(self, identity: str) -> tuple[bool, int | None, float]:
        """Charge a pull: (allowed, remaining after, seconds until a pull frees up)."""
        with self._lock:
            policy = self.policy(identity)
            if not policy.send_headers:
                self._pulls[identity] += 1
                return True, None, 0.0
            now = time.monotonic()
            usage = self._window(identity, policy, now)
            if len(usage) >= policy.limit:
                wait = (usage[0] + policy.window - now) if usage else policy.window
                return False, 0, max(0.0, wait)
            usage.append(now)
            self._pulls[identity] += 1
            return True, policy.limit - len(usage), 0.0

    def refund_pull(self, identity: str) -> None:
        """Undo reserve_pull (the manifest GET was not a pull after all: 404, index...)."""
        with self._lock:
            usage = self._usage.get(identity)
            if usage and self.policy(identity).send_headers:
                usage.pop()
            if self._pulls[identity] > 0:
                self._pulls[identity] -= 1

    # ------------------------------------------------------------------ tokens
    def set_token_ttl(self, seconds: float) -> None:
        with self._lock:
            self.token_ttl = seconds

    def revoke_tokens(self) -> None:
        """Forget every issued token: clients must fetch new ones (their next request is a 401)."""
        with self._lock:
            self._tokens.clear()

    def check_credentials(self, username: str, password: str) -> bool:
        with self._lock:
            expected = self.accounts.get(username)
        return expected is not None and secrets.compare_digest(expected, password)

    def issue_token(self, identity: str, scopes: dict[str, set[str]]) -> tuple[str, TokenInfo]:
        now = time.time()
        with self._lock:
            info = TokenInfo(identity, scopes, now, now + self.token_ttl)
            token = secrets.token_urlsafe(32)
            self._tokens[token] = info
            self._tokens_issued += 1
            return token, info

    def lookup_token(self, token: str) -> TokenInfo | None:
        """The token's info, or None when unknown or expired."""
        with self._lock:
            info = self._tokens.get(token)
            if info is not None and info.expires_at <= time.time():
                del self._tokens[token]
                return None
            return info

    @staticmethod
    def iso8601(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
