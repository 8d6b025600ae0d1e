"""Training: state, the per-device step (pmap or shard_map), evaluation and the loop."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from googlenet_jax import checkpointing
from googlenet_jax import compile_time
from googlenet_jax import input_pipeline
from googlenet_jax import model_dir
from googlenet_jax import variants
from googlenet_jax.models import GoogLeNet, GoogLeNetOutputs

AXIS = "batch"
log = logging.getLogger("googlenet_jax")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # Polyak/EMA weights, or None
  rng: jax.Array  # raw key data (uint32), so that checkpoints hold plain arrays


# --------------------------------------------------------------------------------------------
# Config checks, model, optimiser.


def validate_config(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Raise ValueError for impossible settings before any work starts."""
  problems = []
  if config.variant not in variants.LAYOUTS:
    problems.append(f"variant {config.variant!r} is not one of {sorted(variants.LAYOUTS)}")
  if config.parallel not in ("pmap", "shard_map"):
    problems.append(f"parallel must be 'pmap' or 'shard_map', got {config.parallel!r}")
  if config.batch_size <= 0 or config.batch_size % device_count:
    problems.append(f"batch_size {config.batch_size} must be a positive multiple of the "
                    f"device count {device_count}")
  eval_batch = config.get("eval_batch_size") or config.batch_size
  if eval_batch % device_count:
    problems.append(f"eval_batch_size {eval_batch} must be a multiple of {device_count}")
  if not config.learning_rate > 0:
    problems.append(f"learning_rate must be > 0, got {config.learning_rate}")
  if config.optimizer not in ("sgd", "adam", "adamw", "rmsprop"):
    problems.append(f"optimizer must be sgd, adam, adamw or rmsprop, got {config.optimizer!r}")
  if config.image_size < 16:
    problems.append(f"image_size {config.image_size} is too small for a stride-32 network")
  if not (config.get("num_train_steps") or 0) > 0 and not config.num_epochs > 0:
    problems.append("set num_epochs or num_train_steps to a positive number")
  if config.aux_loss_weight < 0:
    problems.append(f"aux_loss_weight must be >= 0, got {config.aux_loss_weight}")
  if not config.checkpoint_every_steps > 0:
    problems.append(f"checkpoint_every_steps must be > 0, got {config.checkpoint_every_steps}")
  if config.get("keep_checkpoints") is not None and config.keep_checkpoints < 1:
    problems.append(f"keep_checkpoints must be >= 1, got {config.keep_checkpoints}")
  if config.get("skip_nonfinite_steps", 0) < 0:
    problems.append(f"skip_nonfinite_steps must be >= 0, got {config.skip_nonfinite_steps}")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))


def create_model(config, num_classes: int) -> GoogLeNet:
  dtype = jnp.bfloat16 if config.half_precision else None
  return GoogLeNet(variant=config.variant, num_classes=num_classes,
                   aux_logits=config.get("aux_logits"), dtype=dtype,
                   transform_input=config.get("transform_input", False),
                   dropout=config.get("dropout"), aux_dropout=config.get("aux_dropout"),
                   bn_axis_name=AXIS)


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


def create_train_state(model: GoogLeNet, tx, config, image_shape) -> TrainState:
  key = jax.random.key(config.seed)
  with compile_time.unrolled_threefry(), compile_time.gc_paused():  # ~2x faster to compile
    variables = jax.jit(model.init)(key, jnp.zeros(image_shape, jnp.float32))
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


# --------------------------------------------------------------------------------------------
# The per-device steps (written once, compiled with pmap or shard_map).


def _cross_entropy(logits, labels, smoothing=0.0):
  logits = logits.astype(jnp.float32)
  if smoothing:
    onehot = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, onehot)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def _topk_correct(logits, labels, k):
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
    if isinstance(out, GoogLeNetOutputs):
      logits = out.logits
      loss = _cross_entropy(logits, labels, label_smoothing).mean() + aux_loss_weight * (
          _cross_entropy(out.aux1, labels, label_smoothing).mean()
          + _cross_entropy(out.aux2, labels, label_smoothing).mean())
    else:
      logits = out
      loss = _cross_entropy(logits, labels, label_smoothing).mean()
    return loss, (logits, mutated.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      _per_device(state.params))
  grads = lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema_params
  if ema is not None:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
  metrics = {"loss": loss, "top1": _topk_correct(logits, labels, 1).mean(),
             "top5": _topk_correct(logits, labels, 5).mean()}
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
          "top1": (_topk_correct(logits, labels, 1) * mask).sum(),
          "top5": (_topk_correct(logits, labels, 5) * mask).sum(),
          "count": mask.sum()}
  return lax.psum(sums, AXIS)


class _FirstCallWithoutGC:
  """A jitted/pmapped step whose first call (tracing, lowering and compiling it) runs with
  Python's garbage collector paused; other attributes (`lower`, ...) are the step's own."""

  def __init__(self, fn: Callable):
    self._fn = fn
    self._called = False

  def __call__(self, *args, **kwargs):
    if self._called:
      return self._fn(*args, **kwargs)
    with compile_time.gc_paused():
      out = self._fn(*args, **kwargs)
    self._called = True
    return out

  def __getattr__(self, name):
    return getattr(self._fn, name)


class Parallel:
  """Compiles per-device steps with `jax.pmap` or `jax.jit(jax.shard_map(...))` over a 1-D
  mesh of all devices, and places batches to match. The state is one replicated array tree in
  both modes (so checkpoints restore on any device count)."""

  def __init__(self, mode: str, devices: Optional[list] = None):
    self.mode = mode
    self.devices = list(devices) if devices is not None else jax.devices()
    # Auto axes: the same mesh type pmap builds, so states move between the two without copies.
    self.mesh = jax.sharding.Mesh(np.asarray(self.devices), (AXIS,),
                                  axis_types=(jax.sharding.AxisType.Auto,))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P(AXIS))

  def compile(self, step: Callable, donate_state: bool = False) -> Callable:
    if self.mode == "pmap":
      fn = jax.pmap(step, axis_name=AXIS, in_axes=(None, 0), out_axes=None,
                    devices=self.devices)
    else:
      mapped = jax.shard_map(step, mesh=self.mesh, in_specs=(P(), P(AXIS)), out_specs=P())
      fn = jax.jit(mapped, donate_argnums=(0,) if donate_state else ())
    if jax.process_count() == 1:
      return _FirstCallWithoutGC(fn)
    # Across processes, every process must reach the first collective within the CPU
    # collectives' set-up timeout (30 s for gloo), and compiling can take minutes on a loaded
    # machine: compile ahead of time, then wait for every process before the first call.
    if self.mode == "pmap":
      return self._compile_pmap_ahead(step)
    compiled = []

    def run(state, batch):
      if not compiled:
        with compile_time.gc_paused():
          compiled.append(fn.lower(state, batch).compile())
        multihost_utils.sync_global_devices(f"compiled {_name(step)}")
      return compiled[0](state, batch)

    return run

  def _compile_pmap_ahead(self, step: Callable) -> Callable:
    """Multi-process pmap, compiled before its first call. `jax.pmap(...).lower` fails on
    unmapped scalars (JAX 0.10), so the state's scalars travel as shape (1,) and are reshaped
    inside; the compiled program takes global arrays (the pmap axis over all devices)."""
    def unscalar(tree):
      return jax.tree.map(lambda x: jnp.reshape(x, (1,)) if jnp.ndim(x) == 0 else x, tree)

    def step_on_vectors(vector_state, batch, *, scalar_mask):
      state = jax.tree.map(lambda x, is_scalar: x.reshape(()) if is_scalar else x,
                           vector_state, scalar_mask)
      return step(state, batch)

    compiled = []

    def run(state, batch):
      if not compiled:
        mask = jax.tree.map(lambda x: jnp.ndim(x) == 0, state)
        fn = jax.pmap(functools.partial(step_on_vectors, scalar_mask=mask), axis_name=AXIS,
                      in_axes=(None, 0), out_axes=None, devices=self.devices)
        with compile_time.gc_paused():
          compiled.append(fn.lower(unscalar(state), batch).compile())
        multihost_utils.sync_global_devices(f"compiled {_name(step)}")
      batch_sharding = compiled[0].input_shardings[0][1]
      batch = jax.tree.map(
          lambda x, sharding: jax.make_array_from_process_local_data(sharding, x),
          batch, batch_sharding)
      return compiled[0](unscalar(state), batch)

    return run

  def batch(self, local_batch: dict) -> dict:
    """This process's numpy batch -> what the compiled step takes."""
    if self.mode == "pmap":
      n = len([d for d in self.devices if d.process_index == jax.process_index()])
      return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), local_batch)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x), local_batch)

  def replicate(self, tree: Any) -> Any:
    def put(x):
      x = np.asarray(x)
      return jax.make_array_from_callback(x.shape, self.replicated, lambda idx: x[idx])
    return jax.tree.map(put, tree)


# --------------------------------------------------------------------------------------------
# Metrics output: metrics.jsonl, TensorBoard, and a PNG of the curves.


def _name(step: Callable) -> str:
  return getattr(step, "func", step).__name__


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
      self.tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split,
              **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self.tb.scalar(f"{split}/{k}", float(v), int(step))
    self.tb.flush()

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    records = []
    with open(self.path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:  # a line cut short by a killed run
          log.warning("%s: skipping a malformed line: %r", self.path, line[:80])
    return records

  def truncate_after(self, step: int) -> None:
    """On resume, drop records a stopped run wrote after its last checkpoint."""
    if self.enabled and os.path.exists(self.path):
      keep = [r for r in self.read() if r["step"] <= step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
      os.replace(tmp, self.path)

  def plot(self, png_path: str) -> None:
    if not self.enabled:
      return
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    records = self.read()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
      rows = [r for r in records if r["split"] == split]
      if rows:
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], style, label=split)
        axes[1].plot(steps, [r["top1"] for r in rows], style, label=f"{split} top-1")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[1].set(xlabel="step", ylabel="accuracy", title="top-1 accuracy", ylim=(0, 1))
    for ax in axes:
      ax.legend()
      ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

  def close(self):
    if self.tb is not None:
      self.tb.close()


# --------------------------------------------------------------------------------------------
# The loop.


def evaluate(p_eval, state, source, config, parallel: Parallel) -> dict:
  totals = None
  for batch in input_pipeline.eval_batches(source, config, process_index=jax.process_index(),
                                           process_count=jax.process_count()):
    sums = p_eval(state, parallel.batch(batch))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  return {"loss": totals["loss"] / count, "top1": totals["top1"] / count,
          "top5": totals["top5"] / count, "count": count}


class _Preemption:
  """SIGTERM/SIGINT: finish the current step, save, exit cleanly."""

  _active: list = []  # nested: a signal during start-up reaches the training loop's

  def __init__(self):
    self.requested = False
    self._old = {}

  def __enter__(self):
    self.requested = any(p.requested for p in _Preemption._active)
    _Preemption._active.append(self)
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    log.warning("signal %d: saving a checkpoint and stopping", signum)
    self.requested = True

  def __exit__(self, *exc):
    _Preemption._active.remove(self)
    for sig, old in self._old.items():
      signal.signal(sig, old)


class _NonFiniteGuard:
  """Watches the steps' `finite` metric: stops the run at the first non-finite step, or with
  `skip_nonfinite_steps` = N > 0 (the step then left the state unchanged) after more than N
  consecutive ones. `check` runs before anything is saved, so no checkpoint holds them."""

  def __init__(self, allowed: int, ckpt: checkpointing.Checkpointer):
    self.allowed, self.ckpt = allowed, ckpt
    self.consecutive, self.checked, self.skipped = 0, 0, 0

  def check(self, pending: list, done: int) -> None:
    first = done - len(pending) + 1  # the step number of pending[0]
    for i, m in enumerate(jax.device_get(pending[self.checked:]), start=self.checked):
      if float(m["finite"]) >= 0.5:
        self.consecutive = 0
        continue
      self.consecutive += 1
      self.skipped += 1
      if self.consecutive > self.allowed:
        self.ckpt.close()
        last = self.ckpt.latest_step()
        kept = (f"the last good checkpoint, {self.ckpt.directory}/{last}, is intact and a rerun "
                f"resumes from it" if last is not None else "no checkpoint had been saved")
        what = (f"{self.consecutive} consecutive non-finite steps (skip_nonfinite_steps="
                f"{self.allowed})" if self.allowed else "non-finite loss or parameters")
        raise FloatingPointError(
            f"{what} at step {first + i} (loss {float(m['loss'])}); stopped: {kept} (lower "
            f"learning_rate, or set skip_nonfinite_steps)")
      log.warning("step %d: non-finite loss or parameters; the step was skipped (%d in a row)",
                  first + i, self.consecutive)
    self.checked = len(pending)

  def summarize(self, pending: list, done: int) -> dict:
    """The interval's mean train metrics over the steps that were applied."""
    self.check(pending, done)
    self.checked = 0
    rows = [m for m in jax.device_get(pending) if float(m["finite"]) >= 0.5]
    out = {k: float(np.mean([m[k] for m in rows])) if rows else float("nan")
           for k in pending[0] if k != "finite"}
    if self.allowed:
      out["skipped_steps"] = float(len(pending) - len(rows))
    return out


def _one_run_per_workdir(train: Callable) -> Callable:
  """Checks the config, then holds `workdir`'s lock for the whole run (a second run on the
  same workdir raises `checkpointing.WorkdirLocked`) and defers SIGTERM/SIGINT that arrive
  during start-up to the training loop (which saves, then stops)."""

  @functools.wraps(train)
  def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate_config(config, jax.device_count())
    with checkpointing.WorkdirLock(workdir, jax.process_index()), _Preemption():
      return train(config, workdir)

  return run


def _optimizer_as_saved(ckpt, tx, config, per_epoch, num_steps, model, image_shape):
  """`tx`, or the same optimiser with its state in the other form (flat or per-parameter,
  `flat_optimizer_state`) if that is what the workdir's newest checkpoint holds: a run resumes
  in the form it was started with (runs from before the flat state existed included)."""
  saved = ckpt.newest_leaf_paths()
  if not saved:
    return tx

  def paths(optimizer):
    return checkpointing.leaf_paths(jax.eval_shape(
        lambda: create_train_state(model, optimizer, config, image_shape)))

  if paths(tx) == saved:
    return tx
  as_saved = ml_collections.ConfigDict(config.to_dict())
  as_saved.flat_optimizer_state = not config.get("flat_optimizer_state", True)
  other = create_optimizer(as_saved, per_epoch, num_steps)
  if paths(other) == saved:
    log.info("the checkpoint keeps the optimiser state %s: resuming with it "
             "(flat_optimizer_state=%s)",
             "as one vector" if as_saved.flat_optimizer_state else "per parameter",
             as_saved.flat_optimizer_state)
    return other
  return tx  # restore_or reports the difference


@_one_run_per_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train, evaluate and checkpoint as `config` says; returns the final eval metrics (and
  `stopped_early` when a signal interrupted the run)."""
  validate_config(config, jax.device_count())
  is_main = jax.process_index() == 0
  source = input_pipeline.open_source(config)
  num_classes = config.get("num_classes") or source.num_classes
  if num_classes < source.num_classes:
    raise ValueError(f"num_classes {num_classes} < the dataset's {source.num_classes} classes")
  per_epoch = input_pipeline.steps_per_epoch(source, config)
  num_steps = config.get("num_train_steps") or int(math.ceil(config.num_epochs * per_epoch))
  parallel = Parallel(config.parallel)
  model = create_model(config, num_classes)
  tx = create_optimizer(config, per_epoch, num_steps)
  image_shape = (1, config.image_size, config.image_size, config.get("channels", 3))
  ckpt = checkpointing.Checkpointer(workdir, config)
  tx = _optimizer_as_saved(ckpt, tx, config, per_epoch, num_steps, model, image_shape)
  state, start_step = ckpt.restore_or(
      lambda: create_train_state(model, tx, config, image_shape), parallel.replicated)
  if start_step == 0:
    if config.get("init_from"):
      state = initialise_from(state, config, config.init_from)
    state = parallel.replicate(state)
  if is_main:  # what predict / evaluate / init_from need to rebuild the model
    model_dir.write_config(workdir, config, num_classes=num_classes,
                           class_names=source.class_names)
  writer = MetricWriter(workdir, is_main)
  writer.truncate_after(start_step)
  if is_main:
    log.info("training %s on %s: %d steps (%d per epoch), %d device(s), %s, from step %d",
                 config.variant, source.name, num_steps, per_epoch, jax.device_count(),
                 config.parallel, start_step)

  step_fn = functools.partial(train_step, model=model, tx=tx,
                              aux_loss_weight=config.aux_loss_weight,
                              ema_decay=config.get("ema_decay", 0.0),
                              label_smoothing=config.get("label_smoothing", 0.0),
                              skip_nonfinite=config.get("skip_nonfinite_steps", 0) > 0)
  guard = _NonFiniteGuard(config.get("skip_nonfinite_steps", 0), ckpt)
  p_train = parallel.compile(step_fn, donate_state=True)
  p_eval = parallel.compile(functools.partial(eval_step, model=model,
                                              use_ema=config.get("eval_with_ema", False)))
  batches = input_pipeline.train_batches(source, config, start_step, num_steps,
                                         jax.process_index(), jax.process_count())
  log_every = config.get("log_every_steps", 10)
  eval_every = config.get("eval_every_steps") or per_epoch
  progress = None
  if is_main and config.get("progress_bar", True):
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
  pending, t0, images = [], time.time(), 0
  eval_metrics, stopped = {}, False
  with _Preemption() as preemption:
    for step in range(start_step, num_steps):
      batch = next(batches)
      state, metrics = p_train(state, parallel.batch(batch))
      pending.append(metrics)
      images += config.batch_size
      done = step + 1
      if done % log_every == 0 or done == num_steps:
        train_metrics = guard.summarize(pending, done)
        train_metrics["images_per_sec"] = images / (time.time() - t0)
        writer.write(done, "train", train_metrics)
        if progress is not None:
          progress.set_postfix(loss=f"{train_metrics['loss']:.3f}",
                               acc=f"{train_metrics['top1']:.3f}",
                               img_s=f"{train_metrics['images_per_sec']:.1f}")
        pending, t0, images = [], time.time(), 0
      if progress is not None:
        progress.update(1)
      if done % eval_every == 0 or done % config.checkpoint_every_steps == 0:
        guard.check(pending, done)  # nothing non-finite is saved
      if done % eval_every == 0 or done == num_steps:
        eval_metrics = evaluate(p_eval, state, source, config, parallel)
        writer.write(done, "eval", {k: v for k, v in eval_metrics.items() if k != "count"})
        if is_main:
          log.info("step %d: eval loss %.4f top-1 %.4f top-5 %.4f (%d examples)", done,
                       eval_metrics["loss"], eval_metrics["top1"], eval_metrics["top5"],
                       eval_metrics["count"])
        ckpt.save_best(done, state, eval_metrics)
      if done % config.checkpoint_every_steps == 0 or done == num_steps:
        ckpt.save(done, state)
      # Stop at a logging boundary, so that a resumed run logs exactly what an uninterrupted
      # one would (train metrics are averaged over each logging interval).
      if preemption.requested and done < num_steps and done % log_every == 0:
        ckpt.save(done, state, force=True)
        stopped = True
        break
  if progress is not None:
    progress.close()
  if not eval_metrics and not stopped:  # resumed a run that had already finished
    eval_metrics = evaluate(p_eval, state, source, config, parallel)
  ckpt.close()
  writer.plot(os.path.join(workdir, "training_curves.png"))
  writer.close()
  return {**eval_metrics, "stopped_early": stopped, "step": int(jax.device_get(state.step))}
