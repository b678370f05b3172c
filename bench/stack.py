"""Every server of the benchmark, on 127.0.0.1, each a process of its own.

    upstream      CNCF Distribution (hosted): where the images really live
    hub           the Docker Hub emulator in front of it (tokens, counters): "Docker Hub"
    seawall       SeaweedFS S3 + Redis + the edge + one Dramatiq worker process (8 threads)
    dist_proxy    Distribution in `proxy:` mode, its remoteurl the emulator
    dist_hosted   Distribution (hosted), the peer for pushes
    seawall_b     a second Seawall edge (its own bucket and Redis database, same servers):
                  the destination of the push replication P10

`Stack.start()` brings them up in that order and `stop()` takes them down in reverse, also
when start-up fails half way; nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from services.embedded import start_redis, start_s3
from services.processes import ManagedProcess, free_port
from shared.auth.access import hash_password
from tests.support.distribution import Distribution, start_distribution

BENCH_USER = ("bench", "bench-secret")
TIMEOUT = 60.0
# The replication workloads' content: 5 repositories of 4 tags each (bench/replication.py).
REP_REPOS = [f"library/bench-rep-{i}" for i in range(5)]
REP_TAGS = [f"t{i}" for i in range(4)]
PUSH_PASSWORD_ENV = "BENCH_PUSH_PASSWORD"


class Emulator(ManagedProcess):
    """`python -m tests.support.dockerhub` as a process: its own interpreter, its own GIL."""

    def __init__(self, upstream: str, work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable, "-m", "tests.support.dockerhub",
            "--upstream", upstream, "--port", str(self.port), "--unlimited",
        ]  # fmt: skip
        super().__init__("dockerhub-emulator", argv, work / "emulator.log", _env())
        self.wait_ready(
            lambda: "listening on" in self.log_path.read_text(errors="replace"), TIMEOUT, "emulator"
        )

    def control(self, method: str, op: str) -> Any:
        request = urllib.request.Request(
            f"{self.url}/_emulator/{op}", method=method, data=b"" if method == "POST" else None
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        self.control("POST", "reset")

    def counts(self) -> dict[str, Any]:
        return dict(self.control("GET", "counts"))

    def requests(self) -> list[dict[str, Any]]:
        return list(self.control("GET", "requests"))


class Edge(ManagedProcess):
    """`python -m services.edge --config F`: a process of its own, so its RSS can be read."""

    def __init__(self, config: Path, port: int, work: Path, name: str = "edge") -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.address = f"127.0.0.1:{port}"
        argv = [sys.executable, "-m", "services.edge", "--config", str(config)]
        super().__init__(name, argv, work / f"{name}.log", _env())
        self.wait_ready(self._answers, TIMEOUT, "edge")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False


class Workers(ManagedProcess):
    def __init__(self, config: Path, work: Path, name: str = "workers") -> None:
        # As users run them: `seawall worker`, with the processes and threads of the config.
        argv = [sys.executable, "-m", "services.cli", "worker", "--config", str(config)]
        env = {**_env(), "SEAWALL_CONFIG": str(config)}
        super().__init__(name, argv, work / f"{name}.log", env)
        self.wait_ready(
            lambda: "is ready for action" in self.log_path.read_text(errors="replace"),
            TIMEOUT,
            "workers",
        )


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEAWALL_", "REGISTRY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    # The password the workers push to the second Seawall with (P10's rule).
    env[PUSH_PASSWORD_ENV] = BENCH_USER[1]
    return env


def replication_rules() -> list[dict[str, Any]]:
    """P9's pull rule with the defaults (and the same without referrers), P10's push rule."""
    pull = {"mode": "pull", "source": "hub", "filters": {"name": REP_REPOS}, "destination": "mirror"}
    return [
        {"name": "bench-p9", **pull},
        {"name": "bench-p9-norefs", **pull, "copy_referrers": False},
        {
            "name": "bench-p10",
            "mode": "push",
            "source": "mirror",
            "filters": {"name": "mirror/bench-rep-*"},
            "destination": "seawall-b",
            "destination_namespace": "rep",
        },
    ]


def site_config(port: int, redis_url: str, s3: Any, data_dir: Path, *, threads: int = 8) -> dict[str, Any]:
    """What every Seawall of the bench shares: listen address, Redis, bucket, the bench user."""
    return {
        "listen": f"127.0.0.1:{port}",
        "data_dir": str(data_dir),
        "worker_metrics_listen": None,
        # No metrics port to collide with another stack's: P1 reads /metrics on the registry port.
        "metrics_listen": None,
        "metrics_on_registry_port": True,
        "redis_url": redis_url,
        "s3": {
            "endpoint": s3.endpoint,
            "access_key": s3.access_key,
            "secret_key": s3.secret_key.get_secret_value(),
            "bucket": s3.bucket,
        },
        "log_level": "info",
        "edge_processes": 1,
        "worker_processes": 1,
        "worker_threads": threads,
        "users": [{"name": BENCH_USER[0], "password_hash": hash_password(BENCH_USER[1])}],
    }


def redis_db(url: str, db: int) -> str:
    """The same Redis server, another database (each Seawall of the bench keeps its own keys)."""
    return url.rsplit("/", 1)[0] + f"/{db}"


def seawall_b_config(port: int, redis_url: str, s3: Any, data_dir: Path) -> dict[str, Any]:
    """The push destination of P10: hosted projects `rep` (the rule's) and `sync` (skopeo's)."""
    hosted = {"type": "hosted", "public": True, "push": [BENCH_USER[0]], "delete": [BENCH_USER[0]]}
    return {
        **site_config(port, redis_url, s3, data_dir),
        "projects": [{"name": "rep", **hosted}, {"name": "sync", **hosted}],
    }


def seawall_config(
    port: int, redis_url: str, s3: Any, hub_url: str, data_dir: Path, seawall_b_url: str
) -> dict[str, Any]:
    """`hub` caches with a long tag TTL (P1, P2), `hubttl0` revalidates every tag GET (P6);
    `mirror` is P9's destination and P10's source, `seawall-b` P10's destination."""
    proxy = {"type": "proxy", "public": True, "upstream": "hub"}
    return {
        **site_config(port, redis_url, s3, data_dir),
        "upstreams": [
            {
                "name": "hub",
                "url": hub_url,
                "flavor": "dockerhub",
                # A paid account: no pull quota, and no per-minute cap to throttle the bench.
                "quota": {"preset": "unlimited"},
                "requests_per_minute": 1_000_000,
            },
            {
                "name": "seawall-b",
                "url": seawall_b_url,
                "flavor": "registry",
                "username": BENCH_USER[0],
                "password_env": PUSH_PASSWORD_ENV,
                "requests_per_minute": 0,
            },
        ],
        "projects": [
            {
                "name": "local",
                "type": "hosted",
                "public": True,
                "push": [BENCH_USER[0]],
                "delete": [BENCH_USER[0]],
            },
            {"name": "hub", **proxy, "tag_ttl": "1h"},
            {"name": "hubttl0", **proxy, "tag_ttl": "0s"},
            # P13 (bench/lifecycle.py): a capped cache, evicted as it grows.
            {"name": "hubcap", **proxy, "tag_ttl": "1h", "cache": {"max_bytes": "256MiB"}},
            {"name": "mirror", "type": "hosted", "public": True, "push": [BENCH_USER[0]]},
        ],
        "mirror": {"default": "hub", "namespaces": {"docker.io": "hub"}},
        "replication": replication_rules(),
    }


class Stack:
    def __init__(self, work: Path) -> None:
        self.work = work.resolve()
        self._exit = contextlib.ExitStack()
        self.upstream: Distribution
        self.hub: Emulator
        self.edge: Edge
        self.workers: Workers
        self.dist_proxy: Distribution
        self.dist_hosted: Distribution
        self.seawall_b: Edge
        self.config_path = self.work / "seawall.yaml"
        self.config_b_path = self.work / "seawall-b.yaml"

    def start(self) -> Stack:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        enter = self._exit.enter_context
        self.upstream = enter(start_distribution(self.work / "upstream"))
        self.hub = enter(Emulator(self.upstream.url, self.work))
        redis = enter(start_redis(self.work / "redis"))
        s3 = enter(start_s3(self.work / "s3"))
        s3.ensure_bucket("seawall")
        s3.ensure_bucket("seawall-b")
        port, port_b = free_port(), free_port()
        config_b = seawall_b_config(
            port_b, redis_db(redis.url, 1), s3.settings("seawall-b"), self.work / "data-b"
        )
        self.config_b_path.write_text(yaml.safe_dump(config_b, sort_keys=False))
        config = seawall_config(
            port,
            redis.url,
            s3.settings("seawall"),
            self.hub.url,
            self.work / "data",
            f"http://127.0.0.1:{port_b}",
        )
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.edge = enter(Edge(self.config_path, port, self.work))
        self.workers = enter(Workers(self.config_path, self.work))
        self.dist_proxy = enter(start_distribution(self.work / "dist-proxy", proxy_url=self.hub.url))
        self.dist_hosted = enter(start_distribution(self.work / "dist-hosted"))
        self.seawall_b = enter(Edge(self.config_b_path, port_b, self.work, name="edge-b"))
        self.redis, self.s3 = redis, s3

    def stop(self) -> None:
        self._exit.close()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def processes(self) -> dict[str, int]:
        names = ["upstream", "hub", "redis", "s3", "edge", "workers", "dist_proxy", "dist_hosted"]
        names.append("seawall_b")
        return {n: getattr(self, n).pid for n in names if hasattr(self, n)}


# ---------------------------------------------------------------- memory of a process


def memory_mib(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, MiB, from /proc (psutil is not installed)."""
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (`echo 5 > /proc/PID/clear_refs`); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used by a server's process group (the process, its threads and
    the children it forked: dramatiq's worker processes), from /proc/PID/stat."""
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == pid or int(fields[2]) == pid:  # fields[2]: the process group
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
