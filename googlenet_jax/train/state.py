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


def _constant(base, config, steps_per_epoch, span):
  del config, steps_per_epoch, span
  return lambda t: base + 0.0 * t


def _step(base, config, steps_per_epoch, span):
  del span
  every, rate = max(1, int(config.decay_epochs * steps_per_epoch)), config.decay_rate
  return lambda t: base * rate ** jnp.floor(t / every)


def _cosine(base, config, steps_per_epoch, span):
  del config, steps_per_epoch
  return lambda t: base * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(t, span) / span))


def _poly(base, config, steps_per_epoch, span):
  del steps_per_epoch
  power = config.poly_power
  return lambda t: base * (1 - jnp.minimum(t, span) / span) ** power


# config.lr_schedule's kinds: (learning_rate, config, steps_per_epoch, steps after warm-up) ->
# the rate at step t of the kind's own count.
LR_SCHEDULES = {"constant": _constant, "step": _step, "cosine": _cosine, "poly": _poly}


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
  warmup = int(config.warmup_epochs * steps_per_epoch)
  start_factor = config.warmup_start_factor
  span = max(1, num_steps - warmup)
  main = LR_SCHEDULES[config.lr_schedule](base, config, steps_per_epoch, span)

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


def _rmsprop_pytorch(lr, decay, eps, momentum):
  return optax.chain(optax.scale_by_rms(decay=decay, eps=eps, eps_in_sqrt=False),
                     optax.trace(decay=momentum) if momentum else optax.identity(),
                     optax.scale_by_learning_rate(lr))


def _rmsprop_tensorflow(lr, decay, eps, momentum):
  return optax.rmsprop(lr, decay=decay, eps=eps, momentum=momentum, eps_in_sqrt=True)


# config.rmsprop_style's forms: (lr, decay, eps, momentum or None) -> RMSprop.
RMSPROP_STYLES = {"pytorch": _rmsprop_pytorch, "tensorflow": _rmsprop_tensorflow}


def _rmsprop(lr, config):
  """PyTorch's RMSprop (alpha=rmsprop_decay, eps outside the square root, lr applied after
  the momentum buffer), or with rmsprop_style="tensorflow" TensorFlow's and optax's: eps
  inside the square root and lr inside the momentum buffer (the same when lr is constant and
  eps is 0)."""
  return RMSPROP_STYLES[config.rmsprop_style](lr, config.rmsprop_decay, config.rmsprop_eps,
                                              config.momentum or None)


def _sgd(lr, config):
  return optax.sgd(lr, momentum=config.momentum or None, nesterov=config.nesterov)


def _adam(lr, config):
  return optax.adam(lr, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps)


def _decay(config):
  """(weight_decay, its mask or None for every parameter, the optimiser state's flattening)."""
  mask = None if config.weight_decay_norm_and_bias else _decay_mask
  flat = optax.flatten if config.flat_optimizer_state else (lambda t: t)
  return config.weight_decay, mask, flat


def _coupled(core):
  """The optimiser of `core` (lr, config) -> transform with PyTorch's coupled weight decay:
  weight_decay * p added to the gradient."""

  def build(lr, config):
    wd, mask, flat = _decay(config)
    # One state vector instead of one per parameter (optax.flatten): the optimiser's
    # arithmetic becomes one kernel instead of ~2 per parameter (XLA:CPU: -130 kernels, ~3 s
    # less tracing and compiling the classic train step); the gradient is concatenated once.
    if not wd:
      return flat(core(lr, config))
    if mask is None:
      return flat(optax.chain(optax.add_decayed_weights(wd), core(lr, config)))
    return optax.chain(optax.add_decayed_weights(wd, mask), flat(core(lr, config)))

  return build


def _adamw(lr, config):
  """AdamW: p -= lr * weight_decay * p, decoupled from Adam's moments."""
  wd, mask, flat = _decay(config)
  b1, b2, eps = config.adam_b1, config.adam_b2, config.adam_eps
  if not wd:
    return flat(optax.adam(lr, b1=b1, b2=b2, eps=eps))
  if mask is None:
    return flat(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd))
  return optax.chain(flat(optax.scale_by_adam(b1=b1, b2=b2, eps=eps)),
                     optax.add_decayed_weights(wd, mask), optax.scale_by_learning_rate(lr))


# config.optimizer's names: (learning-rate schedule, config) -> the optimiser.
OPTIMIZERS = {"sgd": _coupled(_sgd), "adam": _coupled(_adam), "adamw": _adamw,
              "rmsprop": _coupled(_rmsprop)}


def create_optimizer(config, steps_per_epoch: int, num_steps: int):
  """The config's optimiser with PyTorch's semantics, name for name: "sgd" = torch.optim.SGD
  (momentum, nesterov, no dampening), "adam" = Adam (betas adam_b1/adam_b2, eps adam_eps),
  "adamw" = AdamW (decoupled decay: p -= lr * weight_decay * p), "rmsprop" = RMSprop (see
  `rmsprop_style`). For sgd, adam and rmsprop weight_decay is PyTorch's coupled L2 term
  (weight_decay * p added to the gradient). weight_decay_norm_and_bias=False leaves BatchNorm
  parameters and biases undecayed (torchvision's reference --norm-weight-decay 0 with
  --bias-weight-decay 0: two parameter groups)."""
  lr = learning_rate_schedule(config, steps_per_epoch, num_steps)
  return OPTIMIZERS[config.optimizer](lr, config)


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
      ema_params=params if config.ema_decay else None,
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
