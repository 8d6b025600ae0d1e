# The two documented commands: `make train` (the main job) and `make test`.
# Each sets up .venv from nothing when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/default

.PHONY: train test test-slow test-all venv venv-train clean

# One marker file per install: `make test` installs the `test` extra (everything the suite
# imports), `make train` only what train.py's default run needs (`train`, and `cpu` for the
# oneDNN convolutions it uses on CPU). Into the same .venv: a second install only adds.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.installed-train: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[train,cpu]"
	touch $@

venv: $(VENV)/.installed

venv-train: $(VENV)/.installed-train

train: venv-train
	$(PY) train.py --config configs/default.py --workdir $(WORKDIR)

# The suite runs in TEST_WORKERS processes (pytest-xdist; each file stays in one of them, so
# module fixtures are built once). Most tests wait on single-threaded XLA compiles: two workers
# keep two cores busy. Each worker holds 8 simulated devices and a few GB.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

test: venv
	$(PYTEST) -m "not slow" tests

test-slow: venv
	$(PYTEST) -m slow tests

test-all: venv
	$(PYTEST) tests

# The compilation cache lives outside the checkout ($JAX_CACHE_DIR or ~/.cache/googlenet_jax/xla)
# and is shared by every clone: clean leaves it.
clean:
	rm -rf $(VENV) runs
