"""What drives the servers from outside: the load generator and wrk as subprocesses, skopeo,
and a sampler of a process's memory."""

from __future__ import annotations

import contextlib
import json
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.stack import _env, cpu_seconds, memory_mib, reset_peak

ACCEPT = (
    "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, "
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json"
)


class ToolError(RuntimeError):
    pass


def loadgen(mode: str, *targets: str, timeout: float = 600, **options: Any) -> dict[str, Any]:
    """Run `python -m bench.loadgen MODE TARGETS --option value ...`; its JSON result."""
    argv = [sys.executable, "-m", "bench.loadgen", mode, *targets]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list | tuple):
            for item in value:
                argv += [flag, str(item)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=_env(), check=False)
    if done.returncode != 0:
        raise ToolError(f"loadgen failed ({done.returncode}): {done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}
_SIZE = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s|m)", text)
    return float(match[1]) * _UNITS[match[2]] if match else float("nan")


def wrk(
    url: str, *, connections: int, duration: float, headers: dict[str, str], threads: int = 1
) -> dict[str, Any]:
    """wrk's figures in loadgen's shape (requests, rps, mib_s, latency_ms, errors)."""
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "--timeout",
        "30s",
    ]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    done = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 60, check=False)
    out = done.stdout
    if done.returncode != 0 or "Requests/sec" not in out:
        raise ToolError(f"wrk failed: {out[-1500:]} {done.stderr[-500:]}")
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    assert total is not None, out
    elapsed = float(total[2]) * {"ms": 1e-3, "s": 1.0, "m": 60.0}[total[3]]
    read = float(total[4]) * _SIZE[total[5]]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx[1]) if non2xx else 0) + (sum(int(x) for x in socket.groups()) if socket else 0)
    pct = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)\s*$", out, re.M))
    return {
        "requests": int(total[1]),
        "elapsed_s": elapsed,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1]),  # type: ignore[index]
        "bytes": int(read),
        "mib_s": read / elapsed / 2**20,
        "latency_ms": {f"p{k}": _ms(v) for k, v in pct.items()},
        "errors": errors,
        "tool": "wrk",
    }


class Skopeo:
    """skopeo with a private policy (accept anything), registries.conf and tmpdir."""

    def __init__(self, work: Path) -> None:
        self.binary = shutil.which("skopeo")
        self.work = work
        (work / "tmp").mkdir(parents=True, exist_ok=True)
        (work / "registries.d").mkdir(exist_ok=True)
        (work / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
        (work / "registries.conf").write_text("")
        (work / "auth.json").write_text(json.dumps({"auths": {}}))
        self.env = {
            **_env(),
            "CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf"),
            "REGISTRY_AUTH_FILE": str(work / "auth.json"),
            "TMPDIR": str(work / "tmp"),
        }

    def available(self) -> bool:
        return self.binary is not None

    def copy(
        self, src: str, dest: str, *, src_creds: str | None = None, dest_creds: str | None = None
    ) -> float:
        """Seconds a `skopeo copy` took; ToolError if it failed."""
        argv = [
            str(self.binary), "--policy", str(self.work / "policy.json"),
            "--registries.d", str(self.work / "registries.d"), "--tmpdir", str(self.work / "tmp"),
            "copy", "--retry-times", "0", "--preserve-digests", "--quiet",
        ]  # fmt: skip
        if src.startswith("docker://"):
            argv += [
                "--src-tls-verify=false",
                *(["--src-creds", src_creds] if src_creds else ["--src-no-creds"]),
            ]
        if dest.startswith("docker://"):
            argv += [
                "--dest-tls-verify=false",
                *(["--dest-creds", dest_creds] if dest_creds else ["--dest-no-creds"]),
            ]
        started = time.perf_counter()
        done = subprocess.run(
            [*argv, src, dest],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=600,
            check=False,
        )
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise ToolError(f"skopeo copy {src} {dest} failed: {done.stderr[-1500:]}")
        return elapsed

    def sync(self, source_yaml: Path, dest: str, *, dest_creds: str | None = None) -> float:
        """Seconds a `skopeo sync --src yaml --dest docker` of `source_yaml` to `dest` took."""
        argv = [
            str(self.binary), "--policy", str(self.work / "policy.json"),
            "--registries.d", str(self.work / "registries.d"), "--tmpdir", str(self.work / "tmp"),
            "sync", "--src", "yaml", "--dest", "docker", "--retry-times", "0", "--preserve-digests",
            "--dest-tls-verify=false",
            *(["--dest-creds", dest_creds] if dest_creds else ["--dest-no-creds"]),
            str(source_yaml), dest,
        ]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=900, check=False)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise ToolError(f"skopeo sync {source_yaml} {dest} failed: {done.stderr[-1500:]}")
        return elapsed


class MemorySampler:
    """Samples a process's VmRSS every `interval` seconds in a thread; reads VmHWM at the end.

    The peak is reset first (clear_refs), so VmHWM is the peak of this window only.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.max_rss = 0.0
        self.start_rss = 0.0
        self.peak_hwm: float | None = None
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def __enter__(self) -> MemorySampler:
        self.hwm_reset = reset_peak(self.pid)
        self.start_rss = memory_mib(self.pid).get("VmRSS", 0.0)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max_rss = max(self.max_rss, memory_mib(self.pid).get("VmRSS", 0.0))
            except OSError:
                return
            self._stop.wait(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            hwm = memory_mib(self.pid).get("VmHWM")
        except OSError:
            hwm = None
        self.peak_hwm = hwm if self.hwm_reset else None

    @property
    def peak(self) -> float:
        """The peak RSS of the window: VmHWM when it could be reset, else the sampled max."""
        return max(self.max_rss, self.peak_hwm or 0.0)


class CpuMeter:
    """CPU used during a block, in % of one core: by each named server process and by the
    load generator (children that ended meanwhile: wrk, loadgen)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.percent: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._wall = time.perf_counter()
        self._before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self._children = usage.ru_utime + usage.ru_stime
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._wall
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                self.percent[name] = 100 * (cpu_seconds(pid) - self._before[name]) / wall
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.percent["load generator"] = 100 * (usage.ru_utime + usage.ru_stime - self._children) / wall

    def describe(self) -> str:
        return ", ".join(f"{name} {value:.0f}%" for name, value in self.percent.items())
