# Two entry points: `make demo` and `make test`. Both build .venv/ at the repo root.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_DATA ?= data
DEMO_OUT  ?= runs
# Test processes at once (pytest-xdist, one test file per process). Most tests wait on jobs and
# subprocesses, so two keep a 2-core machine busy; more than the cores only adds contention.
TEST_WORKERS ?= 2

.PHONY: venv demo readme-plot test slurm-up slurm-down bench clean-demo

# The stamp is rebuilt whenever the dependency list changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m pipeline.data synthetic --root $(DEMO_DATA) --exist-ok
	$(PY) -m pipeline.sweep sweeps/quickstart.yaml --cluster local --wait --out $(DEMO_OUT) data.root=$(DEMO_DATA)
	$(PY) -m pipeline.collect $(DEMO_OUT)/quickstart

# The README's plot: the demo's accuracy against model size (run `make demo` first)
readme-plot:
	$(PY) -m pipeline.collect $(DEMO_OUT)/quickstart --format markdown > /dev/null
	cp $(DEMO_OUT)/quickstart/plots/accuracy_vs_size.png docs/demo_accuracy_vs_size.png

# The Slurm tests need the local cluster; start.sh is a fast no-op when it is already up. If it cannot
# start (not root, say), the Slurm tests fail and show why: they are never skipped.
test: venv
	bash tests/slurm/start.sh || echo "warning: the local Slurm cluster did not start; Slurm tests will fail" >&2
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/ruff format --check pipeline tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --timeout 1200 $(PYTEST_ARGS)

slurm-up:
	bash tests/slurm/start.sh

slurm-down:
	bash tests/slurm/stop.sh
