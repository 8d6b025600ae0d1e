"""Classify image files with a trained or converted GoogLeNet.

  python -m googlenet_jax.tools.predict --workdir DIR IMAGE [IMAGE ...]
  python -m googlenet_jax.tools.predict --checkpoint DIR/checkpoints/STEP IMAGE ... [--json] [--top_k 5]

Prints the top-k classes with their probabilities for each image, preprocessed exactly as the
evaluation does (resize / centre crop / normalisation from the model directory's config.json, or
from --config). A file that cannot be read or decoded is reported on stderr and the others are
still classified. Exit status: 0 when at least one image was classified, 1 when none could be,
2 for a usage error (no checkpoint, bad flags).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Optional, Sequence

import numpy as np

from googlenet_jax.tools import cli


def load_image(path: str, config: Any) -> np.ndarray:
  """An image file -> the float32 (size, size, channels) array the evaluation would feed.
  Raises ValueError naming the file when it cannot be read or decoded."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import preprocessing  # pylint: disable=import-outside-toplevel
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, ValueError):
    raise ValueError(f"{path}: not a decodable image (JPEG, PNG, GIF or BMP expected)") from None
  return preprocessing.preprocess(image, tf.constant([0, 0], tf.int64), False, config).numpy()


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[dict]:
  order = np.argsort(-probs, kind="stable")[:k]
  return [{"index": int(i), "class": class_names[i], "probability": float(probs[i])}
          for i in order]


def predict_files(loaded, paths: Sequence[str], k: int = 5, batch_size: int = 32) -> list[dict]:
  """One record per path, in order: {"image", "top": [{"index", "class", "probability"}]} or
  {"image", "error"}."""
  import jax  # pylint: disable=import-outside-toplevel
  from googlenet_jax.models import probabilities  # pylint: disable=import-outside-toplevel
  records, images, good = [], [], []
  for path in paths:
    try:
      images.append(load_image(path, loaded.config))
      good.append(len(records))
      records.append({"image": path})
    except ValueError as e:
      records.append({"image": path, "error": str(e)})
  if images:
    apply = jax.jit(lambda v, x: probabilities(loaded.model.apply(v, x, train=False)))
    chunk = min(batch_size, len(images))
    probs = []
    for start in range(0, len(images), chunk):
      batch = np.stack(images[start:start + chunk])
      n = len(batch)
      if n < chunk:  # one compiled shape for every chunk
        batch = np.concatenate([batch, np.zeros((chunk - n,) + batch.shape[1:], batch.dtype)])
      probs.append(np.asarray(apply(loaded.variables, batch))[:n])
    probs = np.concatenate(probs)
    for i, p in zip(good, probs):
      records[i]["top"] = top_k(p, loaded.class_names, k)
  return records


def format_text(records: list[dict]) -> str:
  lines = []
  for r in records:
    if "top" not in r:
      continue
    lines.append(r["image"])
    for rank, t in enumerate(r["top"], 1):
      index = f"  (class {t['index']})" if t["class"] != f"class {t['index']}" else ""
      lines.append(f"  {rank}. {t['probability']:.4f}  {t['class']}{index}")
  return "\n".join(lines)


def run(argv: Sequence[str], flags) -> int:
  paths = list(argv[1:])
  if not paths:
    cli.fail("no image files given: python -m googlenet_jax.tools.predict --workdir DIR IMAGE...")
  if flags.top_k < 1:
    cli.fail(f"--top_k must be >= 1, got {flags.top_k}")
  from googlenet_jax import model_dir  # pylint: disable=import-outside-toplevel
  with cli.user_errors():
    loaded = model_dir.load_for_inference(flags.workdir, flags.checkpoint, flags.config,
                                          use_ema=flags.use_ema, ops=cli.model_ops())
  records = predict_files(loaded, paths, flags.top_k, flags.batch_size)
  for r in records:
    if "error" in r:
      print(f"error: {r['error']}", file=sys.stderr)
  if flags.json:
    print(json.dumps(records, indent=1))
  else:
    print(format_text(records))
  return 0 if any("top" in r for r in records) else 1


def define_flags(values, argv) -> None:
  """The command's flags, in the absl FlagValues `values` (`cli.parse_flags`)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  cli.define_model_flags(values, argv, "Config file, when the model directory has no "
                         "config.json or to change the preprocessing.")
  flags.DEFINE_integer("top_k", 5, "How many classes to print per image.", flag_values=values)
  flags.DEFINE_bool("json", False, "Print JSON instead of text.", flag_values=values)
  flags.DEFINE_integer("batch_size", 32, "Images per forward pass.", flag_values=values)
  flags.DEFINE_bool("use_ema", None, "Use the EMA weights (default: the config's eval_with_ema).",
                    flag_values=values)


def main(argv: Optional[Sequence[str]] = None) -> None:
  """The command on `argv` (default: sys.argv's arguments); exits with its status."""
  args, paths = cli.parse_flags(define_flags, argv, __doc__, positional=True)
  cli.setup()
  sys.exit(run(["predict", *paths], args))


if __name__ == "__main__":
  main()
