"""Fault injection: kill a real `train.py` run at random moments and check that resuming it
always reaches exactly the parameters (and metrics.jsonl) of an uninterrupted run.

  python tests/fault_injection.py --kills 8 --seed 0 --max-seconds 600 [--workdir DIR]

One uninterrupted tiny run is the reference. Then one workdir is trained, killed and restarted
until it completes. Each kill is one of:
  startup   SIGKILL at a random moment of start-up (imports, dataset, restore);
  training  SIGKILL 0-1 s after the run logged a random step it had not reached yet;
  save      SIGKILL the moment a checkpoint save is in progress (an Orbax temporary
            directory exists in checkpoints/ (async) or best/ (sync)), plus 0-30 ms;
  signal    SIGTERM or SIGINT, timed like `training`: the run must save and exit with
            status 0.
Checkpoints are saved every 2 steps with keep_checkpoints=1 and keep_best, so most kills land
near a save, a rotation or a best-checkpoint save. A kill "survives" when the next start
resumes from the newest complete checkpoint (no corrupt-checkpoint fallback was needed, no
error) and the final result is identical. Prints the counts; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 24
CONFIG = ["--config.image_size=32", "--config.batch_size=16", f"--config.num_train_steps={STEPS}",
          "--config.log_every_steps=2", "--config.eval_every_steps=6",
          "--config.checkpoint_every_steps=2", "--config.keep_checkpoints=1",
          "--config.keep_best=true", "--config.progress_bar=false"]


def _env() -> dict:
  return subprocess_env()


def _cmd(workdir: str, data_dir: str) -> list[str]:
  return [sys.executable, "train.py", "--config", "configs/default.py", "--workdir", workdir,
          f"--config.data_dir={data_dir}", *CONFIG]


def _start(workdir: str, data_dir: str, log_path: str) -> subprocess.Popen:
  log = open(log_path, "w")  # pylint: disable=consider-using-with
  return subprocess.Popen(_cmd(workdir, data_dir), cwd=ROOT, env=_env(), stdout=log,
                          stderr=subprocess.STDOUT, start_new_session=True)


def _complete_steps(workdir: str) -> list[int]:
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def _saving(workdir: str) -> set[str]:
  """Orbax's temporary directories: a save is in progress (or was killed)."""
  return set(glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))
             + glob.glob(os.path.join(workdir, "best", "*.orbax-checkpoint-tmp*")))


def _training(log_path: str) -> bool:
  with open(log_path, errors="replace") as f:
    return " training torchvision on " in f.read()


def _last_logged_step(workdir: str) -> int:
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      text = f.read()
  except FileNotFoundError:
    return 0
  return max([int(m) for m in re.findall(r'"step": (\d+)', text)] or [0])


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k not in ("images_per_sec", "input_wait_fraction")} for r in rows]


def _final_state(workdir: str):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
    return mgr.latest_step(), mgr.restore(mgr.latest_step(), args=ocp.args.StandardRestore())


def _checksum_problem(workdir: str, step: int):
  from googlenet_jax.train import checkpointing  # pylint: disable=import-outside-toplevel
  return checkpointing.verify_checksums(os.path.join(workdir, "checkpoints", str(step)))


def _identical(a, b) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  return len(la) == len(lb) and all(
      pa == pb and np.array_equal(np.asarray(xa), np.asarray(xb))
      for (pa, xa), (pb, xb) in zip(la, lb))


def run(kills: int, seed: int, max_seconds: float, workdir: str | None = None,
        verbose: bool = True, first_kills: tuple[str, ...] = ()) -> dict:
  """Returns {"tried", "survived", "modes", "starts", "identical", "failures", ...}.
  `first_kills`: the kinds of the first kills ("startup", "training", "save", "SIGTERM",
  "SIGINT"); the rest are drawn at random."""
  t_start = time.time()
  rng = random.Random(seed)
  root = workdir or tempfile.mkdtemp(prefix="fault_injection_")
  os.makedirs(root, exist_ok=True)
  data_dir = os.path.join(root, "tfds")
  whole, killed = os.path.join(root, "whole"), os.path.join(root, "killed")
  for d in (whole, killed):
    shutil.rmtree(d, ignore_errors=True)
  say = print if verbose else (lambda *a, **k: None)

  # The reference: one uninterrupted run (also prepares the dataset and warms the cache).
  t0 = time.time()
  ref = _start(whole, data_dir, os.path.join(root, "whole.log"))
  if ref.wait(timeout=max(60.0, max_seconds)) != 0:
    raise RuntimeError(f"the uninterrupted run failed: see {root}/whole.log")
  ref_seconds = time.time() - t0
  with open(os.path.join(root, "whole.log")) as f:  # the time to the "training" log line
    match = re.search(r"(\d\d):(\d\d):(\d\d),\d+ INFO training ", f.read())
  first = time.localtime(t0)
  ref_startup = ((int(match[1]) - first.tm_hour) * 3600 + (int(match[2]) - first.tm_min) * 60
                 + int(match[3]) - first.tm_sec) % 86400 if match else ref_seconds / 2
  say(f"uninterrupted run: {ref_seconds:.0f} s ({ref_startup:.0f} s to the first step)")

  tried, survived, failures = 0, 0, []
  modes: dict[str, int] = {}
  unchecked: list[int] = []  # kills whose resume has not been seen yet
  expect = 0  # the step the next start must resume from: the newest complete checkpoint
  attempt = 0
  while True:
    attempt += 1
    log_path = os.path.join(root, f"killed.{attempt}.log")
    before, stale = _complete_steps(killed), _saving(killed)  # (stale: left by a kill)
    proc = _start(killed, data_dir, log_path)
    out_of_budget = tried >= kills or time.time() - t_start > max_seconds
    forced = first_kills[tried] if tried < len(first_kills) else None
    mode = None if out_of_budget or expect >= STEPS else (
        "signal" if forced in ("SIGTERM", "SIGINT") else forced) or rng.choice(
            ["startup", "training", "training", "save", "save", "save", "signal", "signal"])
    started, delay = time.time(), rng.uniform(0.0, 1.0)
    # A step the run logs before its last logging interval (a kill after the last one would
    # find the run finished); a forced kill soon after the resume, leaving room for the next.
    last = min(expect + 6, STEPS - 3) if forced else STEPS - 3
    target = rng.randint(expect + 1, last) if expect < last else STEPS
    kill_sent, reached = None, None
    while proc.poll() is None:
      now = time.time()
      if mode == "startup" and now - started > delay * ref_startup:
        kill_sent = signal.SIGKILL
      elif mode in ("training", "signal") and _training(log_path):
        # a random moment after the run has logged step `target` (0-1 s later)
        if reached is None and _last_logged_step(killed) >= target:
          reached = now
        if reached is not None and now - reached > delay:
          kill_sent = (signal.SIGKILL if mode == "training" else
                       signal.Signals[forced] if forced in ("SIGTERM", "SIGINT") else
                       rng.choice([signal.SIGTERM, signal.SIGINT]))
      elif mode == "save" and _training(log_path) and _saving(killed) - stale:
        time.sleep(rng.uniform(0.0, 0.03))
        kill_sent = signal.SIGKILL
      if kill_sent is not None:
        proc.send_signal(kill_sent)
        break
      if now - started > 900:
        proc.kill()
        failures.append(f"attempt {attempt}: hung")
        break
      time.sleep(0.005)
    rc = proc.wait()
    with open(log_path, errors="replace") as f:
      log_text = f.read()

    # Did this start resume from the newest complete checkpoint the previous kill left?
    if "is corrupt or incomplete" in log_text:
      failures.append(f"attempt {attempt}: fell back from a corrupt checkpoint ({log_path})")
    match = re.search(r" training torchvision on .* from step (\d+)", log_text)
    if match:
      if int(match.group(1)) == expect:
        survived += len(unchecked)
      else:
        failures.append(f"attempt {attempt}: resumed from step {match.group(1)}, not from the "
                        f"newest complete checkpoint {expect} ({log_path})")
      unchecked = []

    if kill_sent is None:  # ran to the end
      if rc != 0:
        failures.append(f"attempt {attempt}: exit {rc} ({log_path})")
      break
    graceful = kill_sent != signal.SIGKILL
    if rc == 0 and not graceful:  # it finished just before the kill: nothing was killed
      break
    if (graceful and rc != 0) or (not graceful and rc != -signal.SIGKILL):
      failures.append(f"attempt {attempt}: {signal.Signals(kill_sent).name} gave exit {rc} "
                      f"({log_path})")
    tried += 1
    key = mode if mode != "signal" else signal.Signals(kill_sent).name
    modes[key] = modes.get(key, 0) + 1
    unchecked.append(tried)
    after = _complete_steps(killed)
    if before and not after:
      failures.append(f"attempt {attempt}: the {key} kill left no complete checkpoint")
    expect = max(after) if after else 0
    if graceful and rc == 0:  # saved where it stopped, said so, and logged up to there
      stopped = re.search(r"stopped at step (\d+) by a signal; checkpoint saved", log_text)
      if not stopped or int(stopped.group(1)) != expect or _last_logged_step(killed) != expect:
        failures.append(f"attempt {attempt}: {key} did not stop at a saved, logged step "
                        f"({log_path})")
      elif _checksum_problem(killed, expect):
        failures.append(f"attempt {attempt}: checkpoint {expect} fails its checksums")
    say(f"kill {tried}: {key:8s} {time.time() - started:5.1f} s into start {attempt}; "
        f"complete checkpoints before {before}, after {after}")
  if unchecked:
    failures.append(f"kills {unchecked}: no resume was seen after them")

  result = {"tried": tried, "survived": survived, "modes": modes, "starts": attempt,
            "failures": failures, "reference_seconds": round(ref_seconds, 1),
            "seconds": round(time.time() - t_start, 1), "workdir": root}
  if not failures:
    step_a, state_a = _final_state(whole)
    step_b, state_b = _final_state(killed)
    result["identical"] = step_a == step_b == STEPS and _identical(state_a, state_b)
    result["metrics_identical"] = _metrics(whole) == _metrics(killed)
    best = sorted(os.listdir(os.path.join(killed, "best")))
    result["best_identical"] = best == sorted(os.listdir(os.path.join(whole, "best")))
    if not (result["identical"] and result["metrics_identical"] and result["best_identical"]):
      failures.append("the final state, metrics or best checkpoint differ")
  say(f"kills tried: {tried}, survived: {survived} ({modes}); final parameters identical: "
      f"{result.get('identical')}, metrics.jsonl identical: {result.get('metrics_identical')}; "
      f"{result['seconds']:.0f} s")
  for failure in failures:
    say("FAILURE:", failure)
  return result


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-seconds", type=float, default=900.0,
                      help="stop killing after this long (the run is then completed)")
  parser.add_argument("--workdir", default=None, help="default: a new temporary directory")
  args = parser.parse_args()
  result = run(args.kills, args.seed, args.max_seconds, args.workdir)
  print(json.dumps(result))
  return 0 if not result["failures"] and result["survived"] == result["tried"] else 1


if __name__ == "__main__":
  sys.exit(main())
