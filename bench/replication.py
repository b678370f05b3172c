"""The replication workloads: P9 (pull replication from "Docker Hub" into a hosted project)
and P10 (push replication from one Seawall to another), each against `skopeo sync` of the
same tags between the same two registries.

The content is 5 repositories of 4 tags each (20 tags, 4 layers a tag): one base layer
every tag shares, one layer the tags of a repository share, and two layers of its own per
tag, like images built on one distribution and one runtime per repository. Every round
pushes new content under the same names, so both targets copy every blob again (their tags
move to new digests: `overwrite`) and neither holds anything of it yet.

Seawall runs as a user runs it: `seawall replicate RULE --wait` (a process of its own)
against the stack's edge and workers; the rules are in bench/stack.py.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench import prep
from bench.context import Context, describe, mean_cpu
from bench.report import Goal, Row
from bench.stack import BENCH_USER, REP_REPOS, REP_TAGS, _env
from bench.tools import CpuMeter, ToolError
from services.replication_cli import records
from shared.replication.records import Execution
from shared.settings import load_settings
from tests.support.images import make_image, make_layer

MiB = 2**20


def push_content(ctx: Context, seed: str) -> int:
    """Push this round's 20 tags into the upstream; the bytes of its distinct blobs."""
    z = ctx.sizes
    base = make_layer(size=z.rep_base, seed=f"{seed}-base")
    distinct: dict[str, int] = {}
    for i, repo in enumerate(REP_REPOS):
        runtime = make_layer(size=z.rep_repo_layer, seed=f"{seed}-{i}")
        for tag in REP_TAGS:
            own = [make_layer(size=z.rep_layer, seed=f"{seed}-{i}-{tag}-{n}") for n in range(2)]
            image = make_image([base, runtime, *own], label=f"{seed}-{i}-{tag}")
            prep.push(ctx.stack.upstream.url, [repo], image, tag=tag)
            distinct.update({d: len(b) for d, b in image.blobs.items()})
    return sum(distinct.values())


def replicate(ctx: Context, rule: str) -> tuple[float, Execution]:
    """`seawall replicate RULE --wait`: its wall time, and the execution it ran."""
    argv = [
        sys.executable, "-m", "services.cli", "replicate", rule, "--wait",
        "--config", str(ctx.stack.config_path),
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=900, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        output = f"{done.stdout[-800:]} {done.stderr[-1500:]}"
        raise ToolError(f"seawall replicate {rule} exited {done.returncode}: {output}")
    return elapsed, asyncio.run(_latest(ctx.stack.config_path, rule))


async def _latest(config: Path, rule: str) -> Execution:
    settings = load_settings(config)
    assert settings.redis_url is not None
    async with records(settings, settings.redis_url) as store:
        executions = await store.executions(rule, limit=1)
    if not executions:
        raise RuntimeError(f"no execution of {rule}")
    return executions[0]


def sync_yaml(ctx: Context, name: str, registry: str, repos: list[str]) -> Path:
    """A `skopeo sync --src yaml` file: every tag of `repos` at `registry` (listed by skopeo)."""
    lines = [f"{registry}:", "  tls-verify: false", "  images:"]
    lines += [f"    {repo}: []" for repo in repos]
    path = ctx.work / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _check(execution: Execution, tags: int) -> None:
    if execution.status != "succeeded" or execution.succeeded != tags:
        counts = f"{execution.succeeded}/{execution.total} tasks succeeded"
        raise RuntimeError(f"execution {execution.id}: {execution.status}, {counts}; {execution.message}")


def _server_pids(ctx: Context, *names: str) -> dict[str, int]:
    s = ctx.stack
    every = {
        "edge": s.edge.pid, "workers": s.workers.pid, "s3": s.s3.pid, "redis": s.redis.pid,
        "emulator": s.hub.pid, "upstream": s.upstream.pid, "distribution": s.dist_hosted.pid,
        "edge-b": s.seawall_b.pid,
    }  # fmt: skip
    return {n: every[n] for n in names}


def p9(ctx: Context) -> list[Row]:
    """Pull replication of 20 tags from the emulator into a hosted project, vs skopeo sync
    from the emulator into Distribution (hosted); then a re-run's upstream requests."""
    s = ctx.stack
    tags = len(REP_REPOS) * len(REP_TAGS)
    # skopeo_b: skopeo sync into the second Seawall edge (same S3 server, its own bucket), to
    # tell what the destination's storage costs from what the replication itself does.
    times: dict[str, list[float]] = {"seawall": [], "skopeo": [], "skopeo_b": []}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in times}
    moved: list[float] = []
    rerun_bytes: list[float] = []
    heads: list[float] = []
    gets: list[float] = []
    referrer_gets: list[float] = []
    norefs_heads: list[float] = []
    runs: list[float] = []
    rerun_counts: Counter[str] = Counter()
    norefs_counts: Counter[str] = Counter()
    size = 0
    hub = s.hub.url.removeprefix("http://")
    source = sync_yaml(ctx, "p9-sync", hub, REP_REPOS)
    pids = {
        "seawall": _server_pids(ctx, "edge", "workers", "s3", "redis", "emulator", "upstream"),
        "skopeo": _server_pids(ctx, "distribution", "emulator", "upstream"),
        "skopeo_b": _server_pids(ctx, "edge-b", "s3", "redis", "emulator", "upstream"),
    }
    for r in range(ctx.slow_rounds):
        size = push_content(ctx, f"p9-{r}")
        for name in ctx.order(r, list(times)):
            ctx.settle()
            with CpuMeter(pids[name]) as meter:
                if name == "seawall":
                    seconds, execution = replicate(ctx, "bench-p9")
                    _check(execution, tags)
                    moved.append(execution.bytes_moved)
                    runs.append(execution.seconds)
                elif name == "skopeo":
                    seconds = ctx.skopeo.sync(source, f"{s.dist_hosted.address}/p9")
                else:
                    dest = f"{s.seawall_b.address}/sync"
                    seconds = ctx.skopeo.sync(source, dest, dest_creds=":".join(BENCH_USER))
            times[name].append(seconds)
            cpu[name].append(meter.percent)
            ctx.log(f"P9 round {r + 1} {name}: {seconds:.2f}s; CPU {meter.describe()}")
        # A re-run with the rule's defaults, then the same tags by the rule without referrers.
        s.hub.reset()
        _, again = replicate(ctx, "bench-p9")
        _check(again, tags)
        counts = Counter(s.hub.counts().get("by_kind", {}))
        rerun_bytes.append(again.bytes_moved)
        heads.append(counts["HEAD manifest"] / tags)
        gets.append(counts["GET manifest"])
        referrer_gets.append(counts["GET other"] / tags)
        rerun_counts += counts
        s.hub.reset()
        _, bare = replicate(ctx, "bench-p9-norefs")
        _check(bare, tags)
        counts = Counter(s.hub.counts().get("by_kind", {}))
        norefs_heads.append(counts["HEAD manifest"] / tags)
        norefs_counts += counts
        ctx.log(
            f"P9 round {r + 1} re-runs: {again.bytes_moved} bytes, upstream {describe(rerun_counts)}; "
            f"without referrers {describe(norefs_counts)}"
        )
    note = (
        f"{tags} tags in {len(REP_REPOS)} repositories, 4 layers a tag (one shared by all, one by the tags "
        f"of a repository, two of its own), {size / MiB:.0f} MiB of distinct blobs; new content each round. "
        "Seawall: `seawall replicate bench-p9 --wait` (a process, polling every 0.1 s, backing off "
        "to 1 s) with the stack's workers (1 process, 8 threads; at most 4 tasks of an execution at "
        "once), into hosted project "
        "`mirror`; rule defaults (overwrite, copy_referrers true). skopeo: `skopeo sync --src yaml --dest "
        "docker` from the emulator (every tag of the 5 repositories) into Distribution (hosted). Blob bytes "
        f"the timed executions moved: {', '.join(f'{b / MiB:.0f} MiB' for b in moved)}; the executions "
        f"themselves took {', '.join(f'{t:.2f}s' for t in runs)}. CPU, % of one core: Seawall "
        f"{mean_cpu(cpu['seawall'])}; skopeo into Distribution {mean_cpu(cpu['skopeo'])}; skopeo into the "
        f"second Seawall {mean_cpu(cpu['skopeo_b'])}. Re-runs, all rounds, at the "
        f"emulator: with referrers {describe(rerun_counts)}; copy_referrers false {describe(norefs_counts)}"
    )
    return [
        Row("P9", f"pull replication, {tags} tags ~{size / MiB:.0f} MiB", "seconds", times["seawall"],
            "skopeo sync -> Distribution", times["skopeo"], "<= 1.1x", Goal("ratio_max", 1.1), note),
        Row("P9", f"pull replication, {tags} tags ~{size / MiB:.0f} MiB", "seconds", times["seawall"],
            "skopeo sync -> a Seawall", times["skopeo_b"], note="Context only: skopeo sync from the "
            "emulator into the second Seawall edge (hosted project, its own bucket on the same S3 server), "
            "the same storage path as the replication's destination."),
        Row("P9", "re-run: blob bytes moved", "bytes", rerun_bytes, target="0", goal=Goal("value_eq", 0)),
        Row("P9", "re-run: upstream manifest GETs", "GETs", gets, target="0", goal=Goal("value_eq", 0)),
        Row("P9", "re-run: upstream manifest HEADs per tag (copy_referrers true)", "HEADs", heads,
            target="", goal=None,
            note=f"Referrers API GETs per tag: {', '.join(f'{v:g}' for v in referrer_gets)}"),
        Row("P9", "re-run: upstream manifest HEADs per tag (copy_referrers false)", "HEADs", norefs_heads,
            target="<= 1", goal=Goal("value_max", 1)),
    ]  # fmt: skip


def p10(ctx: Context) -> list[Row]:
    """Push replication of the 20 tags from Seawall to a second Seawall (its own bucket), vs
    skopeo sync between the same two."""
    s = ctx.stack
    tags = len(REP_REPOS) * len(REP_TAGS)
    times: dict[str, list[float]] = {"seawall": [], "skopeo": []}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in times}
    runs: list[float] = []
    moved: list[float] = []
    rerun: list[float] = []
    size = 0
    source = sync_yaml(ctx, "p10-sync", s.edge.address, [r.replace("library/", "mirror/") for r in REP_REPOS])
    pids = _server_pids(ctx, "edge", "workers", "s3", "redis", "edge-b")
    for r in range(ctx.slow_rounds):
        size = push_content(ctx, f"p10-{r}")
        _, filled = replicate(ctx, "bench-p9")  # the round's tags into `mirror`, untimed
        _check(filled, tags)
        for name in ctx.order(r, list(times)):
            ctx.settle()
            with CpuMeter(pids) as meter:
                if name == "seawall":
                    seconds, execution = replicate(ctx, "bench-p10")
                    _check(execution, tags)
                    moved.append(execution.bytes_moved)
                    runs.append(execution.seconds)
                else:
                    dest = f"{s.seawall_b.address}/sync"
                    seconds = ctx.skopeo.sync(source, dest, dest_creds=":".join(BENCH_USER))
            times[name].append(seconds)
            cpu[name].append(meter.percent)
            ctx.log(f"P10 round {r + 1} {name}: {seconds:.2f}s; CPU {meter.describe()}")
        _, again = replicate(ctx, "bench-p10")
        _check(again, tags)
        rerun.append(again.bytes_moved)
    note = (
        f"The P9 content ({size / MiB:.0f} MiB of distinct blobs, new each round), first replicated into "
        "`mirror` (untimed). Seawall: `seawall replicate bench-p10 --wait`, a push rule from `mirror` to "
        "upstream `seawall-b` (a second Seawall edge with its own bucket on the same S3 server and its own "
        "Redis database; namespace `rep`); skopeo: `skopeo sync --src yaml --dest docker` from the first "
        "edge's `mirror/...` to the second's project `sync`, with credentials. Both write new blobs into "
        "the same bucket, in alternating order. Blob bytes the timed executions sent: "
        f"{', '.join(f'{b / MiB:.0f} MiB' for b in moved)}; the executions took "
        f"{', '.join(f'{t:.2f}s' for t in runs)}; a re-run sent {', '.join(f'{b:g}' for b in rerun)} bytes. "
        f"CPU, % of one core: Seawall {mean_cpu(cpu['seawall'])}; skopeo {mean_cpu(cpu['skopeo'])}"
    )
    return [
        Row("P10", f"push replication, {tags} tags ~{size / MiB:.0f} MiB", "seconds", times["seawall"],
            "skopeo sync, same two", times["skopeo"], "<= 1.1x", Goal("ratio_max", 1.1), note),
    ]  # fmt: skip
