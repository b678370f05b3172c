"""The cold workloads (P3, P4, P5) and the push (P8, against the store's own ingest). Every
round uses new content under new repository names, so neither cache has seen it (both store
blobs by digest, across repositories)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import prep
from bench.context import Context, describe, mean_cpu, pids
from bench.report import Goal, Row
from bench.stack import BENCH_USER, _env
from bench.tools import CpuMeter, ToolError, loadgen
from shared.registry.storage import PARALLEL_PARTS, PART_SIZE
from tests.support.images import write_oci_layout

MiB = 2**20
GiB = 2**30


def skopeo_pull(ctx: Context, address: str, ref: str) -> float:
    """Seconds a skopeo pull of `ref` into a scratch directory took."""
    out = ctx.work / "pulled"
    shutil.rmtree(out, ignore_errors=True)
    try:
        return ctx.skopeo.copy(f"docker://{address}/{ref}", f"dir:{out}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def p3(ctx: Context) -> list[Row]:
    """Cold skopeo pull of a 5-layer ~200 MiB image: seconds, vs the upstream and vs Distribution proxy."""
    s, z = ctx.stack, ctx.sizes
    times: dict[str, list[float]] = {"direct": [], "seawall": [], "dist_proxy": []}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in times}
    size = 0
    for r in range(ctx.slow_rounds):
        image = prep.bench_image(z.image_layers, z.layer, f"p3-{r}")
        size = prep.image_size(image)
        sw, dp = f"library/bench-p3-{r}-sw", f"library/bench-p3-{r}-dp"
        prep.push(s.upstream.url, [sw, dp], image)
        pulls = {
            "direct": (s.hub.url.removeprefix("http://"), f"{sw}:1.0"),
            "seawall": (s.edge.address, f"hub/{sw}:1.0"),
            "dist_proxy": (s.dist_proxy.address, f"{dp}:1.0"),
        }
        for name in ctx.order(r, list(pulls)):
            ctx.settle()
            with CpuMeter(pids(ctx, name)) as meter:
                seconds = skopeo_pull(ctx, *pulls[name])
            times[name].append(seconds)
            cpu[name].append(meter.percent)
            ctx.log(f"P3 round {r + 1} {name}: {seconds:.2f}s; CPU {meter.describe()}")
            if name == "seawall":
                # Let fills finish committing before the next pull shares the CPU.
                prep.wait_committed(s.edge.url, f"hub/{sw}", list(image.blobs), timeout=300)
    note = (
        f"skopeo copy docker://... dir:..., {z.image_layers} layers, {size / MiB:.0f} MiB in all. CPU during "
        f"the pulls, % of one core (skopeo is the load generator): Seawall {mean_cpu(cpu['seawall'])}; "
        f"Distribution proxy {mean_cpu(cpu['dist_proxy'])}; direct {mean_cpu(cpu['direct'])}"
    )
    return [
        Row(
            "P3",
            "cold pull, 5 layers ~200 MiB, skopeo",
            "seconds",
            times["seawall"],
            "upstream direct",
            times["direct"],
            "<= 1.15x",
            Goal("ratio_max", 1.15),
            note,
        ),
        Row(
            "P3",
            "cold pull, 5 layers ~200 MiB, skopeo",
            "seconds",
            times["seawall"],
            "Distribution proxy",
            times["dist_proxy"],
            "<= 1.0x",
            Goal("ratio_max", 1.0),
        ),
    ]


def _gets_per_object(
    requests: list[dict[str, Any]], repo: str, blobs: list[str]
) -> tuple[int, int, Counter[str]]:
    """(manifest GETs, most GETs of any one blob, statuses) answered with content by the emulator."""
    prefix = f"/v2/{repo}/"
    manifests = 0
    per_blob: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    for rec in requests:
        if not rec["path"].startswith(prefix):
            continue
        statuses[f"{rec['method']} {rec['kind']} {rec['status']}"] += 1
        if rec["method"] != "GET" or rec["status"] not in (200, 206):
            continue
        if rec["kind"] == "manifest":
            manifests += 1
        elif rec["kind"] == "blob":
            per_blob[rec["path"].rsplit("/", 1)[1]] += 1
    most = max((per_blob[d] for d in blobs), default=0)
    return manifests, most, statuses


def p4(ctx: Context) -> list[Row]:
    """50 concurrent cold pulls of one image: upstream GETs per manifest and per blob."""
    s, z = ctx.stack, ctx.sizes
    manifests: dict[str, list[float]] = {"seawall": [], "dist_proxy": []}
    blobs: dict[str, list[float]] = {"seawall": [], "dist_proxy": []}
    notes: list[str] = []
    for r in range(ctx.slow_rounds):
        image = prep.bench_image(3, z.p4_layer, f"p4-{r}")
        sw, dp = f"library/bench-p4-{r}-sw", f"library/bench-p4-{r}-dp"
        prep.push(s.upstream.url, [sw, dp], image)
        pulls = {
            "seawall": (s.edge.url, f"hub/{sw}:1.0", sw),
            "dist_proxy": (s.dist_proxy.url, f"{dp}:1.0", dp),
        }
        for name in ctx.order(r, list(pulls)):
            base, ref, repo = pulls[name]
            s.hub.reset()
            result = loadgen("pull", base, ref, connections=50, requests=50, verify=True)
            if name == "seawall":
                prep.wait_committed(base, f"hub/{repo}", list(image.blobs), timeout=300)
            n_manifest, most, statuses = _gets_per_object(s.hub.requests(), repo, list(image.blobs))
            manifests[name].append(n_manifest)
            blobs[name].append(most)
            ctx.log(
                f"P4 round {r + 1} {name}: {result['requests']} pulls ok, {result['errors']} failed in "
                f"{result['elapsed_s']:.1f}s; upstream manifest GETs {n_manifest}, most GETs of a blob {most}"
            )
            if r == 0:
                notes.append(f"{name}: {result['errors']} failed pulls, upstream {describe(statuses)}")
    note = (
        f"50 pulls at once (loadgen pull mode, 50 connections, blobs checked against their digests) of a "
        f"3-layer image ({3 * z.p4_layer // MiB} MiB); GETs answered 200/206 by the emulator. Round 1: "
        + "; ".join(notes)
    )
    return [
        Row(
            "P4",
            "50 concurrent cold pulls of one image",
            "upstream GETs per manifest",
            manifests["seawall"],
            "Distribution proxy",
            manifests["dist_proxy"],
            "exactly 1",
            Goal("value_eq", 1),
            note,
        ),
        Row(
            "P4",
            "50 concurrent cold pulls of one image",
            "upstream GETs per blob (max)",
            blobs["seawall"],
            "Distribution proxy",
            blobs["dist_proxy"],
            "exactly 1",
            Goal("value_eq", 1),
        ),
    ]


def p5(ctx: Context) -> list[Row]:
    """Seconds to the first body byte of a cold 500 MiB blob, vs the emulator's own."""
    s, z = ctx.stack, ctx.sizes
    ttfb: dict[str, list[float]] = {"direct": [], "seawall": [], "dist_proxy": []}
    total: dict[str, list[float]] = {k: [] for k in ttfb}
    for r in range(ctx.slow_rounds):
        repo = f"library/bench-p5-{r}"
        digest = prep.push_random_blob(s.upstream.url, repo, z.p5_blob, f"p5-{r}")
        urls = {
            "direct": f"{s.hub.url}/v2/{repo}/blobs/{digest}",
            "seawall": f"{s.edge.url}/v2/hub/{repo}/blobs/{digest}",
            "dist_proxy": f"{s.dist_proxy.url}/v2/{repo}/blobs/{digest}",
        }
        for name in ctx.order(r, list(urls)):
            result = loadgen("ttfb", urls[name])
            if result["status"] != 200 or result["bytes"] != z.p5_blob:
                raise RuntimeError(f"P5 {name}: status {result['status']}, {result['bytes']} bytes")
            ttfb[name].append(result["ttfb_s"])
            total[name].append(result["total_s"])
            ctx.log(
                f"P5 round {r + 1} {name}: first byte {result['ttfb_s'] * 1000:.1f} ms, "
                f"whole {result['total_s']:.2f}s"
            )
            if name == "seawall":
                prep.wait_committed(s.edge.url, f"hub/{repo}", [digest], timeout=300)
    whole = ", ".join(f"{k} {sorted(v)[len(v) // 2]:.2f}s" for k, v in total.items())
    note = (
        f"One streaming GET of a {z.p5_blob // MiB} MiB blob nobody holds, on a new connection; "
        "the emulator's "
        f"token is fetched before the clock starts. Time to read the whole blob (median): {whole}"
    )
    return [
        Row(
            "P5",
            f"first byte of a cold {z.p5_blob // MiB} MiB blob",
            "seconds",
            ttfb["seawall"],
            "upstream direct",
            ttfb["direct"],
            "<= 2x",
            Goal("ratio_max", 2.0),
            note,
        ),
        Row(
            "P5",
            f"first byte of a cold {z.p5_blob // MiB} MiB blob",
            "seconds",
            ttfb["seawall"],
            "Distribution proxy",
            ttfb["dist_proxy"],
            "",
            None,
        ),
    ]


def _store_ingest(ctx: Context, layout: Path) -> float:
    """Seconds the store takes to write the layout's blobs itself, as the edge writes a push
    (bench/s3raw.py, a process of its own)."""
    s3 = ctx.stack.s3
    argv = [
        sys.executable, "-m", "bench.s3raw", "ingest", "--endpoint", s3.endpoint,
        "--access-key", s3.access_key, "--secret-key", s3.secret_key, "--bucket", "seawall",
        *map(str, sorted((layout / "blobs" / "sha256").iterdir())),
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=_env(), check=False)
    if done.returncode != 0:
        raise ToolError(f"bench.s3raw ingest failed: {done.stderr[-1500:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def _per_gib(
    percents: list[dict[str, float]], seconds: list[float], names: list[str], size: int
) -> list[float]:
    """CPU-seconds per GiB moved, per round, summed over the named processes."""
    return [
        sum(cpu.get(n, 0.0) for n in names) / 100 * wall / (size / GiB)
        for cpu, wall in zip(percents, seconds, strict=True)
    ]


def p8(ctx: Context) -> list[Row]:
    """skopeo push of a 5-layer ~200 MiB image: seconds, vs the store writing the same bytes
    itself (the target) and vs Distribution hosted (context); CPU-seconds per pushed GiB."""
    s, z = ctx.stack, ctx.sizes
    times: dict[str, list[float]] = {"seawall": [], "store": [], "dist_hosted": []}
    walls: dict[str, list[float]] = {k: [] for k in times}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in times}
    meters = {**{k: pids(ctx, k) for k in ("seawall", "dist_hosted")}, "store": {"s3": s.s3.pid}}
    size = 0
    for r in range(ctx.slow_rounds):
        image = prep.bench_image(z.image_layers, z.layer, f"p8-{r}")
        size = prep.image_size(image)
        layout = ctx.work / f"p8-layout-{r}"
        write_oci_layout(layout, [image], tag="1.0")
        del image
        pushes = {
            "seawall": (f"docker://{s.edge.address}/local/bench-p8-{r}:1.0", ":".join(BENCH_USER)),
            "store": ("", None),
            "dist_hosted": (f"docker://{s.dist_hosted.address}/library/bench-p8-{r}:1.0", None),
        }
        try:
            for name in ctx.order(r, list(pushes)):
                dest, creds = pushes[name]
                ctx.settle()
                started = time.perf_counter()
                with CpuMeter(meters[name]) as meter:
                    if name == "store":
                        seconds = _store_ingest(ctx, layout)
                    else:
                        seconds = ctx.skopeo.copy(f"oci:{layout}:1.0", dest, dest_creds=creds)
                walls[name].append(time.perf_counter() - started)
                times[name].append(seconds)
                cpu[name].append(meter.percent)
                ctx.log(f"P8 round {r + 1} {name}: {seconds:.2f}s; CPU {meter.describe()}")
        finally:
            shutil.rmtree(layout, ignore_errors=True)
    edge = _per_gib(cpu["seawall"], walls["seawall"], ["edge"], size)
    store_in_push = _per_gib(cpu["seawall"], walls["seawall"], ["s3"], size)
    store_alone = _per_gib(cpu["store"], walls["store"], ["s3"], size)
    distribution = _per_gib(cpu["dist_hosted"], walls["dist_hosted"], ["distribution"], size)
    note = (
        f"skopeo copy oci:... docker://..., {z.image_layers} layers, {size / MiB:.0f} MiB in all; "
        "Seawall with credentials (one token fetch), Distribution without auth. The store's own "
        "ingest: bench.s3raw writes the same blobs into the same bucket, one after another as skopeo "
        "pushes them, in "
        f"{PART_SIZE // MiB} MiB parts, {PARALLEL_PARTS} in flight per object, through the minio SDK "
        "(its time runs from the first byte to the last upload completed). CPU during the pushes, "
        "% of one core: "
        f"Seawall {mean_cpu(cpu['seawall'])}; store alone {mean_cpu(cpu['store'])} (the load generator is "
        f"bench.s3raw); Distribution hosted {mean_cpu(cpu['dist_hosted'])}"
    )
    per_gib = "CPU-seconds per pushed GiB"
    return [
        Row(
            "P8",
            "push, 5 layers ~200 MiB, skopeo",
            "seconds",
            times["seawall"],
            "store's own ingest",
            times["store"],
            "<= 1.25x",
            Goal("ratio_max", 1.25),
            note,
        ),
        Row(
            "P8",
            "push, 5 layers ~200 MiB, skopeo",
            "seconds",
            times["seawall"],
            "Distribution hosted",
            times["dist_hosted"],
            "",
            None,
        ),
        Row(
            "P8",
            f"{per_gib}: edge (Seawall) vs Distribution hosted",
            "CPU-s/GiB",
            edge,
            "Distribution hosted",
            distribution,
            "",
            None,
            "CPU of the server process over the timed push, per GiB of blobs pushed.",
        ),
        Row(
            "P8",
            f"{per_gib}: store during the push vs during its own ingest",
            "CPU-s/GiB",
            store_in_push,
            "store's own ingest",
            store_alone,
            "",
            None,
            "SeaweedFS's CPU (`weed mini`, every one of its servers) per GiB written.",
        ),
    ]
