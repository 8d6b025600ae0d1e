#!/usr/bin/env bash
# `pip install .` gives the network with jax, flax and numpy only: a clean venv with the core
# install (no extras) runs init, apply and a gradient, and has none of the extras' packages.
# Run by .ci/run (it downloads jax and flax, so it is not part of the pytest suite).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/core-venv"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet .
cd "$(mktemp -d)"  # not the checkout: the installed package is what runs
"$venv/bin/python" - <<'PY'
import importlib.util
import jax, jax.numpy as jnp
from googlenet_jax import GoogLeNet

for name in ("tensorflow", "tensorflow_datasets", "torch", "sklearn", "matplotlib",
             "ml_collections"):
  assert importlib.util.find_spec(name) is None, f"{name} was installed by the core install"
model = GoogLeNet(variant="torchvision", num_classes=4)
x = jnp.ones((2, 64, 64, 3))
variables = jax.jit(model.init)(jax.random.key(0), x)
logits = jax.jit(model.apply)(variables, x)
grads = jax.jit(jax.grad(lambda p: model.apply({**variables, "params": p}, x).sum()))(
    variables["params"])
assert logits.shape == (2, 4) and bool(jnp.isfinite(logits).all())
assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
print("core install: init, apply and grad ok with", jax.__version__)
PY
