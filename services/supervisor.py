"""Starts the processes of `seawall up`, follows their logs, restarts and stops them.

A child that exits is restarted after a back-off that doubles with each of its recent
crashes; the supervisor asks for everything to stop once one child crashed more than
`restart_limit` times within `restart_window`. The children end with the supervisor even
when it is killed outright (see ManagedProcess).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rich.console import Console
from rich.text import Text

from services.processes import ManagedProcess, ServerStartError
from shared.settings import Settings

_COLOURS = {
    "edge": "cyan",
    "worker": "magenta",
    "scheduler": "yellow",
    "redis": "red",
    "s3": "green",
    "seawall": "bold",
}
# How often logs are read for new lines, and the stack's children looked at.
POLL = 0.2


class Printer:
    """Writes `name | line` to stdout, coloured on a terminal, one whole line at a time."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self.console = Console(file=self.stream) if self.stream.isatty() else None
        self.lock = threading.Lock()

    def line(self, name: str, text: str) -> None:
        with self.lock:
            if self.console is None:
                self.stream.write(f"{name} | {text}\n")
                self.stream.flush()
                return
            # Several edges (`edge-1`, `edge-2`) share the edge's colour.
            colour = _COLOURS.get(name, _COLOURS.get(name.split("-", 1)[0], "bold"))
            line = Text.assemble((f"{name} | ", colour), text)
            self.console.print(line, soft_wrap=True, highlight=False)

    def info(self, text: str) -> None:
        self.line("seawall", text)


class _Follower(threading.Thread):
    """Copies a child's log file to the printer as it grows."""

    def __init__(self, name: str, path: Path, printer: Printer) -> None:
        super().__init__(name=f"follow-{name}", daemon=True)
        self.label = name
        self.path = path
        self.printer = printer
        self.finish = threading.Event()

    def run(self) -> None:
        pending = b""
        with self.path.open("rb") as log:
            while True:
                chunk = log.readline()
                pending += chunk
                if pending.endswith(b"\n"):
                    self.printer.line(self.label, pending.decode(errors="replace").rstrip())
                    pending = b""
                elif not chunk:
                    # Only stop once the file is drained, so a dying child's last words show.
                    if self.finish.is_set():
                        break
                    self.finish.wait(POLL)
        if pending:
            self.printer.line(self.label, pending.decode(errors="replace").rstrip())


# A crashed child is restarted after BACKOFF_FIRST seconds, doubled for each of its other
# crashes within the restart window, at most BACKOFF_MAX.
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0


@dataclass(frozen=True)
class RestartPolicy:
    """More than `limit` crashes of one child within `window` seconds stop the stack."""

    limit: int
    window: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(settings.restart_limit, settings.restart_window.total_seconds())

    def delay(self, crashes: int) -> float:
        """The back-off before the restart that follows the `crashes`-th recent crash."""
        return min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** (crashes - 1))


# A child's start: the process, and the variables it gives the apps (the embedded servers'
# addresses and keys).
Launch = Callable[[], tuple[ManagedProcess, dict[str, str]]]


@dataclass
class Child:
    """One process of the stack: how to start it again, and when it crashed lately."""

    name: str
    launch: Launch
    server: bool  # an embedded server: stopped after the apps, and its address matters to them
    # Called with the pid of each of its processes that ended (and was reaped).
    on_exit: Callable[[int], None] | None = None
    process: ManagedProcess | None = None
    follower: _Follower | None = None
    crashes: deque[float] = field(default_factory=deque)
    restart_at: float | None = None  # monotonic time of the pending restart, if it crashed


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


class Supervisor:
    """Owns every process of the stack: starts, restarts and stops them.

    Restarts happen on the thread that calls `tend` (the main one), which is also the one
    the kernel watches to end the children when the supervisor dies.
    """

    def __init__(
        self,
        printer: Printer,
        log_dir: Path,
        policy: RestartPolicy,
        env: Mapping[str, str],
        keep_fds: tuple[int, ...] = (),
    ) -> None:
        self.printer = printer
        self.log_dir = log_dir
        self.policy = policy
        # What the apps are started with; the servers' variables are added as they start.
        self.env = dict(env)
        self.keep_fds = keep_fds
        self.children: list[Child] = []

    def start_server(self, name: str, launch: Launch) -> None:
        """Start an embedded server now (ServerStartError if it does not come up)."""
        child = Child(name, launch, server=True)
        self.children.append(child)
        self._launch(child)

    def spawn(
        self,
        name: str,
        argv: list[str],
        env: Mapping[str, str] | None = None,
        on_exit: Callable[[int], None] | None = None,
    ) -> None:
        """Start one of Seawall's own processes, with the environment as it is at each start
        (plus `env`, its own variables); `on_exit(pid)` runs after each of its processes ends."""

        def launch() -> tuple[ManagedProcess, dict[str, str]]:
            log = self.log_dir / f"{name}.log"
            process_env = {**self.env, **(env or {})}
            return ManagedProcess(name, argv, log, process_env, pass_fds=self.keep_fds), {}

        child = Child(name, launch, server=False, on_exit=on_exit)
        self.children.append(child)
        self._launch(child)

    def _launch(self, child: Child) -> dict[str, str]:
        """Start the child and follow its log; the variables it changed for the apps."""
        process, exported = child.launch()
        child.process = process
        child.restart_at = None
        child.follower = _Follower(child.name, process.log_path, self.printer)
        child.follower.start()
        changed = {key: value for key, value in exported.items() if self.env.get(key) != value}
        self.env.update(exported)
        return changed

    def tend(self) -> str | None:
        """Notice children that exited and make due restarts; a reason to stop everything, or None."""
        for child in self.children:
            reason = self._tend(child)
            if reason is not None:
                return reason
        return None

    def _tend(self, child: Child) -> str | None:
        process = child.process
        if child.restart_at is None:
            if process is None or process.running():
                return None
            self._bury(child)
            return self._crashed(child, f"{child.name} {_exit_description(process.process.returncode)}")
        if time.monotonic() < child.restart_at:
            return None
        if process is not None and process.log_path.exists():
            # Its log stays beside the new one (which starts empty) for a look at the crash.
            process.log_path.replace(process.log_path.with_name(process.log_path.name + ".1"))
        try:
            changed = self._launch(child)
        except (ServerStartError, OSError) as exc:
            for line in str(exc).splitlines():
                self.printer.info(line)
            return self._crashed(child, f"{child.name} did not restart")
        assert child.process is not None
        self.printer.info(f"{child.name} restarted (pid {child.process.pid})")
        if child.server and changed:
            self._restart_apps(child.name)
        return None

    def _bury(self, child: Child) -> None:
        """After a child's exit: kill what it left in its process group, print its last words."""
        if child.process is not None:
            child.process.stop()
            if child.on_exit is not None:
                child.on_exit(child.process.pid)
        if child.follower is not None:
            child.follower.finish.set()
            child.follower.join(timeout=5)

    def _crashed(self, child: Child, what: str) -> str | None:
        now = time.monotonic()
        child.crashes.append(now)
        while child.crashes and child.crashes[0] <= now - self.policy.window:
            child.crashes.popleft()
        count = len(child.crashes)
        window = f"{self.policy.window:g}s"
        if count > self.policy.limit:
            return (
                f"{what}; {child.name} crashed {count} times within {window} "
                f"(restart_limit {self.policy.limit}): stopping everything"
            )
        delay = self.policy.delay(count)
        child.restart_at = now + delay
        self.printer.info(
            f"{what}; restarting it in {delay:g}s "
            f"(crash {count} of at most {self.policy.limit} within {window})"
        )
        return None

    def _restart_apps(self, server: str) -> None:
        """The apps learn a server's address from their environment: restart those running."""
        apps = [c for c in self.children if not c.server and c.restart_at is None]
        self.printer.info(f"{server} has a new address: restarting {', '.join(c.name for c in apps)}")
        for child in apps:
            self._bury(child)
            self._launch(child)

    def stop_all(self) -> None:
        # Apps stop before the servers so they can finish work against Redis and S3;
        # within each group the (seconds-long) graceful stops run side by side. A child
        # waiting for its restart was stopped already (its process group killed).
        for servers in (False, True):
            _stop_together(
                [
                    child.process
                    for child in self.children
                    if child.server == servers and child.process is not None and child.restart_at is None
                ]
            )
        for child in self.children:
            if child.follower is not None:
                child.follower.finish.set()
                child.follower.join(timeout=5)


def _stop_together(children: list[ManagedProcess]) -> None:
    threads = [threading.Thread(target=child.stop) for child in children]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
