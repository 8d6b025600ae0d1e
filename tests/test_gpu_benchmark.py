"""benchmarks/gpu.py keeps working: its --smoke mode runs every row on the CPU backend and
writes each of them, with a positive rate and the device that ran it."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_ROWS = ("jax_train", "jax_infer", "torch_eager_train", "torch_eager_infer",
              "torch_compile_train", "torch_compile_infer")  # at each of params["batches"]


@pytest.mark.slow  # ~2 minutes on a 2-core host with a cold compilation cache
def test_smoke_run_writes_every_row_with_its_device(tmp_path):
  out = tmp_path / "gpu.json"
  run = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu.py"), "--smoke",
                        "--out", str(out)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=900, env={**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT})
  assert run.returncode == 0, run.stderr[-3000:]
  res = json.loads(out.read_text())
  assert res["smoke"] and res["backend"] == "cpu"
  assert res["device"]["jax"] and res["device"]["torch"]
  batches = res["params"]["batches"]
  want = {(name, b) for name in MODEL_ROWS for b in batches}
  want |= {(f"pipeline_{l}", res["params"]["pipeline_batch"]) for l in ("tfdata", "dali")}
  want |= {(f"train_py_{l}", res["params"]["train_batch"]) for l in ("tfdata", "dali")}
  got = {(r["name"], r["batch"]): r for r in res["rows"]}
  assert set(got) == want, set(got) ^ want
  has_dali = importlib.util.find_spec("nvidia") is not None and (
      importlib.util.find_spec("nvidia.dali") is not None)
  for (name, _), row in got.items():
    if name.endswith("_dali") and not has_dali:  # the `dali` extra is not installed
      assert not row["available"] and "dali" in row["reason"].lower(), row
      continue
    assert row["available"], (name, row.get("reason"))
    assert row["device"], name
    assert row["img_s"] > 0, name
    if name.startswith(("jax_", "torch_")):
      assert row["peak_memory_bytes"] > 0 and row["memory_source"], name
    if name.startswith("pipeline_"):
      assert row["host_cpu_s_per_img"] > 0, name
    if name.startswith("train_py_"):
      assert 0 <= row["busy_fraction"] <= 1 and row["img_s_over_step"] > 0, name
  assert "| jax_train |" in run.stdout  # the table
