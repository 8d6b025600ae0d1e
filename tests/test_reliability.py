"""Reliability: bad input, faults and interruptions never lose work or end in a
traceback wall. Model-input and converter errors are tested in test_model.py, config errors in
test_training.py / test_end_to_end.py; this file covers the rest (see the README)."""

import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import default
from googlenet_jax import train as training

from googlenet_jax.train import checkpointing, sources

from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config.image_size=32", "--config.batch_size=16", "--config.num_train_steps=12",
         "--config.log_every_steps=2", "--config.eval_every_steps=6",
         "--config.checkpoint_every_steps=2", "--config.progress_bar=false"]


def _env():
  return subprocess_env()


def _train_cmd(workdir, data_dir, *overrides):
  return [sys.executable, "train.py", "--config", "configs/default.py", "--workdir",
          str(workdir), f"--config.data_dir={data_dir}", *SMALL, *overrides]


def _one_line_error(run):
  """train.py's contract for bad input: exit 2, `error: ...` last, no traceback."""
  assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
  assert "Traceback" not in run.stderr, run.stderr[-3000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: "), run.stderr[-3000:]
  return last


# --------------------------------------------------------------------------------------------
# Config and data.


@pytest.mark.parametrize("overrides,match", [
    (dict(checkpoint_every_steps=0), "checkpoint_every_steps must be > 0"),
    (dict(keep_checkpoints=0), "keep_checkpoints must be >= 1"),
    (dict(skip_nonfinite_steps=-1), "skip_nonfinite_steps must be >= 0"),
    (dict(batch_size=12, learning_rate=-1.0), "multiple of the device count 8.*\n.*learning_rate"),
])
def test_more_impossible_configs_are_refused_together(overrides, match):
  config = default.get_config()
  config.update(overrides)
  with pytest.raises(ValueError, match=match):
    training.validate_config(config, 8)


def test_unknown_dataset_is_a_clear_error(tmp_path):
  config = default.get_config()
  config.update(dict(dataset="no_such_dataset_xyz", data_dir=str(tmp_path)))
  with pytest.raises(sources.DatasetError, match="unknown dataset 'no_such_dataset_xyz'.*"
                     "'sklearn_digits', 'folder:/path' or a TFDS name"):
    sources.open_source(config)


def test_missing_dataset_folder_is_a_clear_error(tmp_path):
  config = default.get_config()
  config.dataset = f"folder:{tmp_path / 'nope'}"
  with pytest.raises(sources.DatasetError, match="does not exist"):
    sources.open_source(config)


def _images(folder, n, corrupt=0):
  os.makedirs(folder, exist_ok=True)
  rng = np.random.RandomState(0)
  for i in range(n):
    Image.fromarray(rng.randint(0, 255, (12, 12, 3), np.uint8)).save(folder / f"{i}.png")
  for i in range(corrupt):
    (folder / f"bad{i}.jpg").write_bytes(b"this is not a JPEG")


def test_corrupt_files_are_named_and_counted(tmp_path, caplog):
  for cls in ("a", "b"):
    _images(tmp_path / "train" / cls, 3, corrupt=1)
    _images(tmp_path / "val" / cls, 2)
  (tmp_path / "train" / "a" / "notes.txt").write_text("not an image: ignored by extension")
  config = default.get_config()
  config.dataset = f"folder:{tmp_path}"
  with caplog.at_level(logging.WARNING, logger="googlenet_jax"):
    source = sources.open_source(config)
  assert "skipping 2 unreadable image file(s)" in caplog.text
  assert str(tmp_path / "train" / "a" / "bad0.jpg") in caplog.text
  assert str(tmp_path / "train" / "b" / "bad0.jpg") in caplog.text
  assert source.num_examples("train") == 6 and source.num_examples("val") == 4


@pytest.mark.parametrize("layout,match", [
    ("empty_split", "train: no class subfolders"),
    ("unreadable_split", "val: no readable images"),
    ("no_val", "has train/ but no val/"),
    ("empty_class", "class folder 'b' has no images"),
])
def test_empty_split_or_class_is_an_error(tmp_path, layout, match):
  os.makedirs(tmp_path / "train")
  if layout != "empty_split":
    _images(tmp_path / "train" / "a", 2)
    _images(tmp_path / "train" / "b", 0 if layout == "empty_class" else 2)
  if layout != "no_val":
    for cls in ("a", "b"):
      _images(tmp_path / "val" / cls, 0, corrupt=1 if layout == "unreadable_split" else 0)
      if layout != "unreadable_split":
        _images(tmp_path / "val" / cls, 1)
  config = default.get_config()
  config.dataset = f"folder:{tmp_path}"
  with pytest.raises(sources.DatasetError, match=match):
    sources.open_source(config)


_WITHOUT_FIELDS = """from configs import default
def get_config():
  config = default.get_config()
  del config.lr_schedule, config.random_flip
  return config
"""


@pytest.mark.parametrize("args,expected", [
    (["--config.learnig_rate=0.1"], 'Did you mean "learning_rate" instead of "learnig_rate"?'),
    (["--config=configs/no_such_config.py"], "No such file or directory"),
    (["--config={tmp}/without_fields.py"], "the config has no field 'lr_schedule', 'random_flip':"
     " start from configs/default.py's get_config(), which sets every field"),
])
def test_unknown_config_field_missing_field_or_file_via_train_py_is_one_line(tmp_path, args,
                                                                             expected):
  (tmp_path / "without_fields.py").write_text(_WITHOUT_FIELDS)
  args = [a.format(tmp=tmp_path) for a in args]
  run = subprocess.run([sys.executable, "train.py", "--workdir", str(tmp_path / "w"), *args],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert expected in _one_line_error(run)
  assert not os.path.exists(tmp_path / "w")  # nothing written


def test_bad_config_via_train_py_is_one_line_before_any_work(tmp_path):
  run = subprocess.run(
      [sys.executable, "train.py", "--workdir", str(tmp_path / "w"), "--config.batch_size=12",
       "--config.learning_rate=-1", "--cpu_devices=8"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
  assert "error: invalid config" in run.stderr and "learning_rate must be > 0" in run.stderr
  assert not os.path.exists(tmp_path / "w")  # nothing written


# --------------------------------------------------------------------------------------------
# The workdir lock.


def test_second_run_on_a_locked_workdir_is_refused(tmp_path):
  with checkpointing.WorkdirLock(str(tmp_path)):
    with pytest.raises(checkpointing.WorkdirLocked,
                       match=f"workdir {tmp_path} is in use by another run \\(pid {os.getpid()} "
                       "on host "):
      checkpointing.WorkdirLock(str(tmp_path)).acquire()
    # the other processes of the same multi-process run take their own lock files
    with checkpointing.WorkdirLock(str(tmp_path), process_index=1):
      pass
  with checkpointing.WorkdirLock(str(tmp_path)):  # released: free again
    pass


def test_train_py_refuses_a_locked_workdir_and_a_killed_holder_leaves_no_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from googlenet_jax.train import checkpointing; "
       "checkpointing.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); "
       "time.sleep(600)", str(tmp_path)],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    run = subprocess.run(_train_cmd(tmp_path, tmp_path / "tfds"), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=600)
    last = _one_line_error(run)
    assert f"workdir {tmp_path} is in use by another run (pid {holder.pid} on host" in last
    assert not os.path.exists(tmp_path / "checkpoints")
  finally:
    holder.kill()  # SIGKILL: the kernel drops the lock
    holder.wait()
  with checkpointing.WorkdirLock(str(tmp_path)):
    pass


# --------------------------------------------------------------------------------------------
# Checkpoint integrity and rotation.


def _state(step):
  return {"w": jnp.arange(50_000, dtype=jnp.float32) + step,
          "b": {"v": jnp.full((8, 8), float(step))}, "step": jnp.int32(step)}


SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _checkpointer(tmp_path, **overrides):
  config = default.get_config()
  config.update({"keep_checkpoints": 3, **overrides})
  return checkpointing.Checkpointer(str(tmp_path), config)


def _save_steps(tmp_path, steps, **overrides):
  ckpt = _checkpointer(tmp_path, **overrides)
  for s in steps:
    ckpt.save(s, _state(s))
  ckpt.close()


def _steps(tmp_path, sub="checkpoints"):
  return sorted(int(d) for d in os.listdir(tmp_path / sub) if d.isdigit())


def _biggest_data_file(step_dir):
  return max(glob.glob(f"{step_dir}/**/d/*", recursive=True), key=os.path.getsize)


def _truncate(step_dir):
  path = _biggest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _garbage(step_dir):  # same size, different bytes: only the checksums see it
  path = _biggest_data_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\x5a" * 64)


def _no_commit_marker(step_dir):
  os.remove(os.path.join(step_dir, "commit_success.txt"))


def _garbage_metadata(step_dir):
  with open(os.path.join(step_dir, "default", "_METADATA"), "w") as f:
    f.write("{not json")


def _garbage_metadata_no_checksums(step_dir):  # killed before the checksums were written
  os.remove(os.path.join(step_dir, checkpointing.CHECKSUMS))
  _garbage_metadata(step_dir)


def _truncate_no_checksums(step_dir):
  os.remove(os.path.join(step_dir, checkpointing.CHECKSUMS))
  _truncate(step_dir)


def _emptied(step_dir):
  shutil.rmtree(os.path.join(step_dir, "default"))


@pytest.mark.parametrize("damage", [_truncate, _garbage, _no_commit_marker, _garbage_metadata,
                                    _garbage_metadata_no_checksums, _truncate_no_checksums,
                                    _emptied])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage, caplog):
  _save_steps(tmp_path, (2, 4, 6))
  damage(str(tmp_path / "checkpoints" / "6"))
  ckpt = _checkpointer(tmp_path)
  with caplog.at_level(logging.WARNING, logger="googlenet_jax"):
    state, step = ckpt.restore_or(lambda: _state(0), SHARDING)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(_state(4)))
  assert f"checkpoint {tmp_path / 'checkpoints' / '6'} is corrupt or incomplete" in caplog.text
  assert "6.corrupt" in caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4", "6.corrupt"]
  # Training goes on from 4 and saves 6 again; rotation (keep 3) counts only complete ones.
  for s in (6, 8):
    ckpt.save(s, _state(s))
  ckpt.close()
  assert _steps(tmp_path) == [4, 6, 8]
  ckpt = _checkpointer(tmp_path)
  state, step = ckpt.restore_or(lambda: _state(0), SHARDING)
  ckpt.close()
  assert step == 8 and int(state["step"]) == 8


def test_interrupted_async_save_leaves_a_tmp_dir_that_is_ignored_and_cleaned(tmp_path):
  _save_steps(tmp_path, (2, 4))
  # What `kill -9` during an async save leaves: Orbax's temporary directory, never renamed.
  tmp = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1234567"
  shutil.copytree(tmp_path / "checkpoints" / "4", tmp)
  _truncate(str(tmp))
  ckpt = _checkpointer(tmp_path)
  state, step = ckpt.restore_or(lambda: _state(0), SHARDING)
  ckpt.close()
  assert step == 4 and int(state["step"]) == 4
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]  # the tmp dir is gone


def test_every_checkpoint_corrupt_starts_fresh_and_keeps_them_aside(tmp_path, caplog):
  _save_steps(tmp_path, (2, 4))
  for s in (2, 4):
    _truncate(str(tmp_path / "checkpoints" / str(s)))
  ckpt = _checkpointer(tmp_path)
  state, step = ckpt.restore_or(lambda: _state(0), SHARDING)
  ckpt.close()
  assert step == 0 and int(state["step"]) == 0
  assert "no intact checkpoint" in caplog.text
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2.corrupt", "4.corrupt"]


def test_checkpoint_of_another_model_is_an_error_not_corruption(tmp_path):
  _save_steps(tmp_path, (2,))
  ckpt = _checkpointer(tmp_path)
  with pytest.raises(ValueError, match="holds a different model or optimiser state.*w: "
                     r"checkpoint \(50000,\) vs config \(10,\)"):
    ckpt.restore_or(lambda: {**_state(0), "w": jnp.zeros(10)}, SHARDING)
  ckpt.close()
  assert _steps(tmp_path) == [2]  # untouched


def test_rotation_never_deletes_the_only_complete_checkpoint(tmp_path, monkeypatch):
  ckpt = _checkpointer(tmp_path, keep_checkpoints=1)
  ckpt.save(2, _state(2))

  def fail(*args, **kwargs):
    raise OSError("No space left on device")

  monkeypatch.setattr(ckpt.manager, "save", fail)
  with pytest.raises(OSError):
    ckpt.save(4, _state(4))
  ckpt.close()
  assert _steps(tmp_path) == [2]
  assert checkpointing.verify_checksums(str(tmp_path / "checkpoints" / "2")) is None


def test_best_checkpoint_survives_rotation_corruption_and_a_repeated_eval(tmp_path):
  ckpt = _checkpointer(tmp_path, keep_checkpoints=1, keep_best=True)
  for s, top1 in ((2, 0.9), (4, 0.5), (6, 0.7), (8, 0.6)):
    ckpt.save(s, _state(s))
    ckpt.save_best(s, _state(s), {"top1": top1})
  ckpt.close()
  assert _steps(tmp_path) == [8] and _steps(tmp_path, "best") == [2]
  _truncate(str(tmp_path / "checkpoints" / "8"))
  ckpt = _checkpointer(tmp_path, keep_checkpoints=1, keep_best=True)
  _, step = ckpt.restore_or(lambda: _state(0), SHARDING)
  assert step == 0  # the only checkpoint was corrupt: moved aside, start again
  # a resumed run evaluates step 2 again: the best copy is kept, not an error
  ckpt.save_best(2, _state(2), {"top1": 0.9})
  ckpt.save_best(4, _state(4), {"top1": 0.5})
  ckpt.close()
  assert _steps(tmp_path, "best") == [2]
  with ocp.CheckpointManager(str(tmp_path / "best")) as mgr:
    best = mgr.restore(2, args=ocp.args.StandardRestore())
  assert int(best["step"]) == 2


def test_metrics_log_cut_short_by_a_kill_is_read_and_repaired(tmp_path, caplog):
  writer = training.MetricWriter(str(tmp_path), enabled=True)
  writer.write(2, "train", {"loss": 1.0})
  writer.write(4, "train", {"loss": 0.5})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "split": "tr')  # killed mid-write
  writer = training.MetricWriter(str(tmp_path), enabled=True)
  assert [r["step"] for r in writer.read()] == [2, 4]
  writer.truncate_after(4)
  writer.close()
  assert [json.loads(l)["step"] for l in open(tmp_path / "metrics.jsonl")] == [2, 4]


# --------------------------------------------------------------------------------------------
# Non-finite losses.


class _FakeCkpt:
  directory = "/w/checkpoints"

  def close(self):
    pass

  def latest_step(self):
    return 4


def _steps_metrics(finite):
  return [{"loss": np.float32(1.0 if f else np.nan), "top1": np.float32(0.5),
           "top5": np.float32(1.0), "finite": np.float32(f)} for f in finite]


def test_nonfinite_guard_stops_or_skips_and_counts():
  guard = training.loop._NonFiniteGuard(0, _FakeCkpt())  # pylint: disable=protected-access
  with pytest.raises(FloatingPointError, match="non-finite loss or parameters at step 6 .*"
                     "/w/checkpoints/4, is intact"):
    guard.check(_steps_metrics([1, 0]), 6)
  guard = training.loop._NonFiniteGuard(2, _FakeCkpt())  # pylint: disable=protected-access
  out = guard.summarize(_steps_metrics([1, 0, 0, 1]), 4)
  assert out == {"loss": 1.0, "top1": 0.5, "top5": 1.0, "skipped_steps": 2.0}
  pending = _steps_metrics([0, 0])
  guard.check(pending, 6)  # 2 in a row: allowed
  pending += _steps_metrics([0])
  with pytest.raises(FloatingPointError, match="3 consecutive non-finite steps "
                     r"\(skip_nonfinite_steps=2\) at step 7"):
    guard.check(pending, 7)


class _Tiny(nn.Module):  # train_step with any model: compiles in a second, unlike GoogLeNet

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def test_skip_nonfinite_step_leaves_the_state_unchanged():
  config = default.get_config()
  config.update(dict(image_size=32, batch_size=2))
  model = _Tiny()
  tx = training.create_optimizer(config, 10, 10)
  state = training.create_train_state(model, tx, config, (1, 32, 32, 3), fast_init=True)
  one = training.Parallel("pmap", jax.devices()[:1])
  step = one.compile(lambda s, b: training.train_step(s, b, model=model, tx=tx,
                                                      aux_loss_weight=0.3, skip_nonfinite=True))
  good = {"image": np.zeros((2, 32, 32, 3), np.float32), "label": np.zeros(2, np.int32)}
  bad = {**good, "image": np.full((2, 32, 32, 3), np.nan, np.float32)}
  state = one.replicate(state)
  after_bad, metrics = step(state, one.batch(bad))
  assert float(metrics["finite"]) == 0.0 and int(after_bad.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after_bad.params),
               jax.device_get(state.params))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(after_bad.opt_state),
               jax.device_get(state.opt_state))
  after_good, metrics = step(after_bad, one.batch(good))
  assert float(metrics["finite"]) == 1.0 and int(after_good.step) == 2
  assert not np.array_equal(jax.device_get(after_good.params["Dense_0"]["kernel"]),
                            jax.device_get(state.params["Dense_0"]["kernel"]))


# lr x 1e30 from step 5 on (step-decay schedule, 89 steps per epoch): the loss blows up.
EXPLODE = ["--config.lr_schedule=step", "--config.decay_epochs=0.05",
           "--config.decay_rate=1e30"]


def _latest_params(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
    step = mgr.latest_step()
    return step, mgr.restore(step, args=ocp.args.StandardRestore())


@pytest.mark.slow
def test_nonfinite_loss_stops_train_py_and_keeps_the_last_good_checkpoint(tmp_path):
  data_dir = tmp_path / "tfds"
  run = subprocess.run(_train_cmd(tmp_path / "w", data_dir, *EXPLODE), cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=900)
  last = _one_line_error(run)
  assert "non-finite loss or parameters at step" in last and "is intact" in last, last
  bad_step = int(last.split(" at step ")[1].split()[0])
  step, state = _latest_params(tmp_path / "w")
  assert 4 <= step < bad_step
  assert f"checkpoints/{step}, is intact" in last
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
  for s in glob.glob(str(tmp_path / "w" / "checkpoints" / "*")):
    assert checkpointing.verify_checksums(s) is None
  # The rerun starts from that checkpoint (and stops the same way: same data, same step).
  rerun = subprocess.run(_train_cmd(tmp_path / "w", data_dir, *EXPLODE), cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=900)
  assert _one_line_error(rerun) == last
  assert f"resumed from {tmp_path / 'w' / 'checkpoints'}/{step}" in rerun.stderr
  # With skipping allowed, the run goes on: every non-finite step is skipped (not applied, so
  # no checkpoint holds NaNs) and counted. (A learning rate this large fails every step from
  # here on: skipping is for rare spikes; more than N in a row stop the run.)
  skip = subprocess.run(_train_cmd(tmp_path / "skip", data_dir, *EXPLODE,
                                   "--config.skip_nonfinite_steps=100"),
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert skip.returncode == 0, skip.stderr[-3000:]
  assert "the step was skipped" in skip.stderr
  rows = [json.loads(l) for l in open(tmp_path / "skip" / "metrics.jsonl")]
  skipped = [r["skipped_steps"] for r in rows if r["split"] == "train"]
  assert skipped[:2] == [0, 0] and sum(skipped) >= 6, rows
  step, state = _latest_params(tmp_path / "skip")
  assert step == 12 and int(state["step"]) == 12
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))
  few = subprocess.run(_train_cmd(tmp_path / "few", data_dir, *EXPLODE,
                                  "--config.skip_nonfinite_steps=2"),
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert "3 consecutive non-finite steps (skip_nonfinite_steps=2)" in _one_line_error(few)


@pytest.mark.slow
def test_fault_injection_every_kill_resumes_to_identical_parameters(tmp_path):
  """tests/fault_injection.py with a small budget (run it standalone for more kills). The
  first two kills are SIGTERM and SIGINT mid-run: each must save, say where it stopped, leave
  metrics.jsonl and a checkpoint that passes its checksums at that step, and the resumed run
  must end bit-identical to the uninterrupted one."""
  import fault_injection  # pylint: disable=import-outside-toplevel
  # (Up to 3 kills, none started after 420 s: about 4 min on 2 free cores, more when busy.)
  result = fault_injection.run(kills=3, seed=1, max_seconds=420, workdir=str(tmp_path),
                               first_kills=("SIGTERM", "SIGINT"))
  print(json.dumps(result))
  assert not result["failures"], result
  assert result["modes"].get("SIGTERM", 0) >= 1 and result["modes"].get("SIGINT", 0) >= 1, result
  assert result["tried"] >= 1 and result["survived"] == result["tried"], result
  assert result["identical"] and result["metrics_identical"] and result["best_identical"]
