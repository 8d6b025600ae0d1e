"""The training loop: evaluation, checkpoints, preemption, the non-finite guard."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from googlenet_jax import model_dir
from googlenet_jax.ops import LAX, Ops
from googlenet_jax.train import checkpointing, dali_pipeline, input_pipeline, sources
from googlenet_jax.train.config import validate_config
from googlenet_jax.train.metrics import MetricWriter
from googlenet_jax.train.parallel import Parallel
from googlenet_jax.train.state import (create_model, create_optimizer,
                                       create_train_state, initialise_from)
from googlenet_jax.train.steps import step_functions

log = logging.getLogger("googlenet_jax")


# config.data_loader's names: the modules whose `train_batches` / `eval_batches` feed the run
# (dali_pipeline imports DALI inside its functions).
LOADERS = {"tfdata": input_pipeline, "dali": dali_pipeline}


def loader(config):
  """The module whose `train_batches` / `eval_batches` feed the run (`config.data_loader`)."""
  return LOADERS[config.data_loader]


def evaluate(p_eval, state, source, config, parallel: Parallel) -> dict:
  totals = None
  for batch in loader(config).eval_batches(source, config, process_index=jax.process_index(),
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
  def run(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
    validate_config(config, jax.device_count())
    with checkpointing.WorkdirLock(workdir, jax.process_index()), _Preemption():
      return train(config, workdir, **kwargs)

  return run


def _optimizer_as_saved(ckpt, tx, config, per_epoch, num_steps, model, image_shape):
  """`tx`, or the same optimiser with its state in the other form (flat or per-parameter,
  `flat_optimizer_state`) if that is what the workdir's newest checkpoint holds: a run resumes
  in the form it was started with (per-parameter checkpoints included)."""
  saved = ckpt.newest_leaf_paths()
  if not saved:
    return tx

  def paths(optimizer):
    return checkpointing.leaf_paths(jax.eval_shape(
        lambda: create_train_state(model, optimizer, config, image_shape)))

  if paths(tx) == saved:
    return tx
  as_saved = ml_collections.ConfigDict(config.to_dict())
  as_saved.flat_optimizer_state = not config.flat_optimizer_state
  other = create_optimizer(as_saved, per_epoch, num_steps)
  if paths(other) == saved:
    log.info("the checkpoint keeps the optimiser state %s: resuming with it "
             "(flat_optimizer_state=%s)",
             "as one vector" if as_saved.flat_optimizer_state else "per parameter",
             as_saved.flat_optimizer_state)
    return other
  return tx  # restore_or reports the difference


@_one_run_per_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, ops: Ops = LAX,
                       fast_init: bool = False) -> dict:
  """Train, evaluate and checkpoint as `config` says; returns the final eval metrics (and
  `stopped_early` when a signal interrupted the run). `ops` as `GoogLeNet.ops`, `fast_init` as
  in `create_train_state` (train.py: `googlenet_jax.cpu.ops()` and True on CPU). The config is
  checked by `_one_run_per_workdir`, before the workdir is locked."""
  is_main = jax.process_index() == 0
  source = sources.open_source(config)
  num_classes = config.num_classes or source.num_classes
  if num_classes < source.num_classes:
    raise ValueError(f"num_classes {num_classes} < the dataset's {source.num_classes} classes")
  per_epoch = input_pipeline.steps_per_epoch(source, config)
  num_steps = config.num_train_steps or int(math.ceil(config.num_epochs * per_epoch))
  parallel = Parallel(config.parallel)
  model = create_model(config, num_classes, ops)
  tx = create_optimizer(config, per_epoch, num_steps)
  image_shape = (1, config.image_size, config.image_size, config.channels)
  ckpt = checkpointing.Checkpointer(workdir, config)
  tx = _optimizer_as_saved(ckpt, tx, config, per_epoch, num_steps, model, image_shape)
  state, start_step = ckpt.restore_or(
      lambda: create_train_state(model, tx, config, image_shape, fast_init=fast_init),
      parallel.replicated)
  if start_step == 0:
    if config.init_from:
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

  step_fn, eval_fn = step_functions(config, model, tx)
  guard = _NonFiniteGuard(config.skip_nonfinite_steps, ckpt)
  p_train = parallel.compile(step_fn, donate_state=True)
  p_eval = parallel.compile(eval_fn)
  batches = parallel.prefetch(
      loader(config).train_batches(source, config, start_step, num_steps,
                                   jax.process_index(), jax.process_count()),
      config.device_prefetch)
  log_every = config.log_every_steps
  eval_every = config.eval_every_steps or per_epoch
  progress = None
  if is_main and config.progress_bar:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
  pending, t0, images, waited = [], time.time(), 0, 0.0
  eval_metrics, stopped = {}, False
  with _Preemption() as preemption:
    for step in range(start_step, num_steps):
      wait_start = time.perf_counter()
      batch = next(batches)
      waited += time.perf_counter() - wait_start
      state, metrics = p_train(state, batch)
      pending.append(metrics)
      images += config.batch_size
      done = step + 1
      if done % log_every == 0 or done == num_steps:
        train_metrics = guard.summarize(pending, done)
        elapsed = time.time() - t0
        train_metrics["images_per_sec"] = images / elapsed
        # The share of the time the loop waited for the next batch: near 0 when the input
        # pipeline keeps ahead of the steps (timing, like images_per_sec).
        train_metrics["input_wait_fraction"] = min(1.0, waited / elapsed)
        writer.write(done, "train", train_metrics)
        if progress is not None:
          progress.set_postfix(loss=f"{train_metrics['loss']:.3f}",
                               acc=f"{train_metrics['top1']:.3f}",
                               img_s=f"{train_metrics['images_per_sec']:.1f}")
        pending, t0, images, waited = [], time.time(), 0, 0.0
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
