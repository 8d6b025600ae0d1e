"""The training state: the model, the optimiser and its schedule, initialisation (fresh or
from a model directory)."""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from googlenet_jax import model_dir
from googlenet_jax.cpu import compile_time
from googlenet_jax.models import GoogLeNet

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


# The network of a config: the one factory (googlenet_jax.model_dir), with cross-replica BatchNorm.
create_model = functools.partial(model_dir.create_model, bn_axis_name=AXIS)


def learning_rate_schedule(config, steps_per_epoch: int, num_steps: int) -> optax.Schedule:
  """The learning rate of each optimiser step (counted from 0), in the default float precision
  (float64 under jax_enable_x64, where optax's own step and polynomial schedules stay float32).

  Each kind is the closed form of a PyTorch scheduler stepped once per iteration (the
  fidelity tests train against exactly these): "constant"; "step" = StepLR(step_size =
  decay_epochs * steps_per_epoch, gamma=decay_rate), the paper's x0.96 every 8 epochs;
  "cosine" = CosineAnnealingLR(T_max = steps after warm-up, eta_min=0); "poly" =
  PolynomialLR(total_iters = steps after warm-up, power=poly_power), Caffe's bvlc_googlenet.
  A warm-up of warmup_epochs is LinearLR(start_factor=warmup_start_factor, total_iters=warmup
  steps) followed by the kind through SequentialLR (the kind's own count starts after it).
  """
  base = config.learning_rate
  warmup = int(config.get("warmup_epochs", 0) * steps_per_epoch)
  start_factor = config.get("warmup_start_factor", 0.01)
  kind = config.get("lr_schedule", "constant")
  span = max(1, num_steps - warmup)
  if kind == "constant":
    main = lambda t: base + 0.0 * t
  elif kind == "step":
    every = max(1, int(config.decay_epochs * steps_per_epoch))
    main = lambda t: base * config.decay_rate ** jnp.floor(t / every)
  elif kind == "cosine":
    main = lambda t: base * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t, span) / span))
  elif kind == "poly":
    main = lambda t: base * (1 - jnp.minimum(t, span) / span) ** config.get("poly_power", 0.5)
  else:
    raise ValueError(f"unknown lr_schedule {kind!r}")

  def schedule(count):
    t = jnp.asarray(count, jnp.result_type(float))  # float64 under x64
    if not warmup:
      return main(t)
    ramp = base * (start_factor + (1 - start_factor) * t / warmup)
    return jnp.where(t < warmup, ramp, main(jnp.maximum(t - warmup, 0)))

  return schedule


def _decay_mask(params):
  """True for the weights of convolutions and dense layers, False for BatchNorm's scale and
  offset and for biases (every parameter of rank < 2)."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _rmsprop(lr, config):
  """PyTorch's RMSprop (alpha=rmsprop_decay, eps outside the square root, lr applied after
  the momentum buffer), or with rmsprop_style="tensorflow" TensorFlow's and optax's: eps
  inside the square root and lr inside the momentum buffer (the same when lr is constant and
  eps is 0)."""
  decay, eps = config.get("rmsprop_decay", 0.99), config.get("rmsprop_eps", 1e-8)
  momentum = config.get("momentum", 0.0) or None
  style = config.get("rmsprop_style", "pytorch")
  if style == "tensorflow":
    return optax.rmsprop(lr, decay=decay, eps=eps, momentum=momentum, eps_in_sqrt=True)
  if style != "pytorch":
    raise ValueError(f"rmsprop_style must be 'pytorch' or 'tensorflow', got {style!r}")
  return optax.chain(optax.scale_by_rms(decay=decay, eps=eps, eps_in_sqrt=False),
                     optax.trace(decay=momentum) if momentum else optax.identity(),
                     optax.scale_by_learning_rate(lr))


def create_optimizer(config, steps_per_epoch: int, num_steps: int):
  """The config's optimiser with PyTorch's semantics, name for name: "sgd" = torch.optim.SGD
  (momentum, nesterov, no dampening), "adam" = Adam (betas adam_b1/adam_b2, eps adam_eps),
  "adamw" = AdamW (decoupled decay: p -= lr * weight_decay * p), "rmsprop" = RMSprop (see
  `rmsprop_style`). For sgd, adam and rmsprop weight_decay is PyTorch's coupled L2 term
  (weight_decay * p added to the gradient). weight_decay_norm_and_bias=False leaves BatchNorm
  parameters and biases undecayed (torchvision's reference --norm-weight-decay 0 with
  --bias-weight-decay 0: two parameter groups)."""
  lr = learning_rate_schedule(config, steps_per_epoch, num_steps)
  wd = config.get("weight_decay", 0.0)
  mask = None if config.get("weight_decay_norm_and_bias", True) else _decay_mask
  flat = optax.flatten if config.get("flat_optimizer_state", True) else (lambda t: t)
  b1, b2 = config.get("adam_b1", 0.9), config.get("adam_b2", 0.999)
  eps = config.get("adam_eps", 1e-8)
  if config.optimizer == "adamw":
    if not wd:
      return flat(optax.adam(lr, b1=b1, b2=b2, eps=eps))
    if mask is None:
      return flat(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))
    return optax.chain(flat(optax.scale_by_adam(b1=b1, b2=b2, eps=eps)),
                       optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(lr))
  core = {"sgd": lambda: optax.sgd(lr, momentum=config.get("momentum", 0.9) or None,
                                   nesterov=config.get("nesterov", False)),
          "adam": lambda: optax.adam(lr, b1=b1, b2=b2, eps=eps),
          "rmsprop": lambda: _rmsprop(lr, config)}[config.optimizer]()
  # One state vector instead of one per parameter (optax.flatten): the optimiser's arithmetic
  # becomes one kernel instead of ~2 per parameter (XLA:CPU: -130 kernels, ~3 s less tracing
  # and compiling the classic train step); the gradient is concatenated once (~50 MB).
  if not wd:
    return flat(core)
  if mask is None:
    return flat(optax.chain(optax.add_decayed_weights(wd), core))
  return optax.chain(optax.add_decayed_weights(wd, mask), flat(core))


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
