# sealserve — the two commands a new user needs are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Torch first, so the rest resolves against it. The default takes the CPU build that pip finds
# locally (a find-links wheel) instead of a multi-GB CUDA download; on a GPU node set, e.g.,
# TORCH_SPEC='torch>=2.10'.
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8000
PYTEST_ARGS ?=
# Seconds of fuzzing in make fuzz (the service's start comes on top).
FUZZ_SECONDS ?= 120

# e.g. DRILL_ARGS='--database postgresql' or '--rows sigkill-ingress,database-restart'
DRILL_ARGS ?=
DURATION ?= 30m

.PHONY: help install install-test system-deps serve test test-unit test-integration lint fuzz bench drill soak clean

help:
	@echo "make serve   set up .venv, build demo models if needed, start the service on PORT ($(PORT))"
	@echo "             (metrics on METRICS_PORT, default 8080; LOG_FORMAT=json for JSON logs)"
	@echo "make test    set up .venv with the test extra and run the whole suite"
	@echo "make lint    ruff + mypy"
	@echo "make fuzz    schemathesis against a live make serve for FUZZ_SECONDS ($(FUZZ_SECONDS))"
	@echo "make bench   run the benchmarks in bench/ (reports in bench/reports/)"
	@echo "make soak    DURATION=30m of moderate load: replica memory and descriptors, p99 over time (bench/reports/soak.json)"
	@echo "make drill   faults against a live service: usage recorded vs answered, recovery (bench/reports/drill.json)"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

# HAProxy fronts Serve's high-throughput mode (docs/architecture.md, "The request path"). As root
# with apt-get it is installed from the system's packages; elsewhere Serve's own proxy is used.
system-deps:
	@command -v haproxy >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq haproxy) >/dev/null 2>&1 \
	      || echo "note: haproxy could not be installed; Serve's own HTTP proxy will be used"; \
	  else echo "note: haproxy is not installed; Serve's own HTTP proxy will be used (slower)"; fi; }

serve: install system-deps
	$(VENV)/bin/sealserve demo-models --dir ai-models --if-missing
	$(VENV)/bin/sealserve serve --config serve_config.yaml --port $(PORT)

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: install-test
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: install-test
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

lint: install-test
	$(VENV)/bin/ruff check deployments lib tests bench devservers
	$(VENV)/bin/mypy

# schemathesis against the service as make serve starts it (devservers/fuzz.py): no 5xx, every
# error in the documented body, every response valid against the OpenAPI document.
fuzz: install-test
	$(PY) -m devservers.fuzz --max-time $(FUZZ_SECONDS)

bench: install-test system-deps
	$(PIP) install --quiet -e ".[test,bench]"
	$(PY) -m bench.sealing
	$(PY) -m bench.sealed_fetch
	$(PY) -m bench.fleet
	$(PY) -m bench.request_path

drill: install-test system-deps
	$(PY) -m bench.drill $(DRILL_ARGS)

soak: install-test system-deps
	$(PY) -m bench.soak --duration $(DURATION)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info
