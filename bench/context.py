"""What every workload gets: the running stack, round counts, sizes, and the load helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import profile
from bench.stack import Stack
from bench.tools import Skopeo, loadgen, wrk

T = TypeVar("T")
MiB = 2**20


@dataclass(frozen=True)
class Sizes:
    p2_blob: int = 100 * MiB
    image_layers: int = 5
    layer: int = 40 * MiB  # 5 x 40 MiB: the ~200 MiB image of P3 and P8
    p4_layer: int = 8 * MiB
    p5_blob: int = 500 * MiB
    p7_blob: int = 1024 * MiB
    # P9/P10: a base layer all 20 tags share, a layer per repository, two layers per tag:
    # 24 + 5 x 16 + 40 x 7 = 384 MiB of distinct blobs.
    rep_base: int = 24 * MiB
    rep_repo_layer: int = 16 * MiB
    rep_layer: int = 7 * MiB

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            p2_blob=100 * MiB, layer=8 * MiB, p4_layer=2 * MiB, p5_blob=100 * MiB, p7_blob=256 * MiB,
            rep_base=4 * MiB, rep_repo_layer=2 * MiB, rep_layer=1 * MiB,
        )  # fmt: skip


@dataclass
class Context:
    stack: Stack
    work: Path
    rounds: int
    slow_rounds: int
    duration: float
    sizes: Sizes
    client: str  # "wrk" or "loadgen" for the GET workloads
    profile_dir: Path | None = None
    skopeo: Skopeo = field(init=False)
    profiles: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.skopeo = Skopeo(self.work / "skopeo")

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    @staticmethod
    def settle() -> None:
        """Write out the dirty pages the previous run left, so its writeback does not land in
        the next timed run (each cold pull or push writes hundreds of MiB)."""
        os.sync()

    @staticmethod
    def order(round_index: int, targets: Sequence[T]) -> list[T]:
        """Rotate who goes first each round, so no target always runs on a warmer machine."""
        shift = round_index % len(targets)
        return [*targets[shift:], *targets[:shift]]

    def load(
        self,
        url: str,
        connections: int,
        headers: dict[str, str] | None = None,
        duration: float | None = None,
    ) -> dict[str, Any]:
        """GETs of one URL on `connections` connections for `duration` seconds."""
        duration = duration or self.duration
        if self.client == "wrk":
            return wrk(url, connections=connections, duration=duration, headers=headers or {})
        header = [f"{k}: {v}" for k, v in (headers or {}).items()]
        return loadgen("get", url, connections=connections, duration=duration, header=header)

    def profiled_load(
        self, name: str, pid: int, url: str, connections: int, headers: dict[str, str] | None = None
    ) -> None:
        """One extra, unmeasured run under py-spy, its summary kept for the report."""
        if self.profile_dir is None:
            return
        out = self.profile_dir / f"{name}.txt"
        recorder = profile.record(pid, out, self.duration + 1)
        if recorder is None:
            self.log("py-spy not installed: no profile (pip install py-spy into the venv)")
            self.profile_dir = None
            return
        try:
            time.sleep(0.5)
            self.load(url, connections, headers)
        finally:
            try:
                recorder.wait(timeout=self.duration + 30)
            except subprocess.TimeoutExpired:
                recorder.kill()
                recorder.wait()
        if out.exists():
            self.profiles[name] = profile.summarize(out)
            self.log(f"profile of {name}:\n{self.profiles[name]}")


def describe(counts: Counter[str]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"


def pids(ctx: Context, target: str) -> dict[str, int]:
    """The processes that serve a target's requests, for CPU accounting."""
    s = ctx.stack
    if target == "seawall":
        return {"edge": s.edge.pid, "s3": s.s3.pid, "redis": s.redis.pid, "workers": s.workers.pid}
    if target == "dist_proxy":
        return {"distribution": s.dist_proxy.pid, "emulator": s.hub.pid, "upstream": s.upstream.pid}
    return {"distribution": s.dist_hosted.pid}


def mean_cpu(runs: list[dict[str, float]]) -> str:
    names = list(runs[0]) if runs else []
    return ", ".join(f"{n} {sum(r.get(n, 0.0) for r in runs) / len(runs):.0f}%" for n in names) or "-"
