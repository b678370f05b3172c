"""The deployment files: Dockerfile, docker-compose.yml, k8s/, deploy/ (Prometheus, Grafana).

Nothing here builds an image or starts a container: the files are checked against each
other and against the code they deploy (settings, metrics, error codes, routes).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from shared.oci.errors import CODES
from shared.settings import load_settings
from tests.support.deploy_files import (
    ALERTS,
    COMPOSE_CONFIG,
    COMPOSE_FILE,
    DASHBOARD,
    DEPLOY,
    GROUPING,
    K8S,
    MATCHER,
    METRIC_NAME,
    PROMETHEUS_CONFIG,
    ROOT,
    SELECTOR,
    alert_rules,
    all_expressions,
    bind_mounts,
    check_production_settings,
    compose_env,
    dashboard_expressions,
    dashboard_panels,
    dockerfile_instructions,
    firing,
    load_yaml,
    load_yaml_documents,
    metric_registry,
    pod_spec,
    rel,
    series,
    workloads,
)

SEAWALL_SERVICES = ("edge", "worker", "scheduler")
# Values of seawall_requests_total's `result` label (services/edge/blobs.py, manifests.py).
REQUEST_RESULTS = {"hit", "miss", "stale", "error"}
# Labels Prometheus adds to every scraped series.
TARGET_LABELS = {"job", "instance"}
# Files in k8s/ that kustomization.yaml may leave out (commented out there).
K8S_OPTIONAL = {"ingress.yaml"}


YAML_FILES = sorted([COMPOSE_FILE, *DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml"), *K8S.glob("*.yaml")])


# --------------------------------------------------------------------------- syntax


def test_the_deploy_files_are_there() -> None:
    for path in [
        ROOT / "Dockerfile",
        ROOT / ".dockerignore",
        COMPOSE_FILE,
        COMPOSE_CONFIG,
        DASHBOARD,
        PROMETHEUS_CONFIG,
        ALERTS,
        DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml",
        DEPLOY / "grafana" / "provisioning" / "dashboards" / "seawall.yml",
        K8S / "kustomization.yaml",
    ]:
        assert path.is_file(), f"{rel(path)} is missing"
    assert len(YAML_FILES) >= 10


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path: Path) -> None:
    assert load_yaml_documents(path), f"{rel(path)} holds no YAML document"


def test_dashboard_is_valid_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    assert dashboard["uid"]
    assert dashboard["title"]
    assert dashboard["schemaVersion"] >= 36


# --------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_a_non_root_edge_image() -> None:
    instructions = dockerfile_instructions()
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for kw, rest in instructions
        if kw == "ARG" and "=" in rest
    }
    bases = [rest.split()[0] for kw, rest in instructions if kw == "FROM"]
    assert bases, "no FROM"
    for base in bases:
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), base)
        assert resolved == "python:3.11-slim"

    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in {"root", "0"}

    assert ("EXPOSE", "5000") in instructions
    (cmd,) = [json.loads(rest) for kw, rest in instructions if kw == "CMD"]
    assert cmd[:3] == ["python", "-m", "services.edge"]
    assert "--config" in cmd

    healthchecks = [rest for kw, rest in instructions if kw == "HEALTHCHECK"]
    assert healthchecks
    assert "/healthz" in healthchecks[-1]

    installs = [
        rest for kw, rest in instructions if kw == "RUN" and re.search(r"\bpip (install|wheel)\b", rest)
    ]
    assert installs, "the package is installed with pip"
    for command in installs:
        assert "[" not in command, f"no extras in the image: {command}"
        assert not re.search(r"(^|\s)-e\s", command), "not an editable install"


def test_dockerignore_admits_the_packages_pip_installs() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore is an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", pyproject)
    assert include is not None
    packages = {name.strip().strip("\"'").rstrip("*") for name in include[1].split(",") if name.strip()}
    assert packages <= allowed
    assert "pyproject.toml" in allowed
    for name in allowed:
        assert name in {"README.md"} or (ROOT / name).exists(), f".dockerignore admits missing {name}"


# --------------------------------------------------------------------------- compose


def test_compose_has_the_production_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in [*SEAWALL_SERVICES, "redis", "minio", "minio-init", "prometheus", "grafana"]:
        assert name in services, f"docker-compose.yml has no {name} service"
    assert services["redis"]["image"].startswith("redis:7")
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["minio-init"]["image"].startswith("minio/mc")
    assert services["prometheus"]["image"].startswith("prom/prometheus")
    assert services["grafana"]["image"].startswith("grafana/grafana")


def test_compose_references_files_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for source, _ in bind_mounts(service):
            assert (ROOT / source).exists(), f"service {name} mounts missing {source}"
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
            assert (context / dockerfile).is_file(), f"service {name} builds from a missing Dockerfile"
        env_files = service.get("env_file", [])
        for env_file in [env_files] if isinstance(env_files, str) else env_files:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            assert (ROOT / path).is_file(), f"service {name} reads missing {path}"


def test_compose_seawall_services_share_the_mounted_config(compose: dict[str, Any]) -> None:
    for name in SEAWALL_SERVICES:
        service = compose["services"][name]
        mounts = dict(bind_mounts(service))
        config_target = mounts.get("./deploy/seawall.compose.yaml")
        assert config_target, f"{name} does not mount deploy/seawall.compose.yaml"
        command = service["command"]
        assert command[command.index("--config") + 1] == config_target
        assert compose_env(service)["SEAWALL_CONFIG"] == config_target
        depends = service["depends_on"]
        assert depends["redis"]["condition"] == "service_healthy"
        assert depends["minio-init"]["condition"] == "service_completed_successfully"


def test_compose_commands_run_each_role(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["edge"]["command"][:3] == ["python", "-m", "services.edge"]
    assert services["scheduler"]["command"][:3] == ["python", "-m", "services.scheduler"]
    assert services["worker"]["command"][:2] == ["seawall", "worker"]


def test_compose_healthchecks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "/readyz" in " ".join(services["edge"]["healthcheck"]["test"])
    # The image's own HEALTHCHECK probes the edge's port: the other roles must not inherit it.
    assert services["scheduler"]["healthcheck"] == {"disable": True}
    assert "5000" not in " ".join(services["worker"]["healthcheck"]["test"])
    for name in ("redis", "minio"):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"


def test_compose_passes_secrets_through_the_environment(compose: dict[str, Any]) -> None:
    settings_file = load_yaml(COMPOSE_CONFIG)
    assert "secret_key" not in settings_file["s3"], "the S3 secret belongs in the environment"
    assert "token_secret" not in settings_file
    for name in SEAWALL_SERVICES:
        environment = compose["services"][name]["environment"]
        for key in ["SEAWALL_S3__SECRET_KEY", "SEAWALL_TOKEN_SECRET"]:
            assert str(environment[key]).startswith("${"), f"{name}: {key} must come from the host"
        for upstream in settings_file["upstreams"]:
            if upstream.get("password_env"):
                assert upstream["password_env"] in environment


def test_compose_prometheus_loads_the_rules_and_scrapes_the_seawall_ports(
    compose: dict[str, Any],
) -> None:
    service = compose["services"]["prometheus"]
    mounts = dict(bind_mounts(service))
    config_target = PurePosixPath(mounts["./deploy/prometheus/prometheus.yml"])
    assert f"--config.file={config_target}" in service["command"]
    assert mounts["./deploy/prometheus/alerts.yml"]

    prometheus = load_yaml(PROMETHEUS_CONFIG)
    mounted = {PurePosixPath(target) for target in mounts.values()}
    for rule_file in prometheus["rule_files"]:
        assert config_target.parent / rule_file in mounted, f"rule file {rule_file} is not mounted"

    settings_file = load_yaml(COMPOSE_CONFIG)
    targets = {
        job["job_name"]: [t for static in job.get("static_configs", []) for t in static["targets"]]
        for job in prometheus["scrape_configs"]
    }
    edge_port = settings_file["listen"].rsplit(":", 1)[1]
    edge_metrics_port = settings_file["metrics_listen"].rsplit(":", 1)[1]
    worker_port = settings_file["worker_metrics_listen"].rsplit(":", 1)[1]
    # The edge's metrics have a port of their own, reached on the compose network only.
    assert settings_file["metrics_listen"].startswith("0.0.0.0:")
    assert settings_file.get("metrics_on_registry_port", False) is False
    assert targets["seawall-edge"] == [f"edge:{edge_metrics_port}"]
    assert targets["seawall-worker"] == [f"worker:{worker_port}"]
    assert f"{edge_port}:{edge_port}" in compose["services"]["edge"]["ports"]
    assert not any(edge_metrics_port in str(p) for p in compose["services"]["edge"]["ports"])


def test_compose_grafana_provisions_the_datasource_and_dashboard(compose: dict[str, Any]) -> None:
    service = compose["services"]["grafana"]
    mounts = dict(bind_mounts(service))
    provisioning = DEPLOY / "grafana" / "provisioning"
    providers = load_yaml(provisioning / "dashboards" / "seawall.yml")["providers"]
    dashboard_target = PurePosixPath(mounts["./deploy/grafana/seawall-dashboard.json"])
    assert any(PurePosixPath(p["options"]["path"]) == dashboard_target.parent for p in providers)
    for kind in ("datasources", "dashboards"):
        assert mounts[f"./deploy/grafana/provisioning/{kind}"] == f"/etc/grafana/provisioning/{kind}"

    (datasource,) = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    host = re.match(r"https?://([^:/]+)", datasource["url"])
    assert host is not None
    assert host[1] in compose["services"]


# --------------------------------------------------------------------------- settings


def test_compose_config_validates(clean_env: pytest.MonkeyPatch, compose: dict[str, Any]) -> None:
    for key, value in compose_env(compose["services"]["edge"]).items():
        clean_env.setenv(key, value)
    settings = load_settings(COMPOSE_CONFIG)
    check_production_settings(settings)
    services = compose["services"]
    assert settings.redis_url is not None
    assert settings.s3 is not None
    redis_host = re.match(r"redis://([^:/]+)", settings.redis_url)
    assert redis_host is not None
    assert redis_host[1] in services
    assert settings.s3.endpoint.split(":")[0] in services
    assert settings.s3.bucket in services["minio-init"]["command"][0]


def test_k8s_config_validates(
    clean_env: pytest.MonkeyPatch,
    tmp_path: Path,
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    config = tmp_path / "seawall.yaml"
    config.write_text(k8s_objects[("ConfigMap", "seawall-config")]["data"]["seawall.yaml"])
    secret = k8s_objects[("Secret", "seawall-secrets")]["stringData"]
    for key, value in secret.items():
        clean_env.setenv(key, f"placeholder-{value}")
    settings = load_settings(config)
    check_production_settings(settings)

    assert settings.redis_url is not None
    assert settings.s3 is not None
    services = {name for kind, name in k8s_objects if kind == "Service"}
    redis_host = re.match(r"redis://([^:/]+)", settings.redis_url)
    assert redis_host is not None
    assert redis_host[1] in services
    assert settings.s3.endpoint.split(":")[0] in services

    ports = {
        name: {p["containerPort"] for c in pod_spec(doc)["containers"] for p in c.get("ports", [])}
        for (kind, name), doc in k8s_objects.items()
        if kind == "Deployment"
    }
    assert settings.listen_port in ports["seawall-edge"]
    assert settings.metrics_listen is not None
    assert not settings.metrics_on_registry_port
    metrics_port = int(settings.metrics_listen.rsplit(":", 1)[1])
    assert metrics_port in ports["seawall-edge"]
    edge_pod = k8s_objects[("Deployment", "seawall-edge")]["spec"]["template"]
    assert int(edge_pod["metadata"]["annotations"]["prometheus.io/port"]) == metrics_port
    assert settings.worker_metrics_listen is not None
    assert int(settings.worker_metrics_listen.rsplit(":", 1)[1]) in ports["seawall-worker"]


# --------------------------------------------------------------------------- k8s


def test_kustomization_lists_the_manifests() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization.yaml lists missing {resource}"
    unlisted = {p.name for p in K8S.glob("*.yaml")} - set(resources) - {"kustomization.yaml"}
    assert unlisted <= K8S_OPTIONAL, f"not in kustomization.yaml: {sorted(unlisted - K8S_OPTIONAL)}"
    for optional in K8S_OPTIONAL:
        assert optional in (K8S / "kustomization.yaml").read_text(), (
            f"mention {optional} in kustomization.yaml"
        )


def test_k8s_objects_share_the_namespace(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    namespace = load_yaml(K8S / "kustomization.yaml")["namespace"]
    assert ("Namespace", namespace) in k8s_objects
    for (kind, name), doc in k8s_objects.items():
        if kind != "Namespace":
            assert doc["metadata"].get("namespace", namespace) == namespace, f"{kind}/{name}"


def test_k8s_edge(k8s_objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    edge = k8s_objects[("Deployment", "seawall-edge")]
    assert edge["spec"]["replicas"] == 2
    template = edge["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert edge["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod_spec(edge)["containers"]
    assert container["command"][:3] == ["python", "-m", "services.edge"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        assert port in ports or port in ports.values()
    assert container["resources"]["requests"]["cpu"]
    assert container["resources"]["requests"]["memory"]
    assert container["resources"]["limits"]["memory"]

    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) in ports.values()
    assert annotations["prometheus.io/path"] == "/metrics"

    service = k8s_objects[("Service", "seawall-edge")]
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports or port["targetPort"] in ports.values()

    pdbs = [doc for (kind, _), doc in k8s_objects.items() if kind == "PodDisruptionBudget"]
    assert any(pdb["spec"]["selector"]["matchLabels"].items() <= labels.items() for pdb in pdbs)


def test_k8s_seawall_roles(k8s_objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    worker = k8s_objects[("Deployment", "seawall-worker")]
    (container,) = pod_spec(worker)["containers"]
    assert container["command"][:2] == ["seawall", "worker"]
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) in {p["containerPort"] for p in container["ports"]}

    scheduler = k8s_objects[("Deployment", "seawall-scheduler")]
    (container,) = pod_spec(scheduler)["containers"]
    assert container["command"][:3] == ["python", "-m", "services.scheduler"]

    redis = k8s_objects[("Deployment", "redis")]
    assert not pod_spec(redis).get("volumes") or all(
        "persistentVolumeClaim" not in v for v in pod_spec(redis)["volumes"]
    ), "Redis is disposable: no PVC"


def test_k8s_seawall_pods_read_the_config_and_secret(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    for name in ("seawall-edge", "seawall-worker", "seawall-scheduler"):
        spec = pod_spec(k8s_objects[("Deployment", name)])
        # Kubernetes' service-link variables must not leak into SEAWALL_* settings.
        assert spec.get("enableServiceLinks") is False, name
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        (container,) = spec["containers"]
        command = container["command"]
        config = PurePosixPath(command[command.index("--config") + 1])
        mounts = {PurePosixPath(m["mountPath"]): m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes[mounts[config.parent]]["configMap"]["name"] == "seawall-config"
        assert ("ConfigMap", "seawall-config") in k8s_objects
        assert {"secretRef": {"name": "seawall-secrets"}} in container["envFrom"]


def test_k8s_references_resolve(k8s_objects: dict[tuple[str, str], dict[str, Any]]) -> None:
    for workload in workloads(k8s_objects):
        spec = pod_spec(workload)
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                assert ("ConfigMap", volume["configMap"]["name"]) in k8s_objects
            if "secret" in volume:
                assert ("Secret", volume["secret"]["secretName"]) in k8s_objects
        for container in spec["containers"]:
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in k8s_objects
            for variable in container.get("env", []):
                ref = variable.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = k8s_objects[("Secret", ref["name"])]
                    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {})
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            known = {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
            }
            assert mounted <= known, f"{workload['metadata']['name']} mounts unknown volumes"


def test_k8s_secret_values_are_marked_placeholders(
    k8s_objects: dict[tuple[str, str], dict[str, Any]],
) -> None:
    secret = k8s_objects[("Secret", "seawall-secrets")]
    assert "data" not in secret, "no encoded values in git"
    for key, value in secret["stringData"].items():
        assert value == "" or value.startswith("REPLACE-ME"), f"{key} must be a marked placeholder"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    } <= kinds


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(("where", "expr"), all_expressions())
def test_expressions_name_metrics_that_exist(where: str, expr: str) -> None:
    registry = metric_registry()
    used = set(METRIC_NAME.findall(expr))
    # Only the target-health alerts go without a Seawall metric.
    assert used or re.fullmatch(r'up\{job="[^"]+"\} == 0', expr), f"{where}: no seawall metric in {expr!r}"
    for name in used:
        assert name in registry, f"{where}: {name} is not exported by shared/metrics.py"


@pytest.mark.parametrize(("where", "expr"), all_expressions())
def test_expressions_use_the_metrics_labels(where: str, expr: str) -> None:
    registry = metric_registry()
    available = set(TARGET_LABELS)
    for name, matchers in SELECTOR.findall(expr):
        labels = registry[name] | TARGET_LABELS
        available |= labels
        for label, _, value in MATCHER.findall(matchers):
            assert label in labels, f"{where}: {name} has no label {label!r}"
            if name.startswith("seawall_requests_total") and label == "result":
                values = set(value.split("|"))
                assert values <= REQUEST_RESULTS, f"{where}: unknown result {values - REQUEST_RESULTS}"
    for name in METRIC_NAME.findall(expr):
        available |= registry[name]
    for grouping in GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in grouping.split(","))):
            assert label in available, f"{where}: no metric here has the label {label!r}"


def test_the_5xx_alert_counts_every_5xx_code() -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == "SeawallHigh5xxRate"]
    match = re.search(r'seawall_errors_total\{code=~"([^"]+)"\}', rule["expr"])
    assert match is not None
    assert set(match[1].split("|")) == {c.code for c in CODES.values() if c.status >= 500}


def test_left_out_latency_kinds_are_route_names() -> None:
    routes = (ROOT / "services" / "edge" / "routes.py").read_text()
    for _, expr in all_expressions():
        for excluded in re.findall(r'kind!~"([^"]+)"', expr):
            for kind in excluded.split("|"):
                assert f'name="{kind}"' in routes, f"no route named {kind!r}"


def test_alerts_cover_the_runbook() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name in [
        "SeawallQuotaNearlyExhausted",
        "SeawallUpstream429",
        "SeawallServingStale",
        "SeawallDigestMismatch",
        "SeawallLowHitRatio",
        "SeawallHigh5xxRate",
        "SeawallEdgeDown",
        "SeawallStoredBlobCorrupt",
        "SeawallScrubOverdue",
        "SeawallReplicationFailing",
    ]:
        assert name in rules, f"alerts.yml has no {name}"
    assert rules["SeawallQuotaNearlyExhausted"]["for"] == "10m"
    assert rules["SeawallUpstream429"]["for"] == "5m"
    assert rules["SeawallServingStale"]["for"] == "15m"
    assert rules["SeawallLowHitRatio"]["for"] == "30m"
    assert 'up{job="seawall-edge"} == 0' in rules["SeawallEdgeDown"]["expr"]
    jobs = {job["job_name"] for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        for job in re.findall(r'job="([^"]+)"', rule["expr"]):
            assert job in jobs, f"{rule['alert']} selects job {job!r}, which prometheus.yml does not scrape"


def test_dashboard_panels_have_targets() -> None:
    panels = dashboard_panels()
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    datasource_vars = {
        v["name"]
        for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
        if v["type"] == "datasource"
    }
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        if panel["type"] == "row":
            continue
        assert panel.get("title"), f"panel {panel['id']} has no title"
        assert panel.get("targets"), f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} has an empty query"
            assert target.get("refId")
            uid = (target.get("datasource") or panel["datasource"])["uid"]
            assert uid.strip("${}") in datasource_vars, f"panel {panel['title']!r} uses datasource {uid}"


def test_dashboard_shows_what_operators_ask_for() -> None:
    used = set()
    for expr in dashboard_expressions():
        used |= set(METRIC_NAME.findall(expr))
    for name in [
        "seawall_requests_total",
        "seawall_upstream_requests_total",
        "seawall_upstream_429_total",
        "seawall_quota_remaining",
        "seawall_quota_limit",
        "seawall_quota_denied_total",
        "seawall_bytes_served_total",
        "seawall_upstream_bytes_total",
        "seawall_fills_in_flight",
        "seawall_digest_mismatch_total",
        "seawall_errors_total",
        "seawall_request_duration_seconds_bucket",
        "seawall_replication_executions_total",
        "seawall_replication_tasks_total",
        "seawall_replication_bytes_total",
        "seawall_replication_quota_waits_total",
    ]:
        assert name in used, f"the dashboard does not show {name}"
    quantiles = set()
    for expr in dashboard_expressions():
        quantiles |= set(re.findall(r"histogram_quantile\(\s*([0-9.]+)", expr))
    assert {"0.5", "0.95", "0.99"} <= quantiles


# --------------------------------------------------------------------------- promtool

PROMTOOL = shutil.which("promtool")


EDGE = {"job": "seawall-edge", "instance": "edge:5000"}
# Alert behaviour on synthetic series (`promtool test rules`), where promtool is installed.
RULE_TESTS = [
    {
        "interval": "1m",
        "input_series": [
            series("up", "1 1 0x5", **EDGE),
            # A counter that appears at 1 (its first increment) is still caught.
            series("seawall_digest_mismatch_total", "_ _ _ 1 1 1", source="upstream", **EDGE),
            # Declared at zero, so the first quarantined blob is an increase.
            series("seawall_blob_corruption_total", "0 0 0 1 1 1", where="stream", **EDGE),
        ],
        "alert_rule_test": [
            firing("SeawallEdgeDown", "5m", {"severity": "critical", **EDGE}),
            firing("SeawallDigestMismatch", "5m", {"severity": "critical", "source": "upstream"}),
            firing("SeawallStoredBlobCorrupt", "5m", {"severity": "critical", "where": "stream"}),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            # busy: 1 hit and 3 misses a second; quiet: all misses, but a trickle.
            series("seawall_requests_total", "0+60x100", project="busy", result="hit", **EDGE),
            series("seawall_requests_total", "0+180x100", project="busy", result="miss", **EDGE),
            series("seawall_requests_total", "0+1x100", project="quiet", result="miss", **EDGE),
            series("seawall_quota_remaining", "5x30", upstream="hub", **EDGE),
            series("seawall_quota_limit", "100x30", upstream="hub", **EDGE),
            series("seawall_errors_total", "0+30x30", code="UPSTREAM_TIMEOUT", **EDGE),
            series("seawall_errors_total", "0+600x30", code="MANIFEST_UNKNOWN", **EDGE),
            series("seawall_request_duration_seconds_count", "0+240x30", kind="manifest", **EDGE),
        ],
        "alert_rule_test": [
            firing("SeawallLowHitRatio", "60m", {"severity": "info", "project": "busy"}),
            firing("SeawallQuotaNearlyExhausted", "5m"),
            firing("SeawallQuotaNearlyExhausted", "20m", {"severity": "warning", "upstream": "hub"}),
            firing("SeawallHigh5xxRate", "20m", {"severity": "critical"}),
        ],
    },
]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed")
def test_promtool_accepts_the_config_and_rules(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    for args in (["check", "config", str(PROMETHEUS_CONFIG)], ["check", "rules", str(ALERTS)]):
        result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr

    # The expressions are tested here, not the wording: the annotations are left out.
    rules = load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    tests = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": RULE_TESTS}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(tests))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(tmp_path / "alerts_test.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
