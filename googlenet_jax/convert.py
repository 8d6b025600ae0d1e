"""Weight exchange with PyTorch (classic, torchvision, d2l state_dicts) and Keras (keras layout).

The name mapping is derived from the same Table 1 the network is built from, so the two cannot
drift apart. Tensor layouts: conv OIHW <-> HWIO, linear (out, in) <-> (in, out), and the aux
heads' fc1, whose 2048 inputs PyTorch flattens in (c, h, w) order and this NHWC model in (h, w, c).

Command line (a state_dict file to a model directory, an Orbax checkpoint, and back):
`python -m googlenet_jax.convert --help`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from googlenet_jax import models
from googlenet_jax import variants as V

# Flax conv-unit names inside an Inception block -> PyTorch names, per state_dict style.
_BRANCHES = {
    "module": {"conv_1x1": "branch1", "conv_3x3_reduce": "branch2.0", "conv_3x3": "branch2.1",
               "conv_5x5_reduce": "branch3.0", "conv_5x5": "branch3.1", "pool_proj": "branch4.1"},
    "sequential": {"conv_1x1": "p1_1", "conv_3x3_reduce": "p2_1", "conv_3x3": "p2_2",
                   "conv_5x5_reduce": "p3_1", "conv_5x5": "p3_2", "pool_proj": "p4_2"},
}
# d2l's nn.Sequential(b1, b2, b3, b4, b5, Linear): the stem's positions inside b1/b2 (ReLUs count).
_D2L_STEM = {"conv1": "0.0", "conv2": "1.0", "conv3": "1.2"}


@dataclasses.dataclass(frozen=True)
class _Entry:
  collection: str  # "params" or "batch_stats"
  path: tuple[str, ...]  # Flax path inside the collection
  key: str  # PyTorch state_dict key
  to_flax: Callable[[np.ndarray], np.ndarray]
  to_torch: Callable[[np.ndarray], np.ndarray]


def _conv_to_flax(w):
  return w.transpose(2, 3, 1, 0)


def _conv_to_torch(w):
  return w.transpose(3, 2, 0, 1)


def _identity(w):
  return w


def _fc1_to_flax(w):
  out, n = w.shape
  c = V.AUX_CONV_FEATURES
  side = int(round((n // c) ** 0.5))
  return w.T.reshape(c, side, side, out).transpose(1, 2, 0, 3).reshape(n, out)


def _fc1_to_torch(w):
  n, out = w.shape
  c = V.AUX_CONV_FEATURES
  side = int(round((n // c) ** 0.5))
  return w.reshape(side, side, c, out).transpose(2, 0, 1, 3).reshape(n, out).T


def _torch_modules(layout: V.Layout, aux: bool) -> Iterator[tuple[tuple[str, ...], str, str]]:
  """(Flax module path, PyTorch prefix, kind) for every layer with weights, kind being
  "conv_unit", "dense" or "aux_fc1"."""
  style = layout.torch_names
  if style is None:
    raise ValueError(f"the {layout.name!r} layout has no PyTorch state_dict naming; PyTorch "
                     "conversion exists for 'classic', 'torchvision' and 'd2l'")
  for row in V.TABLE_1:
    if isinstance(row, V.Conv):
      yield (row.name,), row.name if style == "module" else _D2L_STEM[row.name], "conv_unit"
    elif isinstance(row, V.Inception):
      stage, block = row.name[-2], row.name[-1]
      prefix = (f"inception{stage}{block}" if style == "module"
                else f"{int(stage) - 1}.{ord(block) - ord('a')}")
      for flax_name, torch_name in _BRANCHES[style].items():
        yield (row.name, flax_name), f"{prefix}.{torch_name}", "conv_unit"
    elif isinstance(row, V.AuxTap) and aux:
      prefix = f"aux{V.AUX_TAPS.index(row.name) + 1}"
      yield (row.name, "conv"), f"{prefix}.conv", "conv_unit"
      yield (row.name, "fc1"), f"{prefix}.fc1", "aux_fc1"
      yield (row.name, "fc2"), f"{prefix}.fc2", "dense"
  yield ("classifier",), "fc" if style == "module" else "5", "dense"


def _entries(layout: V.Layout, aux: bool) -> list[_Entry]:
  out = []
  for path, prefix, kind in _torch_modules(layout, aux):
    if kind == "conv_unit":
      conv = f"{prefix}.conv" if layout.torch_names == "module" else prefix
      out.append(_Entry("params", path + ("conv", "kernel"), f"{conv}.weight", _conv_to_flax,
                        _conv_to_torch))
      if layout.conv_bias:
        out.append(_Entry("params", path + ("conv", "bias"), f"{conv}.bias", _identity,
                          _identity))
      if layout.batch_norm:
        for coll, name, torch_name in (("params", "scale", "weight"), ("params", "bias", "bias"),
                                       ("batch_stats", "mean", "running_mean"),
                                       ("batch_stats", "var", "running_var")):
          out.append(_Entry(coll, path + ("bn", name), f"{prefix}.bn.{torch_name}", _identity,
                            _identity))
    else:
      to_flax, to_torch = ((_fc1_to_flax, _fc1_to_torch) if kind == "aux_fc1"
                           else (np.transpose, np.transpose))
      out.append(_Entry("params", path + ("kernel",), f"{prefix}.weight", to_flax, to_torch))
      out.append(_Entry("params", path + ("bias",), f"{prefix}.bias", _identity, _identity))
  return out


def _expected_shapes(variant: str, num_classes: int, aux: bool) -> dict:
  layout = V.get_layout(variant)
  model = models.GoogLeNet(variant=variant, num_classes=num_classes, aux_logits=aux)
  size = layout.default_size
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, size, size, layout.in_channels), jnp.float32))
  return {(coll,) + path: tuple(leaf.shape)
          for coll, tree in shapes.items()
          for path, leaf in traverse_util.flatten_dict(tree).items()}


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _classifier_key(layout: V.Layout) -> str:
  return "fc.weight" if layout.torch_names == "module" else "5.weight"


def _mismatch_report(state_dict: Mapping[str, Any], variant: str, num_classes: int,
                     aux: bool) -> tuple[list[str], list[str], list[str]]:
  layout = V.get_layout(variant)
  expected = _expected_shapes(variant, num_classes, aux)
  entries = _entries(layout, aux)
  known = {e.key for e in entries}
  if layout.batch_norm:
    known |= {e.key.replace("running_mean", "num_batches_tracked")
              for e in entries if e.key.endswith("running_mean")}
  missing = [e.key for e in entries if e.key not in state_dict]
  unexpected = [k for k in state_dict if k not in known]
  misshaped = []
  for e in entries:
    if e.key in state_dict:
      value = _to_numpy(state_dict[e.key])
      want = expected[(e.collection,) + e.path]
      try:
        got = e.to_flax(value).shape
      except ValueError:
        got = None
      if got != want:
        misshaped.append(f"{e.key}: got {tuple(value.shape)}, expected "
                         f"{tuple(e.to_torch(np.zeros(want)).shape)}")
  return missing, unexpected, misshaped


def _looks_like(state_dict: Mapping[str, Any], variant: str) -> Optional[str]:
  """The other layout whose naming and shapes fit this state_dict, if any."""
  for other, layout in V.LAYOUTS.items():
    if other == variant or layout.torch_names is None:
      continue
    key = _classifier_key(layout)
    if key not in state_dict:
      continue
    n = int(_to_numpy(state_dict[key]).shape[0])
    aux = any(k.startswith("aux") for k in state_dict)
    if aux and not layout.aux_logits:
      continue
    if not any(_mismatch_report(state_dict, other, n, aux)):
      return other
  return None


def torch_to_flax(state_dict: Mapping[str, Any], variant: str = "classic", *,
                  num_classes: Optional[int] = None, aux_logits: Optional[bool] = None) -> dict:
  """A PyTorch state_dict (tensors or arrays) -> Flax variables for `GoogLeNet(variant=...)`.

  `num_classes` and `aux_logits` default to what the state_dict holds. Returns
  `{"params": ...}`, plus `"batch_stats"` for the BatchNorm (torchvision) layout. Dtypes are
  kept (a double model gives float64 arrays where x64 is on). Raises one ValueError listing every
  missing, unexpected and wrongly shaped key.
  """
  layout = V.get_layout(variant)
  if layout.torch_names is None:
    list(_torch_modules(layout, False))  # raises the explanation
  if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
    state_dict = state_dict.state_dict()
  if aux_logits is None:
    aux_logits = any(k.startswith("aux") for k in state_dict)
  if num_classes is None:
    key = _classifier_key(layout)
    num_classes = int(_to_numpy(state_dict[key]).shape[0]) if key in state_dict else 1000
  missing, unexpected, misshaped = _mismatch_report(state_dict, variant, num_classes, aux_logits)
  if missing or unexpected or misshaped:
    lines = [f"state_dict does not fit GoogLeNet(variant={variant!r}, num_classes={num_classes}, "
             f"aux_logits={aux_logits}):"]
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("wrongly shaped", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
    other = _looks_like(state_dict, variant)
    if other:
      lines.append(f"  it looks like a {other!r} checkpoint: try variant={other!r}")
    raise ValueError("\n".join(lines))
  flat = {(e.collection,) + e.path: jnp.asarray(e.to_flax(_to_numpy(state_dict[e.key])))
          for e in _entries(layout, aux_logits)}
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(variables: Mapping[str, Any], variant: str = "classic", *,
                  as_numpy: bool = False) -> "collections.OrderedDict[str, Any]":
  """Flax variables -> a PyTorch state_dict (`load_state_dict(strict=True)` ready).

  `variables` is `{"params": ..., "batch_stats": ...}`, or a bare tree shaped like `params`
  (gradients, say), in which case only parameter keys are produced.
  """
  layout = V.get_layout(variant)
  if "params" not in variables:
    variables = {"params": variables}
  params = variables["params"]
  aux = V.AUX_TAPS[0] in params
  flat = {(coll,) + path: leaf for coll, tree in variables.items() if coll in
          ("params", "batch_stats") for path, leaf in traverse_util.flatten_dict(tree).items()}
  out = collections.OrderedDict()
  missing = []
  for e in _entries(layout, aux):
    leaf = flat.get((e.collection,) + e.path)
    if leaf is None:
      if e.collection == "params" or "batch_stats" in variables:
        missing.append("/".join((e.collection,) + e.path))
      continue
    out[e.key] = e.to_torch(np.asarray(jax.device_get(leaf)))
    if e.key.endswith("running_var"):
      out[e.key.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  if missing:
    raise ValueError(f"variables do not fit the {variant!r} layout; missing ({len(missing)}): "
                     + ", ".join(missing))
  if as_numpy:
    return out
  import torch  # pylint: disable=import-outside-toplevel
  return collections.OrderedDict((k, torch.from_numpy(np.array(v)))
                                 for k, v in out.items())


# --------------------------------------------------------------------------------------------
# Keras (seed 000's TF2 layout, Keras 3).

# Layer names of the Keras model -> Flax module paths. Inception layers hold six Conv2D layers
# (branch1; branch2 1x1, 3x3; branch3 1x1, 5x5; branch4 1x1 after the pool), aux layers three.
_KERAS_STEM = {"conv2d_1": "conv1", "conv2d_2": "conv2", "conv2d_3": "conv3"}
_INCEPTION_ORDER = ("conv_1x1", "conv_3x3_reduce", "conv_3x3", "conv_5x5_reduce", "conv_5x5",
                    "pool_proj")
_AUX_ORDER = (("conv", "conv"), ("fc1",), ("fc2",))


def _keras_targets(aux: bool) -> Iterator[tuple[str, list[tuple[str, ...]]]]:
  """(Keras layer name, [Flax path of each (kernel, bias) pair in the layer's weight order])."""
  for row in V.TABLE_1:
    if isinstance(row, V.Conv):
      yield {v: k for k, v in _KERAS_STEM.items()}[row.name], [(row.name, "conv")]
    elif isinstance(row, V.Inception):
      yield row.name, [(row.name, b, "conv") for b in _INCEPTION_ORDER]
    elif isinstance(row, V.AuxTap) and aux:
      keras_name = f"aux_{V.AUX_TAPS.index(row.name) + 1}"
      yield keras_name, [(row.name,) + p for p in _AUX_ORDER]
  yield "output_dense", [("classifier",)]


def keras_to_flax(model: Any, *, num_classes: Optional[int] = None,
                  aux_logits: Optional[bool] = None) -> dict:
  """A Keras model of the keras layout (seed 000's layer names) -> Flax variables.

  `model` is a built Keras model, or the path of its `.weights.h5` file (read with h5py, in the
  order Keras 3 saves each layer's variables).
  """
  if isinstance(model, str) or hasattr(model, "__fspath__"):
    layer_weights = _read_keras_h5(model)
  else:
    layer_weights = {}
    for layer in model.layers:
      if layer.weights:
        layer_weights[layer.name] = [np.asarray(w.numpy()) for w in layer.weights]
  if aux_logits is None:
    aux_logits = "aux_1" in layer_weights
  if num_classes is None:
    num_classes = int(layer_weights["output_dense"][0].shape[-1]) \
        if "output_dense" in layer_weights else 1000
  expected = _expected_shapes("keras", num_classes, aux_logits)
  flat, problems = {}, []
  targets = list(_keras_targets(aux_logits))
  names = {name for name, _ in targets}
  problems += [f"unexpected layer {n!r}" for n in layer_weights if n not in names]
  for name, paths in targets:
    weights = layer_weights.get(name)
    if weights is None:
      problems.append(f"missing layer {name!r}")
      continue
    if len(weights) != 2 * len(paths):
      problems.append(f"layer {name!r}: {len(weights)} variables, expected {2 * len(paths)}")
      continue
    for i, path in enumerate(paths):
      for leaf, value in zip(("kernel", "bias"), weights[2 * i: 2 * i + 2]):
        want = expected[("params",) + path + (leaf,)]
        if tuple(value.shape) != want:
          problems.append(f"{name} {'/'.join(path)}/{leaf}: got {value.shape}, expected {want}")
        flat[("params",) + path + (leaf,)] = jnp.asarray(value)
  if problems:
    raise ValueError("Keras weights do not fit GoogLeNet(variant='keras', "
                     f"num_classes={num_classes}, aux_logits={aux_logits}):\n  "
                     + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat)


def _natural_key(name: str):
  base, _, n = name.rpartition("_")
  return (base, int(n)) if n.isdigit() else (name, -1)


def _read_keras_h5(path) -> dict[str, list[np.ndarray]]:
  """Each top-level layer's variables from a Keras 3 `.weights.h5`, in saving order.

  Keras 3 names the groups by class (`conv2d`, `conv2d_1`, `inception`, ...), not by layer name,
  so the layers are recognised by structure: 2-variable groups with a 4-D kernel are the stem
  convolutions, 12-variable groups the Inception blocks, 6-variable groups the aux heads and the
  one with a 2-D kernel the classifier, each kind in creation order.
  """
  import h5py  # pylint: disable=import-outside-toplevel

  def collect(group) -> list[np.ndarray]:
    # A layer's own variables are under "vars" ("0", "1", ...); the layers it tracks are
    # subgroups named by attribute (or under "layers" for a Sequential), in creation order.
    out = [np.asarray(group["vars"][k]) for k in sorted(group.get("vars", {}), key=int)]
    for name in sorted((n for n in group if n != "vars"), key=_natural_key):
      out += collect(group[name])
    return out

  with h5py.File(path, "r") as f:
    groups = [w for name in sorted(f["layers"], key=_natural_key)
              for w in [collect(f["layers"][name])] if w]
  stem = [w for w in groups if len(w) == 2 and w[0].ndim == 4]
  dense = [w for w in groups if len(w) == 2 and w[0].ndim == 2]
  blocks = [w for w in groups if len(w) == 12]
  aux = [w for w in groups if len(w) == 6]
  named = dict(zip(_KERAS_STEM, stem))
  named.update(zip((r.name for r in V.TABLE_1 if isinstance(r, V.Inception)), blocks))
  named.update(zip(("aux_1", "aux_2"), aux))
  named.update(zip(("output_dense",), dense))
  if len(named) != len(groups):
    raise ValueError(f"{path}: {len(groups)} layers with weights, of which only {len(named)} "
                     "fit the keras layout")
  return named


# --------------------------------------------------------------------------------------------
# Command line: python -m googlenet_jax.convert --torch FILE.pth --variant V --out DIR
#               python -m googlenet_jax.convert --checkpoint DIR --to-torch FILE.pth

# How a converted model is fed, per variant (overridable by flags): input size, channels,
# normalisation and the eval crop (torchvision's ImageNet weights: resize 256, centre 224,
# ImageNet mean/std, transform_input on).
_FEEDING = {
    "classic": dict(image_size=224, channels=3, normalize="imagenet", eval_crop_fraction=0.875,
                    transform_input=False),
    "torchvision": dict(image_size=224, channels=3, normalize="imagenet",
                        eval_crop_fraction=0.875, transform_input=True),
    "d2l": dict(image_size=96, channels=1, normalize="unit", eval_crop_fraction=1.0,
                transform_input=False),
}


def _load_torch_file(path: str) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    raise ValueError(f"{path}: no such file") from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path}: not a PyTorch state_dict file ({e.__class__.__name__}: "
                     f"{str(e).splitlines()[0][:200]})") from None
  for key in ("state_dict", "model", "model_state_dict"):  # training-script checkpoints
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
    raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
  if obj and all(k.startswith("module.") for k in obj):  # saved from nn.DataParallel
    obj = {k[len("module."):]: v for k, v in obj.items()}
  return obj


def torch_file_to_model_dir(path: str, variant: str, out: str, *,
                            num_classes: Optional[int] = None,
                            class_names: Optional[list[str]] = None, **feeding) -> str:
  """Convert a PyTorch state_dict file into a model directory (config.json + an Orbax
  checkpoint) that predict, evaluate and `init_from` read. Returns the checkpoint path."""
  from googlenet_jax import model_dir  # pylint: disable=import-outside-toplevel
  state_dict = _load_torch_file(path)
  variables = torch_to_flax(state_dict, variant, num_classes=num_classes)
  n = int(variables["params"]["classifier"]["kernel"].shape[-1])
  if class_names is not None and len(class_names) != n:
    raise ValueError(f"{len(class_names)} class names for a {n}-class model")
  if class_names is None and n == 1000:
    class_names = model_dir.imagenet_class_names()
  record = dict(_FEEDING.get(variant, _FEEDING["classic"]))
  record.update({k: v for k, v in feeding.items() if v is not None})
  record.update(variant=variant, aux_logits=V.AUX_TAPS[0] in variables["params"],
                converted_from=os.path.abspath(path))
  if os.path.isdir(os.path.join(out, model_dir.CHECKPOINTS)):
    raise ValueError(f"{out} already holds checkpoints; choose a new --out directory")
  step_dir = model_dir.save_variables(out, variables)
  model_dir.write_config(out, record, num_classes=n, class_names=class_names)
  return step_dir


def model_dir_to_torch_file(checkpoint: str, out: str, variant: Optional[str] = None,
                            use_ema: bool = False) -> str:
  """A model directory or checkpoint step directory -> a PyTorch state_dict file."""
  import torch  # pylint: disable=import-outside-toplevel
  from googlenet_jax import model_dir  # pylint: disable=import-outside-toplevel
  step_dir, directory = model_dir.locate(checkpoint=checkpoint)
  record = model_dir.read_config(directory) or {}
  variant = variant or record.get("variant")
  if variant is None:
    raise ValueError(f"{directory} has no config.json: pass --variant")
  if record.get("variant", variant) != variant:
    raise ValueError(f"{directory} holds a {record['variant']!r} model, not {variant!r}")
  if V.get_layout(variant).torch_names is None:
    list(_torch_modules(V.get_layout(variant), False))  # raises the explanation
  variables = model_dir.restore_variables(step_dir, use_ema=use_ema)
  state_dict = flax_to_torch(variables, variant)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  torch.save(state_dict, out)
  return step_dir


def main(argv: Optional[list[str]] = None) -> None:
  import argparse  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(
      prog="python -m googlenet_jax.convert",
      description="PyTorch state_dict <-> model directory (config.json + Orbax checkpoint).")
  parser.add_argument("--torch", metavar="FILE.pth", help="PyTorch state_dict to convert")
  parser.add_argument("--variant", choices=sorted(k for k, l in V.LAYOUTS.items()
                                                  if l.torch_names is not None),
                      help="layout of the state_dict (needed with --torch)")
  parser.add_argument("--out", metavar="DIR", help="new model directory (with --torch)")
  parser.add_argument("--num_classes", type=int, help="default: the state_dict's")
  parser.add_argument("--class_names", metavar="FILE",
                      help="class names, one a line (default: ImageNet's for 1000 classes)")
  parser.add_argument("--image_size", type=int, help="input size predict/evaluate use")
  parser.add_argument("--normalize", choices=("imagenet", "half", "unit"),
                      help="input normalisation the weights expect")
  parser.add_argument("--eval_crop_fraction", type=float,
                      help="centre crop fraction (0.875: resize 256, crop 224; 1: no crop)")
  parser.add_argument("--transform_input", choices=("true", "false"),
                      help="torchvision's input re-normalisation (default: on for torchvision, "
                      "as its ImageNet weights expect)")
  parser.add_argument("--checkpoint", metavar="DIR",
                      help="model directory or checkpoint step to export (with --to-torch)")
  parser.add_argument("--to-torch", dest="to_torch", metavar="FILE.pth",
                      help="write the checkpoint's weights as a PyTorch state_dict")
  parser.add_argument("--use_ema", action="store_true", help="export the EMA weights")
  args = parser.parse_args(argv)
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    print("error: converting PyTorch files needs PyTorch (pip install torch)", file=sys.stderr)
    sys.exit(2)
  try:
    if args.torch:
      if args.checkpoint or args.to_torch:
        parser.error("--torch goes with --variant and --out; --checkpoint with --to-torch")
      if not args.variant or not args.out:
        parser.error("--torch needs --variant and --out")
      names = None
      if args.class_names:
        with open(args.class_names) as f:
          names = [line.strip() for line in f if line.strip()]
      step_dir = torch_file_to_model_dir(
          args.torch, args.variant, args.out, num_classes=args.num_classes, class_names=names,
          image_size=args.image_size, normalize=args.normalize,
          eval_crop_fraction=args.eval_crop_fraction,
          transform_input=None if args.transform_input is None else args.transform_input == "true")
      print(f"wrote {step_dir} and {os.path.join(args.out, 'config.json')}")
    elif args.checkpoint and args.to_torch:
      step_dir = model_dir_to_torch_file(args.checkpoint, args.to_torch, args.variant,
                                         args.use_ema)
      print(f"wrote {args.to_torch} from {step_dir}")
    else:
      parser.error("give --torch FILE --variant V --out DIR, or --checkpoint DIR --to-torch FILE")
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
