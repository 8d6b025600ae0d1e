"""Top-1 / top-5 of a trained or converted GoogLeNet on a dataset split.

  python -m googlenet_jax.tools.evaluate --workdir DIR [--config FILE] [--split NAME] [--multi_crop]

The dataset and preprocessing come from --config (with --config.field=value overrides), or from
the model directory's config.json when --config is left out; the network (variant, num_classes,
aux_logits, transform_input) always comes from config.json, since it defines the weights.

Single centre crop (the evaluation train.py runs), or with --multi_crop the 10-crop protocol:
the image's shorter side resized to image_size / eval_crop_fraction (0.875 when the config
resizes whole images), the central square, its 4 corner and centre crops of image_size, and
their mirror images; the 10 softmax outputs are averaged.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Optional, Sequence

import numpy as np

from googlenet_jax.tools import cli

NUM_CROPS = 10


# --------------------------------------------------------------------------------------------
# The 10 crops (TensorFlow ops, run in the input pipeline).


def multi_crop_resize(config) -> int:
  """Side of the square the crops are taken from."""
  fraction = config.eval_crop_fraction
  fraction = fraction if fraction < 1.0 else 0.875
  return int(round(config.image_size / fraction))


def five_crops(square, size: int):
  """[top-left, top-right, bottom-left, bottom-right, centre] `size` crops of a square HWC
  tensor."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  side = square.shape[0]
  far, mid = side - size, (side - size) // 2
  return [tf.image.crop_to_bounding_box(square, top, left, size, size)
          for top, left in ((0, 0), (0, far), (far, 0), (far, far), (mid, mid))]


def ten_crops(image, config):
  """uint8 HWC image -> float32 (10, size, size, channels): the five crops, then their mirrors,
  normalised as `config.normalize` says."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import preprocessing  # pylint: disable=import-outside-toplevel
  size, channels = config.image_size, config.channels
  side = multi_crop_resize(config)
  image = tf.image.convert_image_dtype(image, tf.float32)
  if image.shape[-1] == 1 and channels == 3:
    image = tf.image.grayscale_to_rgb(image)
  elif image.shape[-1] == 3 and channels == 1:
    image = tf.image.rgb_to_grayscale(image)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = side / tf.reduce_min(shape)
  image = tf.image.resize(image, tf.cast(tf.round(shape * scale), tf.int32), antialias=True)
  square = tf.image.resize_with_crop_or_pad(image, side, side)
  square.set_shape((side, side, channels))
  crops = five_crops(square, size)
  crops = tf.stack(crops + [tf.image.flip_left_right(c) for c in crops])
  norm = config.normalize
  mean = tf.constant(preprocessing.MEANS[norm][:channels], tf.float32)
  std = tf.constant(preprocessing.STDS[norm][:channels], tf.float32)
  crops = (crops - mean) / std
  crops.set_shape((NUM_CROPS, size, size, channels))
  return crops


# --------------------------------------------------------------------------------------------
# Evaluation.


def multi_crop_eval_step(state, batch: dict, *, model):
  """Like `training.eval_step` on (batch, crops, H, W, C) images: the crops' softmax outputs
  are averaged; the loss is the negative log of the averaged probability of the label."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import steps  # pylint: disable=import-outside-toplevel
  images = batch["image"]
  b, n = images.shape[:2]
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = model.apply(variables, images.reshape((b * n,) + images.shape[2:]), train=False)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).reshape(b, n, -1).mean(axis=1)
  labels, mask = batch["label"], batch["mask"].astype(jnp.float32)
  nll = -jnp.log(jnp.take_along_axis(probs, labels[:, None], axis=-1)[:, 0] + 1e-12)
  sums = {"loss": (nll * mask).sum(),
          "top1": (steps.topk_correct(probs, labels, 1) * mask).sum(),
          "top5": (steps.topk_correct(probs, labels, 5) * mask).sum(),
          "count": mask.sum()}
  return lax.psum(sums, steps.AXIS)


def evaluate_model(loaded, config: Any, split: Optional[str] = None,
                   multi_crop: bool = False) -> dict:
  """{"top1", "top5", "loss", "count", "split", "crops"} of `loaded` (model_dir.LoadedModel)
  on `split` (default: the dataset's evaluation split) of `config.dataset`, on every local
  device."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from googlenet_jax import train as training  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import input_pipeline, sources  # pylint: disable=import-outside-toplevel
  if not config.get("dataset"):
    raise ValueError("the config names no dataset: pass --config FILE (e.g. the training config)")
  parallel = training.Parallel(config.parallel)
  batch = config.eval_batch_size or config.batch_size
  if batch % jax.device_count():
    raise ValueError(f"eval_batch_size {batch} must be a multiple of the device count "
                     f"{jax.device_count()}")
  source = sources.open_source(config)
  if loaded.model.num_classes < source.num_classes:
    raise ValueError(f"the model has {loaded.model.num_classes} classes, the dataset "
                     f"{source.name} {source.num_classes}")
  split = split or source.eval_split
  if source.builder is None and split not in source.splits:
    raise ValueError(f"{source.name} has no split {split!r}; it has {sorted(source.splits)}")
  model = loaded.model.clone(bn_axis_name=training.AXIS)
  state = training.TrainState(
      step=jnp.zeros((), jnp.int32), params=loaded.variables["params"],
      batch_stats=loaded.variables.get("batch_stats") or {}, opt_state=None, ema_params=None,
      rng=np.zeros((2,), np.uint32))
  state = parallel.replicate(state)
  if multi_crop:
    step = functools.partial(multi_crop_eval_step, model=model)
    image_fn = lambda image: ten_crops(image, config)
  else:
    step = functools.partial(training.eval_step, model=model)
    image_fn = None
  p_eval = parallel.compile(step)
  totals = None
  for b in input_pipeline.eval_batches(source, config, split, jax.process_index(),
                                       jax.process_count(), image_fn=image_fn):
    sums = p_eval(state, parallel.batch(b))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError(f"{source.name} split {split!r} is empty")
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  count = max(totals["count"], 1.0)
  return {"top1": totals["top1"] / count, "top5": totals["top5"] / count,
          "loss": totals["loss"] / count, "count": int(totals["count"]), "split": split,
          "crops": NUM_CROPS if multi_crop else 1}


def format_result(result: dict) -> str:
  crops = "10 crops" if result["crops"] == NUM_CROPS else "single centre crop"
  return (f"top-1 {result['top1']:.4f}  top-5 {result['top5']:.4f}  loss {result['loss']:.4f}"
          f"  on {result['count']} examples ({result['split']}, {crops})")


def define_flags(values, argv) -> None:
  """The command's flags, in the absl FlagValues `values` (`cli.parse_flags`)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  define = dict(flag_values=values)
  cli.define_model_flags(values, argv, "Dataset and preprocessing config (default: the model "
                         "directory's config.json).")
  flags.DEFINE_string("split", None, "Split to evaluate (default: the dataset's eval split).",
                      **define)
  flags.DEFINE_bool("multi_crop", False, "10 crops (4 corners + centre, and mirrors) per image, "
                    "softmax averaged.", **define)
  flags.DEFINE_bool("use_ema", None, "Use the EMA weights (default: the config's eval_with_ema).",
                    **define)
  flags.DEFINE_bool("json", False, "Print the result as JSON.", **define)
  flags.DEFINE_integer("cpu_devices", None, "Simulate this many CPU devices (testing).", **define)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command on `argv` (default: sys.argv's arguments); exits with its status."""
  args, _ = cli.parse_flags(define_flags, argv, __doc__)
  cli.setup(lambda: cli.simulate_cpu_devices(args.cpu_devices))
  from googlenet_jax import model_dir  # pylint: disable=import-outside-toplevel
  with cli.user_errors():
    loaded = model_dir.load_for_inference(args.workdir, args.checkpoint, args.config,
                                          use_ema=args.use_ema, ops=cli.model_ops())
    result = evaluate_model(loaded, loaded.config, args.split, args.multi_crop)
  print(json.dumps(result) if args.json else format_result(result))
  sys.exit(0)


if __name__ == "__main__":
  main()
