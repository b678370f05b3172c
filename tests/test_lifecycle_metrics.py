"""The storage lifecycle's metrics, its dashboard row and the SeawallGCNotSucceeding alert."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.lifecycle.runs import LifecycleReport, record
from shared.metrics import (
    LIFECYCLE_LAST_SUCCESS,
    LIFECYCLE_RECLAIMED_BYTES,
    LIFECYCLE_RECLAIMED_OBJECTS,
    LIFECYCLE_RUNS,
    PROJECT_BYTES,
)
from tests.support.deploy_files import (
    ALERTS,
    DASHBOARD,
    METRIC_NAME,
    alert_rules,
    dashboard_expressions,
    firing,
    load_yaml,
    series,
)

PROMTOOL = shutil.which("promtool")
WORKER = {"job": "seawall-worker", "instance": "worker:9191"}
ALERT = "SeawallGCNotSucceeding"
FIRED = {"severity": "warning"}


def _value(metric: Any, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())


def test_record_counts_what_a_real_run_reclaimed_and_when_it_succeeded() -> None:
    runs = _value(LIFECYCLE_RUNS, "eviction", "succeeded")
    blob_bytes = _value(LIFECYCLE_RECLAIMED_BYTES, "eviction", "blob")
    tags = _value(LIFECYCLE_RECLAIMED_OBJECTS, "eviction", "tag")
    report = LifecycleReport(job="eviction", project="metrics-hub", started=1_000.0, project_bytes=4096)
    report.deleting("blob", 300, item="sha256:aa")
    report.deleting("blob", 200, item="sha256:bb")
    report.deleting("tag", item="metrics-hub/library/alpine:3.20")
    report.seconds = 5.0

    record(report)

    assert _value(LIFECYCLE_RUNS, "eviction", "succeeded") == runs + 1
    assert _value(LIFECYCLE_RECLAIMED_BYTES, "eviction", "blob") == blob_bytes + 500
    assert _value(LIFECYCLE_RECLAIMED_OBJECTS, "eviction", "tag") == tags + 1
    assert _value(LIFECYCLE_LAST_SUCCESS, "eviction") == 1_005.0
    assert _value(PROJECT_BYTES, "metrics-hub") == 4096


def test_a_dry_or_unsuccessful_run_counts_its_outcome_but_no_success() -> None:
    LIFECYCLE_LAST_SUCCESS.labels("retention").set(42.0)
    reclaimed = _value(LIFECYCLE_RECLAIMED_OBJECTS, "retention", "tag")
    busy = _value(LIFECYCLE_RUNS, "retention", "busy")
    dry = _value(LIFECYCLE_RUNS, "retention", "succeeded")

    report = LifecycleReport(job="retention", project="team", dry_run=True)
    report.deleting("tag", item="team/app:v1")
    record(report)
    record(LifecycleReport(job="retention", project="team", outcome="busy"))

    assert _value(LIFECYCLE_RUNS, "retention", "busy") == busy + 1
    assert _value(LIFECYCLE_RUNS, "retention", "succeeded") == dry + 1
    assert _value(LIFECYCLE_RECLAIMED_OBJECTS, "retention", "tag") == reclaimed
    assert _value(LIFECYCLE_LAST_SUCCESS, "retention") == 42.0


def test_the_dashboard_has_a_storage_lifecycle_row_with_its_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert "Storage lifecycle" in rows
    used = set()
    for expr in dashboard_expressions():
        used |= set(METRIC_NAME.findall(expr))
    for name in [
        "seawall_project_bytes",
        "seawall_project_limit_bytes",
        "seawall_lifecycle_reclaimed_bytes_total",
        "seawall_lifecycle_reclaimed_objects_total",
        "seawall_lifecycle_runs_total",
        "seawall_lifecycle_last_success_timestamp_seconds",
    ]:
        assert name in used, f"the dashboard does not show {name}"


def test_the_gc_alert_is_in_the_rules() -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == ALERT]
    assert 'kind="gc"' in rule["expr"]
    assert rule["labels"]["severity"] == "warning"


def _gc(values: str) -> dict[str, str]:
    return series("seawall_lifecycle_last_success_timestamp_seconds", values, kind="gc", **WORKER)


def _quiet(at: str) -> dict[str, Any]:
    return firing(ALERT, at)


# A sample every 5 minutes (a worker scraped); promtool's clock starts at 0, so a success at
# hour h is the value 3600 h, and `vxN` is N + 1 samples of v.
RULE_TESTS = [
    {
        # Workers started at hour 30 (promtool's time() is below a day before that, unlike a
        # real clock), GC never succeeded: nothing for their first day, then the alert.
        "interval": "5m",
        "input_series": [_gc("_x359 0x600")],
        "alert_rule_test": [_quiet("31h30m"), _quiet("54h30m"), firing(ALERT, "56h", FIRED)],
    },
    {
        # A success at hour 2, none after: quiet until a day after it (plus the `for`).
        "interval": "5m",
        "input_series": [_gc("0x23 7200x600")],
        "alert_rule_test": [_quiet("25h"), _quiet("26h30m"), firing(ALERT, "28h", FIRED)],
    },
    {
        # Successes a day apart, the second finishing 15 minutes later in the day: quiet.
        "interval": "5m",
        "input_series": [_gc("0x23 7200x290 94200x300")],
        "alert_rule_test": [_quiet("26h5m"), _quiet("27h"), _quiet("50h"), _quiet("51h")],
    },
    {
        # A success at hour 2, then the workers restart at hour 12 (the gauge starts at 0
        # again): the success still counts.
        "interval": "5m",
        "input_series": [_gc("0x23 7200x120 0x600")],
        "alert_rule_test": [_quiet("20h"), _quiet("26h"), firing(ALERT, "28h", FIRED)],
    },
]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_the_gc_alert_fires_a_day_after_the_last_success_or_a_day_after_start(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    rules = load_yaml(ALERTS)
    for group in rules["groups"]:
        group["rules"] = [r for r in group["rules"] if r["alert"] == ALERT]
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "5m", "tests": RULE_TESTS}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(tmp_path / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
