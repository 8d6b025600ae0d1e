"""Weight exchange with Keras: the keras layout (the reference TF2 model's layer names, Keras 3)
-> Flax variables."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from googlenet_jax import variants as V
from googlenet_jax.convert.common import expected_shapes

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
  """A Keras model of the keras layout (the reference TF2 model's layer names) -> Flax variables.

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
  expected = expected_shapes("keras", num_classes, aux_logits)
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
    raise ValueError("\n  ".join([_keras_diagnosis(layer_weights, num_classes, aux_logits)]
                                 + problems[:5]
                                 + ([f"... and {len(problems) - 5} more"] if len(problems) > 5
                                    else [])))
  return traverse_util.unflatten_dict(flat)


def _keras_diagnosis(layer_weights: Mapping[str, list], num_classes: int,
                     aux_logits: bool) -> str:
  """The first line of a Keras conversion error: what is wrong and the call that fixes it."""
  has_aux = "aux_1" in layer_weights
  if aux_logits and not has_aux:
    return ("these Keras weights have no auxiliary heads: pass aux_logits=False (and build "
            "GoogLeNet(variant='keras', ..., aux_logits=False))")
  if has_aux and not aux_logits:
    return "these Keras weights have auxiliary heads: pass aux_logits=None to convert them"
  dense = layer_weights.get("output_dense")
  if dense and int(dense[0].shape[-1]) != num_classes:
    n = int(dense[0].shape[-1])
    return (f"these Keras weights have a {n}-class classifier, not {num_classes}: convert them "
            f"with num_classes={n} (the default), then put them into your {num_classes}-class "
            "model with googlenet_jax.model_dir.merge_pretrained")
  return (f"Keras weights do not fit GoogLeNet(variant='keras', num_classes={num_classes}, "
          f"aux_logits={aux_logits}): is this a keras-layout model (the reference TF2 "
          "model's layer names)?")


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
