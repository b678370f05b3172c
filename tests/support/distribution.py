"""CNCF Distribution (`docker-registry`), hosted or as a pull-through proxy, on a free port."""

from __future__ import annotations

import os
import secrets
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from services.processes import HOST, START_TIMEOUT, ManagedProcess, free_port

BINARY = "docker-registry"


def distribution_binary() -> Path | None:
    """The Debian package's docker-registry binary, if installed."""
    found = shutil.which(BINARY)
    return Path(found) if found else None


def distribution_config(root: Path, port: int, proxy_url: str | None = None) -> dict[str, Any]:
    """A config for filesystem storage under root, deletes on, no debug server."""
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(root)},
            "delete": {"enabled": True},
            "cache": {"blobdescriptor": "inmemory"},
        },
        # No http.debug section: the debug/metrics server stays off.
        "http": {"addr": f"{HOST}:{port}", "secret": secrets.token_hex(16)},
    }
    if proxy_url:
        config["proxy"] = {"remoteurl": proxy_url}
    return config


class Distribution(ManagedProcess):
    """A running registry; `.url` is its base URL, `.address` the host:port for image names."""

    def __init__(self, binary: Path, work_dir: Path, proxy_url: str | None) -> None:
        self.port = free_port()
        self.address = f"{HOST}:{self.port}"
        self.url = f"http://{self.address}"
        self.root = work_dir / "storage"
        self.root.mkdir(parents=True, exist_ok=True)
        config_file = work_dir / "config.yml"
        config = distribution_config(self.root, self.port, proxy_url)
        config_file.write_text(yaml.safe_dump(config))
        # REGISTRY_* variables override the config file; none may leak in from the caller.
        env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
        argv = [str(binary), "serve", str(config_file)]
        super().__init__("distribution", argv, work_dir / "distribution.log", env)

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


def start_distribution(
    work_dir: Path, *, proxy_url: str | None = None, timeout: float = START_TIMEOUT
) -> Distribution:
    """Start docker-registry with its storage in work_dir and wait until /v2/ answers 200."""
    binary = distribution_binary()
    if binary is None:
        raise FileNotFoundError(f"{BINARY} not found on PATH (Debian package docker-registry)")
    work_dir = work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    registry = Distribution(binary, work_dir, proxy_url)
    registry.wait_ready(registry.answers, timeout, f"distribution on {registry.address}")
    return registry
