"""Input pipeline: TFDS / folders / the bundled digits -> per-process batches as numpy arrays.

Two kinds of source:
- random access (the bundled digits, a folder of class subfolders): every global batch is a
  pure function of (seed, step), so each process takes its slice of the same global batch
  whatever the process count, and a resumed run continues exactly where it stopped;
- streamed (TFDS datasets by name, tfrecord shards): each process reads its own files
  (`tfds.split_for_jax_process`), so the data order depends on the process count; a resumed run
  skips the batches it already consumed.
Augmentation uses stateless random ops seeded by (seed, position in the run): deterministic.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from googlenet_jax.models import IMAGENET_MEAN, IMAGENET_STD



def keep_tensorflow_off_accelerators() -> None:
  """TensorFlow only feeds the input pipeline: hide the GPUs and TPUs from it (and TFDS's
  progress bars), so that it never takes an accelerator's memory from JAX. Process-wide: for
  a program's `main` (train.py, the tools), before TensorFlow first runs an op."""
  tf.config.set_visible_devices([], "GPU")
  if tf.config.list_physical_devices("TPU"):
    tf.config.set_visible_devices([], "TPU")
  tfds.display_progress_bar(False)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
MEANS = {"imagenet": IMAGENET_MEAN, "half": (0.5, 0.5, 0.5), "unit": (0.0, 0.0, 0.0)}
STDS = {"imagenet": IMAGENET_STD, "half": (0.5, 0.5, 0.5), "unit": (1.0, 1.0, 1.0)}


class DatasetError(ValueError):
  """A dataset that cannot be found, read or prepared; the message says how to fix it."""


@dataclasses.dataclass
class Split:
  """A random-access split: in-memory images (uint8, NHWC) or image file paths, and labels."""
  labels: np.ndarray
  images: Optional[np.ndarray] = None
  paths: Optional[list[str]] = None

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass
class Source:
  name: str
  class_names: list[str]
  splits: dict[str, Split] = dataclasses.field(default_factory=dict)  # random access
  builder: Any = None  # a TFDS builder (streamed)
  train_split: str = "train"
  eval_split: str = "test"

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def num_examples(self, split: str) -> Optional[int]:
    """The split's size; None where TFDS has no metadata for it (mock data)."""
    if split in self.splits:
      return len(self.splits[split])
    if split not in self.builder.info.splits:
      return None
    return self.builder.info.splits[split].num_examples


# --------------------------------------------------------------------------------------------
# Sources.


def open_source(config) -> Source:
  """The dataset named by `config.dataset`: "sklearn_digits", "folder:/path" or a TFDS name."""
  name = config.dataset
  if name == "sklearn_digits":
    return _digits_source(config)
  if name.startswith("folder:"):
    return _folder_source(name[len("folder:"):], config)
  return _tfds_source(name, config)


def _digits_source(config) -> Source:
  from googlenet_jax.train import digits  # pylint: disable=import-outside-toplevel
  builder = digits.SklearnDigits(data_dir=config.data_dir or None)
  if not builder.is_prepared():
    try:
      builder.download_and_prepare()
    except FileExistsError:  # another process (multi-host on one machine) prepared it first
      builder = digits.SklearnDigits(data_dir=config.data_dir or None)
  splits = {}
  for split in ("train", "test"):
    ds = builder.as_dataset(split=split, batch_size=-1)  # 1,797 examples: read it all
    arrays = tfds.as_numpy(ds)
    splits[split] = Split(labels=arrays["label"].astype(np.int64), images=arrays["image"])
  return Source("sklearn_digits", builder.info.features["label"].names, splits,
                train_split="train", eval_split="test")


def _list_images(root: str) -> tuple[list[str], list[int], list[str]]:
  classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  if not classes:
    raise DatasetError(f"{root}: no class subfolders (expected {root}/<class>/<image>)")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    files = sorted(f for f in os.listdir(os.path.join(root, cls))
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
      raise DatasetError(f"{os.path.join(root, cls)}: class folder {cls!r} has no images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
    paths += [os.path.join(root, cls, f) for f in files]
    labels += [label] * len(files)
  return paths, labels, classes


def _readable(paths: list[str]) -> list[bool]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  ok = []
  for path in paths:
    try:
      with Image.open(path) as im:
        im.verify()
      ok.append(True)
    except Exception:  # pylint: disable=broad-except
      ok.append(False)
  return ok


def _folder_split(paths, labels, what: str) -> Split:
  ok = _readable(paths)
  bad = [p for p, good in zip(paths, ok) if not good]
  if bad:
    logging.getLogger("googlenet_jax").warning("skipping %d unreadable image file(s) in %s: %s", len(bad), what,
                    ", ".join(bad[:20]) + (" ..." if len(bad) > 20 else ""))
  keep = [i for i, good in enumerate(ok) if good]
  if not keep:
    raise DatasetError(f"{what}: no readable images")
  return Split(labels=np.asarray(labels, np.int64)[keep], paths=[paths[i] for i in keep])


def _folder_source(root: str, config) -> Source:
  """`root/train/<class>/*` and `root/val/<class>/*`, or `root/<class>/*` split by
  `config.val_fraction` (a fixed, seeded split)."""
  if not os.path.isdir(root):
    raise DatasetError(f"dataset folder {root!r} does not exist")
  if os.path.isdir(os.path.join(root, "train")):
    paths, labels, classes = _list_images(os.path.join(root, "train"))
    splits = {"train": _folder_split(paths, labels, os.path.join(root, "train"))}
    for val in ("val", "validation", "test"):
      if os.path.isdir(os.path.join(root, val)):
        vpaths, vlabels, vclasses = _list_images(os.path.join(root, val))
        if vclasses != classes:
          raise DatasetError(f"{root}: classes of {val}/ {vclasses} differ from train/ {classes}")
        splits["val"] = _folder_split(vpaths, vlabels, os.path.join(root, val))
        break
    else:
      raise DatasetError(f"{root}: has train/ but no val/ (or validation/, test/) folder")
  else:
    paths, labels, classes = _list_images(root)
    fraction = config.val_fraction
    if not 0 < fraction < 1:
      raise DatasetError(f"val_fraction must be in (0, 1) for a folder without train/ and val/, "
                         f"got {fraction}")
    order = np.random.RandomState(0).permutation(len(paths))
    n_val = max(1, int(round(len(paths) * fraction)))
    pick = lambda idx: ([paths[i] for i in idx], [labels[i] for i in idx])
    splits = {"val": _folder_split(*pick(sorted(order[:n_val])), f"{root} (val)"),
              "train": _folder_split(*pick(sorted(order[n_val:])), f"{root} (train)")}
  return Source(f"folder:{root}", classes, splits, train_split="train", eval_split="val")


def _tfds_source(name: str, config) -> Source:
  try:
    builder = tfds.builder(name, data_dir=config.data_dir or None)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetError(f"unknown dataset {name!r}: expected 'sklearn_digits', 'folder:/path' or "
                       f"a TFDS name ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(
              manual_dir=config.manual_dir or None))
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetError(
          f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and could not be "
          f"downloaded or built ({e.__class__.__name__}: {str(e).splitlines()[0][:300]}).\n"
          f"Prepare it on a machine with the data: `tfds build {name} --data_dir DIR "
          f"[--manual_dir DIR_WITH_ARCHIVES]` (ImageNet needs its archives in the manual dir), "
          f"then pass --config.data_dir=DIR.") from None
  available = list(builder.info.splits)
  train = config.train_split or "train"
  evals = [config.eval_split] if config.eval_split else [
      s for s in ("validation", "test") if s in available]
  if not evals:
    if available:
      raise DatasetError(f"TFDS dataset {name!r} has no validation or test split: {available}; "
                         "set --config.eval_split")
    evals = ["test"]  # split metadata unknown (e.g. under tfds.testing.mock_data)
  names = builder.info.features["label"].names
  return Source(name, list(names), builder=builder, train_split=train, eval_split=evals[0])


# --------------------------------------------------------------------------------------------
# Preprocessing (TensorFlow ops, so that it runs in tf.data's threads).


def _inception_crop(config, train: bool) -> bool:
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
  if _inception_crop(config, train) and not cropped:
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
  if not _inception_crop(config, train):
    return preprocess(decode(data), seed, train, config)
  return preprocess(decode_crop(data, seed, config), seed, train, config, cropped=True)


def _load(split: Split, index: tf.Tensor) -> tf.Tensor:
  """The example's image: uint8 (in-memory splits) or its file's encoded bytes (folders)."""
  if split.images is not None:
    return tf.gather(tf.constant(split.images), index)
  return tf.io.read_file(tf.gather(tf.constant(split.paths), index))


def _preprocess_loaded(image: tf.Tensor, seed: tf.Tensor, train: bool, config) -> tf.Tensor:
  if image.dtype == tf.string:
    return decode_and_preprocess(image, seed, train, config)
  return preprocess(image, seed, train, config)


# --------------------------------------------------------------------------------------------
# Training batches.


def steps_per_epoch(source: Source, config) -> int:
  n = source.num_examples(source.train_split)
  if n is None and config.num_train_steps:
    return config.num_train_steps  # unknown size: the run is one "epoch" of num_train_steps
  if n is None:
    raise DatasetError(f"{source.name}: the size of split {source.train_split!r} is unknown; "
                       "set --config.num_train_steps and --config.eval_every_steps")
  return max(1, n // config.batch_size)


def train_positions(n: int, per_epoch: int, config, start_step: int, num_steps: int,
                    process_index: int = 0, process_count: int = 1) -> Iterator[tuple[int, int]]:
  """(example index, augmentation position) of each of this process's training examples for
  steps start_step..num_steps-1 of a random-access split of n examples: the order is a
  permutation per epoch seeded by (seed, epoch); the position is unique in the run and seeds
  the example's augmentation as [seed, position]."""
  local = config.batch_size // process_count
  perm_epoch, perm = -1, None
  for step in range(start_step, num_steps):
    epoch = step // per_epoch
    if epoch != perm_epoch:
      perm_epoch, perm = epoch, np.random.RandomState([config.seed, epoch]).permutation(n)
    offset = (step % per_epoch) * config.batch_size + process_index * local
    for j in range(local):
      yield int(perm[offset + j]), step * config.batch_size + process_index * local + j


def eval_positions(n: int, batch: int, process_index: int = 0,
                   process_count: int = 1) -> Iterator[tuple[int, int]]:
  """(example index, mask) of this process's evaluation examples of a random-access split of n:
  ceil(n / batch) global batches, this process's slice of each; padding repeats example 0
  with mask 0."""
  local = batch // process_count
  for b in range(math.ceil(n / batch)):
    for j in range(local):
      i = b * batch + process_index * local + j
      yield (i if i < n else 0), int(i < n)


def train_batches(source: Source, config, start_step: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """This process's part of the global training batches for steps start_step..num_steps-1:
  dicts of numpy `image` (local_batch, size, size, C) float32 and `label` int32."""
  local = config.batch_size // process_count
  if source.builder is not None:
    return _streamed_train(source, config, start_step, num_steps, process_index, process_count)
  split = source.splits[source.train_split]
  per_epoch = steps_per_epoch(source, config)
  seed = config.seed

  def positions():
    return train_positions(len(split), per_epoch, config, start_step, num_steps, process_index,
                           process_count)

  ds = tf.data.Dataset.from_generator(
      positions, output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int64)))
  labels = tf.constant(split.labels.astype(np.int32))

  def load(index, position):
    image = _preprocess_loaded(_load(split, index),
                               tf.stack([tf.cast(seed, tf.int64), position]), True, config)
    return {"image": image, "label": tf.gather(labels, index)}

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).prefetch(config.prefetch_batches)
  return iter(tfds.as_numpy(_threads(ds, config)))


def _streamed_train(source, config, start_step, num_steps, process_index, process_count):
  local = config.batch_size // process_count
  split = tfds.split_for_jax_process(source.train_split, process_index=process_index,
                                     process_count=process_count)
  read = tfds.ReadConfig(shuffle_seed=config.seed, interleave_cycle_length=4)
  ds = source.builder.as_dataset(split=split, shuffle_files=True, read_config=read,
                                 decoders={"image": tfds.decode.SkipDecoding()}
                                 if _is_encoded(source) else None)
  ds = ds.repeat().shuffle(config.shuffle_buffer, seed=config.seed)
  ds = ds.enumerate()
  seed = config.seed

  def load(position, example):
    image = _preprocess_loaded(example["image"], tf.stack([tf.cast(seed, tf.int64), position]),
                               True, config)
    return {"image": image, "label": tf.cast(example["label"], tf.int32)}

  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local, drop_remainder=True).skip(start_step).take(num_steps - start_step)
  return iter(tfds.as_numpy(_threads(ds.prefetch(config.prefetch_batches), config)))


def _threads(ds: tf.data.Dataset, config) -> tf.data.Dataset:
  """At most `config.data_threads` threads for the dataset's work (0 or unset: tf.data's
  default, one per core)."""
  threads = int(config.data_threads or 0)
  if threads <= 0:
    return ds
  options = tf.data.Options()
  options.threading.private_threadpool_size = threads
  return ds.with_options(options)


def _is_encoded(source: Source) -> bool:
  feature = source.builder.info.features["image"]
  return getattr(feature, "encoding_format", None) in ("jpeg", "png")


# --------------------------------------------------------------------------------------------
# Evaluation batches: every example once; the last batch padded and masked.


def eval_batches(source: Source, config, split_name: Optional[str] = None,
                 process_index: int = 0, process_count: int = 1,
                 image_fn: Optional[Any] = None) -> Iterator[dict]:
  """Dicts with `image`, `label` and `mask` (1 for real examples, 0 for padding). Every process
  yields the same number of batches (collectives need it). `image_fn` (uint8 image -> float
  tensor of a fixed shape) replaces the single centre crop (e.g. the 10-crop evaluation)."""
  split_name = split_name or source.eval_split
  if image_fn is None:
    image_fn = lambda image: preprocess(image, tf.constant([0, 0], tf.int64), False, config)
  batch = config.eval_batch_size or config.batch_size
  local = batch // process_count
  if source.builder is None:
    split = source.splits[split_name]
    labels = np.asarray(split.labels, np.int32)

    def positions():
      return eval_positions(len(split), batch, process_index, process_count)

    ds = tf.data.Dataset.from_generator(
        positions, output_signature=(tf.TensorSpec([], tf.int64), tf.TensorSpec([], tf.int32)))
    label_table = tf.constant(labels)

    def load(index, mask):
      image = _load(split, index)
      image = image_fn(decode(image) if image.dtype == tf.string else image)
      return {"image": image, "label": tf.gather(label_table, index), "mask": mask}
  else:
    n = source.num_examples(split_name)
    if n is None and process_count > 1:
      raise DatasetError(f"{source.name}: evaluating on several processes needs the size of "
                         f"split {split_name!r}, which TFDS does not know")
    split = tfds.split_for_jax_process(split_name, process_index=process_index,
                                       process_count=process_count)
    ds = source.builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32), 1))
    def load(image, label, mask):
      return {"image": image_fn(image), "label": label, "mask": mask}

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    pad = tf.data.Dataset.from_tensors({
        "image": tf.zeros(ds.element_spec["image"].shape),
        "label": tf.constant(0, tf.int32), "mask": tf.constant(0, tf.int32)}).repeat()
    if n is None:  # unknown size: every real example, then padding to a whole batch
      ds = ds.concatenate(pad.take(local - 1)).batch(local, drop_remainder=True)
    else:  # every process yields the same number of batches
      num_batches = math.ceil(math.ceil(n / process_count) / local)
      ds = ds.concatenate(pad).take(num_batches * local).batch(local)
    return iter(tfds.as_numpy(_threads(ds.prefetch(2), config)))
  ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(local)
  return iter(tfds.as_numpy(_threads(ds.prefetch(2), config)))
