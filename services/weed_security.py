"""Locks the embedded SeaweedFS to its owner: per-data-dir JWT keys, gRPC mutual TLS, owner-only files."""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import tomllib
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

# weed runs with this umask, so every file and socket it creates is its owner's alone.
UMASK = 0o077
CONFIG_NAME = "security.toml"
TLS_DIR = "tls"
CERT_LIFETIME = timedelta(days=3650)
CERT_RENEWAL = timedelta(days=30)

# The security.toml sections holding a JWT key. With a key set, the volume server wants a
# token from the master (or the filer) for every write and every read, and the filer one
# for every HTTP call: none of them serves a needle or an entry to a bare HTTP request.
JWT_SECTIONS = ("jwt.signing", "jwt.signing.read", "jwt.filer_signing", "jwt.filer_signing.read")
# Every [grpc.<component>] that weed mini's servers and their clients read. gRPC has no
# token of its own: without TLS, any local process could list the filer's entries, ask the
# master for volume tokens or copy a volume whole. With these set, each side demands a
# certificate from this store's own CA (mutual TLS), and both use the same one.
GRPC_COMPONENTS = (
    "master", "volume", "filer", "s3", "admin", "worker", "client", "msg_broker", "msg_agent", "mq",
)  # fmt: skip

# HTTP/2's client preface followed by an empty SETTINGS frame: what a gRPC client sends first.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
# x509.KeyUsage's flags, all of which it wants spelled out.
KEY_USAGES = (
    "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
    "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
)  # fmt: skip


def serves_grpc_in_clear(host: str, port: int) -> bool:
    """Whether host:port answers an HTTP/2 client preface sent in the clear, as gRPC without TLS does."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.sendall(H2_PREFACE)
            head = b""
            while len(head) < 9:
                received = sock.recv(9 - len(head))
                if not received:
                    break
                head += received
    except OSError:  # refused, reset or silent: nobody served us
        return False
    return len(head) == 9 and head[3] == 0x04  # a frame header, and the frame a SETTINGS one


def lock_down(store: Path) -> None:
    """Create store owner-only; take group and other bits off anything an earlier version left."""
    store.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(store, 0o700)
    for root, dirs, files in os.walk(store):
        for path in (os.path.join(root, name) for name in dirs + files):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode) or not mode & 0o077:
                continue
            try:
                os.chmod(path, stat.S_IMODE(mode) & 0o700)
            except PermissionError as exc:
                raise PermissionError(
                    f"cannot make {path} private to its owner ({exc.strerror}): "
                    "the embedded S3's data dir must belong to the user running Seawall"
                ) from exc


def write_config(store: Path) -> Path:
    """Write store/security.toml: this store's JWT keys (kept across restarts) and gRPC TLS."""
    path = store / CONFIG_NAME
    kept = _existing_keys(path)
    keys = {section: kept.get(section) or secrets.token_hex(32) for section in JWT_SECTIONS}
    ca, cert, key = _certificates(store / TLS_DIR)
    lines = [
        "# Written by Seawall at each start of its embedded SeaweedFS. The keys belong to this",
        "# data dir and are kept across restarts; the certificates are renewed before they expire.",
        "",
    ]
    for section in JWT_SECTIONS:
        lines += [f"[{section}]", f"key = {_quoted(keys[section])}", ""]
    lines += [
        "[access]", "ui = false", "",
        "[filer.expose_directory_metadata]", "enabled = false", "",
        "[grpc]", f"ca = {_quoted(str(ca))}", "",
    ]  # fmt: skip
    for component in GRPC_COMPONENTS:
        lines += [
            f"[grpc.{component}]", f"cert = {_quoted(str(cert))}", f"key = {_quoted(str(key))}", "",
        ]  # fmt: skip
    _write_private(path, "\n".join(lines).encode())
    return path


def _quoted(value: str) -> str:
    # A JSON string is a valid TOML basic string: same quotes, same escapes.
    return json.dumps(value)


def _existing_keys(path: Path) -> dict[str, str]:
    """The JWT keys of an earlier start, by section; empty when there is no usable file."""
    try:
        config = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    keys: dict[str, str] = {}
    for section in JWT_SECTIONS:
        node: object = config
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        key = node.get("key") if isinstance(node, dict) else None
        if isinstance(key, str) and len(key) >= 32:
            keys[section] = key
    return keys


def _certificates(tls_dir: Path) -> tuple[Path, Path, Path]:
    """CA certificate, certificate and key for weed's gRPC; issued anew unless all three fit."""
    ca, cert, key = tls_dir / "ca.pem", tls_dir / "weed.pem", tls_dir / "weed.key"
    tls_dir.mkdir(mode=0o700, exist_ok=True)
    if not _usable(ca, cert, key):
        ca_pem, cert_pem, key_pem = _issue()
        _write_private(key, key_pem)
        _write_private(cert, cert_pem)
        _write_private(ca, ca_pem)
    return ca, cert, key


def _usable(ca: Path, cert: Path, key: Path) -> bool:
    """Whether cert is signed by ca, belongs to key and is not about to expire.

    weed does not fail on a TLS setup it cannot load: it serves gRPC without TLS instead.
    So a pair left mismatched (say by a crash between two writes) must not reach it.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_private_key,
    )

    try:
        authority = x509.load_pem_x509_certificate(ca.read_bytes())
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
        private = load_pem_private_key(key.read_bytes(), password=None)
        certificate.verify_directly_issued_by(authority)
    except (OSError, ValueError, TypeError, InvalidSignature):
        return False
    spki = (Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return bool(
        private.public_key().public_bytes(*spki) == certificate.public_key().public_bytes(*spki)
        and certificate.not_valid_after_utc > datetime.now(UTC) + CERT_RENEWAL
    )


def _issue() -> tuple[bytes, bytes, bytes]:
    """A fresh CA and one certificate it signs, for servers and clients alike; PEM bytes.

    The CA's private key is never written anywhere: once this returns, nobody can issue
    another certificate that weed would accept.
    """
    # Imported here: only a first start (or a renewal) pays for loading it.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seawall embedded s3 ca")])
    usage = dict.fromkeys(KEY_USAGES, False)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(**usage | {"key_cert_sign": True, "crl_sign": True}), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    # weed checks the chain, not the host name; the names are there for any other client.
    names = [x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))]
    purposes = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seawall embedded s3")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**usage | {"digital_signature": True}), critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem = serialization.Encoding.PEM
    return ca_cert.public_bytes(pem), cert.public_bytes(pem), key_pem


def _write_private(path: Path, data: bytes) -> None:
    """Replace path with data, readable by its owner only, never visible half written."""
    try:
        if path.read_bytes() == data and stat.S_IMODE(path.stat().st_mode) == 0o600:
            return
    except OSError:
        pass
    partial = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(partial, 0o600)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
