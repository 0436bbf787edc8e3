# fastgrow: `make demo` and `make test` each build/refresh a local virtual environment, then run.
# On a machine without an NVIDIA GPU the CPU build of torch is installed first (pinned, so pip never
# reaches for the multi-GB CUDA wheels); on a GPU machine the default (CUDA) build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# Extra pip arguments for the torch install, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.fastgrow-installed

.PHONY: venv demo test lint format bench gpu-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned: the later `-e .` then finds its `torch>=2.4` satisfied and installs nothing
	@# more. Here (and in CI) the pinned version resolves to a CPU wheel on disk; elsewhere on a CPU-only
	@# machine pass TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu".
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

demo: venv
	$(VENV)/bin/fastgrow demo

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: venv
	$(PY) -m pytest bench -q --benchmark-only

gpu-check:
	bash tools/gpu_check.sh $(or $(OUT),bench/results/gpu-latest)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .benchmarks
