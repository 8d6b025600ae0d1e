"""The tf.data input pipeline: a `sources.Source` -> per-process batches as numpy arrays.

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

import math
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from googlenet_jax.train.preprocessing import decode, decode_and_preprocess, preprocess
from googlenet_jax.train.sources import DatasetError, Source, Split


def keep_tensorflow_off_accelerators() -> None:
  """TensorFlow only feeds the input pipeline: hide the GPUs and TPUs from it (and TFDS's
  progress bars), so that it never takes an accelerator's memory from JAX. Process-wide: for
  a program's `main` (train.py, the tools), before TensorFlow first runs an op."""
  tf.config.set_visible_devices([], "GPU")
  if tf.config.list_physical_devices("TPU"):
    tf.config.set_visible_devices([], "TPU")
  tfds.display_progress_bar(False)


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
