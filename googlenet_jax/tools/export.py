"""Export a trained or converted GoogLeNet for serving outside this package.

  python -m googlenet_jax.tools.export --workdir DIR --format jax --out model.jax
  python -m googlenet_jax.tools.export --workdir DIR --format onnx --out model.onnx
  python -m googlenet_jax.tools.export --workdir DIR --format savedmodel --out saved_model/
  (or `googlenet-jax export ...`)

Every format is the evaluation-mode network (BatchNorm running statistics, no dropout, no aux
heads) with its weights inside, from float32 NHWC images of the model's image_size, with any
batch size, to float32 logits (batch, num_classes):

  jax         `jax.export` serialized bytes (symbolic batch dimension "b"); load with
              `jax.export.deserialize(bytes).call(images)`. Lowered for --platforms (cpu).
  onnx        an ONNX model (input "images", output "logits", batch dimension "batch") that
              onnxruntime runs. Made by jax2onnx straight from the JAX function, not by
              jax2tf + tf2onnx: jax2tf has only native serialization, so its graph is one
              XlaCallModule op, which tf2onnx cannot convert.
              jax2onnx is kept below 0.13 (0.13+ requires orbax-checkpoint<0.11.37, below this
              package's). Its generic lax.reduce_window_max lowering makes a 4-D MaxPool that
              onnxruntime refuses, so the max pools are exported as an explicit -inf pad plus
              `flax.linen.max_pool` (same values), which jax2onnx lowers to an ONNX MaxPool.
  savedmodel  a TensorFlow SavedModel (jax2tf, native serialization: an XlaCallModule op,
              weights as tf.Variables) with a `serving_default` signature
              images [None, H, W, C] -> {"logits"}; load with `tf.saved_model.load`. Plain
              jax2tf rather than orbax-export: one function, no extra layer.

Preprocessing. `transform_input` (torchvision's re-normalisation) is inside every export, as
it is inside the network. The image preprocessing (decode, resize / centre crop, mean/std
normalisation: `googlenet_jax.train.preprocessing.preprocess` in evaluation mode) is not: it
works on images of any size, with TensorFlow's antialiased resize, which the other runtimes do
not reproduce exactly. It is written next to the export as JSON, with the class names:
PATH.preprocessing.json for jax and onnx (the ONNX file also carries it in its metadata, key
"preprocessing"), SAVEDMODEL/assets.extra/preprocessing.json for savedmodel.

Exit status 0 on success, 2 for a usage error (no checkpoint, bad flag, missing optional
dependency: `pip install 'googlenet_jax[export]'`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from googlenet_jax.tools import cli

FORMATS = ("jax", "onnx", "savedmodel")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
PREPROCESSING_FILE = "preprocessing.json"
PREPROCESSING_VERSION = 1
INSTALL = "pip install 'googlenet_jax[export]'"
# What each format needs beyond the core package, as (module, pip name).
REQUIREMENTS = {
    "jax": (),
    "onnx": (("jax2onnx", "jax2onnx"), ("onnx", "onnx")),
    "savedmodel": (("tensorflow", "tensorflow-cpu"),),
}

log = logging.getLogger("googlenet_jax.export")


# --------------------------------------------------------------------------------------------
# The function exported, and its preprocessing.


def onnx_max_pool(x, window: int, stride: int, pads):
  """`ops.lax_max_pool` as an explicit -inf pad and a VALID `flax.linen.max_pool`: the same
  values, in the form jax2onnx lowers to an ONNX MaxPool (its generic reduce_window_max makes
  a 4-D pool that onnxruntime does not run)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  pads = tuple(tuple(int(v) for v in p) for p in pads)
  if any(v for p in pads for v in p):
    x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),), constant_values=-jnp.inf)
  # Keyword arguments and a lookup at call time: jax2onnx patches `nn.max_pool` while converting.
  return nn.max_pool(x, window_shape=(window, window), strides=(stride, stride), padding="VALID")


def export_ops(fmt: str):
  """The convolution / pooling ops the exported network is built with: plain `lax` (XLA:CPU's
  fast ops are custom calls that do not serialize portably), ONNX-friendly max pools for onnx."""
  from googlenet_jax import ops  # pylint: disable=import-outside-toplevel
  if fmt == "onnx":
    return ops.Ops("lax+onnx_max_pool", ops.lax_conv2d, onnx_max_pool, ops.lax_avg_pool)
  return ops.LAX


def input_shape(config: Any) -> tuple[int, int, int]:
  size = int(config.image_size)
  return size, size, int(config.channels)


def logits_fn(loaded) -> Callable:
  """images (batch, H, W, C) float32 -> float32 logits, the weights closed over."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model, variables = loaded.model, loaded.variables
  return lambda images: model.apply(variables, images, train=False).astype(jnp.float32)


def logits_fn_of_variables(loaded) -> Callable:
  """(variables, images) -> float32 logits: the weights as an argument (SavedModel variables)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = loaded.model
  return lambda variables, images: model.apply(variables, images, train=False).astype(
      jnp.float32)


def preprocessing_record(loaded, fmt: str) -> dict:
  """The machine-readable preprocessing: what a serving client does to a decoded image before
  the export, exactly as `preprocessing.preprocess(image, seed, train=False, config)` does."""
  from googlenet_jax.train import preprocessing  # pylint: disable=import-outside-toplevel
  config = loaded.config
  size, _, channels = input_shape(config)
  norm = config.normalize
  fraction = float(config.eval_crop_fraction)
  steps: list[dict] = [
      {"op": "decode", "channels": 3, "dtype": "uint8",
       "note": "RGB; tf.io.decode_image(data, channels=3)"},
  ]
  unit = 1 / 255  # the decoded 0..255 values are resized as they are, then normalised
  if channels == 1:
    steps.append({"op": "to_float", "scale": 1 / 255, "note": "uint8 / 255 -> [0, 1] float32"})
    steps.append({"op": "rgb_to_grayscale", "weights": [0.2989, 0.587, 0.114],
                  "note": "tf.image.rgb_to_grayscale"})
    unit = 1.0
  resize = {"method": "bilinear", "antialias": True, "half_pixel_centers": True,
            "note": "tf.image.resize(..., antialias=True)"}
  if fraction >= 1.0:
    steps.append({"op": "resize", "height": size, "width": size, **resize})
  else:
    steps.append({"op": "resize_shorter_side", "scale": f"{size} / {fraction} / min(h, w)",
                  "target": size / fraction, "rounding": "round half to even (tf.round) of "
                  "h * scale and w * scale", **resize})
    steps.append({"op": "center_crop", "height": size, "width": size,
                  "offset": "((h - height) // 2, (w - width) // 2)",
                  "note": "tf.image.resize_with_crop_or_pad"})
  scale, offset = preprocessing.normalization(norm, channels, unit)
  steps.append({"op": "normalize", "scale": scale.tolist(), "offset": offset.tolist(),
                "formula": "float32 x * scale + offset per channel (last axis), x the resized "
                           "values (0..255 for uint8 input): (x * unit - mean) / std",
                "unit": unit, "mean": list(preprocessing.MEANS[norm][:channels]),
                "std": list(preprocessing.STDS[norm][:channels])})
  steps.append({"op": "stack", "layout": "NHWC", "note": "a batch of any size"})
  return {
      "format_version": PREPROCESSING_VERSION,
      "export_format": fmt,
      "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NHWC",
                "shape": [None, size, size, channels]},
      "output": {"name": OUTPUT_NAME, "dtype": "float32",
                 "shape": [None, int(loaded.model.num_classes)],
                 "note": "logits; softmax over the last axis for probabilities"},
      "preprocessing": {
          "inside_export": (["transform_input"] if loaded.model.transform_input else []),
          "before_export": steps,
          "reference": "googlenet_jax.train.preprocessing.preprocess(image, seed, "
                       "train=False, config)",
          "normalize": norm, "image_size": size, "channels": channels,
          "eval_crop_fraction": fraction,
      },
      "transform_input": bool(loaded.model.transform_input),
      "model": {"variant": loaded.model.variant, "num_classes": int(loaded.model.num_classes),
                "checkpoint": loaded.step_dir},
      "class_names": list(loaded.class_names),
  }


def preprocessing_path(fmt: str, out: str) -> str:
  if fmt == "savedmodel":
    return os.path.join(out, "assets.extra", PREPROCESSING_FILE)
  return f"{out}.{PREPROCESSING_FILE}"


# --------------------------------------------------------------------------------------------
# The formats.


def export_jax(loaded, out: str, platforms: Sequence[str]) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  shape = jax.export.symbolic_shape("b") + input_shape(loaded.config)
  exported = jax.export.export(jax.jit(logits_fn(loaded)), platforms=tuple(platforms))(
      jax.ShapeDtypeStruct(shape, np.float32))
  _write_bytes(out, exported.serialize())


@contextlib.contextmanager
def _quiet_jax2onnx():
  """jax2onnx 0.12 prints debugging lines on stdout, and logs a warning with a traceback for
  each of its plugins for other libraries that fails to import: keep both off ours."""
  logger = logging.getLogger("jax2onnx")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
      yield
  finally:
    logger.setLevel(level)


def export_onnx(loaded, out: str, opset: int, record: dict) -> None:
  fn = logits_fn(loaded)
  with _quiet_jax2onnx():
    import jax2onnx  # pylint: disable=import-outside-toplevel
    model = jax2onnx.to_onnx(fn, [("batch",) + input_shape(loaded.config)],
                             model_name="googlenet", opset=opset, input_names=[INPUT_NAME],
                             output_names=[OUTPUT_NAME])
  entry = model.metadata_props.add()
  entry.key, entry.value = "preprocessing", json.dumps(record)
  _write_bytes(out, model.SerializeToString())


def export_savedmodel(loaded, out: str, platforms: Sequence[str]) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from jax.experimental import jax2tf  # pylint: disable=import-outside-toplevel
  h, w, c = input_shape(loaded.config)
  converted = jax2tf.convert(logits_fn_of_variables(loaded), with_gradient=False,
                             polymorphic_shapes=[None, f"(b, {h}, {w}, {c})"],
                             native_serialization_platforms=tuple(platforms))
  leaves, treedef = jax.tree.flatten(loaded.variables)
  module = tf.Module()
  module.weights = [tf.Variable(np.asarray(a), trainable=False) for a in leaves]

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, h, w, c], tf.float32, name=INPUT_NAME)])
  def serve(images):
    variables = jax.tree.unflatten(treedef, list(module.weights))
    return {OUTPUT_NAME: converted(variables, images)}

  module.serve = serve
  tf.saved_model.save(module, out, signatures={"serving_default": serve})


def _write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_preprocessing(path: str, record: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  _write_bytes(path, (json.dumps(record, indent=1) + "\n").encode())


# --------------------------------------------------------------------------------------------
# The command.


def missing_requirements(fmt: str) -> list[str]:
  import importlib.util  # pylint: disable=import-outside-toplevel
  return [pip for module, pip in REQUIREMENTS[fmt] if importlib.util.find_spec(module) is None]


def check_flags(fmt: Optional[str], out: Optional[str], platforms: Sequence[str]) -> None:
  """Usage errors, before anything is loaded."""
  if fmt not in FORMATS:
    cli.fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
  if not out:
    cli.fail(f"--out PATH is needed (the {fmt} file or directory to write)")
  missing = missing_requirements(fmt)
  if missing:
    cli.fail(f"--format {fmt} needs {' and '.join(missing)}: {INSTALL}")
  if fmt == "savedmodel" and os.path.isfile(out):
    cli.fail(f"--out {out}: a file; a SavedModel is a directory")
  if fmt != "savedmodel" and os.path.isdir(out):
    cli.fail(f"--out {out}: a directory; --format {fmt} writes one file")
  if not platforms:
    cli.fail("--platforms needs at least one of cpu, cuda, rocm, tpu")
  if fmt == "onnx" and list(platforms) != ["cpu"]:
    cli.fail("--platforms is for --format jax and savedmodel (an ONNX model is not lowered)")


def export(loaded, fmt: str, out: str, *, platforms: Sequence[str] = ("cpu",),
           opset: int = 21) -> str:
  """Write `loaded` (model_dir.LoadedModel, built with `export_ops(fmt)`) as `fmt` at `out`,
  and its preprocessing record next to it. Returns the record's path."""
  record = preprocessing_record(loaded, fmt)
  if fmt == "jax":
    export_jax(loaded, out, platforms)
  elif fmt == "onnx":
    export_onnx(loaded, out, opset, record)
  elif fmt == "savedmodel":
    export_savedmodel(loaded, out, platforms)
  else:
    raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
  path = preprocessing_path(fmt, out)
  write_preprocessing(path, record)
  return path


def run(argv: Sequence[str], flags, setup: Callable[[], None] = cli.setup) -> int:
  """The command on parsed `flags`: usage checks, then `setup()` (the process set-up), the
  model loaded, the export written. Returns the exit status."""
  if len(argv) > 1:
    cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
  fmt = flags.format.lower() if flags.format else flags.format
  platforms = [p.strip().lower() for p in flags.platforms if p.strip()]
  check_flags(fmt, flags.out, platforms)
  setup()
  from googlenet_jax import model_dir  # pylint: disable=import-outside-toplevel
  with cli.user_errors():
    loaded = model_dir.load_for_inference(flags.workdir, flags.checkpoint,
                                          getattr(flags, "config", None),
                                          use_ema=flags.use_ema, ops=export_ops(fmt))
  start = time.perf_counter()
  path = export(loaded, fmt, flags.out, platforms=platforms, opset=flags.opset)
  log.info("wrote %s (%s, %.1f s) and %s", flags.out, fmt, time.perf_counter() - start, path)
  return 0


def define_flags(values, argv) -> None:
  """The command's flags, in the absl FlagValues `values` (`cli.parse_flags`)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  define = dict(flag_values=values)
  cli.define_model_flags(values, argv, "Config file, when the model directory has no "
                         "config.json or to change the preprocessing.")
  flags.DEFINE_string("format", None, f"What to write: {', '.join(FORMATS)}.", **define)
  flags.DEFINE_string("out", None, "The file (jax, onnx) or directory (savedmodel) to write.",
                      **define)
  flags.DEFINE_list("platforms", ["cpu"], "jax and savedmodel: the platforms to lower for "
                    "(cpu, cuda, rocm, tpu).", **define)
  flags.DEFINE_integer("opset", 21, "onnx: the ONNX opset.", **define)
  flags.DEFINE_bool("use_ema", None, "Use the EMA weights (default: the config's eval_with_ema).",
                    **define)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command on `argv` (default: sys.argv's arguments); exits with its status."""
  args, _ = cli.parse_flags(define_flags, argv, __doc__)
  sys.exit(run(["export"], args))


if __name__ == "__main__":
  main()
