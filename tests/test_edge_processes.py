"""Several edge processes: `seawall up` starts `edge_processes` edges on the one registry
port, one `/metrics` sums them, and a killed edge is restarted while the others serve."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from services.processes import ManagedProcess, free_port, wait_until
from shared.settings import S3Settings
from tests.fixtures.stack import SeawallUp, v2_status
from tests.support.processes import alive, command_line, descendants, listening_ports, parent

pytestmark = pytest.mark.slow

# What an edge's command line holds (`python -m services.edge --config ...`).
EDGE = "services.edge"
# One GET /v2/ counted by the edge's request histogram.
BASE_GETS = 'seawall_request_duration_seconds_count{kind="base",method="GET"}'


def _config(redis_url: str, s3: S3Settings, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{free_port()}",
        "metrics_listen": f"127.0.0.1:{free_port()}",
        "worker_metrics_listen": f"127.0.0.1:{free_port()}",
        "data_dir": str(tmp_path / "data"),
        "redis_url": redis_url,
        "s3": {
            "endpoint": s3.endpoint,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key.get_secret_value(),
            "bucket": s3.bucket,
        },
        "edge_processes": 2,
        "worker_processes": 1,
        "worker_threads": 1,
        "log_level": "warning",
        "projects": [{"name": "local", "public": True}],
        **extra,
    }


def edges(up: SeawallUp) -> set[int]:
    """The live edge processes `seawall up` started."""
    return {
        pid
        for pid in descendants(up.process.pid)
        if parent(pid) == up.process.pid and alive(pid) and EDGE in command_line(pid)
    }


def serving(pids: set[int], port: int) -> bool:
    """Whether every one of pids listens on port."""
    return all(port in listening_ports({pid}) for pid in pids)


def scrape(metrics_listen: str) -> dict[str, float]:
    """The samples of one `/metrics` scrape, by name and labels."""
    with urllib.request.urlopen(f"http://{metrics_listen}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def live_edges(metrics_listen: str) -> float | None:
    """`seawall_edge_processes` as scraped; None while no edge serves the metrics port yet."""
    try:
        return scrape(metrics_listen).get("seawall_edge_processes")
    except OSError:
        return None


@pytest.fixture
def up_two_edges(
    tmp_config: Callable[..., Path], redis_url: str, s3_settings: S3Settings, tmp_path: Path
) -> Iterator[tuple[SeawallUp, dict[str, Any]]]:
    config = _config(redis_url, s3_settings, tmp_path)
    up = SeawallUp(tmp_config(config))
    try:
        yield up, config
    finally:
        if up.process.poll() is None:
            up.process.send_signal(signal.SIGTERM)
            try:
                up.wait(30)
            except subprocess.TimeoutExpired:
                up.kill()


def test_two_edges_share_the_port_sum_their_metrics_and_a_killed_one_is_restarted(
    up_two_edges: tuple[SeawallUp, dict[str, Any]],
) -> None:
    up, config = up_two_edges
    listen, metrics = config["listen"], config["metrics_listen"]
    port = int(listen.rsplit(":", 1)[1])
    up.wait_serving(listen)
    wait_until(lambda: len(edges(up)) == 2 and serving(edges(up), port), 30, "both edges on the port")
    first = edges(up)
    assert "(2 edge processes)" in up.output()
    # The live edges add up to 2 (each sets 1 as it starts to serve).
    wait_until(lambda: live_edges(metrics) == 2, 10, "both edges in /metrics")

    # Each request on a new connection, which the kernel gives to either edge: a scrape,
    # answered by one of them, counts all of them only if it sums over both.
    before = scrape(metrics)[BASE_GETS]
    assert [v2_status(listen) for _ in range(40)] == [200] * 40
    assert scrape(metrics)[BASE_GETS] == before + 40

    killed = min(first)
    survivor = max(first)
    os.kill(killed, signal.SIGKILL)
    # Reaped (by the supervisor): all its threads are gone, so its listening socket is closed
    # (a thread group's leader shows as a zombie while its other threads still exit).
    wait_until(lambda: not Path(f"/proc/{killed}").exists(), 5, "the killed edge to be reaped")
    # The other edge still holds the port: nothing is refused while the killed one is away.
    assert [v2_status(listen) for _ in range(10)] == [200] * 10
    assert survivor in edges(up)

    wait_until(lambda: len(edges(up)) == 2, 30, "a new edge")
    restarted = edges(up) - first
    assert len(restarted) == 1, up.output()
    wait_until(lambda: serving(restarted, port), 30, "the new edge on the port")
    assert re.search(r"edge-\d was killed by SIGKILL; restarting it in 1s", up.output()), up.output()
    # The new edge counts itself once both its sites listen; the dead edge's gauge was removed
    # (otherwise the sum would be 3), and its counts stay in the sums.
    wait_until(lambda: live_edges(metrics) == 2, 10, "2 live edges in /metrics")
    assert scrape(metrics)[BASE_GETS] == before + 50


def test_edges_started_by_hand_share_a_tls_port(
    redis_url: str, s3_settings: S3Settings, tmp_path: Path, tmp_config: Callable[..., Path]
) -> None:
    """`python -m services.edge` with `edge_processes` above 1 binds with SO_REUSEPORT, also
    with native TLS: a second edge on the same port starts (it could not bind without) and
    https is answered on it while both run."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    leaf.private_key_pem.write_to_path(str(key_file))
    leaf.cert_chain_pems[0].write_to_path(str(cert_file))
    config = _config(
        redis_url, s3_settings, tmp_path, tls={"cert_file": str(cert_file), "key_file": str(key_file)}
    )
    path = tmp_config(config)
    env = {name: value for name, value in os.environ.items() if not name.startswith("SEAWALL_")}
    argv = [sys.executable, "-m", EDGE, "--config", str(path)]
    port = int(config["listen"].rsplit(":", 1)[1])
    context = ssl.create_default_context()
    ca.configure_trust(context)
    with (
        ManagedProcess("edge-1", argv, tmp_path / "edge-1.log", env) as one,
        ManagedProcess("edge-2", argv, tmp_path / "edge-2.log", env) as two,
    ):
        wait_until(lambda: serving({one.pid, two.pid}, port), 30, "both edges on the port")
        for _ in range(20):
            with urllib.request.urlopen(f"https://{config['listen']}/v2/", context=context, timeout=5) as r:
                assert r.status == 200
        assert one.running(), one.log_tail()
        assert two.running(), two.log_tail()
