"""P1E: P1's warm manifest GET by tag served by one edge process and by two sharing the port.

Both groups are extra edges of the stack's Seawall (its configuration, Redis and bucket; a
port of their own), started for P1E only and stopped after it. The two-process group is
started as `seawall up` starts its edges: `edge_processes: 2`, both binding the port with
SO_REUSEPORT, their metrics in one multi-process directory (the per-request cost of the
shared counters is in its figure). The one-process group is a single edge with
`edge_processes: 1`, the stack's own shape.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import yaml

from bench import prep
from bench.context import Context, describe, mean_cpu
from bench.report import Goal, Row
from bench.stack import TIMEOUT, _env
from bench.tools import ACCEPT, CpuMeter, loadgen
from services.processes import ManagedProcess, free_port
from services.up import EDGE_METRICS_DIR

REF = "hub/library/bench-p1:1.0"


@contextlib.contextmanager
def edge_group(ctx: Context, count: int) -> Iterator[tuple[str, dict[str, int]]]:
    """`count` edge processes on one new port: the manifest URL and their pids by name."""
    work = ctx.work / f"edges-{count}"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = yaml.safe_load(ctx.stack.config_path.read_text())
    config |= {"listen": f"127.0.0.1:{port}", "edge_processes": count}
    path = work / "seawall.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = _env()
    if count > 1:
        metrics = Path(config["data_dir"]) / f"{EDGE_METRICS_DIR}-{count}"
        shutil.rmtree(metrics, ignore_errors=True)
        metrics.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    argv = [sys.executable, "-m", "services.edge", "--config", str(path)]
    with contextlib.ExitStack() as stack:
        pids: dict[str, int] = {}
        for index in range(1, count + 1):
            name = f"edge-{index}"
            edge = stack.enter_context(ManagedProcess(f"{name} of {count}", argv, work / f"{name}.log", env))
            # The port answers as soon as one of them listens: wait for each one's own line.
            edge.wait_ready(functools.partial(_listening, edge), TIMEOUT, name)
            pids[name] = edge.pid
        yield f"http://127.0.0.1:{port}", pids


def _listening(edge: ManagedProcess) -> bool:
    return "edge_listening" in edge.log_path.read_text(errors="replace")


def p1e(ctx: Context) -> list[Row]:
    """P1 (warm manifest GET by tag, 64 connections) with 1 and with 2 edge processes: requests/s."""
    s = ctx.stack
    image = prep.bench_image(1, 4096, "p1")
    prep.push(s.upstream.url, ["library/bench-p1"], image)
    loadgen("pull", s.edge.url, REF, connections=1, requests=1, verify=True)
    headers = {"Accept": ACCEPT}
    values: dict[int, list[float]] = {1: [], 2: []}
    cpu: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    errors: Counter[str] = Counter()
    with edge_group(ctx, 1) as (one_url, one_pids), edge_group(ctx, 2) as (two_url, two_pids):
        groups = {1: (one_url, one_pids), 2: (two_url, two_pids)}
        for base, _ in groups.values():
            loadgen("pull", base, REF, connections=1, requests=1, verify=True)
        for r in range(ctx.rounds):
            for count in ctx.order(r, [1, 2]):
                base, edge_pids = groups[count]
                url = f"{base}/v2/hub/library/bench-p1/manifests/1.0"
                with CpuMeter({**edge_pids, "redis": s.redis.pid}) as meter:
                    result = ctx.load(url, 64, headers)
                cpu[count].append(meter.percent)
                values[count].append(result["rps"])
                errors[f"{count} edge"] += result["errors"]
                ctx.log(
                    f"P1E round {r + 1} {count} edge process(es): {result['rps']:.0f} req/s, "
                    f"p99 {result['latency_ms'].get('p99')} ms; CPU {meter.describe()}"
                )
    note = (
        f"{ctx.client}, 64 connections, {ctx.duration:g}s a run, the 1- and 2-process groups "
        f"alternating (extra edges of the stack's Seawall on ports of their own; the 2 processes "
        f"share theirs with SO_REUSEPORT and sum their metrics as `seawall up` has them). "
        f"Errors: {describe(+errors)}. CPU, % of one core: 1 process {mean_cpu(cpu[1])}; "
        f"2 processes {mean_cpu(cpu[2])}"
    )
    return [
        Row(
            "P1E",
            "P1 with 2 edge processes sharing the port",
            "requests/s",
            values[2],
            "1 edge process",
            values[1],
            "> 1.0x",
            Goal("ratio_min", 1.0),
            note,
        )
    ]
