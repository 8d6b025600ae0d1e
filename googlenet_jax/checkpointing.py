"""Orbax checkpoints of the whole training state: the latest `keep_checkpoints`, and the best by
validation top-1 when `keep_best` is set. The state is a replicated array tree, so a checkpoint
restores on any device count (the target sharding is always given explicitly)."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, workdir: str, config):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.every = config.checkpoint_every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=True,
            enable_async_checkpointing=config.get("async_checkpointing", True)))
    self.best = None
    if config.get("keep_best", False):
      self.best = ocp.CheckpointManager(
          os.path.abspath(os.path.join(workdir, "best")),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m["top1"], best_mode="max",
              enable_async_checkpointing=False))

  def latest_step(self):
    return self.manager.latest_step()

  def restore_or(self, make_state: Callable[[], Any], sharding) -> tuple[Any, int]:
    """(state, step): restored from the newest complete checkpoint if there is one, else made
    fresh by `make_state()`. The state arrays are placed with `sharding` (replicated)."""
    step = self.manager.latest_step()
    if step is None:
      return make_state(), 0
    abstract = jax.eval_shape(make_state)
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
    restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    logging.getLogger("googlenet_jax").info("resumed from %s/%d", self.directory, step)
    return restored, int(step)

  def save(self, step: int, state: Any, force: bool = False) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def save_best(self, step: int, state: Any, metrics: dict) -> None:
    if self.best is not None:
      self.best.save(step, args=ocp.args.StandardSave(state),
                     metrics={"top1": float(metrics["top1"])}, force=True)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
    if self.best is not None:
      self.best.wait_until_finished()
      self.best.close()
