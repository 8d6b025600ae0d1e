"""The DALI input pipeline (config.data_loader="dali") on the CPU: the same examples, crop
windows and flips as the tf.data path, values within the measured decoder/resize difference,
exact resumes, process sharding, bad files, and a training run reaching tf.data's accuracy."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from configs import default  # noqa: E402
from googlenet_jax.train import dali_pipeline, input_pipeline, preprocessing, sources  # noqa: E402

from helpers import ROOT, subprocess_env  # noqa: E402

SIZE = 48
# Measured on this test's images (JPEG quality 90, 4:2:0, 50-200 px, at 48 px, ImageNet
# normalisation, where one 0..255 pixel level is 0.0174): DALI against tf.data, mean
# |difference| 0.0165-0.0170 and max 0.072-0.073 in evaluation (crop fraction 0.875 and 1.0),
# mean 0.016-0.018 and max 0.07-0.09 over 240 training crops. TensorFlow decodes JPEGs with
# libjpeg's fast integer IDCT, DALI with the accurate one (about one level apart on average),
# DALI rounds its resized image to uint8 (TensorFlow keeps float32) and the resize kernels
# accumulate in another order. A wrong window, flip, offset or normalisation moves the mean
# past 0.1.
MEAN_TOL, MAX_TOL = 0.03, 0.15


def photo(h, w, seed):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  base = np.stack([np.sin(7 * x + 3 * y + seed), np.cos(5 * y - 2 * x), np.sin(9 * x * y)], -1)
  image = 127 + 90 * base + rng.normal(0, 12, (h, w, 3))
  image[h // 3: h // 2, w // 4: w // 2] = (250, 30, 40)  # a hard edge: shows a wrong window
  return np.clip(image, 0, 255).astype(np.uint8)


def write_folder(root, classes=3, per_class=12):
  rng = np.random.default_rng(0)
  for c in range(classes):
    os.makedirs(root / f"c{c}", exist_ok=True)
    for i in range(per_class):
      h, w = rng.integers(50, 201, 2)
      Image.fromarray(photo(h, w, 100 * c + i)).save(root / f"c{c}" / f"{i}.jpg", quality=90)


def config(root, **overrides):
  cfg = default.get_config()
  cfg.update({**dict(
      dataset=f"folder:{root}", val_fraction=0.25, image_size=SIZE, channels=3,
      augment="inception_crop", random_flip=True, normalize="imagenet",
      crop_area_range=(0.08, 1.0), eval_crop_fraction=0.875, batch_size=8, eval_batch_size=8,
      seed=3, data_threads=2, prefetch_batches=2), **overrides})
  return cfg


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("dali_folder")
  write_folder(root)
  return root


def differences(a, b):
  d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return d.mean(), d.max()


@pytest.mark.parametrize("fraction", [0.875, 1.0])
def test_eval_batches_agree_with_tfdata(folder, fraction):
  cfg = config(folder, eval_crop_fraction=fraction)
  source = sources.open_source(cfg)
  want = list(input_pipeline.eval_batches(source, cfg))
  got = list(dali_pipeline.eval_batches(source, cfg))
  assert len(got) == len(want) == 2  # 9 examples: a padded, masked second batch
  for g, w in zip(got, want):
    assert g["image"].shape == (8, SIZE, SIZE, 3) and g["image"].dtype == np.float32
    np.testing.assert_array_equal(g["label"], w["label"])
    np.testing.assert_array_equal(g["mask"], w["mask"])
    mean, worst = differences(g["image"], w["image"])
    assert mean < MEAN_TOL and worst < MAX_TOL, (mean, worst)


@pytest.mark.parametrize("augment,flip", [("inception_crop", True), ("none", False)])
def test_train_batches_agree_with_tfdata_windows_and_flips(folder, augment, flip):
  cfg = config(folder, augment=augment, random_flip=flip)
  source = sources.open_source(cfg)
  want = list(input_pipeline.train_batches(source, cfg, 0, 6))
  got = list(dali_pipeline.train_batches(source, cfg, 0, 6))
  assert len(got) == len(want) == 6
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["label"], w["label"])
    mean, worst = differences(g["image"], w["image"])
    assert mean < MEAN_TOL and worst < MAX_TOL, (mean, worst)
    for gi, wi in zip(g["image"], w["image"]):  # each flip agrees: nearer than the mirror
      assert np.abs(gi - wi).mean() < np.abs(gi - wi[:, ::-1]).mean()
  if flip:  # the crop path both flips and does not flip (48 examples)
    assert 0 < sum(input_pipeline_flips(cfg, 48)) < 48


def input_pipeline_flips(cfg, count):
  """The tf.data path's flip draws for positions 0..count-1."""
  _, _, flips = dali_pipeline.augmentation(cfg)(np.full((count, 2), 100),
                                                [(cfg.seed, p) for p in range(count)])
  return flips


def test_windows_are_the_tfdata_windows(folder):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  cfg = config(folder)
  shapes = [(50 + 7 * i, 200 - 5 * i) for i in range(20)]
  seeds = [(cfg.seed, 1000 + i) for i in range(20)]
  anchors, windows, _ = dali_pipeline.augmentation(cfg)(shapes, seeds)
  for (h, w), seed, anchor, window in zip(shapes, seeds, anchors, windows):
    begin, size = preprocessing.crop_window(tf.constant([h, w, 3]),
                                             tf.constant(seed, tf.int64), cfg)
    np.testing.assert_array_equal(anchor, begin.numpy()[:2])
    np.testing.assert_array_equal(window, size.numpy()[:2])


def test_resume_gives_the_uninterrupted_batches(folder):
  cfg = config(folder)
  source = sources.open_source(cfg)
  whole = list(dali_pipeline.train_batches(source, cfg, 0, 7))  # 3 steps an epoch: 2 epochs+
  resumed = list(dali_pipeline.train_batches(source, cfg, 4, 7))
  assert len(resumed) == 3
  for a, b in zip(whole[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_two_processes_split_each_batch(folder):
  cfg = config(folder)
  source = sources.open_source(cfg)
  single = list(dali_pipeline.train_batches(source, cfg, 0, 3))
  halves = [list(dali_pipeline.train_batches(source, cfg, 0, 3, p, 2)) for p in (0, 1)]
  for step, batch in enumerate(single):
    parts = [h[step] for h in halves]
    assert all(len(p["label"]) == 4 for p in parts)
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), batch["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), batch["label"])
  # Disjoint: an epoch's 3 steps x 8 examples are 24 different training images.
  images = np.concatenate([b["image"] for b in single]).reshape(24, -1)
  assert len({row.tobytes() for row in images}) == 24
  # Evaluation: the same number of batches on each process, every example once.
  evals = [list(dali_pipeline.eval_batches(source, cfg, process_index=p, process_count=2))
           for p in (0, 1)]
  assert len(evals[0]) == len(evals[1])
  whole = list(dali_pipeline.eval_batches(source, cfg))
  for b, batch in enumerate(whole):
    np.testing.assert_array_equal(
        np.concatenate([e[b]["mask"] for e in evals]), batch["mask"])
    np.testing.assert_array_equal(
        np.concatenate([e[b]["image"] for e in evals]), batch["image"])
  assert sum(int(e["mask"].sum()) for es in evals for e in es) == len(source.splits["val"])


def test_bad_files_are_handled_as_tfdata_handles_them(tmp_path, caplog):
  write_folder(tmp_path, classes=2, per_class=6)
  (tmp_path / "c0" / "random.jpg").write_bytes(np.random.default_rng(0).bytes(3000))
  (tmp_path / "c1" / "text.jpg").write_bytes(b"this is not a JPEG")
  cfg = config(tmp_path, val_fraction=0.2)
  with caplog.at_level(logging.WARNING, logger="googlenet_jax"):
    source = sources.open_source(cfg)
  for bad in ("c0/random.jpg", "c1/text.jpg"):  # skipped for both loaders, named
    assert str(tmp_path / bad) in caplog.text
    assert not any(p.endswith(bad) for s in source.splits.values() for p in s.paths)
  want = list(input_pipeline.train_batches(source, cfg, 0, 1))
  got = list(dali_pipeline.train_batches(source, cfg, 0, 1))
  np.testing.assert_array_equal(got[0]["label"], want[0]["label"])
  assert differences(got[0]["image"], want[0]["image"])[0] < MEAN_TOL
  # A JPEG that passes the header check but ends early: tf.data stops with a decode error; DALI
  # with one naming the file (never a zero image or a hang).
  split = source.splits["train"]
  victim = split.paths[0]
  data = open(victim, "rb").read()
  with open(victim, "wb") as f:
    f.write(data[:len(data) // 2])
  cfg.batch_size = len(split)
  with pytest.raises(sources.DatasetError, match=victim):
    list(dali_pipeline.train_batches(source, cfg, 0, 1))
  with pytest.raises(sources.DatasetError, match=victim):
    list(dali_pipeline.eval_batches(source, cfg, "train"))


def test_unsupported_sources_and_options_say_so(folder):
  cfg = config(folder)
  source = sources.open_source(cfg)
  digits = sources.Source("sklearn_digits", ["0"], {"test": sources.Split(
      labels=np.zeros(2, np.int64), images=np.zeros((2, 8, 8, 3), np.uint8))},
      eval_split="test")
  with pytest.raises(sources.DatasetError, match="use data_loader='tfdata' for "
                     "sklearn_digits"):
    dali_pipeline.eval_batches(digits, cfg)
  for bad in (dict(augment="inception_crop_photometric"), dict(channels=1)):
    with pytest.raises(ValueError, match="not supported with data_loader='dali'"):
      dali_pipeline.train_batches(source, config(folder, **bad), 0, 1)
  with pytest.raises(ValueError, match="not supported with data_loader='dali'"):
    dali_pipeline.eval_batches(source, cfg, image_fn=lambda image: image)
  from googlenet_jax.train import validate_config  # pylint: disable=import-outside-toplevel
  from configs import default  # pylint: disable=import-outside-toplevel
  wrong = default.get_config()
  wrong.data_loader = "torch"
  with pytest.raises(ValueError, match="data_loader must be 'tfdata' or 'dali'"):
    validate_config(wrong, 1)


def test_tfds_records_are_read_without_tensorflow(tmp_path):
  """The TFDS jpeg_benchmark_set (the files' JPEG bytes as records): DALI's evaluation batches
  against tf.data's (both read the records in file order), and training batches of the
  records' own images and labels."""
  import sys  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
  import jpeg_set  # pylint: disable=import-outside-toplevel
  jpeg_set.generate(str(tmp_path), train=16, val=8, quiet=True)
  cfg = config(tmp_path, dataset="jpeg_benchmark_set", data_dir=jpeg_set.prepare_tfds(
      str(tmp_path)))
  source = sources.open_source(cfg)
  want = next(input_pipeline.eval_batches(source, cfg))
  got = next(dali_pipeline.eval_batches(source, cfg))
  np.testing.assert_array_equal(got["label"], want["label"])
  mean, worst = differences(got["image"], want["image"])
  # These images are 180-700 px (more of the decoders' rounding reaches a 48 px image).
  assert mean < MEAN_TOL and worst < 0.3, (mean, worst)
  batches = list(dali_pipeline.train_batches(source, cfg, 0, 2))
  assert len(batches) == 2 and batches[0]["image"].shape == (8, SIZE, SIZE, 3)
  assert set(np.concatenate([b["label"] for b in batches])) <= set(range(10))


@pytest.mark.parametrize("normalize", ["imagenet", "half", "unit"])
def test_normalisation_is_the_configs_mean_and_std(tmp_path, normalize):
  for c in range(2):  # flat colours, lossless: the exact normalised values
    os.makedirs(tmp_path / f"c{c}")
    for i in range(2):
      Image.fromarray(np.full((50 + 9 * i, 70, 3), (0, 128, 255), np.uint8)).save(
          tmp_path / f"c{c}" / f"{i}.png")
  cfg = config(tmp_path, normalize=normalize, val_fraction=0.5, eval_batch_size=2)
  source = sources.open_source(cfg)
  got = next(dali_pipeline.eval_batches(source, cfg))["image"]
  mean = np.asarray(preprocessing.MEANS[normalize])
  std = np.asarray(preprocessing.STDS[normalize])
  want = (np.array([0, 128, 255]) / 255 - mean) / std
  np.testing.assert_allclose(got.reshape(-1, 3), np.broadcast_to(want, (got.size // 3, 3)),
                             rtol=0, atol=1e-5)


@pytest.mark.slow
def test_train_py_with_dali_reaches_tfdatas_accuracy(tmp_path):
  """train.py on a 2-class folder (reddish against bluish noise, 32 px, one device): the same
  validation accuracy with either loader. (At 40 steps the running BatchNorm statistics are
  still settling, and with 8 simulated devices of 2 examples each evaluation swings between
  0.33 and 1.0 with either loader; at 60 steps on one device both reach a loss near 1e-4.)"""
  rng = np.random.default_rng(0)
  for c, tint in enumerate(((200, 40, 40), (40, 40, 200))):
    os.makedirs(tmp_path / "data" / f"c{c}")
    for i in range(24):
      h, w = rng.integers(40, 80, 2)
      image = np.clip(np.asarray(tint) + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(image).save(tmp_path / "data" / f"c{c}" / f"{i}.jpg", quality=90)
  settings = dict(dataset=f"folder:{tmp_path / 'data'}", val_fraction=0.25, num_classes=2,
                  image_size=32, variant="torchvision", aux_logits=False, batch_size=16,
                  eval_batch_size=8, num_train_steps=60, eval_every_steps=60,
                  learning_rate=0.01, augment="inception_crop", crop_area_range="(0.5,1.0)",
                  random_flip=True, normalize="imagenet", checkpoint_every_steps=1000,
                  progress_bar=False, data_threads=2)
  final = {}
  for loader in ("tfdata", "dali"):
    workdir = tmp_path / loader
    run = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/default.py", "--workdir", str(workdir),
         f"--config.data_loader={loader}", *(f"--config.{k}={v}" for k, v in settings.items())],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    final[loader] = [json.loads(l) for l in open(workdir / "metrics.jsonl")][-1]
    assert final[loader]["split"] == "eval" and final[loader]["step"] == 60, final
  assert final["tfdata"]["top1"] == 1.0, final
  assert final["dali"]["top1"] == final["tfdata"]["top1"], final
  assert final["dali"]["loss"] < 0.05, final
