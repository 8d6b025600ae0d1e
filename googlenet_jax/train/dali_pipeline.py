"""NVIDIA DALI input pipeline (`config.data_loader = "dali"`): the contract of
`input_pipeline.train_batches` / `eval_batches`, decoding and augmenting with DALI.

Python chooses everything random, exactly as the tf.data path does: the example order and
augmentation positions (`input_pipeline.train_positions` / `eval_positions`), the inception
crop window and the flip of each example from [seed, position] (`augmentation`, which runs the
tf.data path's own TensorFlow ops, `preprocessing.crop_window` and the stateless flip draw, on
the image's header shape: no pixels). DALI gets each example's encoded bytes and its window
through `fn.external_source`, decodes only the window (`fn.decoders.image_slice`), resizes it
(linear, antialiased, rounded to uint8: a quarter less CPU per image than resizing to
float32, for about 0.001 more mean difference), flips and normalises it
(`fn.crop_mirror_normalize`). The two paths differ only by their decoders' and resize kernels'
rounding (tests/test_dali.py measures it).

Sources: image folders and TFDS datasets whose records hold encoded JPEG/PNG images (read by
`tfrecords.py`'s indexer and reader: no TensorFlow reads them). TFDS records are read in the
random-access order of folders (a permutation per epoch of all records), not tf.data's
streamed order of shuffled files: a resume and any process count give the same examples.

Devices: on the GPU backend the decode runs on the GPU (`device="mixed"`, nvJPEG and the
hardware decoder where present) and so does the rest; batches come as jax.Arrays sharded over
this process's devices (the DALI JAX plugin). Elsewhere every operator runs on the CPU
(`device_id=None`) and batches are numpy arrays.

DALI is imported inside the functions: importing googlenet_jax.train does not need it.
"""

from __future__ import annotations

import collections
import io
import itertools
import os
from typing import Any, Callable, Iterator, Optional

import numpy as np

from googlenet_jax.train import input_pipeline, preprocessing
from googlenet_jax.train.sources import DatasetError, Source

NOT_SUPPORTED = "not supported with data_loader='dali'"


def _dali():
  try:
    from nvidia import dali  # pylint: disable=import-outside-toplevel
    from nvidia.dali import fn, types  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("data_loader='dali' needs NVIDIA DALI: install googlenet_jax[dali] "
                      "(pip install -e '.[train,dali]')") from e
  return dali, fn, types


def check_config(config) -> None:
  """Raise ValueError for the options the tf.data path honours and this one does not."""
  problems = []
  if config.augment not in ("none", "inception_crop"):
    problems.append(f"augment={config.augment!r} is {NOT_SUPPORTED} (use 'none' or "
                    f"'inception_crop', or data_loader='tfdata')")
  if config.channels != 3:
    problems.append(f"channels={config.channels} is {NOT_SUPPORTED} (RGB only)")
  if problems:
    raise ValueError("\n".join(problems))


# --------------------------------------------------------------------------------------------
# The examples: encoded bytes, header shapes and labels, by index.


class _Examples:
  """Random access to a split's examples: `read(i)` (encoded bytes, label), `shape(i, bytes)`
  (h, w), `name(i)` (the file, for errors)."""

  def __init__(self, count: int, read: Callable[[int], tuple[bytes, int]],
               names: Callable[[int], str]):
    self.count, self.read, self.name = count, read, names
    self._shapes: dict[int, tuple[int, int]] = {}

  def __len__(self) -> int:
    return self.count

  def shape(self, i: int, data: bytes) -> tuple[int, int]:
    """(height, width) from the image's header (PIL reads no pixels for it)."""
    if i not in self._shapes:
      from PIL import Image  # pylint: disable=import-outside-toplevel
      try:
        with Image.open(io.BytesIO(data)) as im:
          self._shapes[i] = (im.size[1], im.size[0])
      except Exception as e:  # pylint: disable=broad-except
        raise DatasetError(f"{self.name(i)}: not a readable image ({e})") from None
    return self._shapes[i]


def _unsupported(source: Source) -> DatasetError:
  return DatasetError(f"data_loader='dali' needs JPEG/PNG files or records; use "
                      f"data_loader='tfdata' for {source.name} (its images are not encoded)")


def examples(source: Source, split_name: str) -> _Examples:
  """The split's examples, from a folder's files or a TFDS dataset's records."""
  if source.builder is not None:
    from googlenet_jax.train import tfrecords  # pylint: disable=import-outside-toplevel
    if not input_pipeline._is_encoded(source):  # pylint: disable=protected-access
      raise _unsupported(source)
    records = tfrecords.TfdsRecords(source.builder, split_name)
    return _Examples(len(records), records.image, records.name)
  split = source.splits[split_name]
  if split.paths is None:
    raise _unsupported(source)

  def read(i):
    with open(split.paths[i], "rb") as f:
      return f.read(), int(split.labels[i])

  return _Examples(len(split), read, lambda i: split.paths[i])


# --------------------------------------------------------------------------------------------
# Augmentation parameters, computed as the tf.data path computes them.


def augmentation(config) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, ...]]:
  """(shapes (B, 2) int, seeds (B, 2) int64) -> (anchors (B, 2), windows (B, 2), flips (B,))
  int32: each example's training crop window (y, x) and (h, w) and whether it is flipped,
  from the same TensorFlow ops on the same seeds as `preprocessing.preprocess`."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  crop = preprocessing.inception_crop(config, True)
  flip = config.augment != "none" and config.random_flip

  def one(args):
    shape, seed = args
    full = tf.concat([shape, [3]], 0)
    if crop:
      begin, size = preprocessing.crop_window(full, seed, config)
    else:
      begin, size = tf.zeros([3], tf.int32), full
    if flip:
      draw = tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_split(
          seed, 4)[1], minval=0, maxval=1.0)
      mirror = tf.cast(draw < 0.5, tf.int32)
    else:
      mirror = tf.constant(0, tf.int32)
    return begin[:2], size[:2], mirror

  @tf.function(input_signature=[tf.TensorSpec([None, 2], tf.int32),
                                tf.TensorSpec([None, 2], tf.int64)])
  def batch(shapes, seeds):
    return tf.map_fn(one, (shapes, seeds), fn_output_signature=(
        tf.TensorSpec([2], tf.int32), tf.TensorSpec([2], tf.int32), tf.TensorSpec([], tf.int32)))

  def run(shapes, seeds):
    return tuple(t.numpy() for t in batch(np.asarray(shapes, np.int32),
                                          np.asarray(seeds, np.int64)))

  return run


def eval_window(shape: tuple[int, int], config) -> tuple[np.ndarray, np.ndarray]:
  """The region of the decoded image (roi start, roi end; (y, x), float) that the evaluation
  resize maps onto size x size: the whole image, or with eval_crop_fraction < 1 the central
  crop of the shorter side resized to size / fraction, in input coordinates (the same scale
  and offset as `preprocessing._resize_shorter_side_and_center_crop`)."""
  size, fraction = config.image_size, config.eval_crop_fraction
  hw = np.asarray(shape, np.float32)
  if fraction >= 1.0:
    return np.zeros(2, np.float32), hw
  resized = np.round(hw * np.float32(size / fraction / hw.min())).astype(np.int32)
  offset = ((resized - size) // 2).astype(np.float32)
  scale = resized.astype(np.float32) / hw
  return offset / scale, (offset + size) / scale


# --------------------------------------------------------------------------------------------
# The DALI pipelines.


def _on_gpu() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.default_backend() == "gpu"


def _mean_std(config) -> tuple[list[float], list[float]]:
  norm = config.normalize
  return ([255 * m for m in preprocessing.MEANS[norm]],
          [255 * s for s in preprocessing.STDS[norm]])


def _build(feed: Iterator[tuple], batch_size: int, config, train: bool, device_id,
           gpu: bool):
  """A DALI pipeline over `feed`'s batches: training (bytes, anchor, window, mirror, label)
  or evaluation (bytes, roi_start, roi_end, label, mask) -> (image, label[, mask])."""
  dali, fn, types = _dali()
  size = config.image_size
  mean, std = _mean_std(config)
  threads = int(config.data_threads or 0) or os.cpu_count() or 1
  decoder = "mixed" if gpu else "cpu"

  @dali.pipeline_def(batch_size=batch_size, num_threads=threads, device_id=device_id,
                     prefetch_queue_depth=config.prefetch_batches,
                     exec_dynamic=True)
  def pipe():
    if train:
      data, first, second, mirror, label = fn.external_source(
          source=feed, num_outputs=5, batch=True,
          dtype=[types.UINT8, types.INT32, types.INT32, types.INT32, types.INT32])
      # The crop window (without inception_crop: the whole image).
      image = fn.decoders.image_slice(data, first, second, device=decoder,
                                      output_type=types.RGB, normalized_anchor=False,
                                      normalized_shape=False, axis_names="HW")
      image = fn.resize(image, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                        antialias=True)
      extra = ()
    else:
      data, first, second, label, mask = fn.external_source(
          source=feed, num_outputs=5, batch=True,
          dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.INT32])
      image = fn.decoders.image(data, device=decoder, output_type=types.RGB)
      image = fn.resize(image, roi_start=first, roi_end=second, roi_relative=False,
                        resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR,
                        antialias=True)
      mirror, extra = 0, (mask.gpu() if gpu else mask,)
    image = fn.crop_mirror_normalize(image, mirror=mirror, mean=mean, std=std,
                                     dtype=types.FLOAT, output_layout="HWC")
    return (image, label.gpu() if gpu else label) + extra

  p = pipe()
  p.build()
  return p


class _Fed:
  """The examples handed to DALI, batch by batch: the external source's iterator, remembering
  the recent batches' examples so that a decoding error can name the file."""

  def __init__(self, batches: Iterator[tuple]):
    self._batches = batches
    self.recent: collections.deque = collections.deque(maxlen=8)

  def __iter__(self):
    return self

  def __next__(self):
    names, arrays = next(self._batches)
    self.recent.append(names)
    return arrays


def _decode_error(fed: _Fed, error: Exception) -> DatasetError:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for names in fed.recent:
    for name, data in names:
      try:
        with Image.open(io.BytesIO(data)) as im:
          im.load()
      except Exception as e:  # pylint: disable=broad-except
        return DatasetError(f"{name}: the image cannot be decoded ({e})")
  first = str(error).strip().splitlines()
  return DatasetError("DALI failed on a batch of " + ", ".join(
      n for names in fed.recent for n, _ in names[:4]) + f": {first[0] if first else error}")


def _run(pipe, fed: _Fed, keys: tuple[str, ...], sharding) -> Iterator[dict]:
  """The pipeline's batches until the feed ends, as numpy (CPU) or, with `sharding`, as
  jax.Arrays sharded over this process's devices."""
  if sharding is not None:
    from nvidia.dali.plugin import jax as dali_jax  # pylint: disable=import-outside-toplevel
    iterator = dali_jax.DALIGenericIterator(pipe, output_map=list(keys), sharding=sharding)
    batches = iter(iterator)
  else:
    def outputs():
      while True:
        try:
          outs = pipe.run()
        except StopIteration:  # the feed has ended
          return
        yield dict(zip(keys, (np.asarray(out.as_array()) for out in outs)))
    batches = outputs()
  while True:
    try:
      batch = next(batches)
    except StopIteration:
      return
    except RuntimeError as e:
      raise _decode_error(fed, e) from None
    yield batch


def _local_sharding(sharding):
  """This process's devices as a 1-D mesh over the batch axis (train/parallel.py's axis)."""
  if sharding is not None or not _on_gpu():
    return sharding
  import jax  # pylint: disable=import-outside-toplevel
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train.state import AXIS  # pylint: disable=import-outside-toplevel
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (AXIS,))
  return NamedSharding(mesh, PartitionSpec(AXIS))


def _device_id(gpu: bool) -> Optional[int]:
  if not gpu:
    return None
  import jax  # pylint: disable=import-outside-toplevel
  return jax.local_devices()[0].local_hardware_id


# --------------------------------------------------------------------------------------------
# The batches.


def train_batches(source: Source, config, start_step: int, num_steps: int,
                  process_index: int = 0, process_count: int = 1,
                  sharding: Any = None) -> Iterator[dict]:
  """This process's part of the global training batches for steps start_step..num_steps-1:
  dicts of `image` (local_batch, size, size, 3) float32 and `label` int32, the examples and
  augmentation of `input_pipeline.train_batches` on a random-access source. `sharding` (GPU):
  how the jax.Arrays lie over this process's devices (default: split over them)."""
  check_config(config)
  split = examples(source, source.train_split)
  local = config.batch_size // process_count
  per_epoch = input_pipeline.steps_per_epoch(source, config)
  positions = input_pipeline.train_positions(len(split), per_epoch, config, start_step,
                                             num_steps, process_index, process_count)
  augment = augmentation(config)

  def feed():
    while True:
      chunk = list(itertools.islice(positions, local))
      if len(chunk) < local:
        return
      read = [split.read(i) for i, _ in chunk]
      named = [(split.name(i), data) for (i, _), (data, _) in zip(chunk, read)]
      shapes = [split.shape(i, data) for (i, _), (data, _) in zip(chunk, read)]
      seeds = [(config.seed, position) for _, position in chunk]
      anchors, windows, flips = augment(shapes, seeds)
      yield named, ([np.frombuffer(d, np.uint8) for d, _ in read], list(anchors),
                    list(windows), list(flips), [np.asarray(y, np.int32) for _, y in read])

  gpu = _on_gpu()
  fed = _Fed(feed())
  pipe = _build(fed, local, config, True, _device_id(gpu), gpu)
  return _run(pipe, fed, ("image", "label"), _local_sharding(sharding))


def eval_batches(source: Source, config, split_name: Optional[str] = None,
                 process_index: int = 0, process_count: int = 1,
                 image_fn: Optional[Any] = None, sharding: Any = None) -> Iterator[dict]:
  """Dicts with `image`, `label` and `mask` (1 for real examples, 0 for padding), as
  `input_pipeline.eval_batches`: every example once, the last batch padded, every process the
  same number of batches. `image_fn` (other evaluation crops) is a TensorFlow function of the
  decoded image: use data_loader='tfdata' for it."""
  check_config(config)
  if image_fn is not None:
    raise ValueError(f"eval_batches(image_fn=...) (e.g. 10-crop evaluation) is {NOT_SUPPORTED}")
  split = examples(source, split_name or source.eval_split)
  batch = config.eval_batch_size or config.batch_size
  local = batch // process_count
  positions = input_pipeline.eval_positions(len(split), batch, process_index, process_count)

  def feed():
    while True:
      chunk = list(itertools.islice(positions, local))
      if not chunk:
        return
      read = [split.read(i) for i, _ in chunk]
      named = [(split.name(i), data) for (i, _), (data, _) in zip(chunk, read)]
      rois = [eval_window(split.shape(i, data), config)
              for (i, _), (data, _) in zip(chunk, read)]
      yield named, ([np.frombuffer(d, np.uint8) for d, _ in read], [r[0] for r in rois],
                    [r[1] for r in rois], [np.asarray(y, np.int32) for _, y in read],
                    [np.asarray(m, np.int32) for _, m in chunk])

  gpu = _on_gpu()
  fed = _Fed(feed())
  pipe = _build(fed, local, config, False, _device_id(gpu), gpu)
  return _run(pipe, fed, ("image", "label", "mask"), _local_sharding(sharding))
