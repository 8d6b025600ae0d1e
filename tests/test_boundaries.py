"""The package's layers and what importing and using it may change.

- The network (`googlenet_jax`, `models`, `layers`, `variants`, `ops`, `convert`) imports
  nothing from the CPU, training or tools layers, nor TensorFlow, TFDS, PyTorch, optax or
  orbax (`convert` works without PyTorch installed).
- Importing any module, building a model, `init` and `apply` change nothing process-wide: no
  environment variable, no JAX config, no JAX lowering rule, no TensorFlow device list, no
  child process (the oneDNN shim's compiler), no malloc policy.
Each check runs in a fresh interpreter (what is imported is per process).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORK = ("googlenet_jax", "googlenet_jax.models", "googlenet_jax.layers",
           "googlenet_jax.variants", "googlenet_jax.ops", "googlenet_jax.convert")
FORBIDDEN = ("googlenet_jax.cpu", "googlenet_jax.train", "googlenet_jax.tools", "tensorflow",
             "tensorflow_datasets", "torch", "optax", "orbax")


def _run(code: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_network_imports_no_other_layer_and_no_training_library():
  got = _run(f"""
      import importlib.abc, json, sys

      class NoTorch(importlib.abc.MetaPathFinder):  # as if PyTorch were not installed
        def find_spec(self, name, path=None, target=None):
          if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")

      sys.meta_path.insert(0, NoTorch())
      import jax
      for name in {NETWORK!r}:
        __import__(name)
      from googlenet_jax import GoogLeNet, convert, init_variables
      model = GoogLeNet(variant="torchvision", num_classes=5)
      variables = init_variables(model, jax.random.key(0), input_shape=(1, 64, 64, 3))
      state_dict = convert.flax_to_torch(variables, "torchvision", as_numpy=True)
      back = convert.torch_to_flax(state_dict, "torchvision")
      loaded = sorted(m for m in sys.modules
                      if any(m == f or m.startswith(f + ".") for f in {FORBIDDEN!r}))
      print(json.dumps({{"forbidden": loaded, "tensors": len(state_dict)}}))
      """)
  assert got["forbidden"] == [], got["forbidden"]
  assert got["tensors"] > 100


@pytest.mark.slow  # (the fast tier's time: make test runs in <= 8 minutes)
def test_imports_models_init_and_apply_change_nothing_process_wide():
  got = _run("""
      import json, os, pkgutil, subprocess, sys
      import jax
      import numpy as np
      import tensorflow as tf
      from jax._src.interpreters import mlir

      calls = []
      real_popen = subprocess.Popen.__init__
      def popen(self, *args, **kwargs):
        calls.append(str(args[0] if args else kwargs.get("args"))[:200])
        return real_popen(self, *args, **kwargs)
      subprocess.Popen.__init__ = popen
      tf.config.set_visible_devices = lambda *a, **k: calls.append("tf.config.set_visible_devices")

      def jax_config():
        return {k: repr(v) for k, v in jax.config.values.items()}
      def lowerings():
        return {repr(p): id(r) for p, r in mlir._platform_specific_lowerings["cpu"].items()}

      env, config, rules = dict(os.environ), jax_config(), lowerings()
      import googlenet_jax
      modules = [m.name for m in pkgutil.walk_packages(googlenet_jax.__path__, "googlenet_jax.")]
      for name in modules:
        __import__(name)
      from googlenet_jax import GoogLeNet
      x = np.zeros((2, 64, 64, 3), np.float32)
      model = GoogLeNet(variant="torchvision", num_classes=3)
      variables = jax.jit(model.init)(jax.random.key(0), x)
      jax.jit(model.apply)(variables, x)
      jax.jit(lambda v: jax.grad(lambda p: model.apply({**v, "params": p}, x).sum())(
          v["params"]))(variables)
      changed_env = sorted(k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k))
      now = jax_config()
      changed_config = sorted(k for k in config if now.get(k) != config[k])
      print(json.dumps({"modules": len(modules), "env": changed_env, "config": changed_config,
                        "lowerings_changed": sorted(k for k, v in lowerings().items() if rules.get(k, v) != v), "calls": calls}))
      """)
  assert got["modules"] >= 20
  assert got["env"] == [], got["env"]
  assert got["config"] == [], got["config"]
  assert got["lowerings_changed"] == [], got["lowerings_changed"]  # (new primitives may add rules)
  assert got["calls"] == [], got["calls"]


def test_a_missing_extra_is_named_with_its_install_command():
  got = _run("""
      import importlib.metadata, json, sys, warnings
      sys.modules["ml_collections"] = None  # as if the train extra were not installed
      try:
        import googlenet_jax.train
        train = None
      except ImportError as e:
        train = {"message": str(e), "cause": repr(e.__cause__)}

      real = importlib.metadata.distribution
      def distribution(name):  # as if the cpu extra's oneDNN wheels were not installed
        if name.startswith("onednn"):
          raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
      importlib.metadata.distribution = distribution
      from googlenet_jax import cpu
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ops = cpu.ops()
      print(json.dumps({"train": train, "ops": ops.name,
                        "warnings": [str(w.message) for w in caught]}))
      """)
  assert got["train"] is not None, "googlenet_jax.train imported without ml_collections"
  assert "install googlenet_jax[train] (pip install 'googlenet_jax[train]')" in got["train"][
      "message"]
  assert "ml_collections" in got["train"]["cause"]
  assert got["ops"] == "cpu-xla"
  assert any("install googlenet_jax[cpu]" in w for w in got["warnings"]), got["warnings"]
  got = _run("""
      import contextlib, io, json, sys
      sys.modules["torch"] = None  # as if the convert extra were not installed
      from googlenet_jax.tools import convert
      err = io.StringIO()
      with contextlib.redirect_stderr(err):
        try:
          convert.main(["--torch", "w.pth", "--out", "out"])
        except SystemExit as e:
          code = e.code
      print(json.dumps({"code": code, "err": err.getvalue()}))
      """)
  assert got["code"] == 2 and "install googlenet_jax[convert]" in got["err"], got
