"""P11, the chain: edge Seawalls whose proxy project asks a central Seawall first and the
emulator second (`upstreams: [central, hub]`), the central one being the stack's own Seawall
(its `hub` project proxies the emulator and serves Docker Hub's names at the root).

Each site is a Seawall of its own (an edge and a worker process) with its own bucket on the
stack's S3 server and its own Redis database on the stack's Redis server. The sites are
started for P11 only and stopped after it.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from bench import prep
from bench.cold import _gets_per_object
from bench.context import Context, describe
from bench.report import Goal, Row
from bench.stack import Edge, Stack, Workers, redis_db, site_config
from bench.tools import loadgen
from services.processes import free_port

SITES = 5
PULLS = 20  # spread evenly over the sites


def site_yaml(stack: Stack, index: int, port: int, work: Path) -> dict[str, Any]:
    bucket = f"site-{index}"
    stack.s3.ensure_bucket(bucket)
    redis_url = redis_db(stack.redis.url, 2 + index)
    config = site_config(port, redis_url, stack.s3.settings(bucket), work / f"site-{index}", threads=4)
    return {
        **config,
        "upstreams": [
            {
                "name": "central",
                "url": stack.edge.url,
                "flavor": "registry",
                "requests_per_minute": 0,
                "connect_timeout": "2s",
                "head_timeout": "2s",
                "read_timeout": "10s",
            },
            {
                "name": "hub",
                "url": stack.hub.url,
                "flavor": "dockerhub",
                "quota": {"preset": "unlimited"},
                "requests_per_minute": 1_000_000,
            },
        ],
        "projects": [
            {"name": "hub", "type": "proxy", "public": True, "upstreams": ["central", "hub"], "tag_ttl": "1h"}
        ],
    }


@contextlib.contextmanager
def sites(ctx: Context, count: int) -> Iterator[list[Edge]]:
    """`count` edge sites (edge + workers each), stopped on the way out."""
    work = ctx.work / "fleet"
    work.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as exit_stack:
        edges: list[Edge] = []
        for i in range(count):
            port = free_port()
            path = work / f"site-{i}.yaml"
            path.write_text(yaml.safe_dump(site_yaml(ctx.stack, i, port, work), sort_keys=False))
            edges.append(exit_stack.enter_context(Edge(path, port, work, name=f"site-{i}-edge")))
            exit_stack.enter_context(Workers(path, work, name=f"site-{i}-workers"))
        yield edges


def p11(ctx: Context) -> list[Row]:
    """20 concurrent cold pulls over 5 edge sites behind one central Seawall: upstream GETs
    per manifest and per blob at the emulator."""
    s = ctx.stack
    manifests: list[float] = []
    blobs: list[float] = []
    first: Counter[str] = Counter()
    failed = 0
    with sites(ctx, SITES) as edges:
        ctx.log(f"P11: {len(edges)} sites up")
        for r in range(ctx.slow_rounds):
            image = prep.bench_image(3, ctx.sizes.p4_layer, f"p11-{r}")
            repo = f"library/bench-p11-{r}"
            prep.push(s.upstream.url, [repo], image)
            s.hub.reset()
            per_site = PULLS // len(edges)

            def pull(edge: Edge, n: int = per_site, ref: str = f"hub/{repo}:1.0") -> dict[str, Any]:
                return loadgen("pull", edge.url, ref, connections=n, requests=n, verify=True)

            with ThreadPoolExecutor(len(edges)) as pool:
                results = list(pool.map(pull, edges))
            for edge in edges:
                prep.wait_committed(edge.url, f"hub/{repo}", list(image.blobs), timeout=300)
            prep.wait_committed(s.edge.url, f"hub/{repo}", list(image.blobs), timeout=300)
            n_manifest, most, statuses = _gets_per_object(s.hub.requests(), repo, list(image.blobs))
            manifests.append(n_manifest)
            blobs.append(most)
            errors = sum(res["errors"] for res in results)
            failed += errors
            if r == 0:
                first = statuses
            ctx.log(
                f"P11 round {r + 1}: {sum(res['requests'] for res in results)} pulls, {errors} failed; "
                f"upstream manifest GETs {n_manifest}, most GETs of a blob {most}; {describe(statuses)}"
            )
        fallbacks = sum(
            path.read_text(errors="replace").count("upstream_fallback")
            for path in (ctx.work / "fleet").glob("site-*.log")
        )
    note = (
        f"{SITES} edge Seawalls (edge + 1 worker process of 4 threads each; own bucket, own Redis "
        "database) with `upstreams: [central, hub]`, behind the stack's Seawall as central, behind the "
        f"emulator. {PULLS} pulls at once ({PULLS // SITES} per site, loadgen pull mode, blobs checked) "
        f"of a new 3-layer image ({3 * ctx.sizes.p4_layer // 2**20} MiB) each round; GETs answered "
        f"200/206 by the emulator. Failed pulls: {failed}; fallbacks to the emulator the sites logged "
        f"(`upstream_fallback`): {fallbacks}. Everything the emulator saw in round 1: "
        f"{describe(first)}"
    )
    workload = f"{PULLS} cold pulls over {SITES} edges via a central Seawall"
    return [
        Row("P11", workload, "upstream GETs per manifest", manifests, target="exactly 1",
            goal=Goal("value_eq", 1), note=note),
        Row("P11", workload, "upstream GETs per blob (max)", blobs, target="exactly 1",
            goal=Goal("value_eq", 1)),
    ]  # fmt: skip
