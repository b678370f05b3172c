"""What serving costs in CPU (issue 14, item 4): CPU-seconds per GiB served warm (the edge)
and per GiB filled cold (the worker plus the edge), next to Distribution proxy doing the
same work on the same machine. Read from the same per-process CPU meter as every other row.

C1: 8 connections GET a warm 100 MiB blob for a load run, alternating targets.
C2: one client GETs a 100 MiB blob neither cache holds; Seawall's cost runs until the fill is
committed to the bucket, so staging is counted, not only the bytes the client saw.
"""

from __future__ import annotations

import time

from bench import prep
from bench.context import Context, mean_cpu, pids
from bench.report import Row
from bench.tools import CpuMeter, loadgen

MiB = 2**20
GiB = 2**30
SEAWALL = ["edge", "workers"]
DISTRIBUTION = ["distribution"]


def _cpu_seconds(percent: dict[str, float], wall: float, names: list[str]) -> float:
    return sum(percent.get(n, 0.0) for n in names) / 100 * wall


def _warm(ctx: Context) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """CPU-seconds per GiB served while 8 connections GET one warm blob."""
    s = ctx.stack
    repo = "library/bench-cost-warm"
    digest = prep.push_random_blob(s.upstream.url, repo, ctx.sizes.p2_blob, "cost-warm")
    prep.read_blob(s.edge.url, f"hub/{repo}", digest)
    prep.wait_committed(s.edge.url, f"hub/{repo}", [digest], timeout=300)
    prep.read_blob(s.dist_proxy.url, repo, digest)
    urls = {
        "seawall": (f"{s.edge.url}/v2/hub/{repo}/blobs/{digest}", ["edge"]),
        "dist_proxy": (f"{s.dist_proxy.url}/v2/{repo}/blobs/{digest}", DISTRIBUTION),
    }
    per_gib: dict[str, list[float]] = {k: [] for k in urls}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in urls}
    for r in range(ctx.rounds):
        for name in ctx.order(r, list(urls)):
            url, names = urls[name]
            started = time.perf_counter()
            with CpuMeter(pids(ctx, name)) as meter:
                result = ctx.load(url, 8)
            wall = time.perf_counter() - started
            served = result["bytes"] / GiB
            per_gib[name].append(_cpu_seconds(meter.percent, wall, names) / served)
            cpu[name].append(meter.percent)
            ctx.log(
                f"C1 round {r + 1} {name}: {served:.2f} GiB served, {per_gib[name][-1]:.3f} CPU-s/GiB; "
                f"CPU {meter.describe()}"
            )
    return per_gib, cpu


def _cold(ctx: Context) -> tuple[dict[str, list[float]], dict[str, list[dict[str, float]]]]:
    """CPU-seconds per GiB filled: one GET of a blob neither cache holds, to the commit."""
    s, size = ctx.stack, ctx.sizes.p2_blob
    per_gib: dict[str, list[float]] = {"seawall": [], "dist_proxy": []}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in per_gib}
    for r in range(ctx.slow_rounds):
        repo = f"library/bench-cost-cold-{r}"
        digest = prep.push_random_blob(s.upstream.url, repo, size, f"cost-cold-{r}")
        targets = {
            "seawall": (f"{s.edge.url}/v2/hub/{repo}/blobs/{digest}", SEAWALL),
            "dist_proxy": (f"{s.dist_proxy.url}/v2/{repo}/blobs/{digest}", DISTRIBUTION),
        }
        for name in ctx.order(r, list(targets)):
            url, names = targets[name]
            ctx.settle()
            started = time.perf_counter()
            with CpuMeter(pids(ctx, name)) as meter:
                result = loadgen("ttfb", url)
                if name == "seawall":
                    prep.wait_committed(s.edge.url, f"hub/{repo}", [digest], timeout=300)
            wall = time.perf_counter() - started
            if result["status"] != 200 or result["bytes"] != size:
                raise RuntimeError(f"C2 {name}: status {result['status']}, {result['bytes']} bytes")
            per_gib[name].append(_cpu_seconds(meter.percent, wall, names) / (size / GiB))
            cpu[name].append(meter.percent)
            ctx.log(
                f"C2 round {r + 1} {name}: {per_gib[name][-1]:.3f} CPU-s/GiB in {wall:.2f}s; "
                f"CPU {meter.describe()}"
            )
    return per_gib, cpu


def costs(ctx: Context) -> list[Row]:
    """CPU-seconds per GiB served warm and filled cold, Seawall against Distribution proxy."""
    warm, warm_cpu = _warm(ctx)
    cold, cold_cpu = _cold(ctx)
    size = ctx.sizes.p2_blob // MiB
    return [
        Row(
            "C1",
            f"CPU cost of serving warm, {size} MiB blob, 8 conns",
            "CPU-s/GiB",
            warm["seawall"],
            "Distribution proxy",
            warm["dist_proxy"],
            "",
            None,
            f"{ctx.client}, 8 connections, {ctx.duration:g}s a run. Seawall: the edge process; "
            "Distribution: its one process. CPU during the runs, % of one core: "
            f"Seawall {mean_cpu(warm_cpu['seawall'])}; Distribution proxy {mean_cpu(warm_cpu['dist_proxy'])}",
        ),
        Row(
            "C2",
            f"CPU cost of a cold fill, {size} MiB blob, one client",
            "CPU-s/GiB",
            cold["seawall"],
            "Distribution proxy",
            cold["dist_proxy"],
            "",
            None,
            "One streaming GET of a blob neither cache holds, read whole (loadgen ttfb); for "
            "Seawall the meter runs until the blob is committed in the bucket. Seawall: edge plus "
            "workers (SeaweedFS and Redis listed apart); Distribution: its one process (the emulator "
            "and the upstream serve both alike). CPU, % of one core: "
            f"Seawall {mean_cpu(cold_cpu['seawall'])}; Distribution proxy {mean_cpu(cold_cpu['dist_proxy'])}",
        ),
    ]
