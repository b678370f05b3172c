"""`python -m bench [--rounds N] [--only P1,P2] [--quick]`: Seawall against CNCF Distribution.

Starts every server on 127.0.0.1 (see bench/stack.py), runs the workloads, prints the table of
medians and ratios, and (for a full run) rewrites the generated part of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import report
from bench.context import Context, Sizes
from bench.report import Row
from bench.stack import Stack
from bench.tools import have_wrk
from bench.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds of the fast workloads (default 3, quick 1)"
    )
    parser.add_argument(
        "--slow-rounds", type=int, default=None, help="rounds of P3-P5 and P8-P11 (default rounds+1, quick 1)"
    )
    parser.add_argument("--only", default="", help="comma-separated workload ids, e.g. P1,P2")
    parser.add_argument("--quick", action="store_true", help="1 round, 3s runs, smaller images and blobs")
    parser.add_argument("--duration", type=float, default=None, help="seconds of each load run (default 6)")
    parser.add_argument(
        "--client",
        choices=["wrk", "loadgen"],
        default=None,
        help="GET load (default: wrk if installed)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also run P1/P2 once under py-spy and summarise"
    )
    parser.add_argument(
        "--write", action="store_true", help="write BENCHMARKS.md even for a partial or quick run"
    )
    parser.add_argument("--no-write", action="store_true", help="never write BENCHMARKS.md")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, storage)")
    return parser.parse_args(argv)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    selected = [w.strip().upper() for w in args.only.split(",") if w.strip()] or list(WORKLOADS)
    unknown = [w for w in selected if w not in WORKLOADS]
    if unknown:
        print(
            f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(WORKLOADS)}",
            file=sys.stderr,
        )
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    # The cold workloads take one sample a round and move the most between rounds (a
    # neighbour's burst lands in one pull): they get more rounds than the load runs.
    slow_rounds = args.slow_rounds or (1 if args.quick else rounds + 1)
    duration = args.duration or (3.0 if args.quick else 6.0)
    client = args.client or ("wrk" if have_wrk() else "loadgen")
    # SIGTERM (a killed make) unwinds like Ctrl-C, so every server is stopped.
    signal.signal(signal.SIGTERM, _interrupt)

    work = Path(tempfile.mkdtemp(prefix="seawall-bench-"))
    started = time.monotonic()
    rows: list[Row] = []
    ctx: Context | None = None
    print(
        f"bench: work directory {work}; workloads {','.join(selected)}; {rounds} rounds "
        f"({slow_rounds} for the slow ones), {duration:g}s runs, load from {client}",
        file=sys.stderr,
    )
    try:
        with Stack(work / "stack") as stack:
            ctx = Context(
                stack=stack, work=work, rounds=rounds, slow_rounds=slow_rounds, duration=duration,
                sizes=Sizes.quick() if args.quick else Sizes(), client=client,
                profile_dir=work / "profiles" if args.profile else None,
            )  # fmt: skip
            ctx.log(f"stack up: {stack.processes()}")
            for workload in selected:
                ctx.log(f"{workload} ...")
                t0 = time.monotonic()
                try:
                    rows += WORKLOADS[workload](ctx)
                except Exception as exc:  # one broken workload must not hide the others
                    traceback.print_exc()
                    rows.append(Row(workload, "(failed)", "-", [], error=f"{type(exc).__name__}: {exc}"))
                ctx.log(f"{workload} done in {time.monotonic() - t0:.0f}s")
    except KeyboardInterrupt:
        print("bench: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"bench: kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started

    print()
    print(report.table(rows))
    print()
    print(report.details(rows))
    profiles = ctx.profiles if ctx else {}
    for name, text in profiles.items():
        print(f"\nprofile of the edge during {name}:\n{text}")

    if args.write or not (args.no_write or args.only or args.quick):
        given = sys.argv[1:] if argv is None else argv
        command = f"python -m bench {' '.join(given)}" if given else "make bench"
        settings = (
            f"{rounds} rounds of P1 and P2, {slow_rounds} of P3-P5 and P8-P11, one of P6 and P7; "
            f"{duration:g}s load runs; GET load from {client}."
        )
        extra = "\n".join(
            f"### Edge profile during {n} (py-spy)\n\n```\n{t}\n```\n" for n, t in profiles.items()
        )
        report.write(args.output, report.generated(rows, command.strip(), settings, elapsed, extra))
        print(f"\nbench: wrote {args.output}", file=sys.stderr)
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
