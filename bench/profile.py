"""py-spy sampling of the edge process (`--profile`), summarised by function and by package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, out: Path, duration: float, rate: int = 250) -> subprocess.Popen[bytes] | None:
    """Start `py-spy record` on pid for `duration` seconds (raw collapsed stacks into out)."""
    binary = py_spy()
    if binary is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        binary, "record", "--pid", str(pid), "--duration", str(max(1, round(duration))),
        "--rate", str(rate), "--format", "raw", "--function", "--nonblocking", "--output", str(out),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _package(path: str) -> str:
    """A frame's module, as py-spy names files relative to sys.path: `aiohttp/web_protocol`,
    `asyncio/streams`, `services/edge/blobs`; top-level modules keep their own name."""
    return path.removesuffix(".py")


def _role(frames: list[re.Match[str]]) -> str:
    # uvloop runs callbacks from C, so event-loop stacks often start at a coroutine frame.
    for m in frames:
        if m["func"] == "_worker" and m["file"].endswith("futures/thread.py"):
            return "thread pool (S3 SDK calls)"
    return "event loop (main) thread"


def summarize(path: Path, top: int = 12, rate: int = 250) -> str:
    """Self time by package and function, and inclusive time of our own functions."""
    self_pkg: Counter[str] = Counter()
    self_top: Counter[str] = Counter()
    inclusive_top: Counter[str] = Counter()
    roles: Counter[str] = Counter()
    self_func: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f]
        parsed = [m for m in (_FRAME.match(f) for f in frames) if m]
        if not parsed:
            continue
        leaf = parsed[-1]
        roles[_role(parsed)] += n
        self_top[_package(leaf["file"]).split("/")[0]] += n
        self_pkg[_package(leaf["file"])] += n
        self_func[f"{leaf['func']} ({leaf['file']})"] += n
        for top_level in {_package(m["file"]).split("/")[0] for m in parsed}:
            inclusive_top[top_level] += n
        seen: set[str] = set()
        for m in parsed:
            pkg = _package(m["file"])
            if pkg.startswith(("services/", "shared/", "workers/")):
                key = f"{m['func']} ({pkg})"
                if key not in seen:
                    seen.add(key)
                    inclusive[key] += n
    if not total:
        return "(no samples)"

    def block(title: str, counter: Counter[str]) -> list[str]:
        lines = [title]
        for name, n in counter.most_common(top):
            lines.append(f"  {100 * n / total:5.1f}%  {name}")
        return lines

    out = [f"{total} samples of non-idle threads ({rate} a second per thread)"]
    out += block("by thread:", roles)
    out += block("self time by top-level package:", self_top)
    out += block("inclusive time by top-level package (stacks with a frame in it):", inclusive_top)
    out += block("self time by module:", self_pkg)
    out += block("self time by function:", self_func)
    out += block("inclusive time, Seawall's own functions:", inclusive)
    return "\n".join(out)
