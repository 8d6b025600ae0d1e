"""Checks of a training config, before any work starts."""

from __future__ import annotations

import jax
import ml_collections

from googlenet_jax import cpu, variants


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
  if config.get("rmsprop_style", "pytorch") not in ("pytorch", "tensorflow"):
    problems.append(f"rmsprop_style must be 'pytorch' or 'tensorflow', got "
                    f"{config.rmsprop_style!r}")
  if not 0 <= config.get("warmup_start_factor", 0.01) <= 1:
    problems.append(f"warmup_start_factor must be in [0, 1], got {config.warmup_start_factor}")
  if config.get("lr_schedule", "constant") not in ("constant", "step", "cosine", "poly"):
    problems.append(f"lr_schedule must be constant, step, cosine or poly, got "
                    f"{config.lr_schedule!r}")
  if config.get("float64") and config.half_precision:
    problems.append("float64 and half_precision exclude each other")
  if config.get("float64") and not jax.config.jax_enable_x64:
    problems.append("float64 needs jax_enable_x64 (train.py turns it on for --config.float64)")
  if config.get("ops", "auto") not in cpu.OPS_NAMES:
    problems.append(f"ops must be one of {', '.join(cpu.OPS_NAMES)}, got {config.ops!r}")
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
  if config.get("data_loader", "tfdata") not in ("tfdata", "dali"):
    problems.append(f"data_loader must be 'tfdata' or 'dali', got {config.data_loader!r}")
  if problems:
    raise ValueError("invalid config:\n  " + "\n  ".join(problems))
