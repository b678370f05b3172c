"""Runs the all-in-one stack: embedded servers, edge, workers and scheduler, stopped together."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
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


class Supervisor:
    """Owns every process of the stack: Seawall's own first, then the servers they use."""

    def __init__(self, printer: Printer, log_dir: Path) -> None:
        self.printer = printer
        self.log_dir = log_dir
        self.servers: list[ManagedProcess] = []
        self.apps: list[ManagedProcess] = []
        self.followers: list[_Follower] = []

    def _follow(self, child: ManagedProcess) -> None:
        follower = _Follower(child.name, child.log_path, self.printer)
        follower.start()
        self.followers.append(follower)

    def adopt_server(self, server: ManagedProcess) -> None:
        self.servers.append(server)
        self._follow(server)

    def spawn(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        app = ManagedProcess(name, argv, self.log_dir / f"{name}.log", env)
        self.apps.append(app)
        self._follow(app)

    def first_dead(self) -> ManagedProcess | None:
        return next((child for child in [*self.servers, *self.apps] if not child.running()), None)

    def stop_all(self) -> None:
        # Apps stop before the servers so they can finish work against Redis and S3;
        # within each group the (seconds-long) graceful stops run side by side.
        for group in (self.apps, self.servers):
            _stop_together(group)
        for follower in self.followers:
            follower.finish.set()
            follower.join(timeout=5)


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


def embedded_redis_file(data_dir: Path) -> Path:
    return data_dir / "embedded-redis-url"


def start_embedded(settings: Settings, supervisor: Supervisor, data_dir: Path) -> dict[str, str]:
    """Start Redis and S3 where the settings name none; return the variables that point at them."""
    env: dict[str, str] = {}
    if settings.redis_url is None:
        redis = start_redis(data_dir, log_path=supervisor.log_dir / "redis.log")
        supervisor.adopt_server(redis)
        supervisor.printer.info(f"embedded redis at {redis.url}")
        env["SEAWALL_REDIS_URL"] = redis.url
        # So `seawall quota` and `seawall warm` find the embedded Redis of a running stack.
        embedded_redis_file(data_dir).write_text(redis.url)
    if settings.s3 is None:
        s3 = start_s3(data_dir, log_path=supervisor.log_dir / "s3.log")
        supervisor.adopt_server(s3)
        s3.ensure_bucket(S3Settings().bucket)
        supervisor.printer.info(f"embedded s3 at http://{s3.endpoint}")
        env |= {
            "SEAWALL_S3__ENDPOINT": s3.endpoint,
            "SEAWALL_S3__ACCESS_KEY": s3.access_key,
            "SEAWALL_S3__SECRET_KEY": s3.secret_key,
        }
    return env


def client_address(settings: Settings) -> str:
    """host:port a local docker reaches the edge at."""
    host = settings.listen_host
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{host}:{settings.listen_port}"


def announce(settings: Settings, printer: Printer) -> None:
    """Tell the user where the edge is and how to point docker at it."""
    address = client_address(settings)
    printer.info(f"edge listening on http://{address}")
    printer.info(
        f'as a Docker Hub mirror: add "registry-mirrors": ["http://{address}"] '
        "to /etc/docker/daemon.json and restart dockerd"
    )
    names = ", ".join(p.name for p in settings.projects) or "none configured"
    printer.info(f"per project: docker pull {address}/<project>/<repo>:<tag>  (projects: {names})")
    printer.info(
        "docker treats 127.0.0.0/8 as an insecure (plain HTTP) registry by default; "
        'other addresses need "insecure-registries" in daemon.json'
    )


def _supervise(settings: Settings, supervisor: Supervisor, stop: threading.Event) -> int:
    """Wait for a stop request (exit 0) or the death of any child (exit 1)."""
    host, port = client_address(settings).rsplit(":", 1)
    announced = False
    while not stop.wait(_POLL):
        dead = supervisor.first_dead()
        if dead is not None:
            code = dead.process.returncode
            supervisor.printer.info(f"{dead.name} exited with code {code}; stopping everything")
            return 1
        if not announced and port_open(host, int(port)):
            announce(settings, supervisor.printer)
            announced = True
    supervisor.printer.info("stopping")
    return 0


def run_stack(settings: Settings, config_file: Path | None, printer: Printer | None = None) -> int:
    """Run the whole stack in the foreground until Ctrl-C, SIGTERM or a child's death."""
    data_dir = settings.data_dir.resolve()
    supervisor = Supervisor(printer or Printer(), data_dir / "logs")
    with stop_on_signals() as stop:
        try:
            env = {**os.environ, **start_embedded(settings, supervisor, data_dir)}
            if stop.is_set():
                return 0  # asked to stop while the embedded servers were starting
            env["PYTHONUNBUFFERED"] = "1"  # children's lines should show as they are written
            if config_file is not None:
                env["SEAWALL_CONFIG"] = str(config_file.resolve())
            for name, argv in child_commands(settings, config_file and config_file.resolve()):
                supervisor.spawn(name, argv, env)
            return _supervise(settings, supervisor, stop)
        except (ServerStartError, FileNotFoundError) as exc:
            supervisor.printer.info(f"error: {exc}")
            return 1
        finally:
            supervisor.stop_all()
            supervisor.printer.info("all processes stopped")
