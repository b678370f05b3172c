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
# Gauges say how worker processes combine under multi-process metrics (`seawall worker`).
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
UPSTREAM_429 = Counter("seawall_upstream_429_total", "429 answers from upstreams", ["upstream", "kind"])
QUOTA_DENIED = Counter(
    "seawall_quota_denied_total", "Upstream requests the governor refused", ["upstream", "priority"]
)


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


JOBS = Counter("seawall_jobs_total", "Worker jobs by actor and outcome", ["actor", "result"])
