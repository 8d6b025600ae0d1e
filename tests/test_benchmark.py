"""The throughput benchmark itself (benchmarks/throughput.py): a tiny run writes every stable
JSON key with a positive number."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_stable_keys_are_declared():
  import throughput  # pylint: disable=import-outside-toplevel
  assert throughput.STABLE_KEYS == (
      "jax_train_img_s", "jax_infer_img_s", "torch_nchw_train_img_s", "torch_nchw_infer_img_s",
      "torch_best_train_img_s", "torch_best_infer_img_s", "train_ratio", "infer_ratio",
      "compile_s", "matmul_gflops")


@pytest.mark.slow
def test_tiny_run_writes_all_stable_keys(tmp_path):
  out = tmp_path / "bench.json"
  env = {**os.environ, "PYTHONPATH": ROOT, "XLA_FLAGS": ""}  # one device, as in real runs
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "throughput.py"),
                  "--variant", "torchvision", "--batch", "2", "--size", "64",
                  "--num-classes", "10", "--reps", "1", "--iters", "1", "--warmup", "0",
                  "--no-compile-torch", "--json", str(out)], check=True, env=env, cwd=ROOT,
                 timeout=600)
  res = json.loads(out.read_text())
  import throughput  # pylint: disable=import-outside-toplevel
  for key in throughput.STABLE_KEYS:
    assert isinstance(res[key], float) and res[key] > 0, key
  assert len(res["loadavg_start"]) == 3
  # Every implementation trained on finite values (the default --lr keeps them finite).
  assert res["train_losses_finite"] is True
  assert {"jax_train_loss", "torch_nchw_train_loss", "torch_cl_train_loss"} <= set(res)
