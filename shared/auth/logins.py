"""Failed-login limits per client address and per account, kept in each edge process.

In-process on purpose: the check is a dictionary lookup that costs nothing under a
flood and keeps working while Redis is slow or away (a Redis round trip per login would
make logins fail exactly when the flood is on). The price is that behind a balancer
spreading one client over N edges, that client gets N times the budget.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable
from dataclasses import dataclass, field

from shared.oci.errors import RegistryError
from shared.settings import LoginSettings

# Keys each table holds at most: a flood of distinct addresses or user names evicts the
# oldest windows instead of growing memory (about 100 bytes a key).
MAX_KEYS = 65_536


@dataclass(slots=True)
class _Window:
    opened: float
    failures: int = 0


class FailureWindows:
    """Failures per key, counted in a window that opens with the key's first failure.

    Holds at most `max_keys` keys; past that the key whose window opened first is
    forgotten. A success never resets a count: the window simply runs out.
    """

    def __init__(self, limit: int, window: float, max_keys: int = MAX_KEYS) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        # In the order the windows opened, so expired ones are always at the front.
        self._windows: OrderedDict[Hashable, _Window] = OrderedDict()

    def __len__(self) -> int:
        return len(self._windows)

    def _current(self, key: Hashable, now: float) -> _Window | None:
        window = self._windows.get(key)
        if window is not None and now - window.opened >= self.window:
            del self._windows[key]
            return None
        return window

    def blocked_for(self, key: Hashable, now: float) -> float | None:
        """Seconds until `key` may try again, None when it is under the limit."""
        window = self._current(key, now)
        if window is None or window.failures < self.limit:
            return None
        return window.opened + self.window - now

    def fail(self, key: Hashable, now: float) -> _Window:
        window = self._current(key, now)
        if window is None:
            self._make_room(now)
            window = self._windows[key] = _Window(now)
        window.failures += 1
        return window

    def forgive(self, key: Hashable, window: _Window) -> None:
        """Take back one failure counted in advance, if `window` is still the key's own."""
        if self._windows.get(key) is window and window.failures > 0:
            window.failures -= 1

    def _make_room(self, now: float) -> None:
        while self._windows:
            key, oldest = next(iter(self._windows.items()))
            if now - oldest.opened < self.window and len(self._windows) < self.max_keys:
                return
            del self._windows[key]


def client_key(remote: str | None) -> str:
    """The address a client is limited by: an IPv6 client usually holds its whole /64."""
    if not remote:
        return ""
    try:
        address = ipaddress.ip_address(remote)
    except ValueError:
        return remote[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(slots=True)
class LoginAttempt:
    """A login whose failure is counted before it is checked, so parallel guesses count too."""

    counted: list[tuple[FailureWindows, Hashable, _Window]] = field(default_factory=list)

    def succeeded(self) -> None:
        for table, key, window in self.counted:
            table.forgive(key, window)
        self.counted.clear()


class LoginLimiter:
    def __init__(
        self,
        settings: LoginSettings,
        accounts: Collection[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        window = settings.window.total_seconds()
        self._clock = clock
        self._accounts = frozenset(accounts)
        self._clients = FailureWindows(settings.failures_per_client, window)
        # Known accounts are few and never evicted; names that are no account get the
        # same limit (a 429 must not tell which names exist) in a bounded table of their
        # hashes, so long names cost no more memory than short ones.
        self._known = FailureWindows(settings.failures_per_account, window, max_keys=len(self._accounts) + 1)
        self._unknown = FailureWindows(settings.failures_per_account, window)

    @property
    def size(self) -> int:
        """Keys held across the tables (clients, accounts, names that are no account)."""
        return len(self._clients) + len(self._known) + len(self._unknown)

    def _account(self, user: str) -> tuple[FailureWindows, Hashable]:
        if user in self._accounts:
            return self._known, user
        return self._unknown, hashlib.blake2b(user.encode(), digest_size=16).digest()

    def check(self, remote: str | None, user: str) -> None:
        """Raise `429 TOOMANYREQUESTS` when the client or the account is over its limit."""
        now = self._clock()
        seconds = self._clients.blocked_for(client_key(remote), now)
        if seconds is not None:
            raise _too_many("too many failed logins from this address", seconds)
        table, key = self._account(user)
        seconds = table.blocked_for(key, now)
        if seconds is not None:
            raise _too_many("too many failed logins for this account", seconds)

    def begin(self, remote: str | None, user: str) -> LoginAttempt:
        """Check, then count the attempt as failed until `succeeded()` says otherwise."""
        self.check(remote, user)
        now = self._clock()
        attempt = LoginAttempt()
        client = client_key(remote)
        attempt.counted.append((self._clients, client, self._clients.fail(client, now)))
        table, key = self._account(user)
        attempt.counted.append((table, key, table.fail(key, now)))
        return attempt


def _too_many(message: str, seconds: float) -> RegistryError:
    retry_after = max(1, math.ceil(seconds))
    return RegistryError(
        "TOOMANYREQUESTS",
        f"{message}; retry in {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )
