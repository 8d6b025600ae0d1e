"""Training: the state, the per-device steps, data parallelism, the loop, checkpoints, metrics
and input. `python train.py` is the command line; these are its parts, for your own loops.

One job per file: `config` (checks), `state` (model, optimiser, schedule, initialisation),
`steps` (train and eval step, written once per device), `parallel` (pmap or shard_map),
`metrics`, `loop` (`train_and_evaluate`), `checkpointing`, `sources` (datasets),
`preprocessing` (TensorFlow image ops), `input_pipeline` (tf.data batches), `dali_pipeline`
(NVIDIA DALI batches), `tfrecords`, `digits` (the offline dataset). Model directories
(config.json, checkpoints for inference, fine-tuning) are `googlenet_jax.model_dir`.
"""

try:
  from googlenet_jax.train.config import validate_config
  from googlenet_jax.train.loop import evaluate, train_and_evaluate
  from googlenet_jax.train.metrics import MetricWriter
  from googlenet_jax.train.parallel import Parallel
  from googlenet_jax.train.state import (AXIS, TrainState, create_model, create_optimizer,
                                         create_train_state, initialise_from,
                                         learning_rate_schedule)
  from googlenet_jax.train.steps import eval_step, train_step
except ImportError as e:
  if (e.name or "").split(".")[0] == "googlenet_jax":
    raise
  # A library of the `train` extra (optax, orbax, ml_collections, TensorFlow, ...) is missing.
  raise ImportError(f"googlenet_jax.train needs the train extra ({e}): install "
                    "googlenet_jax[train] (pip install 'googlenet_jax[train]')",
                    name=e.name) from e

__all__ = ["AXIS", "MetricWriter", "Parallel", "TrainState", "create_model", "create_optimizer",
           "create_train_state", "eval_step", "evaluate", "initialise_from",
           "learning_rate_schedule", "train_and_evaluate", "train_step", "validate_config"]
