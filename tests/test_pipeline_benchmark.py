"""benchmarks/jpeg_set.py and benchmarks/pipeline.py: the generated set is ImageNet-like and
reproducible, its TFDS records hold the files' bytes, and a tiny side-by-side run writes every
per-core key for the project's pipelines (tf.data and DALI) and torchvision's DataLoader."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import torch  # noqa: F401  (PyTorch before TensorFlow)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import jpeg_set  # noqa: E402


def test_set_is_reproducible_and_tfds_keeps_the_bytes(tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  a = jpeg_set.generate(str(tmp_path / "a"), train=30, val=10, quiet=True)
  b = jpeg_set.generate(str(tmp_path / "b"), train=30, val=10, quiet=True)
  assert a == b
  files_a = sorted(glob.glob(str(tmp_path / "a" / "*" / "*" / "*.jpg")))
  files_b = sorted(glob.glob(str(tmp_path / "b" / "*" / "*" / "*.jpg")))
  assert len(files_a) == 40
  assert [open(f, "rb").read() for f in files_a] == [open(f, "rb").read() for f in files_b]
  # ImageNet-like: a few hundred pixels a side, photographic detail, baseline 4:2:0 JPEGs.
  assert 250 < a["mean_width"] < 600 and 200 < a["mean_height"] < 550
  assert 0.3 < a["bytes_per_pixel"] < 1.2
  with Image.open(files_a[0]) as im:
    assert im.format == "JPEG" and "progressive" not in im.info
  # Asked again with the same parameters: kept, not rewritten.
  stamp = os.path.getmtime(files_a[0])
  jpeg_set.generate(str(tmp_path / "a"), train=30, val=10, quiet=True)
  assert os.path.getmtime(files_a[0]) == stamp

  data_dir = jpeg_set.prepare_tfds(str(tmp_path / "a"))
  builder = tfds.builder("jpeg_benchmark_set", data_dir=data_dir)
  assert builder.info.splits["train"].num_examples == 30
  assert builder.info.splits["validation"].num_examples == 10
  ds = builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  stored = sorted(ex["image"] for ex in tfds.as_numpy(ds))
  assert stored == sorted(open(f, "rb").read() for f in files_a if "/train/" in f)


def test_tiny_side_by_side_run_writes_every_key(tmp_path):
  out = tmp_path / "pipeline.json"
  env = {**os.environ, "PYTHONPATH": ROOT}
  subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "pipeline.py"),
                  "--root", str(tmp_path / "set"), "--train-images", "40", "--val-images", "20",
                  "--size", "64", "--batch", "8", "--threads", "1", "--images", "16",
                  "--warmup", "1", "--rounds", "1", "--json", str(out)],
                 check=True, env=env, cwd=ROOT, timeout=600)
  res = json.loads(out.read_text())
  for key in ("pipeline_train_img_s_per_core", "pipeline_eval_img_s_per_core",
              "tfds_train_img_s_per_core", "tfds_eval_img_s_per_core",
              "torch_loader_train_img_s_per_core", "torch_loader_eval_img_s_per_core",
              "train_ratio_per_core", "eval_ratio_per_core",
              "dali_train_img_s_per_core", "dali_eval_img_s_per_core",
              "dali_train_ratio_per_core", "dali_eval_ratio_per_core"):
    assert isinstance(res[key], float) and np.isfinite(res[key]) and res[key] > 0, key
  for mode in ("train", "eval"):  # DALI's batches are tf.data's within the decoders' rounding
    assert 0 < res[f"dali_{mode}_mean_abs_diff"] < 0.05, res
    assert res[f"dali_{mode}_mean_abs_diff"] <= res[f"dali_{mode}_max_abs_diff"] < 0.5, res
  for name in ("folder", "tfds", "dali", "torch"):
    for mode in ("train", "eval"):
      run = res["runs"][f"{name}_{mode}_1"]
      # Per core is images per CPU-second of the pipeline's own processes: a pipeline that
      # used no CPU or more cores than the machine has would be mismeasured.
      assert 0 < run["cpu_util"] <= os.cpu_count() + 0.5, (name, mode, run)
      assert run["img_s"] > 0
  assert res["pipeline_train_cores_for_5000"] == 5000 / res["pipeline_train_img_s_per_core"]
