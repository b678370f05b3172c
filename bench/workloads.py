"""The warm workloads (P1, P2, P6, P7), one function each, and the registry of all of them
(the cold ones are in bench/cold.py, replication in bench/replication.py, the fleet in bench/fleet.py,
the storage lifecycle in bench/lifecycle.py, CPU costs in bench/costs.py).

Names in the upstream are `library/bench-pN...`; Seawall serves them as `hub/library/...`
(tag TTL 1h) or `hubttl0/library/...` (tag TTL 0s), Distribution proxy as `library/...`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from http.client import HTTPConnection
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from bench import prep
from bench.ceiling import Ceiling
from bench.cold import p3, p4, p5, p8
from bench.context import Context, describe, mean_cpu, pids
from bench.costs import costs
from bench.edges import p1e
from bench.fleet import p11
from bench.lifecycle import p12, p13
from bench.replication import p9, p10
from bench.report import Goal, Row
from bench.stack import BENCH_USER
from bench.tools import ACCEPT, CpuMeter, MemorySampler, loadgen
from tests.support.seed import push_image

MiB = 2**20


def _upstream(ctx: Context) -> Counter[str]:
    return Counter(ctx.stack.hub.counts().get("by_kind", {}))


def p1(ctx: Context) -> list[Row]:
    """Warm manifest GET by tag, 64 connections: requests/s, against Distribution and against a
    bare aiohttp app serving the same bytes (the ceiling); then what one warm GET costs in Redis
    calls and S3 requests."""
    s = ctx.stack
    image = prep.bench_image(1, 4096, "p1")
    prep.push(s.upstream.url, ["library/bench-p1"], image)
    prep.push(s.dist_hosted.url, ["library/bench-p1"], image)
    push_image(s.edge.url, "local/bench-p1", image, "1.0", auth=BENCH_USER)
    urls = {
        "seawall": f"{s.edge.url}/v2/hub/library/bench-p1/manifests/1.0",
        "ceiling": "",
        "dist_proxy": f"{s.dist_proxy.url}/v2/library/bench-p1/manifests/1.0",
        "dist_hosted": f"{s.dist_hosted.url}/v2/library/bench-p1/manifests/1.0",
    }
    for base, ref in [
        (s.edge.url, "hub/library/bench-p1:1.0"),
        (s.dist_proxy.url, "library/bench-p1:1.0"),
    ]:
        loadgen("pull", base, ref, connections=1, requests=1, verify=True)
    headers = {"Accept": ACCEPT}
    with httpx.Client(headers=headers, timeout=30) as http:
        served = http.get(urls["seawall"]).raise_for_status()
    with Ceiling(served.content, served.headers["Content-Type"], s.work) as ceiling:
        urls["ceiling"] = f"{ceiling.url}/v2/hub/library/bench-p1/manifests/1.0"
        runs = _p1_runs(ctx, urls, headers, ceiling.pid)
    ctx.profiled_load("P1", s.edge.pid, urls["seawall"], 64, headers)
    layer = next(iter(image.blobs))
    costs = {
        "proxy": _per_get_costs(ctx, urls["seawall"], headers),
        "hosted": _per_get_costs(ctx, f"{s.edge.url}/v2/local/bench-p1/manifests/1.0", headers),
        "blob": _per_get_costs(ctx, f"{s.edge.url}/v2/hub/library/bench-p1/blobs/{layer}", {}),
    }
    values, upstream, errors, cpu = runs["values"], runs["upstream"], runs["errors"], runs["cpu"]
    note = (
        f"{ctx.client}, 64 connections, {ctx.duration:g}s a run. Upstream requests during the runs: "
        f"Seawall {describe(upstream['seawall'])}; Distribution proxy {describe(upstream['dist_proxy'])}. "
        f"Errors: {describe(+errors)}. Redis commands per Seawall request under load: "
        f"{max(runs['per_request'], default=0):.3f} ({describe(runs['commands'])}). "
        f"CPU, % of one core: Seawall {mean_cpu(cpu['seawall'])}; "
        f"aiohttp ceiling {mean_cpu(cpu['ceiling'])}; "
        f"Distribution proxy {mean_cpu(cpu['dist_proxy'])}; "
        f"Distribution hosted {mean_cpu(cpu['dist_hosted'])}"
    )
    cost_note = (
        f"{COST_GETS} GETs one after another on one kept-alive connection, {COST_RUNS} times; Redis "
        "calls from INFO commandstats before and after (every client of the Redis server, the "
        "workers' idle polling included), S3 requests from the edge's seawall_storage_requests_total. "
        + "; ".join(
            f"{kind}: {sum(c['seconds']):.2f}s of GETs, Redis {describe(c['commands'])}, "
            f"in the background {_describe_rate(c['background'])} commands/s with no GETs"
            for kind, c in costs.items()
        )
    )
    return [
        Row(
            "P1",
            "warm manifest GET by tag, 64 conns",
            "requests/s",
            values["seawall"],
            "Distribution proxy",
            values["dist_proxy"],
            ">= 1.5x",
            Goal("ratio_min", 1.5),
            note,
        ),
        Row(
            "P1+",
            "same, peer serving its own tag (no upstream)",
            "requests/s",
            values["seawall"],
            "Distribution hosted",
            values["dist_hosted"],
            "",
            None,
            "Context only: Distribution hosted answers a tag from local storage, "
            "as Seawall does within its tag TTL.",
        ),
        Row(
            "P1c",
            "same, peer a bare aiohttp app with the same bytes",
            "requests/s",
            values["seawall"],
            "aiohttp ceiling",
            values["ceiling"],
            ">= 0.5x",
            Goal("ratio_min", 0.5),
            "The ceiling (bench/ceiling.py): one handler, no middleware, the same body, "
            "Content-Type and digest headers, run alternately with the others.",
        ),
        Row(
            "P1r",
            "Redis calls per warm manifest GET, proxy tag",
            "calls",
            costs["proxy"]["redis"],
            target="<= 0.1",
            goal=Goal("value_max", 0.1),
            note=cost_note,
        ),
        Row(
            "P1r",
            "Redis calls per warm manifest GET, hosted tag",
            "calls",
            costs["hosted"]["redis"],
            target="<= 0.1",
            goal=Goal("value_max", 0.1),
        ),
        Row("P1r", "Redis calls per warm blob GET (4 KiB, proxy)", "calls", costs["blob"]["redis"]),
        Row("P1s", "S3 requests per warm manifest GET, proxy tag", "requests", costs["proxy"]["s3"]),
        Row("P1s", "S3 requests per warm manifest GET, hosted tag", "requests", costs["hosted"]["s3"]),
        Row("P1s", "S3 requests per warm blob GET (4 KiB, proxy)", "requests", costs["blob"]["s3"]),
    ]


def _p1_runs(ctx: Context, urls: dict[str, str], headers: dict[str, str], ceiling_pid: int) -> dict[str, Any]:
    """Each target in turn, the first one rotating every round."""
    s = ctx.stack
    values: dict[str, list[float]] = {k: [] for k in urls}
    upstream: dict[str, Counter[str]] = {k: Counter() for k in urls}
    errors: Counter[str] = Counter()
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in urls}
    per_request: list[float] = []
    commands_ran: Counter[str] = Counter()
    info = redis.Redis.from_url(s.redis.url)
    for r in range(ctx.rounds):
        for name in ctx.order(r, list(urls)):
            s.hub.reset()
            commands = _redis_calls(info)
            with CpuMeter({"ceiling": ceiling_pid} if name == "ceiling" else pids(ctx, name)) as meter:
                result = ctx.load(urls[name], 64, headers)
            cpu[name].append(meter.percent)
            if name == "seawall" and result["requests"]:
                ran = _redis_calls(info) - commands
                commands_ran += ran
                per_request.append(ran.total() / result["requests"])
            values[name].append(result["rps"])
            errors[name] += result["errors"]
            upstream[name] += _upstream(ctx)
            ctx.log(
                f"P1 round {r + 1} {name}: {result['rps']:.0f} req/s, "
                f"p99 {result['latency_ms'].get('p99')} ms; "
                f"CPU {meter.describe()}"
            )
    info.close()
    return {
        "values": values,
        "upstream": upstream,
        "errors": errors,
        "cpu": cpu,
        "per_request": per_request,
        "commands": commands_ran,
    }


COST_GETS = 200
COST_RUNS = 3


def _per_get_costs(ctx: Context, url: str, headers: dict[str, str]) -> dict[str, Any]:
    """Redis calls and S3 requests per GET over COST_GETS warm GETs, COST_RUNS times; which
    Redis commands ran, how long the GETs took, and what the Redis server ran meanwhile in
    the background (commands a second, over as long a window with no GETs).

    The GETs go over one kept-alive connection of the standard library's client, whose own
    time per request is small: every Redis command the workers' idle polling sends while the
    GETs run counts against them, so a slow client would inflate the figure."""
    out: dict[str, Any] = {"redis": [], "s3": [], "commands": Counter(), "seconds": [], "background": []}
    target = urlsplit(url)
    path = target.path + (f"?{target.query}" if target.query else "")
    # One connection for every INFO: its HELLO is not counted as the GETs' (it was, 1 in 200).
    with (
        httpx.Client(timeout=30) as http,
        redis.Redis.from_url(ctx.stack.redis.url) as info,
        closing(HTTPConnection(target.netloc, timeout=30)) as conn,
    ):
        _get(conn, path, headers)
        _redis_calls(info)
        for _ in range(COST_RUNS):
            s3_before = _storage_requests(http, ctx.stack.edge.url)
            redis_before = _redis_calls(info)
            started = time.perf_counter()
            for _ in range(COST_GETS):
                _get(conn, path, headers)
            seconds = time.perf_counter() - started
            ran = _redis_calls(info) - redis_before
            out["seconds"].append(seconds)
            out["redis"].append(ran.total() / COST_GETS)
            out["commands"] += ran
            s3_after = _storage_requests(http, ctx.stack.edge.url)
            if s3_before is not None and s3_after is not None:
                out["s3"].append((s3_after - s3_before) / COST_GETS)
            idle_before = _redis_calls(info)
            idle = max(seconds, 1.0)
            time.sleep(idle)
            out["background"].append((_redis_calls(info) - idle_before).total() / idle)
    return out


def _get(conn: HTTPConnection, path: str, headers: dict[str, str]) -> None:
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        raise RuntimeError(f"GET {path}: {response.status}")


def _describe_rate(rates: list[float]) -> str:
    return "-".join(f"{r:.0f}" for r in (min(rates), max(rates))) if rates else "n/a"


def _redis_calls(client: redis.Redis) -> Counter[str]:
    """Commands the Redis server ran, by name (INFO commandstats), the INFO calls left out."""
    stats = client.info("commandstats")
    return Counter(
        {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}
    )


def _storage_requests(http: httpx.Client, edge_url: str) -> float | None:
    """The edge's seawall_storage_requests_total (None from a revision without it)."""
    text = http.get(f"{edge_url}/metrics", headers={"Accept": "text/plain"}).text
    for line in text.splitlines():
        if line.startswith("seawall_storage_requests_total"):
            return float(line.split()[-1])
    return None


def _warm_blob(ctx: Context, repo: str, size: int, seed: str) -> str:
    """Push a random blob upstream and pull it once through both caches."""
    s = ctx.stack
    digest = prep.push_random_blob(s.upstream.url, repo, size, seed)
    prep.read_blob(s.edge.url, f"hub/{repo}", digest)
    prep.wait_committed(s.edge.url, f"hub/{repo}", [digest], timeout=300)
    prep.read_blob(s.dist_proxy.url, repo, digest)
    return digest


def _blob_runs(
    ctx: Context,
    repo: str,
    digest: str,
    rounds: int,
    label: str,
) -> dict[str, dict[str, Any]]:
    """8 connections GETting one warm blob; MiB/s and the server's peak RSS per run."""
    s = ctx.stack
    targets = {
        "seawall": (f"{s.edge.url}/v2/hub/{repo}/blobs/{digest}", s.edge.pid),
        "dist_proxy": (f"{s.dist_proxy.url}/v2/{repo}/blobs/{digest}", s.dist_proxy.pid),
    }
    out: dict[str, dict[str, Any]] = {k: {"mib_s": [], "rss": [], "upstream": [], "cpu": []} for k in targets}
    for r in range(rounds):
        for name in ctx.order(r, list(targets)):
            url, pid = targets[name]
            s.hub.reset()
            with MemorySampler(pid) as memory, CpuMeter(pids(ctx, name)) as meter:
                result = ctx.load(url, 8)
            out[name]["cpu"].append(meter.percent)
            blob_gets = _upstream(ctx)["GET blob"]
            out[name]["mib_s"].append(result["mib_s"])
            out[name]["rss"].append(memory.peak)
            out[name]["upstream"].append(blob_gets)
            ctx.log(
                f"{label} round {r + 1} {name}: {result['mib_s']:.0f} MiB/s, peak RSS {memory.peak:.0f} MiB "
                f"(from {memory.start_rss:.0f}), errors {result['errors']}, upstream blob GETs {blob_gets}; "
                f"CPU {meter.describe()}"
            )
    return out


def p2(ctx: Context) -> list[Row]:
    """Warm blob GET, 100 MiB blob, 8 connections: MiB/s."""
    repo = "library/bench-p2"
    digest = _warm_blob(ctx, repo, ctx.sizes.p2_blob, "p2")
    runs = _blob_runs(ctx, repo, digest, ctx.rounds, "P2")
    ctx.profiled_load("P2", ctx.stack.edge.pid, f"{ctx.stack.edge.url}/v2/hub/{repo}/blobs/{digest}", 8)
    size = ctx.sizes.p2_blob // MiB
    note = (
        f"{ctx.client}, 8 connections, {ctx.duration:g}s a run, a {size} MiB blob. Peak RSS during the runs: "
        f"edge {max(runs['seawall']['rss']):.0f} MiB, "
        f"Distribution proxy {max(runs['dist_proxy']['rss']):.0f} MiB. "
        f"Upstream blob GETs during the runs: Seawall {sum(runs['seawall']['upstream']):.0f}, "
        f"Distribution proxy {sum(runs['dist_proxy']['upstream']):.0f}. CPU, % of one core: "
        f"Seawall {mean_cpu(runs['seawall']['cpu'])}; "
        f"Distribution proxy {mean_cpu(runs['dist_proxy']['cpu'])}"
    )
    return [
        Row(
            "P2",
            f"warm blob GET, {size} MiB, 8 conns",
            "MiB/s",
            runs["seawall"]["mib_s"],
            "Distribution proxy",
            runs["dist_proxy"]["mib_s"],
            ">= 1.0x",
            Goal("ratio_min", 1.0),
            note,
        ),
    ]


def p6(ctx: Context) -> list[Row]:
    """100 pulls of a cached tag after its TTL (Seawall tag_ttl 0s): upstream manifest GETs."""
    s = ctx.stack
    image = prep.bench_image(1, 256 * 1024, "p6")
    prep.push(s.upstream.url, ["library/bench-p6-sw", "library/bench-p6-dp"], image)
    targets = {
        "seawall": (s.edge.url, "hubttl0/library/bench-p6-sw:1.0"),
        "dist_proxy": (s.dist_proxy.url, "library/bench-p6-dp:1.0"),
    }
    gets: dict[str, list[float]] = {k: [] for k in targets}
    other: dict[str, Counter[str]] = {}
    failures: Counter[str] = Counter()
    for name, (base, ref) in targets.items():
        loadgen("pull", base, ref, connections=1, requests=1, verify=True)
        if name == "seawall":
            prep.wait_committed(base, ref.rsplit(":", 1)[0], list(image.blobs))
        s.hub.reset()
        result = loadgen("pull", base, ref, connections=10, requests=100)
        counts = _upstream(ctx)
        gets[name].append(counts["GET manifest"])
        other[name] = counts
        failures[name] = result["errors"]
        ctx.log(
            f"P6 {name}: {result['requests']} pulls in {result['elapsed_s']:.1f}s, "
            f"upstream {describe(counts)}"
        )
    note = (
        f"100 pulls (10 at a time) after one warming pull. Everything that reached the emulator: "
        f"Seawall {describe(other['seawall'])}; Distribution proxy {describe(other['dist_proxy'])}. "
        f"Failed pulls: {describe(failures)}"
    )
    return [
        Row(
            "P6",
            "100 pulls of a cached tag after its TTL",
            "upstream manifest GETs",
            gets["seawall"],
            "Distribution proxy",
            gets["dist_proxy"],
            "0",
            Goal("value_eq", 0),
            note,
        )
    ]


def p7(ctx: Context) -> list[Row]:
    """Edge peak RSS while 8 connections GET a warm blob: a big one and a 100 MiB one."""
    big, small = ctx.sizes.p7_blob, ctx.sizes.p2_blob
    small_digest = _warm_blob(ctx, "library/bench-p7-small", small, "p7-small")
    big_digest = _warm_blob(ctx, "library/bench-p7-big", big, "p7-big")
    runs_small = _blob_runs(ctx, "library/bench-p7-small", small_digest, 1, f"P7 {small // MiB} MiB")
    runs_big = _blob_runs(ctx, "library/bench-p7-big", big_digest, 1, f"P7 {big // MiB} MiB")
    big_rss, small_rss = runs_big["seawall"]["rss"], runs_small["seawall"]["rss"]
    note = (
        f"Peak RSS (VmHWM, reset before each run, and VmRSS sampled every 20 ms) of the edge process while "
        f"8 connections GET the blob for {ctx.duration:g}s. Throughput then: {big // MiB} MiB blob "
        f"{runs_big['seawall']['mib_s'][0]:.0f} MiB/s "
        f"(Distribution proxy {runs_big['dist_proxy']['mib_s'][0]:.0f}), "
        f"{small // MiB} MiB blob {runs_small['seawall']['mib_s'][0]:.0f} MiB/s"
    )
    growth = [b - s for b, s in zip(big_rss, small_rss, strict=True)]
    return [
        Row(
            "P7",
            f"edge peak RSS, {big // MiB} MiB blob, 8 conns",
            "MiB",
            big_rss,
            "Distribution proxy",
            runs_big["dist_proxy"]["rss"],
            "<= 200",
            Goal("value_max", 200),
            note,
        ),
        Row(
            "P7",
            f"edge peak RSS, {small // MiB} MiB blob, 8 conns",
            "MiB",
            small_rss,
            "Distribution proxy",
            runs_small["dist_proxy"]["rss"],
            "<= 200",
            Goal("value_max", 200),
        ),
        Row(
            "P7",
            "RSS growth from the small to the big blob",
            "MiB",
            growth,
            "",
            [],
            "<= 16 (size-independent)",
            Goal("value_max", 16),
        ),
    ]


WORKLOADS: dict[str, Callable[[Context], list[Row]]] = {
    "P1": p1, "P1E": p1e, "P2": p2, "P3": p3, "P4": p4, "P5": p5, "P6": p6, "P7": p7, "P8": p8,
    "P9": p9, "P10": p10, "P11": p11, "P12": p12, "P13": p13, "COST": costs,
}  # fmt: skip
