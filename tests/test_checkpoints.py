"""Orbax checkpoints: preemption and bit-identical resume, restore on another device count,
keep-N rotation and best-checkpoint retention."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import default
from googlenet_jax import train as training

from googlenet_jax.train import checkpointing

from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.image_size=32", "--config.batch_size=16", "--config.num_train_steps=12",
         "--config.log_every_steps=2", "--config.eval_every_steps=6",
         "--config.checkpoint_every_steps=4", "--config.progress_bar=false"]


def _train_cmd(workdir, data_dir):
  return [sys.executable, "train.py", "--config", "configs/default.py", "--workdir",
          str(workdir), f"--config.data_dir={data_dir}", *SMALL]


def _env():
  return subprocess_env()


def _metrics(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [{k: v for k, v in r.items() if k not in ("images_per_sec", "input_wait_fraction")} for r in rows]


def _final_params(workdir):
  directory = os.path.join(workdir, "checkpoints")
  with ocp.CheckpointManager(directory) as mgr:
    return mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(tmp_path):
  data_dir = tmp_path / "tfds"
  whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
  run = subprocess.run(_train_cmd(whole, data_dir), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-2000:]

  proc = subprocess.Popen(_train_cmd(interrupted, data_dir), cwd=ROOT, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = interrupted / "metrics.jsonl"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l)["step"] >= 2 for l in open(metrics)):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  assert "stopped at step" in out
  stopped_at = int(out.split("stopped at step ")[1].split()[0])
  assert stopped_at < 12  # mid-run, and mid-epoch (89 steps per epoch)
  run = subprocess.run(_train_cmd(interrupted, data_dir), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-2000:]
  assert _metrics(interrupted) == _metrics(whole)
  a, b = _final_params(interrupted), _final_params(whole)
  jax.tree.map(np.testing.assert_array_equal, a, b)


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
