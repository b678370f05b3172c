"""Requests an HTTP client would not send: a path exactly as written (no dot-segment or
percent normalisation), and raw bytes on a socket whose sending side is then shut."""

from __future__ import annotations

import base64
import json
import re
import socket
from dataclasses import dataclass
from http.client import HTTPConnection, HTTPMessage
from typing import Any

from tests.fixtures.edge import USERS, EdgeServer

ALICE_HEADER = "Basic " + base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()


@dataclass
class Raw:
    """An answer as http.client read it, with the method that asked for it."""

    method: str
    status: int
    headers: HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    edge: EdgeServer,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    auth: bool = True,
) -> Raw:
    """Send `path` exactly as written (no dot-segment or percent normalisation)."""
    host, port = edge.address.rsplit(":", 1)
    connection = HTTPConnection(host, int(port), timeout=30)
    try:
        sent = {"Authorization": ALICE_HEADER} if auth else {}
        sent.update(headers or {})
        connection.request(method, path, body=body, headers=sent)
        response = connection.getresponse()
        return Raw(method, response.status, response.headers, response.read())
    finally:
        connection.close()


def half_closed_exchange(edge: EdgeServer, request: bytes) -> bytes:
    """Send `request`, shut our sending side, read whatever the edge answers."""
    host, port = edge.address.rsplit(":", 1)
    received = b""
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            received += chunk
    return received


def status_of(raw: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", raw)
    return int(match[1]) if match else None
