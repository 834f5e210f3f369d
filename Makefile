# Entry points: `make demo`, `make test` (the whole suite, as CI runs it) and `make test-fast` (all but
# the tests marked slow). Each builds .venv/ at the repo root.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO_DATA ?= data
DEMO_OUT  ?= runs
# Test processes at once (pytest-xdist, one test file per process). Most tests wait on jobs and
# subprocesses, so two keep a 2-core machine busy; more than the cores only adds contention.
TEST_WORKERS ?= 2

.PHONY: venv demo readme-plot test test-fast lint slurm-up slurm-down bench clean-demo gpu-check gpu-wheels

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
test: lint
	bash tests/slurm/start.sh || echo "warning: the local Slurm cluster did not start; Slurm tests will fail" >&2
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --timeout 1200 $(PYTEST_ARGS)

# The edit-test loop: every test but those marked slow (over ~30 s each: compiling, long trainings,
# Slurm time limits). The fast Slurm tests stay in: Slurm is the project's core. CI runs `make test`.
test-fast: lint
	bash tests/slurm/start.sh || echo "warning: the local Slurm cluster did not start; Slurm tests will fail" >&2
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --timeout 1200 -m "not slow" $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/ruff format --check pipeline tests bench
	$(VENV)/bin/mypy

slurm-up:
	bash tests/slurm/start.sh

slurm-down:
	bash tests/slurm/stop.sh

# Every CUDA path in one command (README "GPUs"): on a GPU node `make gpu-check` (a cluster:
# `srun --gres=gpu:1 --time=10 make gpu-check`); without a GPU, GPU_CHECK_ARGS=--cpu-dry-run.
GPU_CHECK_ARGS ?= --json runs/gpu_check.json
gpu-check: venv
	mkdir -p runs
	PYTHONPATH=$(CURDIR) $(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# The wheels a machine with torch but without the project's other packages needs for gpu-check (the
# lent GPU machine: Python 3.12, torch 2.11, no registry), into .whl/ (ignored by git); bench/gpu_check.sh
# installs them there. torchao 0.18.0 needs torch >= 2.11; omegaconf 2.4 carries its own antlr4;
# airbench is published as source only, so its wheel is built here (pure Python).
WHEELS ?= .whl
WHEEL_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))
gpu-wheels: venv
	rm -rf $(WHEELS) && mkdir -p $(WHEELS)
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d $(WHEELS) omegaconf==2.4.0 torchao==0.18.0 torch-pruning==1.6.1 submitit==1.5.4
	$(PY) -m pip wheel --quiet --no-deps -w $(WHEELS) airbench==0.1.8
	du -ch $(WHEELS)/*.whl | tail -1
