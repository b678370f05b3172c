"""`seawall up`: the all-in-one stack (embedded Redis and S3 where none are configured,
`edge_processes` edges sharing the registry port, workers and scheduler) in the foreground,
under one Supervisor, until SIGINT or SIGTERM.

A lock on the data directory keeps a second `seawall up` from starting servers on the
same store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from services.embedded import start_redis, start_s3
from services.processes import ManagedProcess, ServerStartError, port_open
from services.running import embedded_redis_file, embedded_s3_file
from services.supervisor import POLL, Printer, RestartPolicy, Supervisor
from shared.settings import S3Settings, Settings

LOCK_FILE = "seawall-up.lock"
# How long a new `seawall up` waits for the apps of a killed one to exit.
LOCK_WAIT = 20.0
# Where several edge processes keep their metrics, each scrape summing them (under data_dir).
EDGE_METRICS_DIR = "edge-metrics"


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


def edge_names(settings: Settings) -> list[str]:
    """The edges' names (their log files' too): `edge`, or `edge-1` ... `edge-N` for several."""
    count = settings.edge_processes
    return ["edge"] if count == 1 else [f"edge-{index}" for index in range(1, count + 1)]


def child_commands(settings: Settings, config_file: Path | None) -> list[tuple[str, list[str]]]:
    """The argv of each Seawall process, by name."""
    config_args = ["--config", str(config_file)] if config_file else []
    edge = [sys.executable, "-m", "services.edge", *config_args]
    worker = [sys.executable, "-m", "services.cli", "worker", *config_args]
    return [
        *((name, edge) for name in edge_names(settings)),
        ("worker", worker),
        ("scheduler", [sys.executable, "-m", "services.scheduler", *config_args]),
    ]


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
                data_dir,
                port=port,
                log_path=supervisor.log_dir / "redis.log",
                password=password,
                pass_fds=supervisor.keep_fds,
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
                pass_fds=supervisor.keep_fds,
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


def spawn_apps(settings: Settings, supervisor: Supervisor, config_file: Path | None, data_dir: Path) -> None:
    """Start the edges, the workers and the scheduler.

    Several edges keep their metrics in one directory (prometheus_client's multi-process
    mode, chosen by the variable as each process starts), so whichever edge a scrape
    reaches serves the sum over all of them, as `seawall worker` does for its processes.
    The directory starts empty with each `seawall up`; an edge that ends has its live
    gauges removed from it, so a restarted edge is not counted twice.
    """
    edge_env: dict[str, str] = {}
    on_exit: Callable[[int], None] | None = None
    if settings.edge_processes > 1:
        metrics_dir = data_dir / EDGE_METRICS_DIR
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        edge_env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        on_exit = _forget_process(metrics_dir)
    edges = set(edge_names(settings))
    for name, argv in child_commands(settings, config_file):
        if name in edges:
            supervisor.spawn(name, argv, env=edge_env, on_exit=on_exit)
        else:
            supervisor.spawn(name, argv)


def _forget_process(metrics_dir: Path) -> Callable[[int], None]:
    """Removes an ended process's live gauges (`livesum`, ...) from the metrics directory."""

    def forget(pid: int) -> None:
        mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]

    return forget


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
    shared = f" ({settings.edge_processes} edge processes)" if settings.edge_processes > 1 else ""
    printer.info(f"edge listening on {scheme}://{address}{shared}")
    printer.info(
        f'as a Docker Hub mirror: add "registry-mirrors": ["{scheme}://{address}"] '
        "to /etc/docker/daemon.json and restart dockerd"
    )
    names = ", ".join(p.name for p in settings.projects) or "none configured"
    printer.info(f"per project: docker pull {address}/<project>/<repo>:<tag>  (projects: {names})")
    if settings.tls:
        printer.info(
            f"clients must trust the CA that signed {settings.tls.cert_file} (docs/clients.md: Native TLS)"
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
    while not stop.wait(POLL):
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

    The apps and the embedded servers inherit the lock, so it is free only once the
    supervisor and all its children are gone: a new `seawall up` after a killed one waits
    for them to exit instead of starting a second SeaweedFS on a store the old one still
    holds (its filer's leveldb lock refuses a second opener, and weed exits).
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
            time.sleep(POLL)
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
                spawn_apps(settings, supervisor, config_file and config_file.resolve(), data_dir)
                return _supervise(settings, supervisor, stop)
            except (ServerStartError, FileNotFoundError) as exc:
                printer.info(f"error: {exc}")
                return 1
            finally:
                supervisor.stop_all()
                printer.info("all processes stopped")
    finally:
        os.close(lock)
