"""Weight exchange with PyTorch: classic, torchvision and d2l state_dicts <-> Flax variables.

PyTorch itself is imported only to return torch tensors (`flax_to_torch(..., as_numpy=False)`).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from googlenet_jax import variants as V
from googlenet_jax.convert.common import expected_shapes

# Flax conv-unit names inside an Inception block -> PyTorch names, per state_dict style.
_BRANCHES = {
    V.TorchNames.MODULE: {
        "conv_1x1": "branch1", "conv_3x3_reduce": "branch2.0", "conv_3x3": "branch2.1",
        "conv_5x5_reduce": "branch3.0", "conv_5x5": "branch3.1", "pool_proj": "branch4.1"},
    V.TorchNames.SEQUENTIAL: {
        "conv_1x1": "p1_1", "conv_3x3_reduce": "p2_1", "conv_3x3": "p2_2",
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


def check_torch_layout(variant: str) -> None:
  """Raise the ValueError saying which layouts have a PyTorch state_dict naming, unless
  `variant`'s has one."""
  list(_torch_modules(V.get_layout(variant), False))


def _torch_modules(layout: V.Layout, aux: bool) -> Iterator[tuple[tuple[str, ...], str, str]]:
  """(Flax module path, PyTorch prefix, kind) for every layer with weights, kind being
  "conv_unit", "dense" or "aux_fc1"."""
  style = layout.torch_names
  if style is None:
    raise ValueError(f"the {layout.name!r} layout has no PyTorch state_dict naming; PyTorch "
                     "conversion exists for 'classic', 'torchvision' and 'd2l'")
  module = style is V.TorchNames.MODULE
  for row in V.TABLE_1:
    if isinstance(row, V.Conv):
      yield (row.name,), row.name if module else _D2L_STEM[row.name], "conv_unit"
    elif isinstance(row, V.Inception):
      stage, block = row.name[-2], row.name[-1]
      prefix = (f"inception{stage}{block}" if module
                else f"{int(stage) - 1}.{ord(block) - ord('a')}")
      for flax_name, torch_name in _BRANCHES[style].items():
        yield (row.name, flax_name), f"{prefix}.{torch_name}", "conv_unit"
    elif isinstance(row, V.AuxTap) and aux:
      prefix = f"aux{V.AUX_TAPS.index(row.name) + 1}"
      yield (row.name, "conv"), f"{prefix}.conv", "conv_unit"
      yield (row.name, "fc1"), f"{prefix}.fc1", "aux_fc1"
      yield (row.name, "fc2"), f"{prefix}.fc2", "dense"
  yield ("classifier",), "fc" if module else "5", "dense"


def _entries(layout: V.Layout, aux: bool) -> list[_Entry]:
  out = []
  for path, prefix, kind in _torch_modules(layout, aux):
    if kind == "conv_unit":
      conv = f"{prefix}.conv" if layout.torch_names is V.TorchNames.MODULE else prefix
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


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _classifier_key(layout: V.Layout) -> str:
  return "fc.weight" if layout.torch_names is V.TorchNames.MODULE else "5.weight"


def _mismatch_report(state_dict: Mapping[str, Any], variant: str, num_classes: int,
                     aux: bool) -> tuple[list[str], list[str], list[str]]:
  layout = V.get_layout(variant)
  expected = expected_shapes(variant, num_classes, aux)
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


def _aux_in(state_dict: Mapping[str, Any]) -> bool:
  return any(k.startswith("aux") for k in state_dict)


def _own_classes(state_dict: Mapping[str, Any], layout: V.Layout) -> Optional[int]:
  key = _classifier_key(layout)
  return int(_to_numpy(state_dict[key]).shape[0]) if key in state_dict else None


def _fits(state_dict: Mapping[str, Any], variant: str) -> bool:
  """Whether the state_dict converts cleanly to `variant` with its own class count and heads."""
  layout = V.get_layout(variant)
  n = _own_classes(state_dict, layout)
  aux = _aux_in(state_dict)
  if layout.torch_names is None or n is None or (aux and not layout.aux_logits):
    return False
  return not any(_mismatch_report(state_dict, variant, n, aux))


def _torch_variants() -> list[str]:
  return [name for name, layout in V.LAYOUTS.items() if layout.torch_names is not None]


def _looks_like(state_dict: Mapping[str, Any], variant: str) -> Optional[str]:
  """The other layout whose naming and shapes fit this state_dict, if any."""
  for other in _torch_variants():
    if other != variant and _fits(state_dict, other):
      return other
  return None


def detect_variant(state_dict: Mapping[str, Any]) -> str:
  """The one PyTorch layout ('classic', 'torchvision' or 'd2l') whose names and shapes the
  state_dict fits (with its own class count and heads); a ValueError saying what it fits (none
  or several) otherwise."""
  tried = _torch_variants()
  fitting = [v for v in tried if _fits(state_dict, v)]
  if len(fitting) == 1:
    return fitting[0]
  if fitting:
    raise ValueError(f"cannot tell this state_dict's variant: it fits {fitting}; pass "
                     f"variant=... (one of {fitting})")
  lines = [f"cannot tell this state_dict's variant: it fits none of {tried}; pass variant=... "
           "to see what does not fit"]
  for v in tried:
    layout = V.get_layout(v)
    n = _own_classes(state_dict, layout) or 1000
    missing, unexpected, misshaped = _mismatch_report(state_dict, v, n, _aux_in(state_dict))
    lines.append(f"  {v}: {len(missing)} missing, {len(unexpected)} unexpected, "
                 f"{len(misshaped)} wrongly shaped keys")
  raise ValueError("\n".join(lines))


def _first(items: list[str], n: int = 3) -> str:
  more = f" ... and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def _details(missing: list[str], unexpected: list[str], misshaped: list[str]) -> list[str]:
  return [f"  {title} ({len(items)}): {_first(items, n)}"
          for title, items, n in (("missing keys", missing, 3), ("unexpected keys", unexpected, 3),
                                  ("wrongly shaped", misshaped, 2)) if items]


def _torch_diagnosis(state_dict: Mapping[str, Any], variant: str, num_classes: int,
                     aux_logits: bool, aux_given: Optional[bool]) -> str:
  """The first line of a conversion error: what is wrong and the call that fixes it."""
  model = f"GoogLeNet(variant={variant!r}, num_classes={num_classes}, aux_logits={aux_logits})"
  has_aux = _aux_in(state_dict)
  other = _looks_like(state_dict, variant)
  if other:
    fix = f"pass variant={other!r}"
    # The aux setting that would go with the other variant, unless the caller already has it.
    if has_aux and aux_given is False:
      fix += " and aux_logits=None (it has auxiliary heads)"
    elif not has_aux and aux_given:
      fix += " and aux_logits=False (it has no auxiliary heads)"
    return f"this state_dict is a {other!r} checkpoint, not {variant!r}: {fix}"
  layout = V.get_layout(variant)
  n = _own_classes(state_dict, layout)
  if _fits(state_dict, variant):
    if aux_logits and not has_aux:
      return ("this state_dict has no auxiliary heads: pass aux_logits=False (and build "
              "GoogLeNet(..., aux_logits=False))")
    if has_aux and not aux_logits:
      return ("this state_dict has auxiliary heads: pass aux_logits=None to convert them, or "
              "drop its aux* keys")
    if n != num_classes:
      return (f"this state_dict has a {n}-class classifier, not {num_classes}: convert it with "
              f"num_classes={n} (the default), then put its weights into your {num_classes}-"
              "class model with googlenet_jax.model_dir.merge_pretrained")
  return f"state_dict does not fit {model}:"


def torch_to_flax(state_dict: Mapping[str, Any], variant: Optional[str] = None, *,
                  num_classes: Optional[int] = None, aux_logits: Optional[bool] = None) -> dict:
  """A PyTorch state_dict (tensors or arrays) -> Flax variables for `GoogLeNet(variant=...)`.

  `variant` None detects it from the state_dict's key names and shapes ('classic',
  'torchvision' or 'd2l'; a ValueError lists the variants tried when none or several fit); a
  given variant is used as is. `num_classes` and `aux_logits` default to what the state_dict
  holds: with `aux_logits=None` the aux heads are converted when the state_dict has them
  (`"aux1"`, `"aux2"` under `params`) and left out when it has none, so build the model with
  `aux_logits=googlenet_jax.variants.AUX_TAPS[0] in variables["params"]`. Returns
  `{"params": ...}`, plus `"batch_stats"` for the BatchNorm (torchvision) layout. Dtypes are
  kept (a double model gives float64 arrays where x64 is on).

  A state_dict that does not fit raises one ValueError whose first line names the cause and
  the fix (another variant, `aux_logits=False`, `merge_pretrained` for another class count),
  followed by the counts and first names of the missing, unexpected and wrongly shaped keys.
  """
  if hasattr(state_dict, "state_dict") and callable(state_dict.state_dict):
    state_dict = state_dict.state_dict()
  if variant is None:
    variant = detect_variant(state_dict)
  layout = V.get_layout(variant)
  if layout.torch_names is None:
    list(_torch_modules(layout, False))  # raises the explanation
  aux_given = aux_logits
  if aux_logits is None:
    aux_logits = _aux_in(state_dict)
  if num_classes is None:
    num_classes = _own_classes(state_dict, layout) or 1000
  if aux_logits and not layout.aux_logits:
    # The model cannot be built with aux heads here, so the keys are compared without them.
    other = _looks_like(state_dict, variant)
    if other:
      first = _torch_diagnosis(state_dict, variant, num_classes, aux_logits, aux_given)
    elif aux_given:
      first = (f"the {variant!r} layout has no auxiliary heads: pass aux_logits=False (or "
               "leave it None)")
    else:
      first = (f"this state_dict has auxiliary heads, which the {variant!r} layout lacks: pass "
               "the variant it was saved from, or drop its aux* keys")
    raise ValueError("\n".join(
        [first] + _details(*_mismatch_report(state_dict, variant, num_classes, False))))
  missing, unexpected, misshaped = _mismatch_report(state_dict, variant, num_classes, aux_logits)
  if missing or unexpected or misshaped:
    first = _torch_diagnosis(state_dict, variant, num_classes, aux_logits, aux_given)
    raise ValueError("\n".join([first] + _details(missing, unexpected, misshaped)))
  flat = {(e.collection,) + e.path: jnp.asarray(e.to_flax(_to_numpy(state_dict[e.key])))
          for e in _entries(layout, aux_logits)}
  return traverse_util.unflatten_dict(flat)


def flax_to_torch(variables: Mapping[str, Any], variant: str = "classic", *,
                  as_numpy: bool = False) -> "collections.OrderedDict[str, Any]":
  """Flax variables -> a PyTorch state_dict (`load_state_dict(strict=True)` ready).

  `variant` is required in practice ('classic' by default): the classic and d2l layouts differ
  in names only, which Flax variables do not carry, so it is not detected.

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
    raise ValueError(f"variables do not fit the {variant!r} layout: pass the variant the model "
                     f"was built with\n  missing ({len(missing)}): {_first(missing)}")
  if as_numpy:
    return out
  import torch  # pylint: disable=import-outside-toplevel
  return collections.OrderedDict((k, torch.from_numpy(np.array(v)))
                                 for k, v in out.items())
