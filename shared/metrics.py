"""Prometheus metrics: `seawall_*`, labels bounded to project, kind, result, method, code."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "seawall_requests_total",
    "Registry API requests by project, resource kind and outcome",
    ["project", "kind", "result"],
)
REQUEST_SECONDS = Histogram(
    "seawall_request_duration_seconds",
    "Time to answer a registry API request, body included, by route",
    ["kind", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
ERRORS = Counter("seawall_errors_total", "OCI errors returned, by code", ["code"])
# One per call into the S3 SDK: a request, except listings and multipart uploads (a few).
STORAGE_REQUESTS = Counter("seawall_storage_requests_total", "Calls to object storage")
# Basic credential checks by result: `accepted` and `refused` ran argon2, `cached` did not,
# `limited` were answered 429 without it.
LOGINS = Counter("seawall_logins_total", "Basic credential checks by result", ["result"])
BYTES_SERVED = Counter(
    "seawall_bytes_served_total", "Blob and manifest bytes sent to clients", ["project", "kind"]
)
BYTES_RECEIVED = Counter("seawall_bytes_received_total", "Bytes pushed by clients", ["project"])
BYTES_FETCHED = Counter("seawall_upstream_bytes_total", "Bytes fetched from upstreams", ["upstream"])
UPSTREAM_REQUESTS = Counter(
    "seawall_upstream_requests_total",
    "Requests sent to upstream registries",
    ["upstream", "kind", "method", "status"],
)
# Gauges say how processes combine under multi-process metrics (`seawall worker`, and
# `seawall up` with several edges).
# Each edge sets 1 while it serves: the sum counts the live edges (a dead one's is removed).
EDGE_PROCESSES = Gauge(
    "seawall_edge_processes", "Edge processes serving on this host", multiprocess_mode="livesum"
)
FILLS_IN_FLIGHT = Gauge(
    "seawall_fills_in_flight", "Blob fills running", ["upstream"], multiprocess_mode="livesum"
)
DIGEST_MISMATCHES = Counter(
    "seawall_digest_mismatch_total", "Fetched or pushed content that did not hash to its digest", ["source"]
)
QUOTA_REMAINING = Gauge(
    "seawall_quota_remaining",
    "Pulls left in the upstream's window",
    ["upstream"],
    multiprocess_mode="mostrecent",
)
QUOTA_LIMIT = Gauge(
    "seawall_quota_limit", "Pull limit of the upstream's window", ["upstream"], multiprocess_mode="mostrecent"
)
# A proxy project with several upstreams asked the next one because this one was
# unreachable or failing (shared/proxy/upstreams.py).
UPSTREAM_FALLBACKS = Counter(
    "seawall_upstream_fallback_total",
    "Upstream requests a proxy project sent to its next upstream, the one before having failed",
    ["project", "from_upstream", "to_upstream"],
)
UPSTREAM_429 = Counter("seawall_upstream_429_total", "429 answers from upstreams", ["upstream", "kind"])
QUOTA_DENIED = Counter(
    "seawall_quota_denied_total", "Upstream requests the governor refused", ["upstream", "priority"]
)

# The edge's local disk tier. Every process sharing the directory sees the same total.
DISK_CACHE_BYTES = Gauge(
    "seawall_disk_cache_bytes",
    "Bytes of blobs held in the local disk cache, as last counted",
    multiprocess_mode="mostrecent",
)
DISK_CACHE_HITS = Counter("seawall_disk_cache_hits_total", "Blob reads found in the local disk cache")
DISK_CACHE_MISSES = Counter("seawall_disk_cache_misses_total", "Blob reads not found in the local disk cache")
DISK_CACHE_EVICTIONS = Counter(
    "seawall_disk_cache_evictions_total", "Blobs removed from the local disk cache to stay within its budget"
)
DISK_CACHE_WRITES = Counter(
    "seawall_disk_cache_writes_total",
    "Blobs offered to the local disk cache, by outcome (stored, failed, too_big)",
    ["result"],
)

FILL_BYTES_FOLLOWED = Counter(
    "seawall_fill_follow_bytes_total",
    "Bytes of blobs being filled sent to waiting clients, by where the edge read them "
    "(spool: the worker's file on this machine; segments: the bucket; blob: a stored copy)",
    ["source"],
)

# Stored blobs whose bytes did not hash to their digest when read back, by where that was
# noticed (stream: a client read; disk_tier: copying to local disk; link: before sharing
# a copy with another project; scrub). Each one is moved to quarantine and never served.
BLOB_CORRUPTIONS = Counter(
    "seawall_blob_corruption_total",
    "Stored blobs found not to match their digest (quarantined), by where it was noticed",
    ["where"],
)
SCRUB_BLOBS = Counter(
    "seawall_scrub_blobs_total", "Blobs re-hashed by the scrub, by result (ok, corrupt, gone)", ["result"]
)
SCRUB_BYTES = Counter("seawall_scrub_bytes_total", "Bytes re-hashed by the scrub")
SCRUB_LAST_SUCCESS = Gauge(
    "seawall_scrub_last_success_timestamp_seconds",
    "When the last complete scrub finished (Unix time)",
    multiprocess_mode="max",
)

CORRUPTION_PLACES = ("stream", "disk_tier", "link", "scrub")


def declare_series(projects: list[str], upstreams: list[str]) -> None:
    """Create the known label combinations at zero, so `rate()` sees their first event."""
    for project in projects:
        for kind in ("manifest", "blob"):
            for result in ("hit", "miss", "stale", "error"):
                REQUESTS.labels(project, kind, result)
            BYTES_SERVED.labels(project, kind)
    for upstream in upstreams:
        BYTES_FETCHED.labels(upstream)
        for kind in ("quota", "abuse"):
            UPSTREAM_429.labels(upstream, kind)
        for priority in ("client", "background"):
            QUOTA_DENIED.labels(upstream, priority)
    DIGEST_MISMATCHES.labels("upstream")
    for result in ("stored", "failed", "too_big"):
        DISK_CACHE_WRITES.labels(result)
    for source in ("spool", "segments", "blob"):
        FILL_BYTES_FOLLOWED.labels(source)
    for where in CORRUPTION_PLACES:
        BLOB_CORRUPTIONS.labels(where)
    for result in ("ok", "corrupt", "gone"):
        SCRUB_BLOBS.labels(result)


JOBS = Counter("seawall_jobs_total", "Worker jobs by actor and outcome", ["actor", "result"])

# Replication (workers/replication.py), by rule: the rules are the configuration's, so the
# label stays bounded. Executions end succeeded, failed, stopped or skipped; tasks end
# succeeded, failed or stopped; bytes are blob bytes read from the source.
REPLICATION_EXECUTIONS = Counter(
    "seawall_replication_executions_total",
    "Replication executions ended, by rule and result",
    ["rule", "result"],
)
REPLICATION_TASKS = Counter(
    "seawall_replication_tasks_total",
    "Replication tasks (one tag each) ended, by rule and result",
    ["rule", "result"],
)
REPLICATION_BYTES = Counter("seawall_replication_bytes_total", "Blob bytes replicated, by rule", ["rule"])
REPLICATION_QUOTA_WAITS = Counter(
    "seawall_replication_quota_waits_total",
    "Replication tasks held back by an upstream's quota until it reopens, by rule",
    ["rule"],
)


def declare_replication_series(rules: list[str]) -> None:
    """The replication series of each rule at zero (see declare_series)."""
    for rule in rules:
        for result in ("succeeded", "failed", "stopped", "skipped"):
            REPLICATION_EXECUTIONS.labels(rule, result)
        for result in ("succeeded", "failed", "stopped"):
            REPLICATION_TASKS.labels(rule, result)
        REPLICATION_BYTES.labels(rule)
        REPLICATION_QUOTA_WAITS.labels(rule)


# The storage lifecycle (shared/lifecycle/, docs/storage.md). `kind` is the job: gc,
# eviction or retention (not `job`, which Prometheus sets to the scrape job); `object` what
# was deleted (blob, manifest, tag, link, ...: a handful of values); outcomes are succeeded,
# failed and busy (another lifecycle job held the lease).
LIFECYCLE_JOBS = ("gc", "eviction", "retention")
LIFECYCLE_OUTCOMES = ("succeeded", "failed", "busy")
LIFECYCLE_RECLAIMED_BYTES = Counter(
    "seawall_lifecycle_reclaimed_bytes_total",
    "Bytes deleted by garbage collection, eviction and retention, by job kind and object",
    ["kind", "object"],
)
LIFECYCLE_RECLAIMED_OBJECTS = Counter(
    "seawall_lifecycle_reclaimed_objects_total",
    "Objects deleted by garbage collection, eviction and retention, by job kind and object",
    ["kind", "object"],
)
LIFECYCLE_RUNS = Counter(
    "seawall_lifecycle_runs_total", "Lifecycle runs ended, by job kind and outcome", ["kind", "outcome"]
)
# Declared at zero for each scheduled kind as a worker starts, so that an alert can tell
# "never" from "not scraped": `max()` over the workers is the last success anywhere.
LIFECYCLE_LAST_SUCCESS = Gauge(
    "seawall_lifecycle_last_success_timestamp_seconds",
    "When the last successful (not dry) run of each lifecycle job finished (Unix time; 0: none yet)",
    ["kind"],
    multiprocess_mode="max",
)
# A hosted project's usage (the unique bytes its manifests reference, what its quota counts)
# or a proxy project's cached bytes, as last measured.
PROJECT_BYTES = Gauge(
    "seawall_project_bytes",
    "Unique bytes a project's images reference (hosted: its quota usage; proxy: its cache)",
    ["project"],
    multiprocess_mode="mostrecent",
)
PROJECT_LIMIT_BYTES = Gauge(
    "seawall_project_limit_bytes",
    "A project's configured bound: a hosted project's quota, a proxy project's cache max_bytes",
    ["project"],
    multiprocess_mode="mostrecent",
)


def declare_lifecycle_series(scheduled: list[str], limits: dict[str, int]) -> None:
    """The lifecycle series at zero (the last success only of the `scheduled` kinds: a kind
    never scheduled has no success to wait for), and each bounded project's limit
    (`limits`: project -> quota or cache max_bytes)."""
    for kind in LIFECYCLE_JOBS:
        for outcome in LIFECYCLE_OUTCOMES:
            LIFECYCLE_RUNS.labels(kind, outcome)
    for kind in scheduled:
        LIFECYCLE_LAST_SUCCESS.labels(kind)
    for project, limit in limits.items():
        PROJECT_LIMIT_BYTES.labels(project).set(limit)
