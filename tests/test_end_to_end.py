"""train.py as a user runs it, and the input pipeline on data the tests make."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import default
from googlenet_jax.train import input_pipeline, sources

from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, *overrides, timeout=900):
  env = subprocess_env()
  cmd = [sys.executable, "train.py", "--config", "configs/default.py", "--workdir", str(workdir),
         "--config.progress_bar=false", *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # (the fast tier's time: make test runs in <= 8 minutes)
def test_default_config_on_a_small_slice(tmp_path):
  run = _train(tmp_path, "--config.num_train_steps=4", "--config.log_every_steps=2",
               "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
               f"--config.data_dir={tmp_path / 'tfds'}")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "final eval at step 4" in run.stdout
  records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [(r["step"], r["split"]) for r in records] == [
      (2, "train"), (2, "eval"), (4, "train"), (4, "eval")]
  for r in records:
    assert {"loss", "top1", "top5"} <= set(r) and np.isfinite(r["loss"])
  assert "images_per_sec" in records[0]
  assert 0 <= records[0]["input_wait_fraction"] <= 1
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
  assert (tmp_path / "training_curves.png").stat().st_size > 1000
  assert os.listdir(tmp_path / "tensorboard")


@pytest.mark.slow
def test_default_run_reaches_95_percent(tmp_path):
  run = _train(tmp_path, f"--config.data_dir={tmp_path / 'tfds'}", timeout=1800)
  assert run.returncode == 0, run.stderr[-3000:]
  last = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")][-1]
  assert last["split"] == "eval" and last["top1"] >= 0.95, last


def _write_folder(root, classes=("cat", "dog", "owl"), per_class=5, corrupt=True):
  rng = np.random.RandomState(0)
  for cls in classes:
    os.makedirs(root / cls)
    for i in range(per_class):
      Image.fromarray(rng.randint(0, 255, (20, 30, 3), np.uint8)).save(root / cls / f"{i}.png")
  if corrupt:
    (root / classes[0] / "broken.jpg").write_bytes(b"not an image")


def test_folder_dataset_skips_corrupt_files_and_counts_every_eval_example(tmp_path, caplog):
  _write_folder(tmp_path)
  config = default.get_config()
  config.update(dict(dataset=f"folder:{tmp_path}", val_fraction=0.25, image_size=32,
                     batch_size=4, eval_batch_size=3))
  source = sources.open_source(config)
  assert "broken.jpg" in caplog.text
  assert source.class_names == ["cat", "dog", "owl"]
  n_val, n_train = source.num_examples("val"), source.num_examples("train")
  assert n_val + n_train == 15
  batches = list(input_pipeline.eval_batches(source, config))
  masks = np.concatenate([b["mask"] for b in batches])
  assert masks.sum() == n_val and len(masks) % 3 == 0
  batch = next(input_pipeline.train_batches(source, config, 0, 2))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  # the same global batch, split between two processes
  halves = [next(input_pipeline.train_batches(source, config, 0, 2, p, 2)) for p in (0, 1)]
  np.testing.assert_array_equal(np.concatenate([h["label"] for h in halves]), batch["label"])


def test_empty_class_folder_is_an_error(tmp_path):
  _write_folder(tmp_path, corrupt=False)
  os.makedirs(tmp_path / "empty")
  config = default.get_config()
  config.dataset = f"folder:{tmp_path}"
  with pytest.raises(sources.DatasetError, match="'empty' has no images"):
    sources.open_source(config)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
  config = default.get_config()
  config.update(dict(dataset="imagenet2012", data_dir=str(tmp_path)))
  with pytest.raises(sources.DatasetError, match="tfds build imagenet2012"):
    sources.open_source(config)


@pytest.mark.parametrize("name,size,channels", [("fashion_mnist", 32, 1), ("imagenet2012", 64, 3)])
def test_tfds_pipeline_on_mock_data(name, size, channels):
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.update(dict(dataset=name, image_size=size, channels=channels, batch_size=8,
                     eval_batch_size=6, augment="inception_crop_photometric", random_flip=True,
                     num_train_steps=3, normalize="imagenet"))
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    source = sources.open_source(config)
    assert source.num_classes == (10 if name == "fashion_mnist" else 1000)
    batches = list(input_pipeline.train_batches(source, config, 0, 3))
    assert len(batches) == 3
    for batch in batches:
      assert batch["image"].shape == (8, size, size, channels)
      assert batch["image"].dtype == np.float32 and np.isfinite(batch["image"]).all()
      assert batch["label"].dtype == np.int32
      assert ((batch["label"] >= 0) & (batch["label"] < source.num_classes)).all()
    resumed = next(input_pipeline.train_batches(source, config, 2, 3))  # skips consumed batches
    np.testing.assert_array_equal(resumed["label"], batches[2]["label"])
    evals = list(input_pipeline.eval_batches(source, config))
    assert sum(int(b["mask"].sum()) for b in evals) == 20  # every example exactly once
    assert all(b["image"].shape[0] == 6 for b in evals)
