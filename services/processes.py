"""Child processes in process groups of their own, with their output in a log file; the
free ports, readiness waits and group-wide stops that the stack and its servers need."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from shared import lifetime

HOST = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


class ServerStartError(RuntimeError):
    """A server did not come up; the message carries the end of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1."""
    # Every socket stays bound until all are chosen, so the kernel cannot hand out one twice.
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((HOST, 0))
        return [sock.getsockname()[1] for sock in sockets]


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(port: int) -> bool:
    """Whether port can be bound on 127.0.0.1."""
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    alive: Callable[[], bool] = lambda: True,
) -> None:
    """Poll check until true; TimeoutError after timeout, RuntimeError once alive() is false."""
    deadline = time.monotonic() + timeout
    while not check():
        if not alive():
            raise RuntimeError(f"process exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s")
        time.sleep(0.1)


def wait_for_port(host: str, port: int, timeout: float = START_TIMEOUT) -> None:
    """Block until host:port accepts connections; TimeoutError otherwise."""
    wait_until(lambda: port_open(host, port), timeout, f"{host}:{port}")


def stop_process_group(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the leader, SIGKILL it if it lingers, then kill whatever it left in its group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    # Children forked by the leader (dramatiq workers, for one) must not outlive it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class ManagedProcess:
    """A child in its own process group with its output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # Truncated: each run's log starts fresh, so followers and error messages show only it.
        with log_path.open("wb") as log:
            # A session of its own: Ctrl-C in a terminal reaches only the supervisor,
            # which then stops children in order, and stop() can signal the whole group.
            # That also means nothing stops the child if its parent is killed outright, so
            # on Linux the kernel sends it SIGTERM when the parent exits, however it exits.
            self.process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
                preexec_fn=lifetime.end_with_this_process(signal.SIGTERM),
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait for check; on failure stop the process and raise with its log attached."""
        try:
            wait_until(check, timeout, what, alive=self.running)
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise ServerStartError(
                f"{self.name} did not start: {exc}\n--- {self.log_path} ---\n{self.log_tail()}"
            ) from exc
        except BaseException:
            self.stop()  # Ctrl-C or a failing probe must not leave the server running
            raise

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        stop_process_group(self.process, timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
