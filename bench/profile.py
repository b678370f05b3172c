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
    """Where a frame's code lives: a site-packages distribution, the stdlib module, or ours."""
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    for ours in ("services/", "shared/", "workers/"):
        if path.startswith(ours) or f"/{ours}" in path:
            rest = path[path.index(ours) :]
            return "/".join(rest.split("/")[:2]).removesuffix(".py")
    if path.startswith("<"):
        return path
    return "stdlib:" + Path(path).stem if "/" in path else path.removesuffix(".py")


def summarize(path: Path, top: int = 12) -> str:
    """Self time by package and function, and inclusive time of our own functions."""
    self_pkg: Counter[str] = Counter()
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
        self_pkg[_package(leaf["file"])] += n
        self_func[f"{leaf['func']} ({leaf['file']})"] += n
        seen: set[str] = set()
        for m in parsed:
            pkg = _package(m["file"])
            if pkg.startswith(("services/", "shared/")):
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

    out = [f"{total} samples (non-idle threads)"]
    out += block("self time by package/module:", self_pkg)
    out += block("self time by function:", self_func)
    out += block("inclusive time, Seawall's own functions:", inclusive)
    return "\n".join(out)
