"""Runs the all-in-one stack: embedded servers, edge, workers and scheduler, under one supervisor.

A child that exits is restarted after a back-off that doubles with each of its recent
crashes; everything stops on SIGINT or SIGTERM, or once one child crashed more than
`restart_limit` times within `restart_window`. The children end with the supervisor even
when it is killed outright (see ManagedProcess), and a lock on the data directory keeps a
second `seawall up` from starting servers on the same store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

from rich.console import Console
from rich.text import Text

from services.embedded import (
    ManagedProcess,
    ServerStartError,
    port_open,
    start_redis,
    start_s3,
)
from shared.settings import S3Settings, Settings

_COLOURS = {
    "edge": "cyan",
    "worker": "magenta",
    "scheduler": "yellow",
    "redis": "red",
    "s3": "green",
    "seawall": "bold",
}
_POLL = 0.2
LOCK_FILE = "seawall-up.lock"
# How long a new `seawall up` waits for the apps of a killed one to exit.
LOCK_WAIT = 20.0


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
            line = Text.assemble((f"{name} | ", _COLOURS.get(name, "bold")), text)
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
                    self.finish.wait(_POLL)
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

    def spawn(self, name: str, argv: list[str]) -> None:
        """Start one of Seawall's own processes, with the environment as it is at each start."""

        def launch() -> tuple[ManagedProcess, dict[str, str]]:
            log = self.log_dir / f"{name}.log"
            return ManagedProcess(name, argv, log, self.env, pass_fds=self.keep_fds), {}

        child = Child(name, launch, server=False)
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


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM while inside the block; handlers restored after."""
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def child_commands(settings: Settings, config_file: Path | None) -> list[tuple[str, list[str]]]:
    """The argv of each Seawall process, by name."""
    config_args = ["--config", str(config_file)] if config_file else []
    worker = [sys.executable, "-m", "services.cli", "worker", *config_args]
    return [
        ("edge", [sys.executable, "-m", "services.edge", *config_args]),
        ("worker", worker),
        ("scheduler", [sys.executable, "-m", "services.scheduler", *config_args]),
    ]


def embedded_s3_file(data_dir: Path) -> Path:
    """Where a running `seawall up` leaves its embedded S3's endpoint and keys (owner-only)."""
    return data_dir / "embedded-s3.json"


def embedded_redis_file(data_dir: Path) -> Path:
    return data_dir / "embedded-redis-url"


def start_embedded(settings: Settings, supervisor: Supervisor, data_dir: Path) -> None:
    """Start Redis and S3 where the settings name none; their variables go to the apps."""
    printer = supervisor.printer
    if settings.redis_url is None:
        port: int | None = None
        # Other users of this host can reach 127.0.0.1: without it they could read the
        # upstream tokens Redis holds. Kept for restarts, so the apps' URL stays valid.
        password = secrets.token_urlsafe(24)

        def launch_redis() -> tuple[ManagedProcess, dict[str, str]]:
            nonlocal port
            # A restarted Redis takes the port it had: the apps reconnect to the same URL
            # and carry on (Redis holds nothing they cannot do without).
            redis = start_redis(
                data_dir, port=port, log_path=supervisor.log_dir / "redis.log", password=password
            )
            port = redis.port
            printer.info(f"embedded redis at redis://127.0.0.1:{redis.port} (password-protected)")
            # So `seawall quota` and `seawall warm` find the embedded Redis of a running stack.
            _write_private(embedded_redis_file(data_dir), redis.url)
            return redis, {"SEAWALL_REDIS_URL": redis.url}

        supervisor.start_server("redis", launch_redis)
    if settings.s3 is None:
        keys: dict[str, str] = {}

        def launch_s3() -> tuple[ManagedProcess, dict[str, str]]:
            # A restarted S3 keeps its keys and data, but its ports are chosen anew: when
            # they differ, the supervisor restarts the apps with the new endpoint.
            s3 = start_s3(
                data_dir,
                access_key=keys.get("access"),
                secret_key=keys.get("secret"),
                log_path=supervisor.log_dir / "s3.log",
            )
            keys.update(access=s3.access_key, secret=s3.secret_key)
            try:
                s3.ensure_bucket(S3Settings().bucket)
            except Exception as exc:
                s3.stop()
                raise ServerStartError(f"s3 did not start: creating the bucket failed: {exc}") from exc
            printer.info(f"embedded s3 at http://{s3.endpoint}")
            # So `seawall scrub` finds the embedded store of a running stack (owner-only: keys).
            _write_private(
                embedded_s3_file(data_dir),
                json.dumps(
                    {"endpoint": s3.endpoint, "access_key": s3.access_key, "secret_key": s3.secret_key}
                ),
            )
            return s3, {
                "SEAWALL_S3__ENDPOINT": s3.endpoint,
                "SEAWALL_S3__ACCESS_KEY": s3.access_key,
                "SEAWALL_S3__SECRET_KEY": s3.secret_key,
            }

        supervisor.start_server("s3", launch_s3)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(text)


def client_address(settings: Settings) -> str:
    """host:port a local docker reaches the edge at."""
    host = settings.listen_host
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{settings.listen_port}"


def announce(settings: Settings, printer: Printer) -> None:
    """Tell the user where the edge is and how to point docker at it."""
    address = client_address(settings)
    scheme = "https" if settings.tls else "http"
    printer.info(f"edge listening on {scheme}://{address}")
    printer.info(
        f'as a Docker Hub mirror: add "registry-mirrors": ["{scheme}://{address}"] '
        "to /etc/docker/daemon.json and restart dockerd"
    )
    names = ", ".join(p.name for p in settings.projects) or "none configured"
    printer.info(f"per project: docker pull {address}/<project>/<repo>:<tag>  (projects: {names})")
    if settings.tls:
        printer.info(
            f"clients must trust the CA that signed {settings.tls.cert_file} (see README: Native TLS)"
        )
    else:
        printer.info(
            "docker treats 127.0.0.0/8 as an insecure (plain HTTP) registry by default; "
            'other addresses need "insecure-registries" in daemon.json'
        )


def _supervise(settings: Settings, supervisor: Supervisor, stop: threading.Event) -> int:
    """Tend the children until a stop request (exit 0) or a child crashing too often (exit 1)."""
    host, port = client_address(settings).rsplit(":", 1)
    announced = False
    while not stop.wait(_POLL):
        reason = supervisor.tend()
        if reason is not None:
            supervisor.printer.info(reason)
            return 1
        if not announced and port_open(host, int(port)):
            announce(settings, supervisor.printer)
            announced = True
    supervisor.printer.info("stopping")
    return 0


class DataDirBusy(RuntimeError):
    """Another `seawall up` (or what is left of one) uses the data directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_data_dir(data_dir: Path, printer: Printer) -> int:
    """Lock data_dir for this `seawall up`: the open lock file (to pass to the apps), or DataDirBusy.

    The apps inherit the lock, so it is free only once the supervisor and its apps are
    all gone: a new `seawall up` after a killed one waits for the old apps to exit
    instead of starting a second SeaweedFS on the same store.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    # It holds the embedded stores' keys, the disk tier's copies of private blobs and logs.
    data_dir.chmod(0o700)
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline: float | None = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _lock_holder(fd)
            if holder is not None and _alive(holder):
                os.close(fd)
                raise DataDirBusy(
                    f"another `seawall up` (pid {holder}) is running with data_dir {data_dir}"
                ) from None
            if deadline is None:
                printer.info(f"waiting for the processes of a stopped `seawall up` to leave {data_dir}")
                deadline = time.monotonic() + LOCK_WAIT
            elif time.monotonic() > deadline:
                os.close(fd)
                raise DataDirBusy(
                    f"processes of an earlier `seawall up` still hold {path} after {LOCK_WAIT:g}s"
                ) from None
            time.sleep(_POLL)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock_holder(fd: int) -> int | None:
    """The pid of the `seawall up` that took the lock, as it wrote it."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def run_stack(settings: Settings, config_file: Path | None, printer: Printer | None = None) -> int:
    """Run the whole stack in the foreground until Ctrl-C, SIGTERM or a child crashing too often."""
    data_dir = settings.data_dir.resolve()
    printer = printer or Printer()
    try:
        lock = lock_data_dir(data_dir, printer)
    except DataDirBusy as exc:
        printer.info(f"error: {exc}")
        return 1
    try:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # children's lines show as they are written
        if config_file is not None:
            env["SEAWALL_CONFIG"] = str(config_file.resolve())
        policy = RestartPolicy.from_settings(settings)
        supervisor = Supervisor(printer, data_dir / "logs", policy, env, keep_fds=(lock,))
        with stop_on_signals() as stop:
            try:
                start_embedded(settings, supervisor, data_dir)
                if stop.is_set():
                    return 0  # asked to stop while the embedded servers were starting
                for name, argv in child_commands(settings, config_file and config_file.resolve()):
                    supervisor.spawn(name, argv)
                return _supervise(settings, supervisor, stop)
            except (ServerStartError, FileNotFoundError) as exc:
                printer.info(f"error: {exc}")
                return 1
            finally:
                supervisor.stop_all()
                printer.info("all processes stopped")
    finally:
        os.close(lock)
