# The two documented commands: `make train` (the main job) and `make test`.
# Each sets up .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default
export JAX_CACHE_DIR ?= $(CURDIR)/.jax_cache

.PHONY: train test test-all venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

train: venv
	$(PY) train.py --config configs/default.py --workdir $(WORKDIR)

test: venv
	$(PY) -m pytest -q -m "not slow" --durations=10 tests

test-all: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .jax_cache runs
