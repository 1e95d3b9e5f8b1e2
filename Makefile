# One venv, one pinned CPU torch, then the package with the extras each target needs.
# torch is installed first and pinned: an unpinned `torch` would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.bpgrad-installed

.PHONY: venv test lint typecheck pytest data demo compare clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,peers,integrations,fast,jax]" "$(TORCH_SPEC)"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy src

# The data sets the real-data tests read (MNIST, Fashion-MNIST, river's segment, fortunes;
# sha256-verified, cached, a no-op once cached), so that `make test` runs them as .ci/run does.
data: $(STAMP)
	$(VENV)/bin/bpgrad data fetch mnist fashion_mnist river_segment fortunes

pytest: $(STAMP) data
	$(VENV)/bin/python -m pytest -q

# The test command README.md names and .ci/run calls.
test: lint typecheck pytest

# The main job on its embedded default: the paper's six-solver comparison on MNIST at a small budget.
demo: $(STAMP)
	$(VENV)/bin/bpgrad compare --config benchmarks/demo.toml

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
