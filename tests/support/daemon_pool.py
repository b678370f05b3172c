"""Daemons (dockerd, containerd) started once per configuration for a whole test session.

What differs between kinds of daemon is passed in: how to start one for a configuration,
and why none can run on this machine. Tests that need a daemon that cannot run skip, with
the reason; a configuration that failed once is not tried again.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import pytest

from services.processes import ManagedProcess

ConfigT = TypeVar("ConfigT", bound=Hashable)
DaemonT = TypeVar("DaemonT", bound=ManagedProcess)


class DaemonUnavailable(Exception):
    """A daemon did not start on this machine; the message says why."""


class DaemonPool(Generic[ConfigT, DaemonT]):
    """One started daemon per configuration for the whole session (or why it cannot start).

    `start(config)` starts one and waits until it answers, or raises DaemonUnavailable;
    `unavailable()` is why no daemon of this kind can run here, or None. With a `limit`,
    starting one more first stops the least recently used daemons that no test uses now.
    """

    def __init__(
        self,
        start: Callable[[ConfigT], DaemonT],
        unavailable: Callable[[], str | None],
        limit: int | None = None,
    ) -> None:
        self.start = start
        self.unavailable = unavailable
        self.limit = limit
        self.daemons: dict[ConfigT, DaemonT] = {}  # least recently used first
        self.failures: dict[ConfigT, str] = {}

    def get(self, config: ConfigT, in_use: Sequence[DaemonT] = ()) -> DaemonT:
        """The running daemon for config, started if need be; the test skips if it cannot be."""
        if config in self.daemons:
            self.daemons[config] = self.daemons.pop(config)
            return self.daemons[config]
        reason = self.failures.get(config) or self.unavailable()
        if reason:
            self.failures[config] = reason
            pytest.skip(reason)
        self._evict(keep=in_use)
        try:
            daemon = self.start(config)
        except DaemonUnavailable as exc:
            self.failures[config] = str(exc)
            pytest.skip(str(exc))
        self.daemons[config] = daemon
        return daemon

    def _evict(self, keep: Sequence[DaemonT]) -> None:
        # Tests that mirror a per-test edge need a daemon each; only a few stay running.
        if self.limit is None:
            return
        idle = [c for c, d in self.daemons.items() if all(d is not k for k in keep)]
        while len(self.daemons) >= self.limit and idle:
            self.daemons.pop(idle.pop(0)).stop()

    def stop_all(self) -> None:
        for daemon in self.daemons.values():
            daemon.stop()
        self.daemons.clear()
