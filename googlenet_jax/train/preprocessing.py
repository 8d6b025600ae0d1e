"""Preprocessing in TensorFlow ops (so that it runs in tf.data's threads): decoding, the
training crop, resizing, flips, photometric changes and normalisation. Random choices come
from stateless ops seeded per example: deterministic."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from googlenet_jax.models import IMAGENET_MEAN, IMAGENET_STD

MEANS = {"imagenet": IMAGENET_MEAN, "half": (0.5, 0.5, 0.5), "unit": (0.0, 0.0, 0.0)}
STDS = {"imagenet": IMAGENET_STD, "half": (0.5, 0.5, 0.5), "unit": (1.0, 1.0, 1.0)}


def inception_crop(config, train: bool) -> bool:
  return train and config.augment in ("inception_crop", "inception_crop_photometric")


def crop_window(shape: tf.Tensor, seed: tf.Tensor, config) -> tuple[tf.Tensor, tf.Tensor]:
  """The training crop of an image of `shape` (h, w, c): (begin, size) for `tf.slice`. It
  depends on the shape and the seed only, so it can be chosen before the image is decoded."""
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=tf.random.experimental.stateless_split(
          seed, 4)[0], area_range=tuple(config.crop_area_range),
      aspect_ratio_range=(3 / 4, 4 / 3), min_object_covered=0.0, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  return begin, size


def preprocess(image: tf.Tensor, seed: tf.Tensor, train: bool, config,
               cropped: bool = False) -> tf.Tensor:
  """uint8 HWC image -> float32 (size, size, channels), normalised as `config.normalize` says.
  `cropped`: the image is already the training crop window (`decode_and_preprocess`)."""
  size = config.image_size
  channels = config.channels
  seeds = tf.random.experimental.stateless_split(seed, 4)
  if inception_crop(config, train) and not cropped:
    begin, crop = crop_window(tf.shape(image), seed, config)
    image = tf.slice(image, begin, crop)
  # Pixel values stay on the decoded 0..255 scale (`unit` = 1/255 is what maps them to [0, 1])
  # until the resize has made the image small, then one multiply and one add normalise them.
  unit = 1 / 255 if image.dtype == tf.uint8 else 1.0
  if image.dtype not in (tf.uint8, tf.float32):
    image = tf.image.convert_image_dtype(image, tf.float32)
  if image.shape[-1] == 1 and channels == 3:
    image = tf.image.grayscale_to_rgb(image)
  elif image.shape[-1] == 3 and channels == 1:
    image, unit = tf.image.rgb_to_grayscale(tf.image.convert_image_dtype(image, tf.float32)), 1.0
  augment = config.augment if train else "none"
  if train or config.eval_crop_fraction >= 1.0:
    image = tf.image.resize(image, (size, size), antialias=True)
  else:  # eval: resize the shorter side to size / fraction, then take the central crop
    image = _resize_shorter_side_and_center_crop(image, size, config.eval_crop_fraction)
  if augment != "none" and config.random_flip:
    image = tf.image.stateless_random_flip_left_right(image, seeds[1])
  if augment == "inception_crop_photometric":
    image, unit = image * unit, 1.0
    image = tf.image.stateless_random_brightness(image, 32 / 255, seeds[2])
    image = tf.image.stateless_random_contrast(image, 0.5, 1.5, seeds[3])
    image = tf.clip_by_value(image, 0.0, 1.0)
  scale, offset = normalization(config.normalize, channels, unit)
  # Constants of the image's full shape: TF's broadcast over a last axis of 3 is ~15x slower
  # than the elementwise op (~1 ms of a ~4 ms image); the values are the same.
  full = lambda v: tf.constant(np.broadcast_to(v, (size, size, channels)))
  image = image * full(scale) + full(offset)
  image.set_shape((size, size, channels))
  return image


def _resize_shorter_side_and_center_crop(image: tf.Tensor, size: int,
                                         fraction: float) -> tf.Tensor:
  """`tf.image.resize(image, shorter side -> size / fraction, antialias=True)`, then its central
  size x size crop; only the crop's pixels are computed (the resize's own scale, translated by
  the crop's offset). Within ~0.01 of the 0..255 values of resizing the whole image (the
  kernel weights round differently), in ~3/4 of the time."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  resized = tf.cast(tf.round(shape * (size / fraction / tf.reduce_min(shape))), tf.int32)
  offset = tf.cast((resized - size) // 2, tf.float32)
  image = tf.raw_ops.ScaleAndTranslate(
      images=image[None], size=[size, size], scale=tf.cast(resized, tf.float32) / shape,
      translation=-offset, kernel_type="triangle", antialias=True)
  return image[0]


def normalization(norm: str, channels: int, unit: float = 1 / 255) -> tuple[np.ndarray, ...]:
  """Per-channel float32 (scale, offset) with x * scale + offset = (x * unit - mean) / std:
  `config.normalize`'s mean and std for pixels x that `unit` maps to [0, 1]."""
  mean = np.asarray(MEANS[norm][:channels], np.float64)
  std = np.asarray(STDS[norm][:channels], np.float64)
  return (unit / std).astype(np.float32), (-mean / std).astype(np.float32)


# Pixels decoded around a training crop: the largest JPEG block (MCU) width, 4:1:1 chroma.
JPEG_MARGIN = 32


def decode(data: tf.Tensor) -> tf.Tensor:
  """Encoded image bytes (JPEG, PNG, BMP, GIF's first frame) -> uint8 (h, w, 3)."""
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def decode_crop(data: tf.Tensor, seed: tf.Tensor, config) -> tf.Tensor:
  """The training crop window (`crop_window`) of encoded image bytes, uint8 (h, w, 3): for a
  JPEG the window is chosen from its header and only around it is the image decoded
  (`tf.io.decode_and_crop_jpeg`: libjpeg skips the rows and blocks outside); the pixels are
  those of decoding the whole image and slicing."""

  def fused():
    shape = tf.io.extract_jpeg_shape(data)
    begin, size = crop_window(shape, seed, config)
    # Chroma upsampling reads the neighbouring blocks: decoding exactly the window changes its
    # edge pixels (4:2:0). Decoding JPEG_MARGIN more on each side, on block boundaries, gives
    # the window the pixels of the whole image's decode.
    start = tf.maximum(begin[:2] - JPEG_MARGIN, 0) // JPEG_MARGIN * JPEG_MARGIN
    stop = tf.minimum((begin[:2] + size[:2] + 2 * JPEG_MARGIN - 1) // JPEG_MARGIN * JPEG_MARGIN,
                      shape[:2])
    wide = tf.io.decode_and_crop_jpeg(data, tf.concat([start, stop - start], 0), channels=3)
    offset = begin[:2] - start
    return wide[offset[0]:offset[0] + size[0], offset[1]:offset[1] + size[1]]

  def full():
    image = decode(data)
    begin, size = crop_window(tf.shape(image), seed, config)
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(data), fused, full)
  image.set_shape((None, None, 3))
  return image


def decode_and_preprocess(data: tf.Tensor, seed: tf.Tensor, train: bool, config) -> tf.Tensor:
  """`preprocess(decode(data), ...)`, the same values; training crops decode only around the
  window (`decode_crop`)."""
  if not inception_crop(config, train):
    return preprocess(decode(data), seed, train, config)
  return preprocess(decode_crop(data, seed, config), seed, train, config, cropped=True)
