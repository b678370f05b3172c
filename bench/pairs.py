"""`python -m bench.pairs [--rounds N]`: P3's cold pull as pairs, for comparing two revisions.

Each round pushes a new image to the upstream, pulls it straight from the emulator, then
through Seawall (with the bench's skopeo flags), and prints both times and their ratio; the
last line is the median ratio. Only the two targets P3 judges by run, so one round's noise
(a neighbour's burst, writeback) lands in both halves of a pair more often than in `make
bench`, where Distribution proxy pulls in between. Run it from a checkout of each revision.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench import prep
from bench.cold import skopeo_pull
from bench.context import Context, Sizes
from bench.stack import Stack


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pairs", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, storage)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="seawall-pairs-"))
    try:
        with Stack(work / "stack") as stack:
            ctx = Context(
                stack=stack, work=work, rounds=1, slow_rounds=1, duration=1, sizes=Sizes(), client="wrk"
            )
            ratios = [_round(ctx, r) for r in range(args.rounds)]
        print(f"median Seawall / direct: {statistics.median(ratios):.2f}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _round(ctx: Context, r: int) -> float:
    s, z = ctx.stack, ctx.sizes
    image = prep.bench_image(z.image_layers, z.layer, f"pair-{r}")
    repo = f"library/bench-pair-{r}"
    prep.push(s.upstream.url, [repo], image)
    times = {}
    for name, address, ref in (
        ("direct", s.hub.url.removeprefix("http://"), f"{repo}:1.0"),
        ("seawall", s.edge.address, f"hub/{repo}:1.0"),
    ):
        ctx.settle()
        times[name] = skopeo_pull(ctx, address, ref)
    prep.wait_committed(s.edge.url, f"hub/{repo}", list(image.blobs), timeout=300)
    ratio = times["seawall"] / times["direct"]
    print(f"round {r + 1}: direct {times['direct']:.3f}s, seawall {times['seawall']:.3f}s, ratio {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
