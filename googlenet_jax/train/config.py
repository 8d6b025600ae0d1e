"""Checks of a training config, before any work starts."""

from __future__ import annotations

import jax
import ml_collections

from googlenet_jax import cpu, variants
from googlenet_jax.train import parallel, state, steps


class _Fields:
  """A config's fields as attributes; one the config lacks is a ValueError that names it."""

  def __init__(self, config: ml_collections.ConfigDict):
    self._config = config

  def __getattr__(self, name: str):
    if name not in self._config:
      raise ValueError(f"config has no field {name!r}: start from configs/default.py's "
                       "get_config(), which sets every field")
    return self._config[name]


def _one_of(name: str, value, allowed) -> list[str]:
  """[] if `value` is one of `allowed`, else the problem, in the words of the config field."""
  if value in allowed:
    return []
  allowed = [repr(a) for a in allowed]
  return [f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, got {value!r}"]


def validate_config(config: ml_collections.ConfigDict, device_count: int) -> None:
  """Raise ValueError for impossible settings, or for a field the config lacks, before any
  work starts."""
  from googlenet_jax.train.loop import LOADERS  # pylint: disable=import-outside-toplevel
  c = _Fields(config)
  problems = []
  if c.variant not in variants.LAYOUTS:
    problems.append(f"variant {c.variant!r} is not one of {sorted(variants.LAYOUTS)}")
  problems += _one_of("parallel", c.parallel, parallel.MODES)
  if c.batch_size <= 0 or c.batch_size % device_count:
    problems.append(f"batch_size {c.batch_size} must be a positive multiple of the "
                    f"device count {device_count}")
  eval_batch = c.eval_batch_size or c.batch_size
  if eval_batch % device_count:
    problems.append(f"eval_batch_size {eval_batch} must be a multiple of {device_count}")
  if not c.learning_rate > 0:
    problems.append(f"learning_rate must be > 0, got {c.learning_rate}")
  problems += _one_of("optimizer", c.optimizer, state.OPTIMIZERS)
  problems += _one_of("rmsprop_style", c.rmsprop_style, state.RMSPROP_STYLES)
  if not 0 <= c.warmup_start_factor <= 1:
    problems.append(f"warmup_start_factor must be in [0, 1], got {c.warmup_start_factor}")
  problems += _one_of("lr_schedule", c.lr_schedule, state.LR_SCHEDULES)
  if c.float64 and c.half_precision:
    problems.append("float64 and half_precision exclude each other")
  if c.float64 and not jax.config.jax_enable_x64:
    problems.append("float64 needs jax_enable_x64 (train.py turns it on for --config.float64)")
  problems += _one_of("ops", c.ops, cpu.OPS_NAMES)
  if c.image_size < 16:
    problems.append(f"image_size {c.image_size} is too small for a stride-32 network")
  if not (c.num_train_steps or 0) > 0 and not c.num_epochs > 0:
    problems.append("set num_epochs or num_train_steps to a positive number")
  if c.aux_loss_weight < 0:
    problems.append(f"aux_loss_weight must be >= 0, got {c.aux_loss_weight}")
  if not c.checkpoint_every_steps > 0:
    problems.append(f"checkpoint_every_steps must be > 0, got {c.checkpoint_every_steps}")
  if c.keep_checkpoints is not None and c.keep_checkpoints < 1:
    problems.append(f"keep_checkpoints must be >= 1, got {c.keep_checkpoints}")
  if c.skip_nonfinite_steps < 0:
    problems.append(f"skip_nonfinite_steps must be >= 0, got {c.skip_nonfinite_steps}")
  problems += _one_of("data_loader", c.data_loader, LOADERS)
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))
  # The optimiser, its schedule and the steps read their fields as they are built (cheap: no
  # arrays), so a field they need and the config lacks is named here too.
  steps.step_functions(c, None, state.create_optimizer(c, 1, 1))
