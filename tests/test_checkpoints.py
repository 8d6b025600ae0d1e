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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.image_size=32", "--config.batch_size=16", "--config.num_train_steps=12",
         "--config.log_every_steps=2", "--config.eval_every_steps=6",
         "--config.checkpoint_every_steps=4", "--config.progress_bar=false"]


def _train_cmd(workdir, data_dir):
  return [sys.executable, "train.py", "--config", "configs/default.py", "--workdir",
          str(workdir), f"--config.data_dir={data_dir}", *SMALL]


def _env():
  return {**os.environ, "XLA_FLAGS": "", "JAX_CACHE_DIR": os.path.join(ROOT, ".jax_cache")}


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
  return model, tx, training.create_train_state(model, tx, config, (1, 32, 32, 3))


@pytest.mark.slow
def test_checkpoint_written_on_8_devices_restores_on_1_and_continues(tmp_path):
  config = default.get_config()
  config.update(dict(image_size=32, batch_size=8, keep_checkpoints=2, dropout=0.0))
  model, tx, state = _small_state(config)
  eight = training.Parallel("shard_map", jax.devices())
  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  ckpt.save(3, eight.replicate(state), force=True)
  ckpt.close()
  one = training.Parallel("pmap", jax.devices()[:1])
  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  restored, step = ckpt.restore_or(lambda: state, one.replicated)
  ckpt.close()
  assert step == 3
  assert restored.params["conv1"]["conv"]["kernel"].sharding.device_set == {jax.devices()[0]}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state))
  step_fn = one.compile(lambda s, b: training.train_step(s, b, model=model, tx=tx,
                                                         aux_loss_weight=0.3))
  batch = {"image": np.zeros((8, 32, 32, 3), np.float32), "label": np.zeros(8, np.int32)}
  new, metrics = step_fn(restored, one.batch(batch))
  assert int(new.step) == 1 and np.isfinite(float(metrics["loss"]))


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
