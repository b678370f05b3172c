"""Native TLS on the edge, with a CA made by trustme: clients that trust the CA pull over
https without any `insecure` setting, and a certificate replaced on disk is served to new
connections within the reload interval (a broken replacement keeps the old one)."""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme
from cryptography import x509

from services.edge.server import EdgeSites
from services.edge.tls import CERT_POLL_SECONDS
from shared.settings import S3Settings
from tests.fixtures.clients import Skopeo, output
from tests.fixtures.edge import USERS, EdgeFactory, EdgeLoop, EdgeServer, build_settings
from tests.support.images import OCI_MANIFEST, make_image, make_layer, sha256
from tests.support.seed import push_blob, push_manifest

ALICE = ("alice", USERS["alice"])


@pytest.fixture(params=["asyncio", "uvloop"])
def edge_loop(request: pytest.FixtureRequest) -> EdgeLoop:
    """This module's edges run on asyncio and on uvloop (which `python -m services.edge` runs):
    their transports and TLS are different code."""
    loop: EdgeLoop = request.param
    return loop


@dataclass
class TLSFiles:
    ca: trustme.CA
    ca_file: Path
    cert_file: Path
    key_file: Path

    def issue(self) -> int:
        """Write a new leaf certificate and key over the served ones; return its serial."""
        leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        replace(self.key_file, leaf.private_key_pem.bytes())
        replace(self.cert_file, b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
        return serial_of_pem(leaf.cert_chain_pems[0].bytes())

    def settings(self) -> dict[str, str]:
        return {"cert_file": str(self.cert_file), "key_file": str(self.key_file)}

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def replace(path: Path, data: bytes) -> None:
    """Swap the file's content in one rename, as cert-manager or certbot do."""
    temporary = path.with_suffix(".new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def serial_of_pem(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def served_serial(edge: EdgeServer, files: TLSFiles) -> int:
    """The serial of the certificate a new connection to the edge is given."""
    host, port = edge.address.rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        files.client_context().wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture
def tls_files(tmp_path: Path) -> TLSFiles:
    ca = trustme.CA()
    files = TLSFiles(ca, tmp_path / "ca.crt", tmp_path / "tls.crt", tmp_path / "tls.key")
    ca.cert_pem.write_to_path(str(files.ca_file))
    files.issue()
    return files


def push_test_image(edge: EdgeServer, files: TLSFiles, repo: str, tag: str) -> bytes:
    image = make_image(label=f"tls-{repo}")
    with httpx.Client(base_url=edge.url, auth=ALICE, verify=files.client_context(), timeout=60) as client:
        for digest, data in image.blobs.items():
            push_blob(client, repo, digest, data)
        push_manifest(client, repo, tag, image.manifest, OCI_MANIFEST)
    return image.manifest


def test_manifest_pulls_over_https_with_the_ca(edge_factory: EdgeFactory, tls_files: TLSFiles) -> None:
    edge = edge_factory(tls=tls_files.settings())
    assert edge.url.startswith("https://")
    manifest = push_test_image(edge, tls_files, "local/tls", "v1")

    with httpx.Client(base_url=edge.url, verify=tls_files.client_context(), timeout=30) as client:
        pulled = client.get("/v2/local/tls/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert pulled.status_code == 200, pulled.text
        assert pulled.content == manifest
        # The token realm a client is sent to is https too.
        challenged = client.get("/v2/private/anything/manifests/v1")
        assert challenged.status_code == 401
        assert 'realm="https://' in challenged.headers["WWW-Authenticate"]

    # Without the CA the certificate is not trusted: TLS is really verified above.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{edge.url}/healthz", timeout=10)


def test_blobs_in_the_disk_tier_are_served_intact_over_https(
    edge_factory: EdgeFactory, tls_files: TLSFiles, tmp_path: Path
) -> None:
    edge = edge_factory(tls=tls_files.settings(), data_dir=str(tmp_path / "data"))
    layer = make_layer(size=3 * 1024 * 1024, seed="tls-disk-tier")
    digest = sha256(layer)
    on_disk = tmp_path / "data" / "cache" / "blobs" / "sha256" / digest.split(":")[1]
    with httpx.Client(base_url=edge.url, auth=ALICE, verify=tls_files.client_context(), timeout=60) as client:
        push_blob(client, "local/tls-disk", digest, layer)
        first = client.get(f"/v2/local/tls-disk/blobs/{digest}")
        assert first.content == layer
        deadline = time.monotonic() + 30
        while not on_disk.is_file():
            assert time.monotonic() < deadline, "the blob never reached the disk tier"
            time.sleep(0.1)
        # The kernel's sendfile would bypass TLS: a disk-tier hit must still be encrypted.
        for _ in range(3):
            again = client.get(f"/v2/local/tls-disk/blobs/{digest}")
            assert again.status_code == 200
            assert again.content == layer


def test_skopeo_pulls_with_cert_dir_and_no_tls_verify_false(
    edge_factory: EdgeFactory, tls_files: TLSFiles, skopeo: Skopeo, tmp_path: Path
) -> None:
    edge = edge_factory(tls=tls_files.settings())
    push_test_image(edge, tls_files, "local/tls-skopeo", "v1")
    cert_dir = tmp_path / "certs.d"
    cert_dir.mkdir()
    shutil.copy(tls_files.ca_file, cert_dir / "ca.crt")
    source = f"docker://{edge.address}/local/tls-skopeo:v1"

    pulled = skopeo(
        "copy", "--retry-times", "0", "--src-no-creds", "--src-cert-dir", str(cert_dir),
        source, f"oci:{tmp_path / 'layout'}:v1",
        check=False,
    )  # fmt: skip
    assert pulled.returncode == 0, output(pulled)
    assert (tmp_path / "layout" / "index.json").is_file()

    untrusted = skopeo("inspect", "--retry-times", "0", "--no-creds", source, check=False)
    assert untrusted.returncode != 0
    assert "certificate" in output(untrusted)


def test_a_replaced_certificate_is_served_to_new_connections(
    edge_factory: EdgeFactory, tls_files: TLSFiles
) -> None:
    edge = edge_factory(tls=tls_files.settings())
    first = served_serial(edge, tls_files)
    wait = CERT_POLL_SECONDS * 3 + 2

    second = tls_files.issue()
    assert second != first
    deadline = time.monotonic() + wait
    while served_serial(edge, tls_files) != second:
        assert time.monotonic() < deadline, "the new certificate was not served"
        time.sleep(0.2)
    with httpx.Client(base_url=edge.url, verify=tls_files.client_context(), timeout=30) as client:
        assert client.get("/healthz").status_code == 200


# The reload logic does not depend on the loop, and the test waits out several polls: once,
# on uvloop (what `python -m services.edge` runs).
@pytest.mark.parametrize("edge_loop", ["uvloop"])
def test_a_broken_replacement_keeps_the_served_certificate(
    edge_factory: EdgeFactory, tls_files: TLSFiles
) -> None:
    edge = edge_factory(tls=tls_files.settings())
    served = served_serial(edge, tls_files)
    good_key = tls_files.key_file.read_bytes()

    # A certificate whose key has not been written yet (a non-atomic renewal), then garbage.
    leaf = tls_files.ca.issue_cert("127.0.0.1", "localhost")
    replace(tls_files.cert_file, b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    time.sleep(CERT_POLL_SECONDS * 2 + 1)
    assert served_serial(edge, tls_files) == served
    replace(tls_files.cert_file, b"-----BEGIN CERTIFICATE-----\nnot a certificate\n")
    time.sleep(CERT_POLL_SECONDS * 2 + 1)
    assert served_serial(edge, tls_files) == served
    assert tls_files.key_file.read_bytes() == good_key

    # Once both files are right again, the new pair is served.
    fixed = tls_files.issue()
    deadline = time.monotonic() + CERT_POLL_SECONDS * 3 + 2
    while served_serial(edge, tls_files) != fixed:
        assert time.monotonic() < deadline, "the repaired certificate was not served"
        time.sleep(0.2)


def test_an_http_public_url_with_tls_is_refused(
    redis_url: str, s3_settings: S3Settings, user_hashes: dict[str, str], tls_files: TLSFiles
) -> None:
    settings = build_settings(
        redis_url, s3_settings, user_hashes, tls=tls_files.settings(), public_url="http://registry.test"
    )
    with pytest.raises(ValueError, match="https"):
        EdgeSites(settings)
