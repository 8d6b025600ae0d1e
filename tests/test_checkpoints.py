"""Orbax checkpoints: restore on another device count along the same trajectory, keep-N
rotation and best-checkpoint retention (preemption and resume: tests/test_reliability.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from googlenet_jax import train as training
from googlenet_jax.train import checkpointing


# SIGTERM / SIGINT mid-run, then resume, bit-identical: tests/test_reliability.py
# (test_fault_injection_every_kill_resumes_to_identical_parameters, its first two kills).


def _small_state(config):
  model = training.create_model(config, 10)
  tx = training.create_optimizer(config, 10, 10)
  return model, tx, training.create_train_state(model, tx, config, (1, 32, 32, 3), fast_init=True)


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


@pytest.mark.slow
def test_checkpoint_written_on_8_devices_resumes_on_1_along_the_same_trajectory(tmp_path):
  """Two steps on 8 devices, a checkpoint, two more on 1 device (pmap): the losses and
  parameters of four uninterrupted steps on 8 devices, within the rounding of another device
  count (classic layout, no BatchNorm, the small rate of tests/test_training.py, whose
  measurements set these bounds)."""
  config = default.get_config()
  config.update(dict(variant="classic", aux_logits=False, image_size=32, batch_size=8,
                     keep_checkpoints=2, dropout=0.0, learning_rate=3e-6,
                     lr_schedule="constant"))
  model, tx, state = _small_state(config)
  rng = np.random.RandomState(0)
  batches = [{"image": rng.randn(8, 32, 32, 3).astype(np.float32),
              "label": rng.randint(0, 10, 8).astype(np.int32)} for _ in range(4)]
  eight = training.Parallel("shard_map", jax.devices())
  one = training.Parallel("pmap", jax.devices()[:1])
  compile_step = lambda parallel: parallel.compile(
      lambda s, b: training.train_step(s, b, model=model, tx=tx, aux_loss_weight=0.3))
  step8, step1 = compile_step(eight), compile_step(one)
  live, losses = eight.replicate(state), []
  for i, batch in enumerate(batches):
    live, metrics = step8(live, eight.batch(batch))
    losses.append(float(metrics["loss"]))
    if i == 1:
      ckpt = checkpointing.Checkpointer(str(tmp_path), config)
      ckpt.save(2, live, force=True)
      ckpt.close()
      at_2 = jax.device_get(live)
  whole = jax.device_get(live)

  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  restored, step = ckpt.restore_or(lambda: state, one.replicated)
  ckpt.close()
  assert step == 2
  assert restored.params["conv1"]["conv"]["kernel"].sharding.device_set == {jax.devices()[0]}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), at_2)
  resumed_losses = []
  for batch in batches[2:]:
    restored, metrics = step1(restored, one.batch(batch))
    resumed_losses.append(float(metrics["loss"]))
  resumed = jax.device_get(restored)
  assert int(resumed.step) == 4 and np.all(np.isfinite(resumed_losses))
  np.testing.assert_allclose(resumed_losses, losses[2:], rtol=5e-5)
  update = _flat(whole.params) - _flat(state.params)
  assert np.linalg.norm(update) > 3e-5 * np.linalg.norm(_flat(state.params))  # they moved
  err = np.linalg.norm(_flat(resumed.params) - _flat(whole.params)) / np.linalg.norm(update)
  assert err < 1e-2, err


def test_rotation_keeps_the_newest_n_and_the_best(tmp_path):
  config = default.get_config()
  config.update(dict(keep_checkpoints=2, keep_best=True, async_checkpointing=False))
  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  state = {"w": jnp.arange(3.0)}
  for step, top1 in ((1, 0.5), (2, 0.9), (3, 0.7), (4, 0.6)):
    ckpt.save(step, {"w": state["w"] + step}, force=True)
    ckpt.save_best(step, {"w": state["w"] + step}, {"top1": top1})
  ckpt.close()
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [3, 4]
  assert [int(d) for d in os.listdir(tmp_path / "best") if d.isdigit()] == [2]
