"""Seawall's settings: one pydantic-settings model read from seawall.yaml and SEAWALL_* variables."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from croniter import croniter
from pydantic import BaseModel, ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from shared.durations import Duration
from shared.lifecycle.policies import CachePolicy, LifecycleSettings, ProjectGC, RetentionRule
from shared.replication.rules import ReplicationRule, check_rules


class S3Settings(BaseModel):
    """An S3 endpoint reached through the minio SDK (MinIO in production, any S3 elsewhere)."""

    endpoint: str = "127.0.0.1:9000"
    access_key: str = "seawall"
    secret_key: SecretStr = SecretStr("seawall-secret")
    bucket: str = "seawall"
    secure: bool = False
    region: str | None = None
    # Bounds on every call: a stalled store must give clients a clear 503 in seconds, not
    # hang them. `request_timeout` caps a metadata call (stat, small read, listing) made on
    # a request path, retries included; `read_timeout` a single socket read of a transfer.
    connect_timeout: Duration = timedelta(seconds=3)
    read_timeout: Duration = timedelta(seconds=30)
    request_timeout: Duration = timedelta(seconds=5)


class User(BaseModel):
    name: str
    password_hash: SecretStr


class Project(BaseModel):
    """A top-level namespace: `hosted` stores what is pushed, `proxy` caches its upstreams."""

    name: str = Field(pattern=r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
    type: Literal["hosted", "proxy"] = "hosted"
    public: bool = False
    pull: list[str] = Field(default_factory=list)
    push: list[str] = Field(default_factory=list)
    delete: list[str] = Field(default_factory=list)
    # A proxy project's upstreams in order of preference: the next one is asked only when
    # the one before is unreachable or failing, never when it says an image does not exist
    # (see shared/proxy/upstreams.py). `upstream: X` is the shorthand for `upstreams: [X]`;
    # once read, it is moved into `upstreams` (one form to serve and edit).
    upstreams: list[str] = Field(default_factory=list)
    upstream: str | None = None
    tag_ttl: Duration = timedelta(minutes=5)
    # The storage lifecycle (docs/storage.md): a hosted project's quota and tag retention,
    # a proxy project's cache bounds, and what garbage collection may delete.
    quota: ByteSize | None = None
    retention: list[RetentionRule] = Field(default_factory=list)
    cache: CachePolicy = Field(default_factory=CachePolicy)
    gc: ProjectGC = Field(default_factory=ProjectGC)

    @model_validator(mode="after")
    def _lifecycle_fits_the_type(self) -> Project:
        if self.type == "proxy":
            for field in ("quota", "retention"):
                if getattr(self, field):
                    raise ValueError(f"project {self.name!r}: {field} applies to hosted projects only")
        elif self.cache.max_bytes is not None or self.cache.evict_after is not None:
            raise ValueError(f"project {self.name!r}: cache applies to proxy projects only")
        return self

    @model_validator(mode="after")
    def _upstreams_listed(self) -> Project:
        if self.upstream is not None:
            if self.upstreams:
                raise ValueError(
                    f"project {self.name!r} sets both upstream and upstreams: "
                    f"use upstreams: [{', '.join([self.upstream, *self.upstreams])}]"
                )
            self.upstreams, self.upstream = [self.upstream], None
        if len(set(self.upstreams)) != len(self.upstreams):
            raise ValueError(f"project {self.name!r} names an upstream twice in upstreams")
        if self.type == "proxy" and not self.upstreams:
            raise ValueError(f"proxy project {self.name!r} needs an upstream")
        return self


class Quota(BaseModel):
    """Pull quota of an upstream: a preset or an explicit limit per window."""

    preset: Literal["dockerhub-anonymous", "dockerhub-personal", "unlimited"] | None = None
    limit: int | None = None
    window: Duration = timedelta(hours=6)
    reserve: float = 0.2


class Upstream(BaseModel):
    name: str
    url: str
    username: str | None = None
    password_env: str | None = None
    tls_verify: bool = True
    ca_file: Path | None = None
    connect_timeout: Duration = timedelta(seconds=5)
    read_timeout: Duration = timedelta(seconds=30)
    head_timeout: Duration = timedelta(seconds=3)
    quota: Quota = Field(default_factory=Quota)
    requests_per_minute: int = 600
    # `dockerhub` applies Docker Hub's rules (official images under `library/`); `auto`
    # recognises Docker Hub by its host name.
    flavor: Literal["auto", "dockerhub", "registry"] = "auto"

    def password(self) -> SecretStr | None:
        """The upstream password is read from the environment, never from the file."""
        if self.password_env and self.password_env in os.environ:
            return SecretStr(os.environ[self.password_env])
        return None


class Mirror(BaseModel):
    default: str | None = None
    namespaces: dict[str, str] = Field(default_factory=dict)


class DiskCacheSettings(BaseModel):
    """The edge's local disk tier for hot blobs; the bucket stays the source of truth."""

    # Budget for the files under `path`; `0` turns the tier off. Accepts `10GiB`, `500MB`.
    max_bytes: ByteSize = ByteSize(10 * 1024**3)
    # Unset: `<data_dir>/cache`.
    path: Path | None = None
    # A blob bigger than this share of `max_bytes` is served from the bucket only, so that
    # one huge layer cannot flush everything else out of the tier.
    max_blob_fraction: float = Field(default=0.25, gt=0, le=1)
    # Send files with sendfile(2) (`true`), or copy them through a buffer (`false`), which
    # costs less CPU in all when the client runs on the same host (see
    # services/edge/sendfile.py). `auto`: copy to loopback clients, sendfile to the others.
    sendfile: bool | Literal["auto"] = "auto"

    @property
    def max_blob_bytes(self) -> int:
        return int(self.max_bytes * self.max_blob_fraction)


class TLSSettings(BaseModel):
    """HTTPS on the edge's `listen` address; both files are re-read when they change."""

    cert_file: Path
    key_file: Path


class EdgeLimits(BaseModel):
    """Per-connection limits that keep slow or abusive clients from holding the edge."""

    # A client must send its request line and headers within this (from connecting, or on
    # a kept-alive connection from the first byte of its next request: the idle time
    # before that is `keepalive_timeout`'s). It also bounds the TLS handshake.
    header_timeout: Duration = timedelta(seconds=10)
    # A request body (a blob upload) that sends nothing for this long is cut off.
    body_idle_timeout: Duration = timedelta(seconds=60)
    # Idle kept-alive connections are closed after this.
    keepalive_timeout: Duration = timedelta(seconds=75)
    # Open connections one client address may hold; `0` means no cap.
    max_connections_per_client: int = Field(default=512, ge=0)


class LoginSettings(BaseModel):
    """Password checks: run off the event loop, remembered briefly, failures limited."""

    # Threads that run argon2 verifications (each takes ~100 ms of CPU by design).
    hash_threads: int = Field(default=2, ge=1)
    # A verified Basic credential is remembered this long (keyed by the stored hash, so a
    # password change or a removed account invalidates it at once).
    cache_ttl: Duration = timedelta(minutes=5)
    # Failed logins allowed per client address and per account within `window`; past
    # either, logins are answered `429 TOOMANYREQUESTS` with `Retry-After`.
    failures_per_client: int = Field(default=10, ge=1)
    failures_per_account: int = Field(default=30, ge=1)
    window: Duration = timedelta(minutes=5)


class ScrubSettings(BaseModel):
    """Background re-hashing of stored blobs (`seawall scrub` runs it by hand)."""

    # Cron expression for the scheduled scrub; `null` turns it off.
    schedule: str | None = "30 3 * * *"
    # Read rate cap, so a scrub never competes with clients for the store.
    bytes_per_second: ByteSize = ByteSize(32 * 1024**2)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and not croniter.is_valid(value):
            raise ValueError(f"invalid cron expression {value!r}: use five fields, e.g. '30 3 * * *'")
        return value


class Settings(BaseSettings):
    """Everything Seawall reads at start-up. Loaded once by `load_settings` and passed down."""

    model_config = SettingsConfigDict(
        env_prefix="SEAWALL_",
        env_nested_delimiter="__",
        extra="ignore",
    )

    listen: str = "127.0.0.1:5000"
    public_url: str | None = None
    redis_url: str | None = None
    s3: S3Settings | None = None
    data_dir: Path = Path("./data")
    users: list[User] = Field(default_factory=list)
    projects: list[Project] = Field(default_factory=list)
    upstreams: list[Upstream] = Field(default_factory=list)
    mirror: Mirror = Field(default_factory=Mirror)
    log_format: Literal["json", "console"] = "console"
    log_level: str = "info"
    max_manifest_bytes: int = 4 * 1024 * 1024
    # How many edge processes `seawall up` starts on the one port (SO_REUSEPORT): the CPUs
    # this process may run on.
    edge_processes: int = Field(default_factory=lambda: len(os.sched_getaffinity(0)), ge=1)
    worker_processes: int = 2
    worker_threads: int = 8
    upload_expiry: Duration = timedelta(hours=24)
    # Where each worker host serves its Prometheus metrics (all worker processes summed).
    worker_metrics_listen: str | None = "127.0.0.1:9191"
    # Signs registry tokens; unset, the edges share a random one kept in the bucket.
    token_secret: SecretStr | None = None
    disk_cache: DiskCacheSettings = Field(default_factory=DiskCacheSettings)
    tls: TLSSettings | None = None
    limits: EdgeLimits = Field(default_factory=EdgeLimits)
    logins: LoginSettings = Field(default_factory=LoginSettings)
    scrub: ScrubSettings = Field(default_factory=ScrubSettings)
    # When garbage collection, cache eviction and tag retention run (docs/storage.md).
    lifecycle: LifecycleSettings = Field(default_factory=LifecycleSettings)
    # Rules that copy images from upstreams into hosted projects and from projects to
    # upstreams (docs/replication.md).
    replication: list[ReplicationRule] = Field(default_factory=list)
    # Where each edge serves `/metrics` (and nothing else); `null` serves no metrics port.
    metrics_listen: str | None = "127.0.0.1:9190"
    # Also serve `/metrics` on the registry port, to anyone who can reach it.
    metrics_on_registry_port: bool = False
    # Bound on one Redis call from a request path; past it the edge serves from the bucket
    # (hosted pulls, cached proxy hits) and skips Redis for a few seconds.
    redis_timeout: Duration = timedelta(seconds=1)
    # `seawall up` restarts a crashed child after a back-off; more than `restart_limit`
    # crashes of one child within `restart_window` stop the whole stack.
    restart_limit: int = Field(default=5, ge=0)
    restart_window: Duration = timedelta(minutes=5)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then SEAWALL_* variables, then seawall.yaml.
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        projects = {p.name for p in self.projects}
        upstreams = {u.name for u in self.upstreams}
        users = {u.name for u in self.users}
        for project in self.projects:
            for name in project.upstreams:
                if name not in upstreams:
                    raise ValueError(f"project {project.name!r} names unknown upstream {name!r}")
            for user in [*project.pull, *project.push, *project.delete]:
                if user not in users:
                    raise ValueError(f"project {project.name!r} grants unknown user {user!r}")
        for target in [self.mirror.default, *self.mirror.namespaces.values()]:
            if target and target not in projects:
                raise ValueError(f"mirror routes to unknown project {target!r}")
        check_rules(self.replication, {p.name: p.type for p in self.projects}, upstreams)
        return self

    @property
    def listen_host(self) -> str:
        return self.listen.rsplit(":", 1)[0] or "127.0.0.1"

    @property
    def listen_port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])

    @property
    def disk_cache_path(self) -> Path:
        return self.disk_cache.path or self.data_dir / "cache"

    def project(self, name: str) -> Project | None:
        return next((p for p in self.projects if p.name == name), None)

    def upstream(self, name: str) -> Upstream | None:
        return next((u for u in self.upstreams if u.name == name), None)

    def rule(self, name: str) -> ReplicationRule | None:
        return next((r for r in self.replication if r.name == name), None)


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The configuration file: `--config`, else SEAWALL_CONFIG, else none."""
    chosen = explicit or os.environ.get("SEAWALL_CONFIG")
    return Path(chosen) if chosen else None


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Read seawall.yaml (if any), overlay SEAWALL_* variables and explicit overrides."""
    resolved = config_path(path)
    if resolved is not None and not resolved.is_file():
        raise FileNotFoundError(f"configuration file {resolved} does not exist")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(yaml_file=resolved)

    return _FromFile(**overrides)
