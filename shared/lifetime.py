"""Processes that end with their parent, through Linux's parent-death signal (prctl)."""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., Any] | None:
    """libc's prctl, or None where there is no parent-death signal (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function: Callable[..., Any] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return function


def supported() -> bool:
    return _prctl() is not None


def follow_parent(parent: int, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent (pid `parent`) exits.

    If the parent is already gone (it died before this call, and the process was handed
    to init or a subreaper), `sig` is sent at once. False where unsupported.
    """
    prctl = _prctl()
    if prctl is None:
        return False
    if prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def end_with_this_process(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for `subprocess.Popen`: the child gets `sig` when this process exits.

    The kernel ties the signal to the *thread* that forks the child, so spawn from a
    thread that lives as long as the process (the main thread). The setting survives
    `exec` but not `fork`: a child's own children need it too (see workers/broker.py).
    None where unsupported.
    """
    if not supported():
        return None
    # prctl is looked up here, before the fork: the child only calls it.
    parent = os.getpid()

    def arrange() -> None:
        follow_parent(parent, sig)

    return arrange
