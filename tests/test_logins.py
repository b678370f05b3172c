"""Logins under attack: password checks off the event loop, failed-login limits, tokens
that die with their account or password, malformed Authorization headers.

Every edge here is real (`edge_factory`). Callers bound to other loopback addresses
(127.0.0.x) stand for different clients. The number of argon2 verifications is read from
`seawall_logins_total` (results `accepted` and `refused` ran one; `limited` and `cached`
did not).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from services.embedded import S3Server
from shared.auth.access import hash_password
from shared.auth.logins import MAX_KEYS, FailureWindows, LoginLimiter
from shared.oci.errors import RegistryError
from shared.registry import layout
from shared.settings import LoginSettings, S3Settings
from tests.fixtures.edge import PROJECTS, USERS, EdgeFactory, EdgeServer
from tests.support.bucket import read
from tests.support.images import make_image
from tests.support.seed import push_image

# Limits no test here reaches unless it means to.
UNLIMITED = {"failures_per_client": 1_000_000, "failures_per_account": 1_000_000}
# The login flood test's alternation of quiet and flooded periods.
ROUNDS = 4
ROUND_SECONDS = 2.0


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


ALICE = basic("alice", USERS["alice"])
BOB = basic("bob", USERS["bob"])


def password_checks() -> float:
    """argon2 verifications run so far by the edges of this test process."""
    return sum(
        REGISTRY.get_sample_value("seawall_logins_total", {"result": result}) or 0.0
        for result in ("accepted", "refused")
    )


@contextmanager
def client_at(edge: EdgeServer, address: str = "127.0.0.1") -> Iterator[httpx.Client]:
    """A client whose connections come from `address`, as the edge sees them."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(base_url=edge.url, transport=transport, timeout=30) as client:
        yield client


def login(client: httpx.Client, authorization: str, path: str = "/v2/") -> httpx.Response:
    return client.get(path, headers={"Authorization": authorization})


def assert_too_many(response: httpx.Response, window: float) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert 1 <= int(response.headers["Retry-After"]) <= math.ceil(window)


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["errors"][0]["code"] == "UNAUTHORIZED"
    assert response.headers["WWW-Authenticate"].startswith("Bearer realm=")


def issue_token(edge: EdgeServer, authorization: str | None = None) -> str:
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.get(f"{edge.url}/token", headers=headers, params={"service": "seawall"})
    assert response.status_code == 200, response.text
    return str(response.json()["token"])


def bearer(token: str) -> str:
    return f"Bearer {token}"


# --------------------------------------------------------------------------- the event loop


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def probe(client: httpx.Client, path: str, seconds: float) -> list[float]:
    """Latencies of back-to-back GETs of `path` for `seconds`."""
    latencies = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        response = client.get(path)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
    return latencies


class Flood:
    """Clients on their own addresses sending wrong passwords back to back while `on`."""

    def __init__(self, edge: EdgeServer, clients: int) -> None:
        self.edge = edge
        self.statuses: list[int] = []
        self._on = threading.Event()
        self._stop = threading.Event()
        self._busy = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(f"127.0.0.{10 + n}",)) for n in range(clients)
        ]

    def _run(self, address: str) -> None:
        with client_at(self.edge, address) as attacker:
            while not self._stop.is_set():
                if not self._on.wait(0.05):
                    continue
                with self._lock:
                    self._busy += 1
                try:
                    response = login(attacker, basic("alice", f"guess-{time.time()}"))
                    self.statuses.append(response.status_code)
                finally:
                    with self._lock:
                        self._busy -= 1

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def on(self) -> None:
        """Flood, and return once the hashing threads are at work."""
        started = password_checks()
        self._on.set()
        deadline = time.monotonic() + 30
        while password_checks() < started + 2 and time.monotonic() < deadline:
            time.sleep(0.01)

    def off(self) -> None:
        """Stop, and return once no login is waiting for a hashing thread any more."""
        self._on.clear()
        while self._busy:
            time.sleep(0.01)

    def stop(self) -> None:
        self._on.clear()
        self._stop.set()
        for thread in self._threads:
            thread.join()


@pytest.mark.slow
def test_a_login_flood_leaves_other_clients_latency_within_twice_normal(edge_factory: EdgeFactory) -> None:
    """Wrong passwords from several clients at once, with the limits out of reach so every
    one costs an argon2 verification: a public manifest GET keeps its p99 within 2x.

    Quiet and flooded periods alternate, each quiet one measured just before its flood,
    so that whatever else the machine runs weighs on both samples alike.
    """
    edge = edge_factory(logins=UNLIMITED)
    image = make_image(label="probe")
    push_image(edge.url, "local/probe", image, "v1", auth=("alice", USERS["alice"]))
    path = "/v2/local/probe/manifests/v1"
    flood = Flood(edge, clients=6)
    quiet: list[float] = []
    flooded: list[float] = []
    checked = 0.0
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        probe(client, path, 1.0)  # warm up: connection, caches, code paths
        flood.start()
        try:
            for _ in range(ROUNDS):
                quiet += probe(client, path, ROUND_SECONDS)
                flood.on()
                before = password_checks()
                flooded += probe(client, path, ROUND_SECONDS)
                checked += password_checks() - before
                flood.off()
        finally:
            flood.stop()
    assert set(flood.statuses) == {401}
    # 2x, or 10 ms more where a quiet p99 is a few milliseconds: on two cores the flood's
    # hashing threads (niced) still cost the probe a scheduler wake-up now and then (a full
    # suite run gave 8.55 ms against a quiet 3.5). What this guards against is far above
    # either: hashing on the loop gave a p99 of seconds, hashing threads at normal priority
    # 25-45 ms against 3-8.
    bound = max(2 * p99(quiet), p99(quiet) + 0.010)
    assert p99(flooded) <= bound, (p99(quiet), p99(flooded), len(quiet), len(flooded), checked)
    # Enough verifications ran while the probe measured that, run on the event loop, they
    # would have held it for a second or more in all (each takes ~100 ms of CPU), and
    # both samples are large enough for a p99 to mean something.
    assert checked >= 10, checked
    assert len(quiet) >= 500
    assert len(flooded) >= 500, len(flooded)


# --------------------------------------------------------------------------- limits


def test_failed_logins_past_the_client_limit_get_429_without_a_password_check(
    edge_factory: EdgeFactory,
) -> None:
    edge = edge_factory(logins={"failures_per_client": 3, "failures_per_account": 1000})
    window = 300
    with client_at(edge, "127.0.0.2") as attacker, client_at(edge, "127.0.0.3") as other:
        before = password_checks()
        # Three wrong guesses, for accounts that exist or not: one verification each.
        for user in ("alice", "bob", "mallory"):
            assert_unauthorized(login(attacker, basic(user, "guess")))
        assert password_checks() == before + 3
        # Then that address gets 429s, whatever it presents and wherever, the right
        # password included, and no more verifications run.
        for authorization in (basic("alice", "guess"), basic("carol", "x"), ALICE, BOB):
            for path in ("/v2/", "/v2/local/app/manifests/v1", "/token"):
                assert_too_many(login(attacker, authorization, path), window)
        grant = {"grant_type": "password", "username": "bob", "password": USERS["bob"]}
        assert_too_many(attacker.post("/token", data=grant), window)
        assert password_checks() == before + 3
        # Another address logs in; its success does not reset the blocked address's count.
        assert login(other, ALICE).status_code == 200
        assert_too_many(login(attacker, ALICE), window)
        # Requests that are no password check are still served from the blocked address.
        anonymous = attacker.get("/token")
        assert anonymous.status_code == 200
        assert login(attacker, bearer(anonymous.json()["token"])).status_code == 200
        assert login(attacker, bearer(issue_token(edge, BOB))).status_code == 200


def test_failed_logins_past_the_account_limit_get_429_from_every_address(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(logins={"failures_per_client": 1000, "failures_per_account": 3})
    window = 300
    with (
        client_at(edge, "127.0.0.2") as first,
        client_at(edge, "127.0.0.3") as alice,
        client_at(edge, "127.0.0.4") as second,
        client_at(edge, "127.0.0.5") as third,
    ):
        assert_unauthorized(login(first, basic("alice", "guess-1")))
        assert_unauthorized(login(first, basic("alice", "guess-2")))
        # alice's own login in between does not reset the failures counted against her.
        assert login(alice, ALICE).status_code == 200
        assert_unauthorized(login(second, basic("alice", "guess-3")))
        before = password_checks()
        for client in (first, second, third):
            assert_too_many(login(client, basic("alice", "guess-4")), window)
            assert_too_many(login(client, ALICE), window)
        assert_too_many(third.post("/token", data={"grant_type": "password", "username": "alice"}), window)
        assert password_checks() == before
        # Other accounts, from the same addresses, are not affected.
        assert login(first, BOB).status_code == 200
        # A name that is no account is limited the same way: a 429 tells no names apart.
        for _ in range(3):
            assert_unauthorized(login(third, basic("mallory", "guess")))
        assert_too_many(login(first, basic("mallory", "guess")), window)


def test_parallel_guesses_are_counted_before_they_are_checked(edge_factory: EdgeFactory) -> None:
    """Guesses sent all at once cannot slip past the limit while the first are hashing."""
    edge = edge_factory(logins={"failures_per_client": 3, "failures_per_account": 1000, "hash_threads": 1})
    start = threading.Barrier(20)
    statuses: list[int] = []

    def guess(n: int) -> None:
        with client_at(edge, "127.0.0.2") as attacker:
            start.wait()
            statuses.append(login(attacker, basic("alice", f"guess-{n}")).status_code)

    before = password_checks()
    threads = [threading.Thread(target=guess, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == [401] * 3 + [429] * 17
    assert password_checks() == before + 3


def test_the_limit_lifts_when_its_window_ends(edge_factory: EdgeFactory) -> None:
    edge = edge_factory(logins={"failures_per_client": 2, "failures_per_account": 1000, "window": "2s"})
    with client_at(edge, "127.0.0.2") as client:
        assert_unauthorized(login(client, basic("alice", "guess")))
        assert_unauthorized(login(client, basic("alice", "guess")))
        refused = login(client, ALICE)
        assert_too_many(refused, 2)
        time.sleep(int(refused.headers["Retry-After"]) + 0.2)
        assert login(client, ALICE).status_code == 200


def test_limiter_memory_stays_bounded_under_a_flood_of_addresses_and_names() -> None:
    limiter = LoginLimiter(LoginSettings(failures_per_account=3), accounts=["alice"])
    for _ in range(2):
        limiter.begin("10.0.0.1", "alice")
    for n in range(3 * MAX_KEYS):
        address = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
        limiter.begin(address, f"{'x' * 1000}-{n}")
    assert limiter.size <= 2 * MAX_KEYS + 1
    # The flood evicted no real account's count: alice's third failure blocks her.
    limiter.begin("192.0.2.1", "alice")
    with pytest.raises(RegistryError, match="too many failed logins for this account"):
        limiter.check("192.0.2.2", "alice")


def test_failure_windows_forget_the_oldest_keys_first() -> None:
    table = FailureWindows(limit=1, window=60, max_keys=1000)
    for n in range(10_000):
        table.fail(f"k{n}", now=n / 1000)
    assert len(table) == 1000
    assert table.blocked_for("k9999", now=10.0) is not None
    assert table.blocked_for("k0", now=10.0) is None


# --------------------------------------------------------------------------- malformed headers


@pytest.fixture
def token_secret(edge: EdgeServer, s3_server: S3Server, s3_settings: S3Settings) -> bytes:
    return read(s3_server, s3_settings.bucket, layout.TOKEN_SECRET_KEY)


def signed(secret: bytes, payload: bytes) -> bytes:
    """A token whose signature verifies but whose payload is whatever we like."""
    encoded = base64.urlsafe_b64encode(payload).rstrip(b"=")
    signature = base64.urlsafe_b64encode(hmac.new(secret, encoded, hashlib.sha256).digest()).rstrip(b"=")
    return b"Bearer " + encoded + b"." + signature


def malformed_headers(secret: bytes) -> list[bytes]:
    far = 2**40
    return [
        "Bearer éé".encode(),
        b"Bearer abc.d\xff",
        b"Bearer \xff\xfe\xfd",
        "Basic é".encode(),
        b"Basic \xff\xfe",
        b"Bearer",
        b"Bearer ",
        b"Basic",
        b"Basic ",
        b"   ",
        b"\xff",
        b"Bearer .",
        b"Bearer ..",
        b"Bearer a.b.c",
        b"Bearer " + b"A" * 6000,
        b"Basic Og",
        b"Basic " + base64.b64encode(b"\xff\xfe:password"),
        b"Basic " + base64.b64encode(b"no-colon"),
        b"Digest username=alice",
        signed(secret, b"[]"),
        signed(secret, b"\xff\xfe"),
        signed(secret, b'"alice"'),
        signed(secret, b'{"sub": 5, "exp": %d}' % far),
        signed(secret, b'{"sub": "alice"}'),
        signed(secret, b'{"sub": "", "exp": "soon"}'),
        signed(secret, b'{"sub": "", "exp": NaN}'),
        signed(secret, b'{"sub": "", "exp": Infinity}'),
        signed(secret, b'{"sub": "alice", "exp": %d, "pwd": 7}' % far),
        # Unbound (as tokens were before they carried a password binding).
        signed(secret, json.dumps({"sub": "alice", "exp": far}).encode()),
    ]


def raw_get(edge: EdgeServer, path: str, authorization: bytes) -> tuple[int, dict[str, Any]]:
    """GET with the header's bytes exactly as given (HTTP clients refuse to send some)."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {edge.address}\r\nConnection: close\r\n".encode()
        + b"Authorization: "
        + authorization
        + b"\r\n\r\n"
    )
    with socket.create_connection((edge.settings.listen_host, edge.settings.listen_port), timeout=30) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)


def test_malformed_authorization_headers_are_401_never_500(edge: EdgeServer, token_secret: bytes) -> None:
    push_image(edge.url, "local/app", make_image(label="app"), "v1", auth=("alice", USERS["alice"]))
    for header in malformed_headers(token_secret):
        for path in ("/v2/", "/v2/local/app/manifests/v1", "/v2/_catalog", "/token"):
            status, body = raw_get(edge, path, header)
            assert status == 401, (header, path, body)
            assert body["errors"][0]["code"] == "UNAUTHORIZED", (header, path)
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        # The password grant's form takes the same path to the same answers.
        for form in (
            b"grant_type=password&username=%ff%fe&password=x",
            b"grant_type=password&username=alice&password=%ff",
            b"grant_type=password&username=al%00ice&password=%00",
        ):
            response = client.post(
                "/token", content=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
            )
            assert response.status_code == 401, (form, response.text)
        # A form of unknown length is refused before it is read.
        chunked = client.post(
            "/token",
            content=iter([b"grant_type=password&username=alice"]),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert chunked.status_code == 400, chunked.text
        assert chunked.json()["errors"][0]["code"] == "SIZE_INVALID"
        # And the edge still serves the right credentials.
        assert login(client, ALICE, "/v2/local/app/manifests/v1").status_code == 200


# --------------------------------------------------------------------------- tokens


def test_a_token_stops_working_when_its_account_is_removed(
    edge_factory: EdgeFactory, user_hashes: dict[str, str]
) -> None:
    first = edge_factory()
    tokens = {name: issue_token(first, credentials) for name, credentials in (("alice", ALICE), ("bob", BOB))}
    anonymous = issue_token(first)
    # The same bucket, so the same signing secret: only alice is gone.
    second = edge_factory(
        users=[{"name": "bob", "password_hash": user_hashes["bob"]}],
        projects=[{"name": "local", "type": "hosted", "public": True, "push": ["bob"]}],
    )
    with httpx.Client(timeout=30) as client:
        for edge in (first, second):
            assert client.get(f"{edge.url}/v2/", headers={"Authorization": bearer(tokens["bob"])}).is_success
            assert client.get(f"{edge.url}/v2/", headers={"Authorization": bearer(anonymous)}).is_success
        assert client.get(f"{first.url}/v2/", headers={"Authorization": bearer(tokens["alice"])}).is_success
        assert_unauthorized(
            client.get(f"{second.url}/v2/", headers={"Authorization": bearer(tokens["alice"])})
        )
        assert_unauthorized(
            client.get(f"{second.url}/token", headers={"Authorization": bearer(tokens["alice"])})
        )


def test_a_token_stops_working_when_its_password_changes(
    edge_factory: EdgeFactory, user_hashes: dict[str, str]
) -> None:
    first = edge_factory()
    old = issue_token(first, ALICE)
    bob = issue_token(first, BOB)
    changed = edge_factory(
        users=[
            {"name": "alice", "password_hash": hash_password("alice-new-secret")},
            {"name": "bob", "password_hash": user_hashes["bob"]},
        ],
        projects=PROJECTS,
    )
    new_password = basic("alice", "alice-new-secret")
    with httpx.Client(timeout=30) as client:

        def get(edge: EdgeServer, authorization: str, path: str = "/v2/") -> httpx.Response:
            return client.get(f"{edge.url}{path}", headers={"Authorization": authorization})

        assert get(first, bearer(old)).is_success
        assert_unauthorized(get(changed, bearer(old)))
        assert_unauthorized(get(changed, ALICE))
        assert get(changed, bearer(bob)).is_success
        new = issue_token(changed, new_password)
        assert get(changed, bearer(new)).is_success
        assert get(changed, new_password).is_success
        # Bound both ways: the edge that still has the old password refuses the new token.
        assert_unauthorized(get(first, bearer(new)))
