"""The training pipeline's fused JPEG decode-and-crop gives the pixels of decode-then-crop, and
the folder pipeline's batches (with it) are those of preprocessing each decoded image."""

import io
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from configs import default
from googlenet_jax.train import input_pipeline, preprocessing, sources

SIZE = 64


def photo(h, w, seed):
  """A smooth image with edges and noise (JPEG-like content, not flat noise)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  base = np.stack([np.sin(7 * x + 3 * y), np.cos(5 * y - 2 * x), np.sin(9 * x * y)], -1)
  image = 127 + 90 * base + rng.normal(0, 12, (h, w, 3))
  image[h // 3: h // 2, w // 4: w // 2] = (250, 30, 40)  # a hard-edged block
  return np.clip(image, 0, 255).astype(np.uint8)


def encode(image, fmt="JPEG", **kw):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format=fmt, **kw)
  return buf.getvalue()


def config(**overrides):
  cfg = default.get_config()
  cfg.update({**dict(
      image_size=SIZE, channels=3, augment="inception_crop", random_flip=True,
      normalize="imagenet", crop_area_range=(0.08, 1.0), eval_crop_fraction=0.875),
      **overrides})
  return cfg


# Baseline JPEGs (4:2:0 and 4:4:4, odd sizes whose chroma blocks do not divide evenly),
# progressive, greyscale, and a PNG (the non-JPEG fallback).
CASES = {
    "baseline_420": lambda: encode(photo(333, 497, 0), quality=90, subsampling=2),
    "baseline_444": lambda: encode(photo(375, 500, 1), quality=95, subsampling=0),
    "baseline_422": lambda: encode(photo(289, 411, 5), quality=90, subsampling=1),
    "progressive": lambda: encode(photo(301, 259, 2), quality=85, progressive=True),
    "greyscale": lambda: encode(photo(250, 330, 3)[..., 0], quality=90),
    "png": lambda: encode(photo(120, 97, 4), fmt="PNG"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_decode_and_crop_equals_decode_then_crop(case):
  data = tf.constant(CASES[case]())
  cfg = config()
  image = preprocessing.decode(data)
  exact_window_differs = 0
  for position in range(12):  # 12 crop windows per image, from the run's seeds
    seed = tf.constant([7, position], tf.int64)
    begin, size = preprocessing.crop_window(tf.shape(image), seed, cfg)
    want = tf.slice(image, begin, size).numpy()
    np.testing.assert_array_equal(preprocessing.decode_crop(data, seed, cfg).numpy(), want)
    if case != "png":  # why decode_crop decodes a margin: the bare window's edges differ
      window = tf.stack([begin[0], begin[1], size[0], size[1]])
      bare = tf.io.decode_and_crop_jpeg(data, window, channels=3).numpy()
      exact_window_differs += not np.array_equal(bare, want)
    # The whole path: the same float image as preprocessing the decoded image.
    np.testing.assert_array_equal(
        preprocessing.decode_and_preprocess(data, seed, True, cfg).numpy(),
        preprocessing.preprocess(image, seed, True, cfg).numpy())
  if case in ("baseline_420", "progressive"):  # chroma subsampled in both directions
    assert exact_window_differs > 0
  # Evaluation decodes the whole image (resize the shorter side, central crop).
  seed = tf.constant([0, 0], tf.int64)
  np.testing.assert_array_equal(
      preprocessing.decode_and_preprocess(data, seed, False, cfg).numpy(),
      preprocessing.preprocess(image, seed, False, cfg).numpy())


def test_crop_window_is_chosen_from_the_header_shape():
  data = tf.constant(CASES["baseline_420"]())
  np.testing.assert_array_equal(tf.io.extract_jpeg_shape(data).numpy(), (333, 497, 3))
  windows = {tuple(preprocessing.crop_window(tf.constant([333, 497, 3]),
                                              tf.constant([7, p], tf.int64), config())[1].numpy())
             for p in range(12)}
  assert len(windows) > 6  # the seeds pick different windows


def test_folder_batches_are_the_preprocessed_decoded_images(tmp_path):
  """train_batches on a folder (fused path) against preprocess(decode(file)) per example, with
  the example order and augmentation seeds the pipeline documents."""
  for c in range(2):
    os.makedirs(tmp_path / f"c{c}")
    for i in range(5):
      with open(tmp_path / f"c{c}" / f"{i}.jpg", "wb") as f:
        f.write(encode(photo(90 + 13 * i, 120 - 7 * i, 10 * c + i), quality=90))
  cfg = config(dataset=f"folder:{tmp_path}", val_fraction=0.2, batch_size=4, seed=3)
  source = sources.open_source(cfg)
  split = source.splits["train"]
  batches = list(input_pipeline.train_batches(source, cfg, 0, 3))
  per_epoch = input_pipeline.steps_per_epoch(source, cfg)
  for step, batch in enumerate(batches):
    perm = np.random.RandomState([cfg.seed, step // per_epoch]).permutation(len(split))
    for j in range(cfg.batch_size):
      index = perm[(step % per_epoch) * cfg.batch_size + j]
      image = preprocessing.decode(tf.io.read_file(split.paths[index]))
      want = preprocessing.preprocess(
          image, tf.constant([cfg.seed, step * cfg.batch_size + j], tf.int64), True, cfg)
      np.testing.assert_array_equal(batch["image"][j], want.numpy())
      assert batch["label"][j] == split.labels[index]


@pytest.mark.parametrize("normalize", ["imagenet", "half", "unit"])
def test_normalisation_is_the_configs_mean_and_std(normalize):
  image = np.full((50, 70, 3), (0, 128, 255), np.uint8)
  cfg = config(normalize=normalize)
  got = preprocessing.preprocess(tf.constant(image), tf.constant([0, 0], tf.int64), False,
                                  cfg).numpy()
  mean = np.asarray(preprocessing.MEANS[normalize])
  std = np.asarray(preprocessing.STDS[normalize])
  want = (np.array([0, 128, 255]) / 255 - mean) / std
  np.testing.assert_allclose(got.reshape(-1, 3), np.broadcast_to(want, (SIZE * SIZE, 3)),
                             rtol=0, atol=2e-6)


@pytest.mark.parametrize("mode", ["shard_map", "pmap"])
def test_prefetch_keeps_the_order_and_stays_a_fixed_number_of_batches_ahead(mode):
  import jax  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import parallel  # pylint: disable=import-outside-toplevel
  par = parallel.Parallel(mode)
  n = len(par.devices)
  pulled = []

  def host_batches():
    for i in range(6):
      pulled.append(i)
      yield {"image": np.full((2 * n, 3), i, np.float32)}

  got = []
  for batch in par.prefetch(host_batches(), size=2):
    assert len(pulled) - len(got) <= 3  # the batch handed out and at most 2 more
    if mode == "shard_map":
      assert isinstance(batch["image"], jax.Array)  # already on the devices
    got.append(int(np.asarray(batch["image"]).reshape(-1)[0]))
  assert got == list(range(6))
