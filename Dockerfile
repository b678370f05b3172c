# Seawall image: one image for every process; the command picks the role.
#   edge (default):  python -m services.edge --config /etc/seawall/seawall.yaml
#   workers:         seawall worker --config /etc/seawall/seawall.yaml
#                    (dramatiq workers.actors plus their Prometheus metrics on worker_metrics_listen)
#   scheduler:       python -m services.scheduler --config /etc/seawall/seawall.yaml
# The configuration is mounted at /etc/seawall/seawall.yaml; secrets come from the
# environment (SEAWALL_S3__SECRET_KEY, SEAWALL_TOKEN_SECRET, the upstreams' password_env).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: wheels for Seawall and its dependencies (no dev or test extras) ---
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# .dockerignore admits only pyproject.toml, README.md and the three packages.
COPY . .
RUN pip wheel --wheel-dir /wheels .

# --- runtime ---
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    SEAWALL_CONFIG=/etc/seawall/seawall.yaml
RUN groupadd --system --gid 10001 seawall \
    && useradd --system --uid 10001 --gid seawall --home-dir /var/lib/seawall \
        --create-home --shell /usr/sbin/nologin seawall
# The wheels are bind-mounted from the build stage, so they add no layer to this image.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels seawall
# data_dir: the workers' multi-process metrics live here (a volume or emptyDir in production).
WORKDIR /var/lib/seawall
USER 10001:10001
EXPOSE 5000
# Liveness of the edge; docker-compose.yml checks /readyz instead and turns this off for
# the workers and the scheduler, which serve no HTTP on port 5000.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=4)"]
CMD ["python", "-m", "services.edge", "--config", "/etc/seawall/seawall.yaml"]
