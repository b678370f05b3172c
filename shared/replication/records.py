"""The record of a replication run: an execution of a rule and its tasks, one per tag.

Plain models: the store keeps them as JSON (Redis while the execution runs, the bucket
once it is over), workers and the CLI read and write them, and an admin API can serve them
as they are.
"""

from __future__ import annotations

import enum
import secrets
import time
from typing import Literal

from pydantic import BaseModel, Field

# A task's log keeps its last lines only: it says what happened, not every byte.
LOG_LINES = 20


class TaskStatus(enum.StrEnum):
    PENDING = "pending"  # planned, not yet taken by a worker
    RUNNING = "running"
    WAITING = "waiting"  # the upstream's quota is spent; `waiting_until` says when it reopens
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # `error` says why; it can be retried
    STOPPED = "stopped"  # the execution was stopped before the task finished


# A task in one of these still has work ahead; the execution is over when none is.
TASK_ACTIVE = frozenset({TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING})


class ExecutionStatus(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # every task succeeded (or had nothing to copy)
    FAILED = "failed"  # at least one task failed
    STOPPED = "stopped"  # stopped by hand before every task had run
    SKIPPED = "skipped"  # triggered while another execution of the rule was running


ExecutionTrigger = Literal["manual", "cron", "on_push"]


def new_execution_id(now: float | None = None) -> str:
    """`20261202T120000Z-1f4a2b3c4d5`: sorts by start time to the millisecond. The suffix is
    the millisecond (three hex digits) then eight random ones: executions started within one
    millisecond (a burst of triggers) must never share an id, and their order among
    themselves comes from their start times (see `ExecutionStore.executions`)."""
    now = time.time() if now is None else now
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{stamp}-{int(now * 1000) % 1000:03x}{secrets.token_hex(4)}"


def task_id(execution_id: str, index: int) -> str:
    return f"{execution_id}:{index}"


def execution_of(task_id: str) -> str:
    """The execution a task id belongs to."""
    return task_id.rsplit(":", 1)[0]


class Task(BaseModel):
    """Copying one tag of one repository, and what came of it."""

    id: str
    execution: str
    rule: str
    source_repository: str
    tag: str
    destination_repository: str
    status: TaskStatus = TaskStatus.PENDING
    attempts: int = 0
    bytes_moved: int = 0
    blobs_copied: int = 0
    blobs_present: int = 0
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    waiting_until: float | None = None
    log: list[str] = Field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.status in TASK_ACTIVE

    @property
    def seconds(self) -> float | None:
        """How long the task ran (so far, while it runs)."""
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def note(self, line: str) -> None:
        """Add a line to the log, keeping the last LOG_LINES."""
        self.log = [*self.log, line][-LOG_LINES:]


class Execution(BaseModel):
    """One run of a rule: its status, its tasks counted by status, and the bytes moved."""

    id: str
    rule: str
    trigger: ExecutionTrigger
    status: ExecutionStatus = ExecutionStatus.RUNNING
    started: float
    finished: float | None = None
    total: int = 0
    pending: int = 0
    running: int = 0
    waiting: int = 0
    succeeded: int = 0
    failed: int = 0
    stopped: int = 0
    bytes_moved: int = 0
    # What an operator should know while it runs, e.g. "waiting for quota, reopens at 12:34:56Z".
    message: str | None = None
    stop_requested: bool = False

    @property
    def done(self) -> bool:
        return self.status is not ExecutionStatus.RUNNING

    @property
    def seconds(self) -> float:
        return (self.finished or time.time()) - self.started

    def count(self, status: TaskStatus) -> int:
        """How many of its tasks are in `status`."""
        return int(getattr(self, status.value))


class ExecutionRecord(BaseModel):
    """A finished execution with its tasks: what the bucket keeps of it."""

    execution: Execution
    tasks: list[Task] = Field(default_factory=list)
