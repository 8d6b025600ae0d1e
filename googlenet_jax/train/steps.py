"""The per-device steps, written once and compiled with pmap or shard_map (`parallel.py`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from googlenet_jax.models import GoogLeNet, GoogLeNetOutputs
from googlenet_jax.train.state import AXIS, TrainState


def _cross_entropy(logits, labels, smoothing=0.0):
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32; f64 stays
  if smoothing:
    onehot = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, onehot)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def topk_correct(logits, labels, k):
  k = min(k, logits.shape[-1])
  top = lax.top_k(logits.astype(jnp.float32), k)[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _per_device(tree: Any) -> Any:
  """Mark replicated values as per-device ("varying") so that `jax.grad` gives each device its
  own gradient (which the step then averages with `lax.pmean`). Without this, JAX's shard_map
  (and pmap, built on it since 0.8) differentiates a replicated input by summing the
  cotangents of all devices: an N-times larger gradient."""
  if hasattr(lax, "pcast"):
    return lax.pcast(tree, AXIS, to="varying")
  if hasattr(lax, "pvary"):
    return lax.pvary(tree, AXIS)
  return tree  # older JAX: per-device semantics already


def _all_finite(tree) -> jax.Array:
  """Whether every element of `tree` is finite, as one reduction over the concatenated leaves:
  a check per leaf costs XLA:CPU three kernels per parameter (~30% of the train step's kernels
  and of its compile time)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in leaves])))


def train_step(state: TrainState, batch: dict, *, model: GoogLeNet, tx, aux_loss_weight: float,
               ema_decay: float = 0.0, label_smoothing: float = 0.0, skip_nonfinite: bool = False):
  """One step on one device's share of the batch; gradients, metrics and BatchNorm statistics
  are averaged over the `batch` axis, so every device ends with the same state. The `finite`
  metric is 0 when the loss or the new parameters are not finite; with `skip_nonfinite` such a
  step then leaves the state as it was (only the step counter advances)."""
  rng = jax.random.wrap_key_data(state.rng)
  dropout_rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
  labels = batch["label"]

  def loss_fn(params):
    variables = {"params": params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    out, mutated = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"],
                               rngs={"dropout": dropout_rng})
    # GoogLeNet's train mode gives GoogLeNetOutputs (aux1/aux2 None without aux heads); any
    # other module, its logits.
    logits = out.logits if isinstance(out, GoogLeNetOutputs) else out
    loss = _cross_entropy(logits, labels, label_smoothing).mean()
    if isinstance(out, GoogLeNetOutputs) and out.aux1 is not None:
      loss = loss + aux_loss_weight * (_cross_entropy(out.aux1, labels, label_smoothing).mean()
                                       + _cross_entropy(out.aux2, labels, label_smoothing).mean())
    return loss, (logits, mutated.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      _per_device(state.params))
  grads = lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
  metrics = {"loss": loss, "top1": topk_correct(logits, labels, 1).mean(),
             "top5": topk_correct(logits, labels, 5).mean()}
  metrics = lax.pmean(metrics, AXIS)
  finite = jnp.isfinite(metrics["loss"]) & _all_finite(params)
  metrics["finite"] = finite.astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema)
  if skip_nonfinite:
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                             state.replace(step=state.step + 1))
  return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: GoogLeNet, use_ema: bool = False):
  """Sums (not means) of loss and correct counts over real examples, across devices."""
  params = state.ema_params if use_ema and state.ema_params is not None else state.params
  variables = {"params": params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  logits = model.apply(variables, batch["image"], train=False)
  mask = batch["mask"].astype(jnp.float32)
  labels = batch["label"]
  sums = {"loss": (_cross_entropy(logits, labels) * mask).sum(),
          "top1": (topk_correct(logits, labels, 1) * mask).sum(),
          "top5": (topk_correct(logits, labels, 5) * mask).sum(),
          "count": mask.sum()}
  return lax.psum(sums, AXIS)


def step_functions(config, model: GoogLeNet, tx) -> tuple[functools.partial, functools.partial]:
  """(train, eval): `train_step` and `eval_step` with the config's settings bound, the
  per-device functions the training loop hands to `Parallel.compile`."""
  train = functools.partial(train_step, model=model, tx=tx,
                            aux_loss_weight=config.aux_loss_weight,
                            ema_decay=config.ema_decay,
                            label_smoothing=config.label_smoothing,
                            skip_nonfinite=config.skip_nonfinite_steps > 0)
  evaluate = functools.partial(eval_step, model=model,
                               use_ema=config.eval_with_ema)
  return train, evaluate
