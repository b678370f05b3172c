"""The deployment files (Dockerfile, docker-compose.yml, k8s/, deploy/) read the way the
deploy tests check them: where they are, their YAML, the Dockerfile's instructions, compose
mounts and environments, pod specs, and the Prometheus expressions of the alerts and the
dashboard next to the metrics shared/metrics.py exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.metrics import MetricWrapperBase

from shared import metrics as metrics_module
from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = ROOT / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_CONFIG = DEPLOY / "seawall.compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "seawall-dashboard.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# A Seawall metric name in an expression; a selector `name{matchers}`; one matcher; the
# label list of a by/without/on/ignoring clause.
METRIC_NAME = re.compile(r"\bseawall_[a-z0-9_]*[a-z0-9]")
SELECTOR = re.compile(r"\b(seawall_[a-z0-9_]*[a-z0-9])\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*\"([^\"]*)\"")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def load_yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_yaml(path: Path) -> Any:
    (doc,) = load_yaml_documents(path)
    return doc


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(host path, container path) of the service's bind mounts."""
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                yield volume["source"], volume["target"]
            continue
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/", "~")):
            yield source, target


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    """The service's environment with `${VAR...}` interpolations replaced by placeholders."""
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    pattern = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+][^}]*)?\}")
    return {
        key: pattern.sub(lambda m: f"placeholder-{m[1].lower()}", str(value))
        for key, value in environment.items()
    }


def check_production_settings(settings: Settings) -> None:
    """What the compose and the k8s settings both hold: a hosted project, Docker Hub mirrored
    through a proxy project, and secrets left to the environment."""
    assert settings.listen_host == "0.0.0.0"
    assert settings.redis_url
    assert settings.s3 is not None
    assert settings.s3.secret_key.get_secret_value().startswith("placeholder")
    assert settings.token_secret is not None
    hosted = [p for p in settings.projects if p.type == "hosted"]
    assert hosted, "a hosted project"
    dockerhub = settings.project("dockerhub")
    assert dockerhub is not None
    assert dockerhub.type == "proxy"
    assert dockerhub.upstreams, "the dockerhub project names its upstream"
    upstream = settings.upstream(dockerhub.upstreams[0])
    assert upstream is not None
    assert upstream.quota.preset == "dockerhub-anonymous"
    assert upstream.password_env == "DOCKERHUB_TOKEN"
    assert settings.mirror.default == "dockerhub"
    assert settings.mirror.namespaces


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def workloads(objects: dict[tuple[str, str], dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for (kind, _), doc in objects.items():
        if kind in {"Deployment", "StatefulSet"}:
            yield doc


def metric_registry() -> dict[str, set[str]]:
    """Every sample name shared/metrics.py exports, with the metric's label names."""
    names: dict[str, set[str]] = {}
    for value in vars(metrics_module).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        (family,) = value.describe()
        labels = set(value._labelnames)
        suffixes = {
            "counter": ["_total", "_created"],
            "gauge": [""],
            "histogram": ["_bucket", "_count", "_sum", "_created"],
            "summary": ["", "_count", "_sum", "_created"],
        }[family.type]
        for suffix in suffixes:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return names


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # collapsed rows hold their panels
    return panels


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if "expr" in t]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            expressions.append(query["query"] if isinstance(query, dict) else query)
    return expressions


def all_expressions() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()] + [
        ("dashboard", e) for e in dashboard_expressions()
    ]


def series(metric: str, values: str, **labels: str) -> dict[str, str]:
    """An input series of `promtool test rules`."""
    body = ", ".join(f'{key}="{value}"' for key, value in labels.items())
    return {"series": f"{metric}{{{body}}}", "values": values}


def firing(alert: str, at: str, *expected: dict[str, str]) -> dict[str, Any]:
    """A `promtool test rules` case: alert firing at `at` with exactly the labels expected."""
    return {
        "eval_time": at,
        "alertname": alert,
        "exp_alerts": [{"exp_labels": e} for e in expected],
    }
