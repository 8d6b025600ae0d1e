"""One command that measures a GPU: the project against PyTorch on the same card, the input
pipelines that feed it, and train.py end to end (see benchmarks/NOTES.md).

  python benchmarks/gpu.py --out gpu.json          # about 6-8 minutes on one GPU
  python benchmarks/gpu.py --smoke --out tmp.json  # every row on the CPU backend, ~1 minute

Rows, each with the device that ran it (jax `device_kind`, `torch.cuda.get_device_name`):
- jax_train / jax_infer: the training step as the training loop builds it (`step_functions`
  through `Parallel.compile`; torchvision layout, 224 px, 1000 classes, bfloat16 compute with
  float32 parameters: `half_precision`; float32 on the CPU backend, as for PyTorch) and jitted evaluation-mode inference, at batch 128 and
  256; peak device memory (`memory_stats()["peak_bytes_in_use"]`, cumulative in the process);
- torch_eager_* / torch_compile_*: torchvision's googlenet (random weights) with AMP (bfloat16
  autocast) and channels_last, eager and `torch.compile`d, same batches; peak memory
  (`torch.cuda.max_memory_allocated`, reset per row);
- pipeline_tfdata / pipeline_dali: the training input pipeline alone (inception crop, flip,
  normalise) on a JPEG set made here (benchmarks/jpeg_set.py): img/s and host CPU-seconds per
  image (this process and its children). tf.data yields host arrays; DALI (`device="mixed"`
  on a GPU) yields device arrays, waited for;
- train_py_tfdata / train_py_dali: `train.py` for --train-steps steps with each loader on that
  set: img/s and the busy fraction of the device, 1 - `input_wait_fraction` (metrics.jsonl,
  the first logging interval, which compiles, left out), and img/s over jax_train's.
A row that cannot run here (DALI missing, ...) says `available: false` and why.
Nothing is downloaded: random weights, images made from the photographs installed packages
ship. Timing as benchmarks/throughput.py: compiled first, warm-up steps, then the median of
rounds, each waited for (`block_until_ready`, `torch.cuda.synchronize`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

# Entry point: JAX and PyTorch share the card, and train.py runs beside this process, so JAX
# allocates as it goes instead of taking 75% of the memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))

# PyTorch before TensorFlow (imported by the input pipeline): the other order crashes.
import torch  # noqa: E402
import torchvision  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jpeg_set  # noqa: E402
from pipeline import cpu_seconds  # noqa: E402
from configs import imagenet_torchvision  # noqa: E402
from googlenet_jax import cpu  # noqa: E402
from googlenet_jax.tools import cli  # noqa: E402
from googlenet_jax.train import input_pipeline, sources  # noqa: E402
from googlenet_jax.train.parallel import Parallel  # noqa: E402
from googlenet_jax.train.state import create_model, create_optimizer, create_train_state  # noqa: E402
from googlenet_jax.train.steps import step_functions  # noqa: E402

FULL = dict(batches=(128, 256), size=224, reps=5, iters=5, warmup=2, train_images=1000,
            val_images=200, pipeline_images=1024, pipeline_batch=128, train_steps=200,
            train_batch=256, log_every=50, torch_compile_backend="inductor")
SMOKE = dict(batches=(8,), size=64, reps=2, iters=1, warmup=1, train_images=40, val_images=10,
             pipeline_images=32, pipeline_batch=8, train_steps=3, train_batch=8, log_every=1,
             torch_compile_backend="eager")  # (inductor compiles C++ for minutes on a CPU)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="the JSON file to write")
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes on the CPU backend: checks that every row runs")
  p.add_argument("--root", default=None, help="where the JPEG set goes (default: a temp dir)")
  p.add_argument("--train-steps", type=int, default=None, help="train.py steps per loader")
  return p.parse_args(argv)


def jax_device() -> str:
  return str(jax.devices()[0].device_kind)


def torch_device() -> str:
  if torch.cuda.is_available():
    return torch.cuda.get_device_name(0)
  return f"cpu ({platform.processor() or platform.machine()})"


def jax_peak_bytes() -> tuple[float, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return float(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024), "host peak RSS"


def median_rate(run, batch, p) -> float:
  """img/s: median over p["reps"] rounds of p["iters"] calls of `run` (which waits)."""
  for _ in range(p["warmup"]):
    run(1)
  times = []
  for _ in range(p["reps"]):
    start = time.perf_counter()
    run(p["iters"])
    times.append((time.perf_counter() - start) / p["iters"])
  return float(batch / np.median(times))


def unavailable(name, batch, device, error) -> dict:
  return {"name": name, "batch": batch, "device": device, "available": False,
          "reason": f"{type(error).__name__}: {error}"}


# --------------------------------------------------------------------------------------------
# The models: the project's JAX step and torchvision's googlenet.


def jax_rows(batch: int, p: dict) -> list[dict]:
  config = imagenet_torchvision.get_config()
  config.image_size, config.batch_size, config.half_precision = p["size"], batch, p["bf16"]
  model = create_model(config, config.num_classes, cpu.ops_for_backend())
  tx = create_optimizer(config, 100, 1000)
  size = p["size"]
  state = create_train_state(model, tx, config, (1, size, size, 3), fast_init=True)
  parallel = Parallel("shard_map", jax.devices()[:1])
  state = parallel.replicate(jax.device_get(state))
  rng = np.random.RandomState(0)
  images = rng.randn(batch, size, size, 3).astype(np.float32)
  labels = rng.randint(0, config.num_classes, batch).astype(np.int32)
  data = parallel.batch({"image": images, "label": labels})
  train_fn, _ = step_functions(config, model, tx)
  start = time.perf_counter()
  step = parallel.compile(train_fn, donate_state=True).lower(state, data).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def train(iters):
    for _ in range(iters):
      holder["state"], metrics = step(holder["state"], data)
    jax.block_until_ready(metrics)
    holder["loss"] = float(metrics["loss"])

  train_img_s = median_rate(train, batch, p)
  peak, source = jax_peak_bytes()
  device = jax_device()
  dtype = ("bfloat16 compute, float32 parameters" if p["bf16"] else "float32")
  rows = [{"name": "jax_train", "batch": batch, "device": device, "available": True,
           "img_s": train_img_s, "compile_s": compile_s, "loss": holder["loss"],
           "peak_memory_bytes": peak, "memory_source": source, "dtype": dtype}]
  variables = {"params": holder["state"].params, "batch_stats": holder["state"].batch_stats}
  infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
  x = jnp.asarray(images, jnp.bfloat16)
  start = time.perf_counter()
  jax.block_until_ready(infer(variables, x))
  compile_s = time.perf_counter() - start

  def run_infer(iters):
    for _ in range(iters):
      out = infer(variables, x)
    jax.block_until_ready(out)

  infer_img_s = median_rate(run_infer, batch, p)
  peak, source = jax_peak_bytes()
  rows.append({"name": "jax_infer", "batch": batch, "device": device, "available": True,
               "img_s": infer_img_s, "compile_s": compile_s, "peak_memory_bytes": peak,
               "memory_source": source, "dtype": dtype})
  return rows


def torch_rows(batch: int, compiled: bool, p: dict) -> list[dict]:
  cuda = torch.cuda.is_available()
  dev = "cuda" if cuda else "cpu"
  model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True,
                                       num_classes=1000)
  model = model.to(dev).to(memory_format=torch.channels_last)
  opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, weight_decay=1e-4)
  x = torch.randn(batch, 3, p["size"], p["size"], device=dev).contiguous(
      memory_format=torch.channels_last)
  labels = torch.randint(0, 1000, (batch,), device=dev)
  net = torch.compile(model, backend=p["torch_compile_backend"]) if compiled else model
  loss_fn = torch.nn.functional.cross_entropy
  state = {}

  def sync():
    if cuda:
      torch.cuda.synchronize()

  def train(iters):
    model.train()
    for _ in range(iters):
      with torch.autocast(dev, dtype=torch.bfloat16, enabled=p["bf16"]):
        out = net(x)
        loss = loss_fn(out[0], labels) + 0.3 * (loss_fn(out[1], labels)
                                                + loss_fn(out[2], labels))
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    sync()
    state["loss"] = float(loss.detach())

  def infer(iters):
    model.eval()
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=p["bf16"]):
      for _ in range(iters):
        net(x)
    sync()

  kind = "torch_compile" if compiled else "torch_eager"
  rows = []
  for mode, run in (("train", train), ("infer", infer)):
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    run(1)  # torch.compile compiles here (train and eval modes are two graphs)
    first_s = time.perf_counter() - start
    img_s = median_rate(run, batch, p)
    peak = (float(torch.cuda.max_memory_allocated()) if cuda else
            float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
    row = {"name": f"{kind}_{mode}", "batch": batch, "device": torch_device(),
           "available": True, "img_s": img_s, "first_call_s": first_s,
           "peak_memory_bytes": peak,
           "memory_source": "torch.cuda.max_memory_allocated" if cuda else "host peak RSS",
           "dtype": f"{'bfloat16 autocast' if p['bf16'] else 'float32'}, channels_last"}
    if compiled:
      row["compile_backend"] = p["torch_compile_backend"]
    if mode == "train":
      row["loss"] = state["loss"]
    rows.append(row)
  return rows


# --------------------------------------------------------------------------------------------
# The input: the pipelines alone, and train.py.


def loader_config(root: str, loader: str, batch: int, p: dict):
  config = imagenet_torchvision.get_config()
  config.dataset = f"folder:{root}"
  config.image_size = p["size"]
  config.batch_size = config.eval_batch_size = batch
  config.data_loader = loader
  config.data_threads = 0  # one per core
  config.num_train_steps = 10 ** 6
  return config


def pipeline_row(root: str, loader: str, p: dict) -> dict:
  name, batch = f"pipeline_{loader}", p["pipeline_batch"]
  device = jax_device() if loader == "dali" else f"host, {os.cpu_count()} cores"
  try:
    config = loader_config(root, loader, batch, p)
    if loader == "dali":
      from googlenet_jax.train import dali_pipeline as module  # pylint: disable=import-outside-toplevel
    else:
      module = input_pipeline
    source = sources.open_source(config)
    batches = module.train_batches(source, config, 0, config.num_train_steps)
    jax.block_until_ready(next(batches)["image"])  # warm-up: threads started, files cached
    images, start_cpu, start = 0, cpu_seconds(), time.perf_counter()
    while images < p["pipeline_images"]:
      out = next(batches)
      jax.block_until_ready(out["image"])
      images += len(out["label"])
    wall, cpu_s = time.perf_counter() - start, cpu_seconds() - start_cpu
    batches.close()
    where = getattr(out["image"], "devices", lambda: {"host"})()
  except Exception as e:  # pylint: disable=broad-except  (DALI missing, no GPU decoder, ...)
    return unavailable(name, batch, device, e)
  return {"name": name, "batch": batch, "device": device, "available": True,
          "img_s": images / wall, "host_cpu_s_per_img": cpu_s / images,
          "batches_on": sorted(str(d) for d in where)}


def train_py_row(root: str, loader: str, p: dict, step_img_s: float) -> dict:
  name, batch = f"train_py_{loader}", p["train_batch"]
  workdir = tempfile.mkdtemp(prefix=f"gpu_bench_{loader}_")
  steps = p["train_steps"]
  command = [sys.executable, os.path.join(_ROOT, "train.py"),
             "--config", os.path.join(_ROOT, "configs", "imagenet_torchvision.py"),
             "--workdir", workdir, f"--config.dataset=folder:{root}",
             f"--config.data_loader={loader}", f"--config.image_size={p['size']}",
             f"--config.batch_size={batch}", f"--config.eval_batch_size={batch}",
             f"--config.num_train_steps={steps}", f"--config.eval_every_steps={steps}",
             f"--config.checkpoint_every_steps={steps}",
             f"--config.log_every_steps={p['log_every']}", "--config.progress_bar=False",
             f"--config.half_precision={p['bf16']}"]
  env = {**os.environ, "XLA_FLAGS": os.environ.get("GPU_BENCH_XLA_FLAGS", ""),
         "PYTHONPATH": _ROOT}
  start = time.perf_counter()
  run = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  wall = time.perf_counter() - start
  try:
    if run.returncode != 0:
      errors = [l for l in run.stderr.splitlines() if l.startswith(("error", "Traceback"))]
      raise RuntimeError(f"train.py exit {run.returncode}: "
                         f"{(errors or run.stderr.splitlines() or [''])[-1][:600]}")
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    timed = rows[1:] or rows  # the first interval compiles the step
    img_s = float(np.mean([r["images_per_sec"] for r in timed]))
    wait = float(np.mean([r["input_wait_fraction"] for r in timed]))
  except Exception as e:  # pylint: disable=broad-except
    return unavailable(name, batch, jax_device(), e)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return {"name": name, "batch": batch, "device": jax_device(), "available": True,
          "img_s": img_s, "busy_fraction": 1.0 - wait, "input_wait_fraction": wait,
          "img_s_over_step": img_s / step_img_s if step_img_s else float("nan"),
          "steps": steps, "wall_s": wall}


# --------------------------------------------------------------------------------------------


def run(args) -> dict:
  p = dict(SMOKE if args.smoke else FULL)
  # bfloat16 compute where it is fast (XLA:CPU and PyTorch's CPU kernels emulate it slowly).
  p["bf16"] = jax.default_backend() != "cpu"
  if args.train_steps:
    p["train_steps"] = args.train_steps
  start = time.perf_counter()
  res = {"smoke": args.smoke, "backend": jax.default_backend(),
         "device": {"jax": jax_device(), "torch": torch_device()},
         "jax_version": jax.__version__, "torch_version": torch.__version__,
         "host": {"cpu_count": os.cpu_count(), "processor": platform.processor()},
         "params": {k: list(v) if isinstance(v, tuple) else v for k, v in p.items()},
         "rows": []}
  root = args.root or tempfile.mkdtemp(prefix="gpu_bench_jpegs_")
  log = lambda what: print(f"[{time.perf_counter() - start:6.1f} s] {what}", flush=True)
  log(f"JPEG set ({p['train_images']} + {p['val_images']}) in {root}")
  res["jpeg_set"] = jpeg_set.generate(root, p["train_images"], p["val_images"], quiet=True)
  # train.py first, in its own processes, before this one holds device memory.
  for loader in ("tfdata", "dali"):
    log(f"train.py, {loader}, {p['train_steps']} steps")
    res["rows"].append(train_py_row(root, loader, p, 0.0))
  for loader in ("tfdata", "dali"):
    log(f"pipeline alone, {loader}")
    res["rows"].append(pipeline_row(root, loader, p))
  for batch in p["batches"]:
    log(f"JAX, batch {batch}")
    res["rows"] += jax_rows(batch, p)
  for batch in p["batches"]:
    for compiled in (False, True):
      log(f"PyTorch {'torch.compile' if compiled else 'eager'}, batch {batch}")
      try:
        res["rows"] += torch_rows(batch, compiled, p)
        if torch.cuda.is_available():
          torch.cuda.empty_cache()  # the row's model and activations are gone by now
      except Exception as e:  # pylint: disable=broad-except
        kind = "torch_compile" if compiled else "torch_eager"
        res["rows"] += [unavailable(f"{kind}_{m}", batch, torch_device(), e)
                        for m in ("train", "infer")]
  step = {r["batch"]: r["img_s"] for r in res["rows"] if r["name"] == "jax_train"}
  for row in res["rows"]:
    if row["name"].startswith("train_py_") and row["available"] and row["batch"] in step:
      row["img_s_over_step"] = row["img_s"] / step[row["batch"]]
  if args.root is None:
    shutil.rmtree(root, ignore_errors=True)
  res["wall_s"] = time.perf_counter() - start
  return res


def table(res: dict) -> str:
  lines = [f"{'smoke run, ' if res['smoke'] else ''}backend {res['backend']}; JAX on "
           f"{res['device']['jax']}, PyTorch on {res['device']['torch']}; "
           f"{res['wall_s']:.0f} s", "",
           "| row | batch | device | img/s | extra |", "|---|---|---|---|---|"]
  for r in res["rows"]:
    if not r["available"]:
      lines.append(f"| {r['name']} | {r['batch']} | {r['device']} | unavailable | "
                   f"{r['reason'][:120]} |")
      continue
    extra = []
    if "peak_memory_bytes" in r:
      extra.append(f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['memory_source']})")
    if "host_cpu_s_per_img" in r:
      extra.append(f"{1e3 * r['host_cpu_s_per_img']:.2f} host CPU-ms/img")
    if "busy_fraction" in r:
      extra.append(f"busy {r['busy_fraction']:.2f}, {r.get('img_s_over_step', float('nan')):.2f}"
                   f"x the step alone")
    lines.append(f"| {r['name']} | {r['batch']} | {r['device']} | {r['img_s']:.1f} | "
                 f"{'; '.join(extra)} |")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  cpu.setup_process()
  cli.enable_compilation_cache()  # as train.py: a rerun loads its compiled programs
  res = run(args)
  print(table(res))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(res, f, indent=1)
  return res


if __name__ == "__main__":
  main()
