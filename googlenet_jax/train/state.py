"""The training state: the model, the optimiser and its schedule, initialisation (fresh or
from a model directory)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from googlenet_jax.cpu import compile_time
from googlenet_jax.models import GoogLeNet
from googlenet_jax.ops import LAX, Ops
from googlenet_jax.train import model_dir

AXIS = "batch"  # the data-parallel axis: devices under pmap, the mesh axis under shard_map
log = logging.getLogger("googlenet_jax")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # Polyak/EMA weights, or None
  rng: jax.Array  # raw key data (uint32), so that checkpoints hold plain arrays


def create_model(config, num_classes: int, ops: Ops = LAX) -> GoogLeNet:
  """The config's network; `ops` as `GoogLeNet.ops` (`googlenet_jax.cpu.ops()` on CPU)."""
  dtype = jnp.bfloat16 if config.half_precision else None
  param_dtype = jnp.float32
  if config.get("float64"):
    dtype = param_dtype = jnp.float64
  return GoogLeNet(variant=config.variant, num_classes=num_classes,
                   aux_logits=config.get("aux_logits"), dtype=dtype, param_dtype=param_dtype,
                   transform_input=config.get("transform_input", False),
                   dropout=config.get("dropout"), aux_dropout=config.get("aux_dropout"),
                   bn_axis_name=AXIS, ops=ops)


def learning_rate_schedule(config, steps_per_epoch: int, num_steps: int) -> optax.Schedule:
  base = config.learning_rate
  warmup = int(config.get("warmup_epochs", 0) * steps_per_epoch)
  kind = config.get("lr_schedule", "constant")
  if kind == "constant":
    main = optax.constant_schedule(base)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(base, max(1, num_steps - warmup))
  elif kind == "step":  # the paper: x decay_rate every decay_epochs
    main = optax.exponential_decay(base, int(config.decay_epochs * steps_per_epoch),
                                   config.decay_rate, staircase=True)
  elif kind == "poly":  # Caffe bvlc_googlenet: base * (1 - t/T) ** power
    main = optax.polynomial_schedule(base, 0.0, config.get("poly_power", 0.5),
                                     max(1, num_steps - warmup))
  else:
    raise ValueError(f"unknown lr_schedule {kind!r}")
  if warmup:
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), main], [warmup])
  return main


def create_optimizer(config, steps_per_epoch: int, num_steps: int):
  lr = learning_rate_schedule(config, steps_per_epoch, num_steps)
  wd = config.get("weight_decay", 0.0)
  if config.optimizer == "adamw":
    return optax.adamw(lr, weight_decay=wd)
  opt = {"sgd": lambda: optax.sgd(lr, momentum=config.get("momentum", 0.9) or None,
                                  nesterov=config.get("nesterov", False)),
         "adam": lambda: optax.adam(lr),
         "rmsprop": lambda: optax.rmsprop(lr, decay=0.9, eps=1.0, momentum=0.9)}[config.optimizer]()
  # PyTorch-style coupled weight decay (added to the gradient), as the recipes use it.
  opt = optax.chain(optax.add_decayed_weights(wd), opt) if wd else opt
  # One state vector instead of one per parameter: the optimiser's arithmetic becomes one
  # kernel instead of ~2 per parameter (XLA:CPU: -130 kernels, ~3 s less tracing and
  # compiling the classic train step); the gradient is concatenated once (~50 MB).
  return optax.flatten(opt) if config.get("flat_optimizer_state", True) else opt


def create_train_state(model: GoogLeNet, tx, config, image_shape, *,
                       fast_init: bool = False) -> TrainState:
  """A fresh state from `config.seed`. `fast_init`: lower `init` with the threefry hash
  unrolled on CPU (`compile_time.unrolled_threefry`, which swaps a JAX lowering rule while
  `init` is lowered: ~2x faster to compile, the same bits); for entry points."""
  key = jax.random.key(config.seed)
  # float64 models start from the float32 model's weights, widened (the same trajectory).
  wide = getattr(model, "param_dtype", None) == jnp.float64
  init_model = model.clone(param_dtype=jnp.float32) if wide else model
  unrolled = compile_time.unrolled_threefry() if fast_init else contextlib.nullcontext()
  with unrolled, compile_time.gc_paused():
    variables = jax.jit(init_model.init)(key, jnp.zeros(image_shape, jnp.float32))
  if wide:
    variables = jax.tree.map(lambda x: x.astype(jnp.float64)
                             if jnp.issubdtype(x.dtype, jnp.floating) else x, variables)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
      ema_params=params if config.get("ema_decay", 0.0) else None,
      rng=jax.random.key_data(jax.random.fold_in(key, 1)))


def initialise_from(state: TrainState, config, directory: str) -> TrainState:
  """A fresh state with the weights of the model directory `directory` (a train.py workdir or
  a converted checkpoint) copied in; classifier heads of another shape (num_classes) and aux
  heads the pretrained model lacks stay freshly initialised (logged)."""
  pretrained, _ = model_dir.load_pretrained(directory, config)
  fresh = {"params": state.params, "batch_stats": state.batch_stats}
  merged, reinitialised, ignored = model_dir.merge_pretrained(fresh, pretrained)
  log.info("initialised from %s%s%s", directory,
           f"; re-initialised (shape differs or absent): {', '.join(reinitialised)}"
           if reinitialised else "",
           f"; ignored (not in this model): {', '.join(ignored)}" if ignored else "")
  params = jax.device_get(merged["params"])
  return state.replace(params=params, batch_stats=jax.device_get(merged.get("batch_stats", {})),
                       ema_params=params if state.ema_params is not None else None)
