"""Orbax checkpoints of the whole training state: the latest `keep_checkpoints`, and the best by
validation top-1 when `keep_best` is set. The state is a replicated array tree, so a checkpoint
restores on any device count (the target sharding is always given explicitly).

Reliability (see the README's "Reliability" section):
- `WorkdirLock`: one run per workdir (an `fcntl.flock` the kernel drops when the process dies).
- A step directory appears only once Orbax has committed it (it writes into a temporary
  directory and renames it), so a run killed mid-save leaves the previous checkpoints complete.
- After each save completes, a CRC32 of every file goes into `<step>/checksums.json`; on restore
  a checkpoint whose files do not match, or that Orbax cannot read, is moved aside to
  `<step>.corrupt` with a warning and the previous one is used.
- Rotation is done here, not by Orbax: only checkpoints known to be complete are counted, and
  the newest `keep_checkpoints` of them are never deleted (Orbax deletes old steps even when
  the new save failed).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import zlib
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from googlenet_jax import model_dir

log = logging.getLogger("googlenet_jax")
CHECKSUMS = "checksums.json"


class WorkdirLocked(RuntimeError):
  """Another live process is training in this workdir."""


class WorkdirLock:
  """An exclusive lock on `workdir/.lock` (process 0) or `workdir/.lock.<i>` (process i of a
  multi-process run: the processes of one run do not exclude each other, and each process of a
  second run fails on its own). The kernel releases it when the process exits or is killed, so
  a `kill -9` leaves no stale lock."""

  def __init__(self, workdir: str, process_index: int = 0):
    name = ".lock" if process_index == 0 else f".lock.{process_index}"
    self.path = os.path.join(os.path.abspath(workdir), name)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      try:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
      finally:
        os.close(fd)
      raise WorkdirLocked(
          f"workdir {os.path.dirname(self.path)} is in use by another run ({holder}); wait for "
          f"it to finish, stop it, or pass another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _file_crcs(directory: str) -> dict[str, str]:
  crcs = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, directory)
      if rel in (CHECKSUMS, CHECKSUMS + ".tmp"):
        continue
      crc = 0
      with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
          crc = zlib.crc32(chunk, crc)
      crcs[rel] = f"{crc:08x}:{os.path.getsize(path)}"
  return crcs


def write_checksums(step_dir: str) -> None:
  """Record a CRC32 of every file of a complete checkpoint (atomically: tmp file + rename)."""
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(_file_crcs(step_dir), f, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str) -> Optional[str]:
  """None if the files match `checksums.json` (or there is none yet), else what is wrong."""
  try:
    expected = model_dir.read_json(os.path.join(step_dir, CHECKSUMS))
  except (OSError, ValueError) as e:
    return f"unreadable {CHECKSUMS} ({e})"
  if expected is None:
    return None
  actual = _file_crcs(step_dir)
  bad = sorted(k for k in expected if actual.get(k) != expected[k])
  if bad:
    return "files missing or changed since the save: " + ", ".join(bad[:5]) + (
        f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
  return None


def leaf_paths(tree) -> dict[str, tuple]:
  """{'params/conv1/kernel': shape} for the array leaves of a state or Orbax metadata tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = []
    for k in path:
      names.append(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))))
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out["/".join(names)] = tuple(shape)
  return out


class Checkpointer:

  def __init__(self, workdir: str, config):
    self.directory = os.path.abspath(os.path.join(workdir, model_dir.CHECKPOINTS))
    self.every = config.checkpoint_every_steps
    self.keep = config.keep_checkpoints
    self.is_main = jax.process_index() == 0
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=config.async_checkpointing),
        item_handlers=ocp.StandardCheckpointHandler())  # (so that item_metadata reads shapes)
    self.best = None
    if config.keep_best:
      self.best = ocp.CheckpointManager(
          os.path.abspath(os.path.join(workdir, "best")),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m["top1"], best_mode="max",
              cleanup_tmp_directories=True, enable_async_checkpointing=False))
    self._unverified: list[int] = []  # saved, not yet given checksums

  def latest_step(self):
    return self.manager.latest_step()

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _sync(self, name: str) -> None:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(name)

  def _set_aside(self, step: int, why: str) -> None:
    """Move a corrupt checkpoint to `<step>.corrupt` (kept for inspection, never restored,
    never counted by rotation)."""
    self._sync(f"corrupt checkpoint {step}")
    src = self._step_dir(step)
    dst = src + ".corrupt"
    if self.is_main and os.path.exists(src):
      n = 1
      while os.path.exists(dst):
        dst, n = f"{src}.corrupt{n}", n + 1
      os.rename(src, dst)
    log.warning("checkpoint %s is corrupt or incomplete (%s); moved it to %s and trying the "
                "previous one", src, why, dst)
    self._sync(f"corrupt checkpoint {step} moved")
    self.manager.reload()

  def newest_leaf_paths(self) -> Optional[dict[str, tuple]]:
    """`leaf_paths` of the newest checkpoint's state, or None (no checkpoint, or unreadable
    metadata, which `restore_or` then deals with)."""
    steps = self.manager.all_steps()
    if not steps:
      return None
    try:
      return leaf_paths(self.manager.item_metadata(max(steps)))
    except Exception:  # pylint: disable=broad-except
      return None

  def restore_or(self, make_state: Callable[[], Any], sharding) -> tuple[Any, int]:
    """(state, step): restored from the newest complete and intact checkpoint if there is one,
    else made fresh by `make_state()`. The state arrays are placed with `sharding`
    (replicated). A corrupt checkpoint is moved aside with a warning and the previous one
    tried; a checkpoint of another model or optimiser is an error (not corruption)."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return make_state(), 0
    abstract = jax.eval_shape(make_state)
    target = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), abstract)
    want = leaf_paths(abstract)
    for step in steps:
      problem = verify_checksums(self._step_dir(step))
      if problem is None:
        try:
          have = leaf_paths(self.manager.item_metadata(step))
        except Exception as e:  # pylint: disable=broad-except
          problem = f"unreadable metadata: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
      if problem is None and have and have != want:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        raise ValueError(
            f"checkpoint {self._step_dir(step)} holds a different model or optimiser state "
            f"than this config makes ({len(diff)} arrays differ, e.g. "
            + ", ".join(f"{k}: checkpoint {have.get(k)} vs config {want.get(k)}"
                        for k in diff[:3])
            + "); use the config it was trained with, or another --workdir")
      if problem is None:
        try:
          restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # pylint: disable=broad-except
          problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
      if problem is None:
        log.info("resumed from %s/%d", self.directory, step)
        return restored, int(step)
      self._set_aside(step, problem)
    log.warning("no intact checkpoint in %s: starting from scratch", self.directory)
    return make_state(), 0

  def _finish_saves(self) -> None:
    """Wait for the pending save, record checksums of what it wrote, and rotate."""
    self.manager.wait_until_finished()
    self._sync("checkpoint saves finished")
    if self.is_main:
      for step in self._unverified:
        if os.path.isdir(self._step_dir(step)):
          write_checksums(self._step_dir(step))
    self._unverified = []
    self._rotate()

  def _rotate(self) -> None:
    """Delete all but the newest `keep` complete checkpoints (never fewer than one)."""
    self.manager.reload()
    complete = sorted(self.manager.all_steps())
    keep = max(1, self.keep or len(complete))
    for step in complete[:-keep]:
      self.manager.delete(step)

  def save(self, step: int, state: Any, force: bool = False) -> None:
    if step in self.manager.all_steps():
      return
    self._finish_saves()
    self.manager.save(step, args=ocp.args.StandardSave(state), force=force)
    self._unverified.append(step)

  def save_best(self, step: int, state: Any, metrics: dict) -> None:
    # (A resumed run can evaluate a step again; the best/ copy of it is the same state.)
    if self.best is not None and step not in self.best.all_steps():
      self.best.save(step, args=ocp.args.StandardSave(state),
                     metrics={"top1": float(metrics["top1"])}, force=True)

  def close(self) -> None:
    self._finish_saves()
    self.manager.close()
    if self.best is not None:
      self.best.wait_until_finished()
      self.best.close()
