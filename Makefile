# corral: `make run` starts a single-host cluster; `make test` runs every check and test.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint unit integration e2e guest bench deps venv clean cluster cluster-stop proto

deps:
	@bash scripts/host-deps.sh

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null
	@$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

run: deps venv
	@bash scripts/run.sh

# The test guest (Debian kernel + busybox initramfs), cached in ./.cache/guest.
guest: deps
	@bash guest/build.sh

# A 3-server + 1 compute-host cluster on 127.0.0.1-.4 (data in ./.cluster).
cluster: deps venv
	@bash scripts/cluster.sh start

cluster-stop:
	@bash scripts/cluster.sh stop

# Regenerate the gRPC code in src/corral/v1 from proto/ (the generated files are committed).
proto: venv
	@PYTHON=$(PY) bash scripts/gen-proto.sh

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# pytest exits 5 when it collected no tests: that fails here like any other failure.
test: deps venv lint
	$(VENV)/bin/pytest -q -p no:cacheprovider --durations=10

unit: venv
	$(VENV)/bin/pytest -q tests/unit

integration: deps venv
	$(VENV)/bin/pytest -q tests/integration

e2e: deps venv guest
	$(VENV)/bin/pytest -q tests/e2e

bench: deps venv
	$(PY) -m bench.store_commit
	$(PY) -m bench.api_create
	$(PY) -m bench.vm_start
	$(PY) -m bench.scheduler
	$(PY) -m bench.migrate

clean:
	rm -rf $(VENV) .corral .cluster .mypy_cache .ruff_cache .pytest_cache
