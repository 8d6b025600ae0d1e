"""The linen network used from Flax NNX code, through `flax.nnx.bridge` (one definition).

  from flax import nnx
  from googlenet_jax import GoogLeNet, nnx_bridge

  net = nnx_bridge.to_nnx(GoogLeNet(variant="torchvision", num_classes=5), variables,
                          rngs=nnx.Rngs(0))       # variables: e.g. convert.torch_to_flax(...)
  net.train()                                     # BatchNorm on batch statistics, dropout on
  out = net(images)                               # GoogLeNetOutputs; the running stats update
  net.eval()
  logits = net(images)
  variables = nnx_bridge.to_linen_variables(net)  # {"params", "batch_stats"} for linen code

`GoogLeNetNNX` holds the linen module inside an `nnx.bridge.ToNNX` (`.network`): its parameters
are `nnx.Param`s and its BatchNorm running statistics `nnx.BatchStat`s, so `nnx.Optimizer(net,
tx, wrt=nnx.Param)`, `nnx.grad`, `nnx.jit` and `nnx.state` work as on any NNX module. Not
imported by `import googlenet_jax`: `flax.nnx` imports optax, which the network layer does not.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax import traverse_util

from googlenet_jax.models import GoogLeNet, init_variables

# The linen collections the network has, and the NNX variable types ToNNX makes of them.
COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}


class GoogLeNetNNX(nnx.Module):
  """A `GoogLeNet` (linen) as an NNX module; build it with `to_nnx`.

  The mode is two attributes, the ones `nnx.Dropout` and `nnx.BatchNorm` have, so `train()`,
  `eval()` and `nnx.view` set them: `use_running_average` (False: linen `train=True`, BatchNorm
  on batch statistics with the running statistics updated in place, the aux heads run) and
  `deterministic` (False: dropout on, its keys drawn from the module's "dropout" stream). A new
  module is in eval mode, as the linen module's `__call__` defaults are.

  Attributes:
    network: the `nnx.bridge.ToNNX` holding the linen module and its variables (one attribute
      per top-level linen submodule: "conv1", ..., "classifier").
    rngs: the stream dropout keys come from (forked from the `rngs` given), or None.
  """

  def __init__(self, network: nnx.bridge.ToNNX, rngs: Optional[nnx.Rngs] = None):
    self.network = network
    self.rngs = _dropout_stream(rngs)
    self.deterministic = True
    self.use_running_average = True

  @property
  def linen_module(self) -> GoogLeNet:
    # ToNNX's attribute is `to_nnx__module` in flax 0.12 (`module`, now deprecated, before).
    return vars(self.network).get("to_nnx__module") or self.network.module

  def set_view(self, deterministic: Optional[bool] = None,
               use_running_average: Optional[bool] = None):
    """For `nnx.view(net, deterministic=..., use_running_average=...)` (flax >= 0.12)."""
    if deterministic is not None:
      self.deterministic = deterministic
    if use_running_average is not None:
      self.use_running_average = use_running_average

  def __call__(self, x: jax.Array, *, train: Optional[bool] = None,
               deterministic: Optional[bool] = None,
               rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None) -> Any:
    """Logits in eval mode, `GoogLeNetOutputs` in train mode (`aux1`/`aux2` None without aux
    heads), as the linen module.

    Without `train` the module's mode applies; `train` / `deterministic` given work as in the
    linen `__call__` (`deterministic` defaults to `not train`). `rngs`: the dropout key for
    this call instead of the module's stream."""
    if train is None:
      train = not self.use_running_average
      if deterministic is None:
        deterministic = self.deterministic
    dropout_on = not (not train if deterministic is None else deterministic)
    call_rngs = None
    if dropout_on:
      call_rngs = nnx.Rngs(dropout=_dropout_key(rngs if rngs is not None else self.rngs))
    # ToNNX writes the returned batch_stats back into its nnx.BatchStat variables.
    return self.network(x, train=train, deterministic=deterministic, rngs=call_rngs,
                        mutable=["batch_stats"] if train else False)


def _dropout_stream(rngs: Optional[nnx.Rngs]) -> Optional[nnx.RngStream]:
  """A fork of the "dropout" (else "default") stream of `rngs`; None if it has neither."""
  try:
    return rngs["dropout"].fork() if rngs is not None else None
  except KeyError:
    return None


def _dropout_key(rngs: Any) -> jax.Array:
  if rngs is None:
    raise ValueError("dropout is on but the module has no dropout rngs: build it with "
                     "to_nnx(..., rngs=nnx.Rngs(...)) or pass rngs= to the call")
  if isinstance(rngs, nnx.Rngs):
    return rngs["dropout"]()
  if isinstance(rngs, nnx.RngStream):
    return rngs()
  return rngs


def to_nnx(model: GoogLeNet, variables: Optional[Mapping[str, Any]] = None, *,
           rngs: Optional[nnx.Rngs] = None,
           sample_shape: Optional[Sequence[int]] = None) -> GoogLeNetNNX:
  """The linen `model` as an NNX module holding `variables` ({"params", "batch_stats"}, as
  `model.init`, `convert.torch_to_flax` or `model_dir.load_for_inference` give them).

  Without `variables` the parameters are `googlenet_jax.init_variables(model,
  rngs["params"](), sample_shape)`: the linen initialisation, key for key, compiled fast.
  `rngs` also gives the dropout stream ("dropout", else "default"). `sample_shape` (default:
  one image of the variant's default size) is the input the variables are shaped for
  (`nnx.bridge.lazy_init` runs on it under `nnx.eval_shape`: tracing only). ValueError names
  any variable missing, unexpected or mis-shaped."""
  layout = model.layout
  if sample_shape is None:
    sample_shape = (1, layout.default_size, layout.default_size, layout.in_channels)
  sample_shape = tuple(sample_shape)
  # The structure ToNNX builds for this model, with abstract arrays; filled in below.
  network = nnx.eval_shape(lambda: nnx.bridge.ToNNX(model).lazy_init(
      jnp.zeros(sample_shape, jnp.float32), rngs=jax.random.key(0)))
  if variables is None:
    if rngs is None:
      raise ValueError("to_nnx needs rngs (nnx.Rngs) to initialise the parameters, or variables")
    variables = init_variables(model, rngs["params"](), sample_shape)
  net = GoogLeNetNNX(network, rngs)
  load_linen_variables(net, variables)
  return net


def load_linen_variables(net: GoogLeNetNNX, variables: Mapping[str, Any]) -> None:
  """Set `net`'s parameters and BatchNorm statistics to the linen `variables`, in place."""
  flat = {}
  for collection, tree in variables.items():
    if collection not in COLLECTIONS:
      raise ValueError(f"unexpected variable collection {collection!r}; GoogLeNet has "
                       f"{sorted(COLLECTIONS)}")
    flat.update(traverse_util.flatten_dict(dict(tree)))  # ToNNX merges the collections
  state = nnx.state(net.network, tuple(COLLECTIONS.values()))
  want = traverse_util.flatten_dict(_to_pure_dict(state))  # abstract or not: shapes, dtypes
  missing = sorted("/".join(p) for p in want if p not in flat)
  unexpected = sorted("/".join(p) for p in flat if p not in want)
  misshaped = sorted(f"{'/'.join(p)} {tuple(jnp.shape(flat[p]))} != {tuple(v.shape)}"
                     for p, v in want.items() if p in flat and jnp.shape(flat[p]) != v.shape)
  problems = [f"{title} ({len(items)}): {', '.join(items[:4])}" + (" ..." if len(items) > 4
                                                                   else "")
              for title, items in (("missing", missing), ("unexpected", unexpected),
                                   ("wrongly shaped", misshaped)) if items]
  if problems:
    model = net.linen_module
    raise ValueError(f"variables do not fit GoogLeNet(variant={model.variant!r}, "
                     f"num_classes={model.num_classes}): " + "; ".join(problems))
  _replace_by_pure_dict(state, traverse_util.unflatten_dict(
      {p: jnp.asarray(flat[p], want[p].dtype) for p in want}))
  nnx.update(net.network, state)


def to_linen_variables(net: GoogLeNetNNX) -> dict:
  """`net`'s variables as linen's {"params", "batch_stats"} (arrays; no batch_stats for the
  variants without BatchNorm): for `model.apply`, `model_dir.save_variables`,
  `convert.flax_to_torch`."""
  out = {}
  for collection, kind in COLLECTIONS.items():
    tree = _to_pure_dict(nnx.state(net.network, kind))
    if tree or collection == "params":
      out[collection] = tree
  return out


# Newer flax has these as functions (0.12 deprecates the State methods); older flax only the
# methods.
def _to_pure_dict(state) -> dict:
  if hasattr(nnx, "to_pure_dict"):
    return nnx.to_pure_dict(state)
  return state.to_pure_dict()


def _replace_by_pure_dict(state, tree: dict) -> None:
  if hasattr(nnx, "replace_by_pure_dict"):
    nnx.replace_by_pure_dict(state, tree)
  else:
    state.replace_by_pure_dict(tree)
