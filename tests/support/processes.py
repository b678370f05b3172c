"""Processes seen from outside through /proc, and servers paused (SIGSTOP) behind their clients' backs."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path


def alive(pid: int) -> bool:
    """Whether pid is a process that has not exited (zombies count as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def parent(pid: int) -> int | None:
    """The pid of pid's parent; None once pid is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> set[int]:
    """Every process below pid in the process tree, read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*"):
        above = parent(int(stat.name))
        if above is not None:
            children.setdefault(above, []).append(int(stat.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _socket_inodes(pids: set[int]) -> set[str]:
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    return inodes


def _tcp_sockets(pids: set[int]) -> Iterator[list[str]]:
    """The /proc/net/tcp{,6} rows of these processes' sockets."""
    inodes = _socket_inodes(pids)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[9] in inodes:
                    yield fields


def listening_ports(pids: set[int]) -> set[int]:
    """The TCP ports these processes listen on, read from /proc."""
    # State 0A is LISTEN; the local address is field 1, as hex ip:port.
    return {int(f[1].rsplit(":", 1)[1], 16) for f in _tcp_sockets(pids) if f[3] == "0A"}


def connections_by_remote_port(pid: int) -> dict[int, int]:
    """How many established TCP connections the process has, by the remote port."""
    # State 01 is ESTABLISHED; the remote address is field 2.
    ports = [int(f[2].rsplit(":", 1)[1], 16) for f in _tcp_sockets({pid}) if f[3] == "01"]
    return {port: ports.count(port) for port in sorted(set(ports))}


def resume(pid: int) -> None:
    """SIGCONT the process group that pid leads, if it is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGCONT)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[float]:
    """SIGSTOP the process group that pid leads (the embedded servers each start a session
    of their own); SIGCONT on leaving. Yields the pause's start."""
    os.killpg(pid, signal.SIGSTOP)
    try:
        yield time.monotonic()
    finally:
        resume(pid)
