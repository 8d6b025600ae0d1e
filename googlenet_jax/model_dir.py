"""Model directories: what `predict`, `evaluate`, `convert` and fine-tuning (`init_from`) read.

    DIR/config.json          the config the model was trained (or converted) with, as JSON,
                             with `num_classes` resolved and the dataset's `class_names`
    DIR/checkpoints/<step>/  Orbax checkpoints: train.py's whole TrainState, or convert's
                             {"params", "batch_stats"}
    DIR/best/<step>/         the best checkpoint (train.py with `keep_best`)

Inference restores only `params` and `batch_stats` (or `ema_params`), never the optimiser state,
onto one device, whatever the device count the checkpoint was written on. `create_model` is the
one factory of the network a config describes, for inference and for training
(`googlenet_jax.train.state`). Neither TensorFlow nor `googlenet_jax.train` is imported here (the
converter imports PyTorch, which must load before TensorFlow); Orbax and ml_collections are
imported where they are used.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from googlenet_jax import variants
from googlenet_jax.models import GoogLeNet
from googlenet_jax.ops import LAX, Ops

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
# The config fields that define the network (the rest say how to feed and train it).
MODEL_FIELDS = ("variant", "num_classes", "aux_logits", "transform_input")
# The config fields that say how to feed it an image: every config.json holds them.
FEEDING_FIELDS = ("image_size", "channels", "normalize", "eval_crop_fraction")
# Heads whose shape follows num_classes: replaced rather than loaded when fine-tuning.
CLASSIFIER_PATHS = (("classifier",), ("aux_after_4a", "fc2"), ("aux_after_4d", "fc2"))


class ModelDirError(ValueError):
  """A model directory or checkpoint that cannot be used; the message says why, in one line."""


# --------------------------------------------------------------------------------------------
# config.json


def config_to_dict(config: Any) -> dict:
  """A ConfigDict (or dict) as plain JSON-able values (tuples become lists)."""
  raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(raw, default=str))


def write_config(directory: str, config: Any, *, num_classes: int,
                 class_names: Optional[list[str]] = None) -> str:
  """Write DIR/config.json (atomically): the config, `num_classes` resolved, class names."""
  record = config_to_dict(config)
  record["num_classes"] = int(num_classes)
  missing = [f for f in ("variant",) + FEEDING_FIELDS if f not in record]
  if missing:
    raise ValueError(f"a model config needs {', '.join(missing)} (how the network is fed); "
                     "the record holds " + ", ".join(sorted(record)))
  if class_names is not None:
    record["class_names"] = [str(n) for n in class_names]
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, CONFIG_FILE)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None if there is no such file; OSError or ValueError for one
  that cannot be read or parsed."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def read_config(directory: str) -> Optional[dict]:
  path = os.path.join(directory, CONFIG_FILE)
  try:
    record = read_json(path)
  except (OSError, ValueError) as e:
    raise ModelDirError(f"{path}: unreadable ({e})") from None
  if record is None:
    return None
  if not isinstance(record, dict) or "variant" not in record:
    raise ModelDirError(f"{path}: not a model config (no 'variant')")
  return record


def imagenet_class_names() -> list[str]:
  """The 1,000 ImageNet class names (package data, from torchvision's weights metadata)."""
  path = os.path.join(os.path.dirname(__file__), "data", "imagenet_classes.txt")
  with open(path) as f:
    return [line.rstrip("\n") for line in f if line.strip()]


def class_names(record: dict) -> list[str]:
  """Names for every classifier output: the dataset's, ImageNet's for 1000 classes, or
  "class <i>"."""
  n = int(record["num_classes"])
  names = list(record.get("class_names") or [])
  if not names and n == 1000:
    names = imagenet_class_names()
  return names[:n] + [f"class {i}" for i in range(len(names), n)]


def create_model(config: Any, num_classes: Optional[int] = None, ops: Ops = LAX, *,
                 bn_axis_name: Optional[str] = None) -> GoogLeNet:
  """The network a config (a ConfigDict, or a config.json record) describes. `num_classes`
  None: the config's; `ops` as `GoogLeNet.ops` (`googlenet_jax.cpu.ops()` on CPU);
  `bn_axis_name` the mapped axis BatchNorm averages its batch statistics over in training (none
  for inference). `float64` takes effect under `jax_enable_x64` (train.py turns it on).
  A converted model's record holds the network and feeding fields only: a field it lacks
  (half_precision, float64, dropout, ...) is off or the layout's own, as GoogLeNet's own
  arguments default."""
  variant = config.get("variant")
  if variant not in variants.LAYOUTS:
    raise ModelDirError(f"unknown variant {variant!r} in the model config; expected one of "
                        f"{sorted(variants.LAYOUTS)}")
  dtype = jnp.bfloat16 if config.get("half_precision") else None
  param_dtype = jnp.float32
  if config.get("float64") and jax.config.jax_enable_x64:
    dtype = param_dtype = jnp.float64
  return GoogLeNet(variant=variant,
                   num_classes=int(config["num_classes"] if num_classes is None else num_classes),
                   aux_logits=config.get("aux_logits"),
                   transform_input=bool(config.get("transform_input", False)),
                   dropout=config.get("dropout"), aux_dropout=config.get("aux_dropout"),
                   dtype=dtype, param_dtype=param_dtype, bn_axis_name=bn_axis_name, ops=ops)


# --------------------------------------------------------------------------------------------
# Finding and restoring checkpoints.


def _steps(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _is_step_dir(path: str) -> bool:
  return os.path.isdir(os.path.join(path, "default")) or os.path.exists(
      os.path.join(path, "_CHECKPOINT_METADATA"))


def locate(workdir: Optional[str] = None, checkpoint: Optional[str] = None) -> tuple[str, str]:
  """(checkpoint step directory, model directory holding config.json).

  `workdir`: its newest checkpoint. `checkpoint`: a step directory (DIR/checkpoints/12,
  DIR/best/40), a folder of steps (its newest), or a model directory.
  """
  if bool(workdir) == bool(checkpoint):
    raise ModelDirError("give one of --workdir DIR or --checkpoint PATH")
  path = os.path.abspath(workdir or checkpoint)
  if not os.path.isdir(path):
    raise ModelDirError(f"{path}: no such directory")
  if checkpoint and _is_step_dir(path):
    return path, os.path.dirname(os.path.dirname(path))
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    model_dir, steps_dir = path, os.path.join(path, CHECKPOINTS)
  elif checkpoint and _steps(path):
    model_dir, steps_dir = os.path.dirname(path), path
  else:
    raise ModelDirError(f"{path}: no checkpoints (expected {path}/{CHECKPOINTS}/<step>, written "
                        "by train.py or googlenet_jax.tools.convert)")
  steps = [s for s in _steps(steps_dir) if _is_step_dir(os.path.join(steps_dir, str(s)))]
  if not steps:
    raise ModelDirError(f"{steps_dir}: no complete checkpoint")
  return os.path.join(steps_dir, str(steps[-1])), model_dir


def _item_dir(step_dir: str) -> str:
  item = os.path.join(step_dir, "default")
  return item if os.path.isdir(item) else step_dir


def restore_variables(step_dir: str, *, use_ema: bool = False,
                      device: Optional[jax.Device] = None) -> dict:
  """{"params", "batch_stats"} of a checkpoint, on one device (the optimiser state is not read).
  With `use_ema`, the EMA weights where the checkpoint has them."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  path = _item_dir(step_dir)
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    meta = checkpointer.metadata(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ModelDirError(f"{step_dir}: not a readable Orbax checkpoint "
                        f"({e.__class__.__name__}: {str(e).splitlines()[0][:200]})") from None
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  if not hasattr(tree, "keys") or "params" not in tree:
    raise ModelDirError(f"{step_dir}: the checkpoint has no 'params'")
  source = {"params": "params", "batch_stats": "batch_stats"}
  if use_ema and tree.get("ema_params") and jax.tree_util.tree_leaves(tree["ema_params"]):
    source["params"] = "ema_params"
  wanted = {src: tree[src] for src in source.values()
            if src in tree and jax.tree_util.tree_leaves(tree[src])}
  sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                        wanted)
  restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
      partial_restore=True))
  return {name: restored.get(src, {}) for name, src in source.items()}


def save_variables(directory: str, variables: dict, step: int = 0) -> str:
  """Write {"params", "batch_stats"} as DIR/checkpoints/<step> (convert's output)."""
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {}),
           "step": np.asarray(step, np.int32)}
  state = jax.tree.map(jnp.asarray, state)
  checkpoints = os.path.abspath(os.path.join(directory, CHECKPOINTS))
  with ocp.CheckpointManager(checkpoints, options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False)) as manager:
    manager.save(step, args=ocp.args.StandardSave(state), force=True)
    manager.wait_until_finished()
  return os.path.join(checkpoints, str(step))


def _shapes(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {path: tuple(leaf.shape)
          for path, leaf in traverse_util.flatten_dict(tree or {}).items()}


def expected_variables(model: GoogLeNet) -> dict:
  """Shapes of the model's variables (no compilation: `jax.eval_shape`)."""
  layout = model.layout
  size = layout.default_size
  return jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(
      (1, size, size, layout.in_channels), jnp.float32))


def check_fits(variables: dict, model: GoogLeNet, where: str) -> None:
  """Raise ModelDirError unless `variables` are exactly what `model` needs (eval mode: the aux
  heads may be absent)."""
  expected = expected_variables(model)
  problems = []
  for coll in ("params", "batch_stats"):
    want, got = _shapes(expected.get(coll)), _shapes(variables.get(coll))
    missing = [p for p in want if p not in got and p[0] not in variants.AUX_TAPS]
    unexpected = [p for p in got if p not in want and p[0] not in variants.AUX_TAPS]
    misshaped = [p for p in want if p in got and want[p] != got[p]]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrongly shaped", misshaped)):
      if items:
        shown = ", ".join("/".join(p) + (f" {got[p]} != {want[p]}" if title == "wrongly shaped"
                                         else "") for p in items[:4])
        problems.append(f"{coll} {title} ({len(items)}): {shown}"
                        + (" ..." if len(items) > 4 else ""))
  if problems:
    raise ModelDirError(
        f"{where} does not fit GoogLeNet(variant={model.variant!r}, "
        f"num_classes={model.num_classes}): " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# Fine-tuning: start from another model's weights.


def merge_pretrained(fresh: dict, pretrained: dict) -> tuple[dict, list[str], list[str]]:
  """Fresh variables with every pretrained array that fits copied in.

  Returns (variables, reinitialised, ignored): classifier heads (`CLASSIFIER_PATHS`) whose shape
  differs (another num_classes) and aux heads the pretrained model lacks keep their fresh
  values; pretrained aux heads the new model does not have are ignored. Any other missing or
  mis-shaped array raises ValueError (a different architecture).
  """
  out, reinitialised, ignored, problems = {}, set(), set(), []

  def head_of(path):
    for head in CLASSIFIER_PATHS:
      if path[:len(head)] == head:
        return "/".join(head)
    return None

  for coll in ("params", "batch_stats"):
    new = traverse_util.flatten_dict(fresh.get(coll) or {})
    old = traverse_util.flatten_dict(pretrained.get(coll) or {})
    merged = {}
    for path, leaf in new.items():
      head = head_of(path)
      if path not in old:
        if path[0] in variants.AUX_TAPS and not any(p[0] == path[0] for p in old):
          reinitialised.add(path[0])
        else:
          problems.append(f"{coll}/{'/'.join(path)} missing")
        merged[path] = leaf
      elif tuple(old[path].shape) != tuple(leaf.shape):
        if head is not None:
          reinitialised.add(head)
        else:
          problems.append(f"{coll}/{'/'.join(path)} is {tuple(old[path].shape)}, the model "
                          f"needs {tuple(leaf.shape)}")
        merged[path] = leaf
      else:
        merged[path] = jnp.asarray(old[path], leaf.dtype)
    for path in old:
      if path not in new:
        if path[0] in variants.AUX_TAPS:
          ignored.add(path[0])
        else:
          problems.append(f"{coll}/{'/'.join(path)} unexpected")
    if new or coll in fresh:
      out[coll] = traverse_util.unflatten_dict(merged) if merged else {}
  if problems:
    raise ValueError(f"pretrained weights do not fit this architecture ({len(problems)} "
                     "problems): " + "; ".join(problems[:6]) + (" ..." if len(problems) > 6
                                                                 else ""))
  return out, sorted(reinitialised), sorted(ignored)


def load_pretrained(directory: str, config: Any) -> tuple[dict, dict]:
  """(variables, config record) of the model directory `directory` for fine-tuning with
  `config`; ValueError when its variant is not the config's."""
  try:
    step_dir, model_dir = locate(checkpoint=directory)
    record = read_config(model_dir)
  except ModelDirError as e:
    raise ValueError(f"init_from: {e}") from None
  if record is not None and record["variant"] != config.variant:
    raise ValueError(f"init_from: {model_dir} holds a {record['variant']!r} GoogLeNet but the "
                     f"config builds variant={config.variant!r}; set --config.variant="
                     f"{record['variant']} (or start from a {config.variant!r} checkpoint)")
  return restore_variables(step_dir), record or {}


# --------------------------------------------------------------------------------------------
# Loading a model for inference (predict, evaluate).


class LoadedModel:
  """A restored network: `model`, `variables` (params, batch_stats), the `config` to feed it
  with, `class_names`, and where it came from (`step_dir`, `model_dir`)."""

  def __init__(self, model, variables, config, class_names, step_dir, model_dir):
    self.model, self.variables, self.config = model, variables, config
    self.class_names, self.step_dir, self.model_dir = class_names, step_dir, model_dir


def inference_config(record: Optional[dict], override: Any, where: str) -> Any:
  """The config to run a model with: config.json's, or `override` (a --config) with the
  network fields (`MODEL_FIELDS`) still taken from config.json, since they define the weights."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  if record is None and override is None:
    raise ModelDirError(f"{where} has no {CONFIG_FILE} (train.py and googlenet_jax.tools.convert "
                        "write one); pass the training config with --config FILE")
  if override is None:
    missing = [f for f in FEEDING_FIELDS if f not in record]
    if missing:
      raise ModelDirError(f"{os.path.join(where, CONFIG_FILE)} lacks {', '.join(missing)}: add "
                          "them (configs/default.py says what they mean) or pass the training "
                          "config with --config FILE")
    return ml_collections.ConfigDict(record)
  config = ml_collections.ConfigDict(config_to_dict(override))
  if record is not None:
    for field in MODEL_FIELDS:
      if field in record:
        config[field] = record[field]
    if record.get("class_names"):
      config["class_names"] = record["class_names"]
  elif not config.get("num_classes"):
    raise ModelDirError(f"{where} has no {CONFIG_FILE} and the config leaves num_classes to the "
                        "dataset: set --config.num_classes=N")
  return config


def load_for_inference(workdir: Optional[str] = None, checkpoint: Optional[str] = None,
                       config: Any = None, use_ema: Optional[bool] = None,
                       ops: Ops = LAX) -> LoadedModel:
  """Restore a model directory's newest checkpoint (or the given one) for inference on one
  device. `use_ema` None: the config's `eval_with_ema`; `ops` as `GoogLeNet.ops`."""
  step_dir, directory = locate(workdir, checkpoint)
  record = read_config(directory)
  cfg = inference_config(record, config, directory)
  model = create_model(cfg, ops=ops)
  if use_ema is None:
    use_ema = bool(cfg.get("eval_with_ema", False))
  variables = restore_variables(step_dir, use_ema=use_ema)
  check_fits(variables, model, step_dir)
  return LoadedModel(model, variables, cfg, class_names(cfg.to_dict()), step_dir, directory)
