"""GoogLeNet (Inception v1) in Flax linen: one network, five layouts (see `variants.py`)."""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
import threading
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

from googlenet_jax import layers, shapes
from googlenet_jax import variants as V
from googlenet_jax.ops import LAX, Ops
# feature_map_sizes: part of this module's API (the summary tool reads it here).
from googlenet_jax.shapes import EMBEDDING, feature_map_sizes, stage_pool  # noqa: F401

Dtype = Any
ModuleDef = Any

# torchvision's `transform_input`: ImageNet-normalised input -> the [-1, 1] range of its weights.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GoogLeNetOutputs(NamedTuple):
  """What `GoogLeNet` returns in train mode (`train=True`), with or without aux heads.

  `logits` is the main classifier's output; `aux1` the auxiliary head after inception 4a,
  `aux2` the one after inception 4d; both None for a model without aux heads
  (`aux_logits=False`, or a variant that has none). Eval mode returns the logits array itself.

  The order is (logits, aux1, aux2). torchvision's `GoogLeNetOutputs` is (logits, aux_logits2,
  aux_logits1): unpacking the two positionally swaps the heads, so use the names.
  """
  logits: jax.Array
  aux1: Optional[jax.Array]
  aux2: Optional[jax.Array]


# --------------------------------------------------------------------------------------------
# Initialisers, one set per origin, so that a fresh model trains like the model it comes from.


def _torch_default_bias(fan_in: int):
  """PyTorch's default bias init for Conv2d/Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _constant_bias(value: float):
  return lambda fan_in: nn.initializers.constant(value)


@dataclasses.dataclass(frozen=True)
class Initializers:
  conv_kernel: Callable
  dense_kernel: Callable
  bias: Callable[[int], Callable]  # fan_in -> initializer, for every conv and hidden dense layer
  classifier_bias: Callable[[int], Callable]


_XAVIER_FAN_IN = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")

INITIALIZERS = {
    # torch: kaiming_normal_(fan_out, relu) for convs, N(0, 0.01) for linears, zero biases.
    V.Init.KAIMING: Initializers(
        nn.initializers.variance_scaling(2.0, "fan_out", "normal"), nn.initializers.normal(0.01),
        _constant_bias(0.0), _constant_bias(0.0)),
    # Caffe bvlc_googlenet: xavier filler (uniform, variance 1/fan_in), bias 0.2, classifier 0.
    V.Init.CAFFE: Initializers(
        _XAVIER_FAN_IN, _XAVIER_FAN_IN, _constant_bias(0.2), _constant_bias(0.0)),
    # torchvision: trunc_normal_(std=0.01, a=-2, b=2); the bounds are absolute (200 std), so
    # this is a plain normal. Linear biases keep PyTorch's default.
    V.Init.TORCHVISION: Initializers(
        nn.initializers.normal(0.01), nn.initializers.normal(0.01),
        _torch_default_bias, _torch_default_bias),
    # d2l's init_cnn: xavier_uniform_ weights, PyTorch default biases.
    V.Init.XAVIER: Initializers(
        nn.initializers.glorot_uniform(), nn.initializers.glorot_uniform(),
        _torch_default_bias, _torch_default_bias),
    # Keras defaults.
    V.Init.GLOROT: Initializers(
        nn.initializers.glorot_uniform(), nn.initializers.glorot_uniform(),
        _constant_bias(0.0), _constant_bias(0.0)),
}


def feature_names(variant: str = "classic") -> tuple[str, ...]:
  """The stages `GoogLeNet.features` returns for `variant`, in order: every row of Table 1
  that the layout has (the LRN rows only where it has them; not the aux taps), then
  "embedding", the pooled 1024-d vector the classifier reads (before dropout)."""
  layout = V.get_layout(variant)
  rows = [row.name for row in V.TABLE_1
          if not isinstance(row, V.AuxTap) and (layout.lrn or not isinstance(row, V.LRN))]
  return (*rows, EMBEDDING)


# --------------------------------------------------------------------------------------------
# The network.


class InceptionBlock(nn.Module):
  """Four parallel branches, concatenated on channels (Figure 2b of the paper)."""
  spec: V.Inception
  conv: ModuleDef  # a ConvUnit with the layout's normalisation, padding and initialisers
  conv_5x5_kernel: int = 5
  ops: Ops = LAX

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    s = self.spec
    branch_1x1 = self.conv(s.conv_1x1, 1, name="conv_1x1")(x, train)
    branch_3x3 = self.conv(s.conv_3x3_reduce, 1, name="conv_3x3_reduce")(x, train)
    branch_3x3 = self.conv(s.conv_3x3, 3, name="conv_3x3")(branch_3x3, train)
    branch_5x5 = self.conv(s.conv_5x5_reduce, 1, name="conv_5x5_reduce")(x, train)
    branch_5x5 = self.conv(s.conv_5x5, self.conv_5x5_kernel, name="conv_5x5")(branch_5x5, train)
    # 3x3/1 max pool, padding 1 (the same as 'SAME' at stride 1, and as torchvision's ceil_mode).
    pooled = layers.max_pool(x, 3, 1, padding=1, ops=self.ops)
    branch_pool = self.conv(s.pool_proj, 1, name="pool_proj")(pooled, train)
    return jnp.concatenate([branch_1x1, branch_3x3, branch_5x5, branch_pool], axis=-1)


class AuxHead(nn.Module):
  """Auxiliary classifier: pool to 4x4 -> 1x1 conv 128 -> fc 1024 + ReLU -> fc."""
  num_classes: int
  layout: V.Layout
  conv: ModuleDef
  dropout: float
  init: Initializers
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  ops: Ops = LAX

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, deterministic: bool) -> jax.Array:
    if self.layout.aux_pool is V.AuxPool.ADAPTIVE4:
      x = layers.adaptive_avg_pool(x, 4)
    else:
      x = layers.avg_pool(x, 5, 3, ops=self.ops)
    x = self.conv(V.AUX_CONV_FEATURES, 1, name="conv")(x, train)
    # Flattened in NHWC order; the PyTorch converters permute fc1's (c, h, w) rows to match.
    x = x.reshape(x.shape[0], -1)
    dense = functools.partial(nn.Dense, kernel_init=self.init.dense_kernel, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    if self.layout.aux_dropout_before_fc1:
      x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = nn.relu(dense(V.AUX_FC_FEATURES, bias_init=self.init.bias(x.shape[-1]), name="fc1")(x))
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    return dense(self.num_classes, bias_init=self.init.classifier_bias(x.shape[-1]),
                 name="fc2")(x)


class GoogLeNet(nn.Module):
  """GoogLeNet / Inception v1 on NHWC images.

  Attributes:
    variant: "classic" (default), "paper", "torchvision", "d2l" or "keras" (`variants.LAYOUTS`).
    num_classes: classifier outputs.
    aux_logits: build the auxiliary heads; None takes the variant's default.
    transform_input: torchvision's re-normalisation of ImageNet-normalised input to [-1, 1].
    dropout, aux_dropout: override the variant's dropout rates.
    dtype: compute dtype (e.g. bfloat16, or float64 under `jax_enable_x64`).
    param_dtype: dtype of freshly initialised parameters.
    bn_axis_name: mapped axis to average BatchNorm statistics over (cross-replica BatchNorm).
    ops: the convolution and pooling implementations (`googlenet_jax.ops.Ops`). The default,
      `ops.LAX`, is plain `lax` on every backend; `googlenet_jax.cpu.ops()` is XLA:CPU's faster
      set. Same parameters and (to rounding) the same values either way.
  """
  variant: str = "classic"
  num_classes: int = 1000
  aux_logits: Optional[bool] = None
  transform_input: bool = False
  dropout: Optional[float] = None
  aux_dropout: Optional[float] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  ops: Ops = LAX

  @property
  def layout(self) -> V.Layout:
    return V.get_layout(self.variant)

  @property
  def has_aux(self) -> bool:
    layout = self.layout
    if self.aux_logits and not layout.aux_logits:
      raise ValueError(f"the {layout.name!r} layout has no auxiliary heads; use aux_logits=None")
    return layout.aux_logits if self.aux_logits is None else self.aux_logits

  def check_input(self, x: Any, train: bool, upto: Optional[str] = None) -> None:
    """Raise a ValueError naming what was expected, before anything is traced. `upto`: the
    last stage computed (`features`); None: the whole network."""
    shapes.check_input(self.layout, x, upto, aux=train and upto is None and self.has_aux)

  def __call__(self, x: jax.Array, train: bool = False,
               deterministic: Optional[bool] = None) -> Any:
    """Logits in eval mode (`train=False`); `GoogLeNetOutputs` in train mode (`train=True`),
    with `aux1`/`aux2` None when the model has no aux heads. `deterministic` (default:
    `not train`) turns dropout off."""
    return self._forward(x, train, deterministic, None)

  def features(self, x: jax.Array, train: bool = False, *,
               upto: str = EMBEDDING) -> collections.OrderedDict[str, jax.Array]:
    """The output of every stage up to `upto`, by name (`feature_names(variant)`: "conv1" ...
    "inception_5b", "embedding"), in one forward pass that stops there. An OrderedDict in
    network order, which `jax.jit` keeps (it sorts the keys of a plain dict). A backbone:

      feats = model.apply(variables, x, method="features", upto="inception_4e")

    `train=True` uses and updates BatchNorm batch statistics (apply with
    mutable=["batch_stats"]); nothing before the embedding has dropout, and the aux heads do
    not run. Maps are NHWC; "embedding" is (batch, 1024)."""
    names = feature_names(self.variant)
    if upto not in names:
      raise ValueError(f"features(upto={upto!r}): the {self.layout.name!r} layout's stages are "
                       f"{', '.join(names)}")
    return self._forward(x, train, True, upto)

  @nn.compact
  def _forward(self, x: jax.Array, train: bool, deterministic: Optional[bool],
               upto: Optional[str]) -> Any:
    """The network; `upto` None: logits (or GoogLeNetOutputs), else the stages up to it."""
    layout = self.layout
    init = INITIALIZERS[layout.init]
    initializing = self.is_initializing()
    self.check_input(x, train and not initializing, upto)
    if not initializing and upto is None:
      shapes.check_variables(layout, self.num_classes, self.variables, train and self.has_aux)
    if deterministic is None:
      deterministic = not train
    # `init` creates every parameter, the aux heads included, whatever the mode.
    run_aux = self.has_aux and (train or initializing) and upto is None
    feats = collections.OrderedDict()
    dropout = layout.dropout if self.dropout is None else self.dropout
    aux_dropout = layout.aux_dropout if self.aux_dropout is None else self.aux_dropout

    conv = functools.partial(
        layers.ConvUnit, same_padding=layout.same_padding, batch_norm=layout.batch_norm,
        bn_epsilon=layout.bn_epsilon, bn_axis_name=self.bn_axis_name,
        kernel_init=init.conv_kernel, bias_init_for_fan_in=init.bias, dtype=self.dtype,
        param_dtype=self.param_dtype, ops=self.ops)

    if self.transform_input:
      scale = jnp.asarray([s / 0.5 for s in IMAGENET_STD], x.dtype)
      shift = jnp.asarray([(m - 0.5) / 0.5 for m in IMAGENET_MEAN], x.dtype)
      x = x * scale + shift
    if self.dtype is not None:
      x = x.astype(self.dtype)

    aux = {}
    for row in V.TABLE_1:
      if isinstance(row, V.Conv):
        x = conv(row.features, row.kernel, row.stride, name=row.name)(x, train)
      elif isinstance(row, V.MaxPool):
        x = layers.max_pool(x, *stage_pool(layout, row.name), ops=self.ops)
      elif isinstance(row, V.LRN):
        if layout.lrn:
          x = layers.local_response_norm(x)
      elif isinstance(row, V.Inception):
        x = InceptionBlock(row, conv, layout.conv_5x5_kernel, self.ops,
                           name=row.name)(x, train)
      elif isinstance(row, V.AuxTap) and run_aux:
        tap = x
        if initializing and not shapes.aux_input_ok(layout, x.shape[1:3]):
          # Initialised at a size the aux heads cannot take: build them on a 14x14 map.
          tap = jnp.zeros((x.shape[0], 14, 14, x.shape[-1]), x.dtype)
        aux[row.name] = AuxHead(self.num_classes, layout, conv, aux_dropout, init,
                                self.dtype, self.param_dtype, self.ops, name=row.name)(
                                    tap, train, deterministic)
      if upto is not None and not isinstance(row, V.AuxTap) and (
          layout.lrn or not isinstance(row, V.LRN)):
        feats[row.name] = x
        if row.name == upto:
          return feats

    if layout.head_pool is V.HeadPool.AVG7:
      x = layers.avg_pool(x, 7, 1, ops=self.ops).reshape(x.shape[0], -1)
    else:
      x = x.mean(axis=(1, 2))
    if upto is not None:
      feats[EMBEDDING] = x
      return feats
    x = nn.Dropout(dropout)(x, deterministic=deterministic)
    logits = nn.Dense(self.num_classes, kernel_init=init.dense_kernel,
                      bias_init=init.classifier_bias(x.shape[-1]), dtype=self.dtype,
                      param_dtype=self.param_dtype, name="classifier")(x)
    if train:
      return GoogLeNetOutputs(logits, aux.get("aux_after_4a"), aux.get("aux_after_4d"))
    return logits


# --------------------------------------------------------------------------------------------
# Initialisation.
#
# Parameter initialisation is ~60 threefry hashes (one per key split and one per random
# tensor). On CPU, JAX lowers each as a rolled 5-iteration `while` loop, which XLA:CPU compiles
# into ~13 separate kernels: ~850 kernels and about twice the compile time of the unrolled hash
# (one fused kernel per call), which JAX emits on GPU/TPU. The bits are the same either way.
# JAX keeps the rolled form on CPU because it compiles faster inside large programs (the train
# step's dropout masks), so only the initialisation uses the unrolled one.

_LOWERING_LOCK = threading.RLock()


def _threefry_cpu_rules():
  """(registry, primitive, unrolled rule, mlir), or None where this JAX keeps them elsewhere.
  These are JAX internals; a JAX that moves them simply gets the default (rolled) lowering."""
  try:
    from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel
    from jax._src.random import threefry2x32  # pylint: disable=import-outside-toplevel
    registry = mlir._platform_specific_lowerings["cpu"]  # pylint: disable=protected-access
    primitive = threefry2x32.threefry2x32_p
    unrolled = threefry2x32._threefry2x32_lowering_rule  # pylint: disable=protected-access
    if primitive not in registry:
      return None
    return registry, primitive, unrolled, mlir
  except (ImportError, AttributeError, KeyError, TypeError):
    return None


@contextlib.contextmanager
def unrolled_threefry():
  """Programs lowered inside this block emit the threefry hash unrolled on CPU (the form JAX
  uses on GPU/TPU). Only lowering is affected: a program compiled inside and called later
  keeps its form, and programs lowered outside keep the default.

  The rule is JAX's process-wide registry entry, swapped on entry and restored on exit (on an
  error too). A lock makes the blocks of different threads take turns (nesting in one thread
  is fine), so the default is always what is restored; a program another thread lowers while
  a block is open may get the unrolled form, which computes the same bits."""
  with _LOWERING_LOCK:
    found = _threefry_cpu_rules()
    if found is None:
      yield
      return
    registry, primitive, unrolled, mlir = found
    saved = registry[primitive]
    mlir.register_lowering(primitive, unrolled, platform="cpu")
    try:
      yield
    finally:
      registry[primitive] = saved


def unrolled_threefry_available() -> bool:
  return _threefry_cpu_rules() is not None


# The initialisation compiles as up to this many programs, each drawing a share of the
# variables (every `parts`-th leaf), compiled in parallel threads: XLA compiles one program on
# one core (docs/performance.md has the times).
_INIT_PARTS = 4


@functools.lru_cache(maxsize=16)
def _init_programs(model: nn.Module, input_shape: tuple[int, ...], rng_shape: tuple[int, ...],
                   rng_dtype: Any) -> tuple[Any, list[tuple[list[int], Any]]]:
  """(the variables' tree structure, [(leaf indices, compiled program)]) for model.init."""
  rng = jax.ShapeDtypeStruct(rng_shape, rng_dtype)
  init = lambda key: model.init(key, jnp.zeros(input_shape))
  parts = max(1, min(_INIT_PARTS, os.cpu_count() or 1))
  with unrolled_threefry():
    closed, shapes_out = jax.make_jaxpr(init, return_shape=True)(rng)
    treedef = jax.tree_util.tree_structure(shapes_out)
    count = treedef.num_leaves
    if not hasattr(jax.extend.core, "jaxpr_as_fun"):  # a JAX without it: one program
      parts, flat = 1, lambda key: jax.tree_util.tree_leaves(init(key))
    else:
      flat = jax.extend.core.jaxpr_as_fun(closed)
    groups = [list(range(first, count, parts)) for first in range(min(parts, count))]

    def draw(key, group):  # a part's leaves; XLA drops what only the others need
      leaves = flat(key)
      return [leaves[i] for i in group]

    lowered = [jax.jit(functools.partial(draw, group=group)).lower(rng) for group in groups]
  if len(lowered) == 1:
    return treedef, [(groups[0], lowered[0].compile())]
  with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
    compiled = list(pool.map(lambda low: low.compile(), lowered))
  return treedef, list(zip(groups, compiled))


def init_variables(model: nn.Module, rng: Any,
                   input_shape: tuple[int, ...] = (1, 224, 224, 3)) -> dict:
  """`model.init(rng, jnp.zeros(input_shape))`, compiled fast: the variables ({"params"} and,
  for the layouts with BatchNorm, {"batch_stats"}), bit for bit the same.

  `rng`: a JAX key (`jax.random.key(0)`) or an int seed. `input_shape` only sets the shapes
  the network is traced at; the parameters' shapes do not depend on it (the aux heads are
  built whatever the size). On CPU the threefry hash is lowered unrolled for this call
  (`unrolled_threefry`: about half the compile time of `jax.jit(model.init)`), and the
  program is compiled as a few parts in parallel threads; nothing stays changed afterwards.
  Compiled once per (model, input_shape) in a process."""
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  if isinstance(rng, jax.core.Tracer):  # inside a transformation: part of its program
    return dict(model.init(rng, jnp.zeros(input_shape)))
  rng = jnp.asarray(rng)
  treedef, programs = _init_programs(model, tuple(int(n) for n in input_shape),
                                     tuple(rng.shape), rng.dtype)
  leaves = [None] * treedef.num_leaves
  for group, program in programs:
    for i, leaf in zip(group, program(rng)):
      leaves[i] = leaf
  return dict(jax.tree_util.tree_unflatten(treedef, leaves))


def probabilities(logits: jax.Array) -> jax.Array:
  """Class probabilities from logits (what the Keras model's final Softmax layer returns)."""
  return jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
