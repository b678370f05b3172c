# Seawall developer tasks: `make run` for the all-in-one stack, `make test` for the suite.

SHELL := /bin/bash
.DEFAULT_GOAL := test

VENV := .venv
BIN := $(VENV)/bin
# Reinstalled only when pyproject.toml changes, so repeated targets stay fast.
STAMP := $(VENV)/.seawall-installed
PYTHON ?= $(shell command -v python3.11 || command -v python3)

# binary:Debian package for what the tests drive; missing ones are installed by `make deps`.
DEPS := docker-registry:docker-registry skopeo:skopeo dockerd:docker.io podman:podman \
	ctr:containerd redis-server:redis-server wrk:wrk promtool:prometheus

.PHONY: venv deps run test bench lint soak

venv: $(STAMP)

$(STAMP): pyproject.toml
	@"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "make venv: $(PYTHON) is older than Python 3.11"; exit 1; }
	test -x $(BIN)/python || "$(PYTHON)" -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,embedded,dev]'
	touch $@

deps:
	@missing=""; \
	for pair in $(DEPS); do \
		command -v "$${pair%%:*}" >/dev/null || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -z "$$missing" ]; then \
		echo "deps: all test binaries present"; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "deps: installing$$missing"; \
		apt-get update && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends $$missing; \
	else \
		echo "deps: missing Debian packages:$$missing (not root: tests needing them will skip)"; \
	fi

run: venv
	$(BIN)/seawall up --config seawall.yaml

test: venv deps
	$(BIN)/pytest

# The long soak: 200 clients for 60 s against an edge process; its memory may grow < 20%.
soak: venv deps
	SEAWALL_SOAK_CLIENTS=200 SEAWALL_SOAK_SECONDS=60 SEAWALL_SOAK_MAX_RSS_GROWTH=0.2 \
		$(BIN)/pytest tests/test_soak.py -p no:cacheprovider

bench: venv
	$(BIN)/python -m bench

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pylint --disable=all --enable=cyclic-import --score=n services workers shared
