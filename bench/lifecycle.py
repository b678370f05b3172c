"""The storage lifecycle's workloads: P12 (garbage collection of a large bucket while pulls go
on) and P13 (a capped proxy cache under a pull mix).

P12 seeds 1,000 repositories of hosted project `local` through the store classes, deletes
the images of 100, and times `seawall gc` (a process, `gc_grace: 0s`) while `bench/loadgen.py`
pulls a warm image, against the same pulls without GC. P13 fills proxy project `hubcap`
(256 MiB cap) close to its cap, lets that content age past the minute eviction leaves alone
(a cache in service is full of older content), then runs a two-minute pull mix, measuring
the cache every 2 s as eviction does.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio import Redis

from bench import prep
from bench.context import Context, Sizes, mean_cpu
from bench.report import Goal, Row
from bench.stack import _env
from bench.tools import CpuMeter, loadgen
from services.lifecycle_cli import cache_bytes
from shared.lifecycle.inventory import bounded, read_repositories
from shared.oci.digest import Digest
from shared.oci.manifest import parse_manifest
from shared.registry.blobs import BlobStore
from shared.registry.repositories import RepositoryStore, Revision
from shared.registry.storage import ObjectStore

MiB = 2**20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
P12_REPOSITORIES = 1000
P12_LAYERS = 8  # + config + manifest: 10 blobs a repository
P13_PROJECT = "hubcap"
P13_CAP = 256 * MiB  # bench/stack.py gives hubcap this max_bytes
P13_PULLERS = 3
# Content older than this is what an eviction may delete (shared/lifecycle/eviction.py).
P13_SETTLE_SECONDS = 65.0


def _quick(ctx: Context) -> bool:
    return ctx.sizes == Sizes.quick()


# ---------------------------------------------------------------- P12: seeding the bucket


def _descriptor(media_type: str, data: bytes) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": str(Digest.of(data)), "size": len(data)}


def _image(seed: str, layers: int, layer_size: int) -> tuple[bytes, dict[Digest, bytes]]:
    """A manifest and its blobs (config, layers of random bytes): (manifest, {digest: bytes})."""
    rng = random.Random(seed)
    config = json.dumps({"architecture": "amd64", "os": "linux", "bench": seed}).encode()
    layer_data = [rng.randbytes(layer_size) for _ in range(layers)]
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": _descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": [_descriptor("application/vnd.oci.image.layer.v1.tar+gzip", d) for d in layer_data],
    }
    return json.dumps(manifest).encode(), {Digest.of(data): data for data in [config, *layer_data]}


class Seeder:
    """Writes images into the stack's bucket as a push would leave them (the edge's Redis
    caches of tags and revisions stay right: the same Redis is used)."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    @contextmanager
    def _stores(self) -> Iterator[tuple[asyncio.AbstractEventLoop, BlobStore, RepositoryStore]]:
        loop = asyncio.new_event_loop()
        objects = ObjectStore(self._ctx.stack.s3.settings("seawall"))
        redis = Redis.from_url(self._ctx.stack.redis.url)
        try:
            yield loop, BlobStore(objects), RepositoryStore(objects, redis)
        finally:
            loop.run_until_complete(redis.aclose())
            objects.close()
            loop.close()

    def seed(self, names: list[str], layer_size: int = 1024) -> dict[str, Revision]:
        """One image per repository, tagged 1.0; its revision per repository."""

        async def one(name: str, blobs: BlobStore, repositories: RepositoryStore) -> Revision:
            raw, content = _image(name, P12_LAYERS, layer_size)
            for digest, data in content.items():
                await blobs.commit_bytes(digest, data)
                await repositories.link_blob(name, digest, len(data))
            digest = Digest.of(raw)
            await blobs.commit_bytes(digest, raw)
            revision = await repositories.add_revision(name, digest, parse_manifest(raw, OCI_MANIFEST))
            await repositories.set_tag(name, "1.0", digest)
            return revision

        with self._stores() as (loop, blobs, repositories):

            def call(name: str) -> Callable[[], Any]:
                return lambda: one(name, blobs, repositories)

            done = loop.run_until_complete(bounded([call(n) for n in names], limit=32))
        return dict(zip(names, done, strict=True))

    def delete(self, revisions: dict[str, Revision]) -> None:
        """Delete each repository's image (its revision and tag): its blobs become garbage."""
        with self._stores() as (loop, _, repositories):

            def call(name: str, revision: Revision) -> Callable[[], Any]:
                return lambda: repositories.delete_revision(name, revision)

            calls = [call(n, r) for n, r in revisions.items()]
            loop.run_until_complete(bounded(calls, limit=32))


def gc_config(ctx: Context) -> Path:
    """The stack's configuration with `lifecycle.gc_grace: 0s`: what was deleted goes now."""
    config = yaml.safe_load(ctx.stack.config_path.read_text())
    config["lifecycle"] = {**config.get("lifecycle", {}), "gc_grace": "0s"}
    path = ctx.work / "p12-gc.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_gc(config: Path, *, dry_run: bool = False, nice: bool = False) -> tuple[float, list[str], float]:
    """`seawall gc [--dry-run]` as a process (under `nice -n 19` if asked): its wall time,
    its report's lines, and the CPU seconds it used."""
    argv = [sys.executable, "-m", "services.cli", "gc", "--config", str(config)]
    argv = (["nice", "-n", "19"] if nice else []) + argv + (["--dry-run"] if dry_run else [])
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=_env())
        # wait4, not wait: the child's own CPU time comes with its exit status.
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if process.returncode != 0:
        raise RuntimeError(f"seawall gc exited {process.returncode}: {stdout[-800:]} {stderr[-1500:]}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    return elapsed, lines, usage.ru_utime + usage.ru_stime


def _count(lines: list[str], word: str) -> int:
    for line in lines:
        if (found := re.match(rf"{word}\s+(\d+) objects", line)) is not None:
            return int(found[1])
    return -1


@dataclass
class Arm:
    """One timed stretch of pulls, with or without a collection running."""

    pulls: dict[str, Any]
    cpu: dict[str, float]
    gc_seconds: float = 0.0
    gc_cpu: float = 0.0
    gc_lines: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        head = self.gc_lines[0].rsplit(" ", 1)[-1] if self.gc_lines else "?"
        examined, deleted = _count(self.gc_lines, "examined"), _count(self.gc_lines, "deleted")
        return (
            f"{self.gc_seconds:.1f}s ({head} in its report), examined {examined}, deleted {deleted}, "
            f"{self.gc_cpu:.1f} CPU-s"
        )


def run_arm(ctx: Context, config: Path | None, load_ref: str, window: float, *, nice: bool = False) -> Arm:
    """`window` seconds of pulls (4 connections); with `config`, `seawall gc` runs meanwhile."""
    s = ctx.stack
    servers = {"edge": s.edge.pid, "s3": s.s3.pid, "redis": s.redis.pid, "workers": s.workers.pid}
    ctx.settle()
    started = time.perf_counter()
    gc: tuple[float, list[str], float] = (0.0, [], 0.0)
    with ThreadPoolExecutor(1) as pool, CpuMeter(servers) as meter:
        load = pool.submit(loadgen, "pull", s.edge.url, load_ref, connections=4, duration=window)
        if config is not None:
            time.sleep(0.2)  # the load's processes are up and pulling
            gc = run_gc(config, nice=nice)
        pulls = load.result()
    # The meter counts every child that ended meanwhile as the load generator: the
    # collection's process is told apart.
    share = 100 * gc[2] / (time.perf_counter() - started)
    cpu = {**meter.percent, "load generator": meter.percent["load generator"] - share, "seawall gc": share}
    return Arm(pulls, cpu, gc_seconds=gc[0], gc_cpu=gc[2], gc_lines=gc[1])


def p12(ctx: Context) -> list[Row]:
    """GC over 10,000 blobs in 1,000 repositories under a pull load; the pulls' p99 with and
    without GC."""
    seeder = Seeder(ctx)
    repositories = P12_REPOSITORIES // 10 if _quick(ctx) else P12_REPOSITORIES
    garbage = repositories // 10  # repositories whose image is deleted before each collection
    started = time.perf_counter()
    names = [f"local/p12/r{i:04d}" for i in range(repositories)]
    revisions = seeder.seed(names)
    load_ref = f"{next(iter(seeder.seed(['local/p12/load'], layer_size=256 * 1024)))}:1.0"
    ctx.log(f"P12: seeded {repositories} repositories in {time.perf_counter() - started:.0f}s")
    seeder.delete({n: revisions[n] for n in names[:garbage]})
    config = gc_config(ctx)
    calibration, dry_lines, _ = run_gc(config, dry_run=True)
    # The load runs as long as a collection took with nothing else going on: under load it
    # takes longer, so every pull of the GC arm runs while the collection does.
    window = max(3.0, calibration)
    ctx.log(f"P12: dry run {calibration:.1f}s ({' / '.join(dry_lines[:3])}); load window {window:.1f}s")
    arms: dict[str, list[Arm]] = {"gc": [], "nogc": []}

    def new_garbage(label: str) -> None:
        fresh = [f"local/p12/g{label}-{i:03d}" for i in range(garbage)]
        seeder.delete(seeder.seed(fresh))

    for r in range(ctx.slow_rounds):
        if r > 0:
            new_garbage(str(r))
        for name in ctx.order(r, list(arms)):
            arm = run_arm(ctx, config if name == "gc" else None, load_ref, window)
            arms[name].append(arm)
            latency = arm.pulls["latency_ms"]
            ctx.log(
                f"P12 round {r + 1} {name}: {arm.pulls['requests']} pulls, p50 {latency['p50']} ms, "
                f"p99 {latency['p99']} ms, errors {arm.pulls['errors']}"
                + (f"; gc {arm.summary}" if name == "gc" else "")
                + f"; CPU {', '.join(f'{k} {v:.0f}%' for k, v in arm.cpu.items())}"
            )
    # Context: the same with the collection at the lowest CPU priority.
    new_garbage("nice")
    niced = run_arm(ctx, config, load_ref, window, nice=True)
    ctx.log(f"P12 niced gc: {niced.summary}; pulls p99 {niced.pulls['latency_ms']['p99']} ms")

    def percentile(arm: Arm, p: str) -> float:
        return float(arm.pulls["latency_ms"][p] or 0)

    p99 = {k: [percentile(a, "p99") for a in v] for k, v in arms.items()}
    p50 = {k: [percentile(a, "p50") for a in v] for k, v in arms.items()}
    errors = sum(int(a.pulls["errors"]) for v in arms.values() for a in v)
    blobs = repositories * 10
    note = (
        f"{repositories} repositories of hosted project `local`, 10 blobs each ({blobs} blobs: manifest, "
        f"config, 8 layers of 1 KiB), seeded through the store classes; before each collection the images "
        f"of {garbage} repositories are deleted ({garbage * 10} blobs become garbage). `seawall gc` as a "
        f"process with gc_grace 0s. Each round: {window:.1f}s of pulls (loadgen pull mode, 4 connections, "
        f"one warm image of 8 x 256 KiB in `local`) during the collection, and the same without it, "
        f"alternating which goes first. Collections: {'; '.join(a.summary for a in arms['gc'])}. "
        f"Pull p50 with GC {p50['gc']} ms, without {p50['nogc']} ms. Failed pulls: {errors}. "
        f"Dry run before the rounds: {calibration:.1f}s. CPU, % of one core: with GC "
        f"{mean_cpu([a.cpu for a in arms['gc']])}; without {mean_cpu([a.cpu for a in arms['nogc']])}. "
        f"Under `nice -n 19` (once, after the rounds): {niced.summary}, pull p99 "
        f"{percentile(niced, 'p99'):g} ms, p50 {percentile(niced, 'p50'):g} ms; CPU {mean_cpu([niced.cpu])}"
    )
    return [
        Row("P12", f"GC of {blobs} blobs in {repositories} repositories, under pulls", "seconds",
            [a.gc_seconds for a in arms["gc"]], target="<= 60", goal=Goal("value_max", 60), note=note),
        Row("P12", "pull p99 during GC", "ms", p99["gc"], "same pulls without GC", p99["nogc"],
            "<= 1.5x", Goal("ratio_max", 1.5)),
        Row("P12", "pull p99 during GC under nice -n 19", "ms", [percentile(niced, "p99")],
            "same pulls without GC", p99["nogc"], note="Context only: one run after the rounds."),
    ]  # fmt: skip


# ---------------------------------------------------------------- P13: a capped cache


class CacheSampler:
    """Measures the project's cache every `interval` seconds, as eviction does, on a thread."""

    def __init__(self, ctx: Context, project: str, interval: float = 2.0) -> None:
        self._ctx, self._project, self._interval = ctx, project, interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def measure(self) -> int:
        return asyncio.run(self._measure())

    async def _measure(self) -> int:
        objects = ObjectStore(self._ctx.stack.s3.settings("seawall"))
        try:
            views = await read_repositories(objects, BlobStore(objects), project=self._project)
        finally:
            objects.close()
        return cache_bytes(list(views.values()))

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - started, self.measure()))
            self._stop.wait(self._interval)

    def __enter__(self) -> CacheSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _evictions(log: Path) -> tuple[int, int]:
    """Eviction runs that succeeded, and evictions the fills asked for, in the workers' log."""
    text = log.read_text(errors="replace")
    runs = sum(
        1 for line in text.splitlines()
        if "lifecycle_job_finished" in line and "job=eviction" in line and "outcome=succeeded" in line
    )  # fmt: skip
    return runs, text.count("cache_eviction_asked")


def p13(ctx: Context) -> list[Row]:
    """A proxy project capped at 256 MiB through a two-minute pull mix: the most its cache held,
    as a share of the cap."""
    s = ctx.stack
    quick = _quick(ctx)
    layer = 8 * MiB
    mix_seconds = 30.0 if quick else 120.0
    # New bytes a second: what eviction brings the cache down to (90% of the cap) holds
    # 80 s of them, more than the minute of fills eviction leaves alone.
    rate = 0.9 * P13_CAP / 80.0
    image_bytes = 2 * layer
    prefill_count = int(0.85 * P13_CAP / image_bytes)
    mix_count = max(1, int(rate * mix_seconds / image_bytes))
    images = [f"library/bench-p13-{i}" for i in range(prefill_count + mix_count)]
    started = time.perf_counter()
    for i, repo in enumerate(images):
        prep.push(s.upstream.url, [repo], prep.bench_image(2, layer, f"p13-{i}"))
    ctx.log(
        f"P13: pushed {len(images)} images of {image_bytes / MiB:.0f} MiB "
        f"in {time.perf_counter() - started:.0f}s"
    )
    sampler = CacheSampler(ctx, P13_PROJECT)
    failures: list[str] = []

    def pull(repo: str) -> None:
        result = loadgen(
            "pull", s.edge.url, f"{P13_PROJECT}/{repo}:1.0", connections=1, requests=1, verify=True
        )
        if result["errors"]:
            failures.extend(result["error_samples"][:1] or ["error"])

    for repo in images[:prefill_count]:
        pull(repo)
    filled = time.monotonic()
    before = sampler.measure()
    ctx.log(f"P13: prefilled {prefill_count} images, cache {before / MiB:.0f} MiB")
    if not quick:
        time.sleep(max(0.0, P13_SETTLE_SECONDS - (time.monotonic() - filled)))
    runs_before, asked_before = _evictions(s.workers.log_path)
    mix = images[prefill_count:]
    pulled: list[str] = list(images[:prefill_count])
    lock = threading.Lock()
    counts = {"new": 0, "again": 0}
    mix_started = time.monotonic()

    def puller(seed: int) -> None:
        rng = random.Random(seed)
        while (now := time.monotonic() - mix_started) < mix_seconds:
            with lock:  # new images are released evenly over the mix; otherwise a recent one again
                due = min(len(mix), int(now / mix_seconds * len(mix)) + 1)
                fresh = mix[counts["new"]] if counts["new"] < due else None
                counts["new" if fresh else "again"] += 1
                repo = fresh or rng.choice(pulled[-6:])
            pull(repo)
            if fresh is None:
                time.sleep(0.3)
                continue
            with lock:
                pulled.append(fresh)

    with sampler, ThreadPoolExecutor(P13_PULLERS) as pool:
        list(pool.map(puller, range(P13_PULLERS)))
        time.sleep(4.0)  # the last fills' evictions
    runs_after, asked_after = _evictions(s.workers.log_path)
    peak_at, peak = max(sampler.samples, key=lambda sample: sample[1])
    ratio = peak / P13_CAP
    values = [b / MiB for _, b in sampler.samples]
    ctx.log(
        f"P13: peak {peak / MiB:.0f} MiB ({ratio:.3f} of the cap) at {peak_at:.0f}s; {counts}; "
        f"evictions {runs_after - runs_before}, asked {asked_after - asked_before}; failures {len(failures)}"
    )
    idle = 0 if quick else P13_SETTLE_SECONDS
    note = " ".join([
        f"Proxy project `{P13_PROJECT}`, cache.max_bytes {P13_CAP // MiB} MiB, eviction_headroom 0.1",
        "(fills ask for an eviction past 90%; it evicts down to 90%).",
        f"Prefilled with {prefill_count} images ({before / MiB:.0f} MiB), then {idle:.0f}s idle.",
        f"Mix: {mix_seconds:.0f}s, {P13_PULLERS} pullers (loadgen pull, blobs checked),",
        f"{counts['new']} new images of {image_bytes / MiB:.0f} MiB (2 layers) released evenly",
        f"({rate / MiB:.1f} MiB/s), {counts['again']} re-pulls of the 6 most recent.",
        "Cache bytes every 2 s (inventory, as eviction measures):",
        f"min {min(values):.0f}, median {statistics.median(values):.0f}, max {max(values):.0f} MiB",
        f"over {len(values)} samples. Evictions that ran: {runs_after - runs_before}",
        f"(asked by fills {asked_after - asked_before} times). Failed pulls: {len(failures)}",
        f"({failures[0][:200]})" if failures else "",
    ]).strip()  # fmt: skip
    return [
        Row("P13", f"capped proxy cache ({P13_CAP // MiB} MiB), {mix_seconds:.0f}s pull mix",
            "max bytes / cap", [round(ratio, 3)], target="<= 1.05", goal=Goal("value_max", 1.05), note=note),
        Row("P13", "evictions during the mix", "runs", [float(runs_after - runs_before)]),
    ]  # fmt: skip
