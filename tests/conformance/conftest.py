"""Fixtures of the OCI distribution-spec conformance port.

Choosing the registry under test (first match wins):

1. ``OCI_ROOT_URL`` set: that registry, configured like the Go suite (``OCI_NAMESPACE``,
   default ``library/conformance``; ``OCI_CROSSMOUNT_NAMESPACE``, default
   ``conformance-<uuid>`` as in Go; ``OCI_USERNAME``/``OCI_PASSWORD``; ``OCI_AUTH_SCOPE``).
2. ``OCI_TARGET=distribution``: a throw-away CNCF Distribution (``docker-registry serve``,
   ``OCI_DISTRIBUTION_BIN`` or ``/usr/bin/docker-registry``) on a free 127.0.0.1 port, with
   filesystem storage in a temp dir, ``storage.delete.enabled: true`` and no auth. This is the
   reference used to validate the port itself::

       OCI_TARGET=distribution .venv/bin/pytest tests/conformance -q -p no:cacheprovider

3. Otherwise the ``seawall_registry`` fixture (session-scoped, provided in tests/fixtures/),
   which must return an object with ``url``, ``namespace``, ``crossmount_namespace``,
   ``username`` and ``password`` attributes (``OciTarget`` itself qualifies; ``namespace`` and
   ``crossmount_namespace`` fall back to the defaults above when None/absent, ``username`` and
   ``password`` may be None for no auth). ``OCI_NAMESPACE``/``OCI_CROSSMOUNT_NAMESPACE``
   override the fixture's values when set.

The workflow toggles and other Go-suite variables are documented in ``suite.py``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conformance.client import OciTarget, Registry
from tests.conformance.suite import (
    ENV_AUTH_SCOPE,
    ENV_CROSSMOUNT_NAMESPACE,
    ENV_NAMESPACE,
    ENV_PASSWORD,
    ENV_ROOT_URL,
    ENV_TARGET,
    ENV_USERNAME,
    SETTINGS,
    WARNINGS,
    WORKFLOW_TITLES,
    Janitor,
    SuiteData,
    build_suite_data,
)

DEFAULT_NAMESPACE = "library/conformance"
DEFAULT_CROSSMOUNT_NAMESPACE = "library/conformance-other"
HERE = Path(__file__).parent


# --------------------------------------------------------------------------- hooks


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "conformance_workflow(name): OCI conformance workflow a test belongs to"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """OCI_HIDE_SKIPPED_WORKFLOWS: deselect disabled workflows instead of skipping them."""
    if not SETTINGS.hide_skipped_workflows:
        return
    keep, drop = [], []
    for item in items:
        mark = item.get_closest_marker("conformance_workflow")
        if mark is not None and not SETTINGS.enabled(mark.args[0]):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the Go suite's Warn() messages (they are not failures)."""
    if WARNINGS:
        terminalreporter.section("OCI conformance warnings")
        for message in dict.fromkeys(WARNINGS):
            terminalreporter.write_line(f"WARNING: {message}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    enabled = [WORKFLOW_TITLES[w] for w in WORKFLOW_TITLES if SETTINGS.enabled(w)]
    target = os.environ.get(ENV_ROOT_URL) or os.environ.get(ENV_TARGET) or "seawall_registry"
    return [f"oci conformance: target={target} workflows={', '.join(enabled) or 'none'}"]


# --------------------------------------------------------------------------- Distribution


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DISTRIBUTION_CONFIG = """\
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: {secret}
"""


class DistributionServer:
    """A CNCF Distribution (docker-registry) process for validating the port.

    Distribution 2.8 predates distribution-spec 1.1 and is known to fail the referrers API,
    OCI-Subject, automatic cross-mounting, tag pagination/deletion and some error codes.
    """

    def __init__(self, workdir: Path, binary: str | None = None) -> None:
        self.workdir = workdir
        self.binary = (
            binary
            or os.environ.get("OCI_DISTRIBUTION_BIN")
            or (shutil.which("docker-registry") or "/usr/bin/docker-registry")
        )
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "registry.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, attempts: int = 3, timeout: float = 20.0) -> None:
        if not Path(self.binary).exists():
            pytest.skip(f"CNCF Distribution binary not found at {self.binary}")
        last_error = ""
        for _ in range(attempts):
            self.port = _free_port()
            config = self.workdir / "config.yml"
            config.write_text(
                DISTRIBUTION_CONFIG.format(
                    root=self.workdir / "storage", port=self.port, secret=uuid.uuid4().hex
                )
            )
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [self.binary, "serve", str(config)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            if self._wait_ready(timeout):
                return
            last_error = self.log_path.read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"Distribution did not start: {last_error}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as probe:
            while time.monotonic() < deadline:
                if self.process is None or self.process.poll() is not None:
                    return False
                try:
                    if probe.get(f"{self.url}/v2/").status_code == 200:
                        return True
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


# --------------------------------------------------------------------------- fixtures


def _namespace_overrides() -> dict[str, str]:
    overrides = {}
    if os.environ.get(ENV_NAMESPACE):
        overrides["namespace"] = os.environ[ENV_NAMESPACE]
    if os.environ.get(ENV_CROSSMOUNT_NAMESPACE):
        overrides["crossmount_namespace"] = os.environ[ENV_CROSSMOUNT_NAMESPACE]
    return overrides


@pytest.fixture(scope="session")
def oci(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OciTarget]:
    """The registry under test (see the module docstring for how it is chosen)."""
    root_url = os.environ.get(ENV_ROOT_URL, "")
    target_kind = os.environ.get(ENV_TARGET, "").strip().lower()
    if root_url:
        yield OciTarget(
            url=root_url,
            namespace=os.environ.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE,
            # the Go suite defaults to a fresh "conformance-<uuid>" repository
            crossmount_namespace=os.environ.get(ENV_CROSSMOUNT_NAMESPACE) or f"conformance-{uuid.uuid4()}",
            username=os.environ.get(ENV_USERNAME) or None,
            password=os.environ.get(ENV_PASSWORD) or None,
            auth_scope=os.environ.get(ENV_AUTH_SCOPE) or None,
            debug=SETTINGS.debug,
        )
    elif target_kind == "distribution":
        server = DistributionServer(tmp_path_factory.mktemp("distribution"))
        server.start()
        try:
            yield OciTarget(
                url=server.url,
                namespace=os.environ.get(ENV_NAMESPACE) or DEFAULT_NAMESPACE,
                crossmount_namespace=os.environ.get(ENV_CROSSMOUNT_NAMESPACE) or DEFAULT_CROSSMOUNT_NAMESPACE,
                debug=SETTINGS.debug,
            )
        finally:
            server.stop()
    elif target_kind in {"", "seawall"}:
        try:
            provided = request.getfixturevalue("seawall_registry")
        except pytest.FixtureLookupError:
            pytest.fail(
                "no registry under test: set OCI_ROOT_URL (an existing registry), "
                "OCI_TARGET=distribution (a local CNCF Distribution), or provide a "
                "session-scoped `seawall_registry` fixture",
                pytrace=False,
            )
        target = OciTarget.from_object(provided, **_namespace_overrides())
        if SETTINGS.debug:
            target.debug = True
        yield target
    else:
        raise pytest.UsageError(f"{ENV_TARGET}={target_kind!r}: expected 'distribution'")


@pytest.fixture(scope="session")
def oci_client(oci: OciTarget) -> Iterator[httpx.Client]:
    """One `httpx.Client` for the whole session (closed at the end)."""
    with oci.client() as client:
        yield client


@pytest.fixture(scope="session")
def registry(oci: OciTarget, oci_client: httpx.Client) -> Registry:
    """Convenience wrapper over `oci_client`, bound to the target's namespaces."""
    return Registry(oci, oci_client)


@pytest.fixture(scope="session")
def data() -> SuiteData:
    """The Go suite's test data (configs, manifests, blobs, referrers), unique per session."""
    return build_suite_data()


@pytest.fixture(scope="module")
def janitor(registry: Registry) -> Iterator[Janitor]:
    """Deletes, at the end of the module, what the spec-text checks registered with it."""
    cleaner = Janitor(registry)
    yield cleaner
    cleaner.clean()
