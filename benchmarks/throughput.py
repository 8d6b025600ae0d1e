"""Training and inference throughput: this project's JAX step against PyTorch on the same
weights, in one process, interleaved (see benchmarks/NOTES.md).

  python benchmarks/throughput.py --variant classic --batch 32 --size 224 --json out.json

Timed, in rounds (every round times each implementation once, so that other load on the
machine hits all of them alike):
- JAX: the real training step (`training.train_step`: aux heads, loss, optax update), jitted
  through `training.Parallel` on one device, and jitted inference (`model.apply`, eval mode);
- PyTorch with the same weights (`convert.flax_to_torch`): eager NCHW, eager channels_last and
  `torch.compile` channels_last (inference; training with --torch-compile-train);
- a large float32 matmul in each framework: the machine's measured peak, for model-FLOPs
  utilisation (MFU = img/s x model FLOPs per image / the higher of the two peaks).
Reported: median img/s over the rounds, JAX / best-PyTorch ratios, the first-step compile time,
peak memory, the load average (the machine may be shared: read the ratios) and each
implementation's last training loss, which must be finite (`--lr`, small by default).
On a GPU the same script runs in bfloat16 (JAX half_precision, PyTorch autocast).
The process reuses freed host memory as train.py does (`googlenet_jax.cpu.host_memory`; both
frameworks gain from it, JAX more); --system-malloc keeps glibc's defaults.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "tests"))  # torch_reference (the classic PyTorch model)

# PyTorch before TensorFlow (imported by the input pipeline): the other order crashes.
import torch  # noqa: E402
import torchvision  # noqa: E402,F401

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from googlenet_jax import train as training  # noqa: E402
from googlenet_jax import cpu  # noqa: E402
from googlenet_jax.cpu import compile_time, host_memory  # noqa: E402
from googlenet_jax.ops import LAX  # noqa: E402
from googlenet_jax import convert  # noqa: E402

STABLE_KEYS = ("jax_train_img_s", "jax_infer_img_s", "torch_nchw_train_img_s",
               "torch_nchw_infer_img_s", "torch_best_train_img_s", "torch_best_infer_img_s",
               "train_ratio", "infer_ratio", "compile_s", "matmul_gflops")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--variant", default="classic", choices=["classic", "torchvision"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--num-classes", type=int, default=1000)
  p.add_argument("--reps", type=int, default=5, help="timed rounds (median reported)")
  p.add_argument("--iters", type=int, default=2, help="steps per implementation per round")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps after compiling")
  p.add_argument("--ops", choices=cpu.OPS_NAMES, default="auto",
                 help="the network's ops (auto: googlenet_jax.cpu.ops_for_backend(), as train.py)")
  p.add_argument("--no-compile-torch", action="store_true", help="skip torch.compile")
  p.add_argument("--torch-compile-train", action="store_true",
                 help="also time a torch.compile'd training step (minutes to compile on CPU)")
  p.add_argument("--also-plain", action="store_true",
                 help="also time the JAX step on plain lax (googlenet_jax.ops.LAX), interleaved")
  p.add_argument("--no-torch", action="store_true", help="JAX only (ratios are then absent)")
  p.add_argument("--pipeline", action="store_true",
                 help="also time the input pipeline alone (JPEG folder, inception crop)")
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
  p.add_argument("--lr", type=float, default=1e-5,
                 help="SGD learning rate of the timed steps (both frameworks). Small, so that "
                      "the loss stays finite for the whole run: on random images and labels the "
                      "classic layout starts at a loss of ~170 and a training learning rate "
                      "(0.05) reaches inf/NaN within two steps")
  p.add_argument("--system-malloc", action="store_true",
                 help="keep glibc's default malloc (by default the process reuses freed memory "
                      "as train.py does: googlenet_jax.cpu.host_memory; it applies to both frameworks)")
  p.add_argument("--json", help="write the figures here")
  return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Helpers.


def _median_rate(times, batch):
  return float(batch / np.median(times)) if times else float("nan")


def _rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def matmul_gflops(n=2048, reps=5):
  """Measured fp32 matmul rate (GFLOP/s) of XLA and of PyTorch."""
  a = jnp.asarray(np.random.RandomState(0).randn(n, n).astype(np.float32))
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  ta = torch.from_numpy(np.array(a))
  ta @ ta
  tj, tt = [], []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    tj.append(time.perf_counter() - t)
    t = time.perf_counter()
    ta @ ta
    tt.append(time.perf_counter() - t)
  flops = 2 * n ** 3
  return flops / np.median(tj) / 1e9, flops / np.median(tt) / 1e9


def model_flops(tmodel, batch, size, num_classes):
  """(train, inference) FLOPs per image, counted by PyTorch's FlopCounterMode on the model
  (train: forward with aux heads + backward; both counts are the same network's)."""
  from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
  x = torch.randn(2, 3, size, size)
  labels = torch.zeros(2, dtype=torch.long)
  tmodel.train()
  with FlopCounterMode(display=False) as counter:
    out = tmodel(x)
    _torch_loss(out, labels).backward()
  train = counter.get_total_flops() / 2
  tmodel.zero_grad(set_to_none=True)
  tmodel.eval()
  with FlopCounterMode(display=False) as counter, torch.no_grad():
    tmodel(x)
  return train, counter.get_total_flops() / 2


def _torch_loss(out, labels, aux_weight=0.3):
  f = torch.nn.functional.cross_entropy
  if isinstance(out, tuple):
    logits, aux2, aux1 = out[0], out[1], out[2]
    return f(logits, labels) + aux_weight * (f(aux1, labels) + f(aux2, labels))
  return f(out, labels)


# --------------------------------------------------------------------------------------------
# The two frameworks.


def make_config(args):
  from configs import default  # pylint: disable=import-outside-toplevel
  config = default.get_config()
  config.variant = args.variant
  config.num_classes = args.num_classes
  config.batch_size = args.batch
  config.image_size = args.size
  config.parallel = "shard_map"
  config.half_precision = jax.default_backend() != "cpu"
  config.weight_decay = 1e-4
  config.learning_rate = args.lr
  return config


class JaxBench:

  def __init__(self, args, config, ops):
    self.batch = args.batch
    device = jax.devices()[0]
    self.parallel = training.Parallel(config.parallel, [device])
    self.model = training.create_model(config, config.num_classes, ops)
    self.tx = training.create_optimizer(config, 100, 1000)
    t = time.perf_counter()
    state = training.create_train_state(self.model, self.tx, config,
                                        (1, args.size, args.size, 3), fast_init=True)
    jax.block_until_ready(state)
    self.init_s = time.perf_counter() - t
    self.state = self.parallel.replicate(jax.device_get(state))
    rng = np.random.RandomState(0)
    self.images = rng.randn(args.batch, args.size, args.size, 3).astype(np.float32)
    self.labels = rng.randint(0, config.num_classes, args.batch).astype(np.int32)
    self.batch_in = self.parallel.batch({"image": self.images, "label": self.labels})
    step_fn = functools.partial(training.train_step, model=self.model, tx=self.tx,
                                aux_loss_weight=config.aux_loss_weight)
    self.p_train = self.parallel.compile(step_fn, donate_state=True)
    t = time.perf_counter()
    with compile_time.gc_paused():  # as the training loop's first call does
      self.compiled_train = self.p_train.lower(self.state, self.batch_in).compile()
    self.compile_s = time.perf_counter() - t
    try:
      mem = self.compiled_train.memory_analysis()
      self.train_temp_gib = mem.temp_size_in_bytes / 2**30
    except Exception:  # pylint: disable=broad-except
      self.train_temp_gib = float("nan")
    model = self.model

    def infer(variables, x):
      return model.apply(variables, x, train=False)

    self.infer_fn = jax.jit(infer)
    self.x = jnp.asarray(self.images, jnp.bfloat16 if config.half_precision else jnp.float32)
    t = time.perf_counter()
    with compile_time.gc_paused():
      jax.block_until_ready(self.infer_fn(self.variables(), self.x))
    self.infer_compile_s = time.perf_counter() - t
    t = time.perf_counter()
    self.train(1)
    self.first_step_s = time.perf_counter() - t

  def variables(self):
    v = {"params": self.state.params}
    if self.state.batch_stats:
      v["batch_stats"] = self.state.batch_stats
    return v

  def train(self, iters):
    for _ in range(iters):
      self.state, metrics = self.compiled_train(self.state, self.batch_in)
    self.last_loss = float(np.asarray(metrics["loss"]).ravel()[0])

  def infer(self, iters):
    v = self.variables()
    for _ in range(iters):
      out = self.infer_fn(v, self.x)
    jax.block_until_ready(out)


class TorchBench:

  def __init__(self, args, config, variables, channels_last, compile_infer, compile_train):
    self.batch = args.batch
    self.cuda = torch.cuda.is_available()
    dev = "cuda" if self.cuda else "cpu"
    if args.variant == "classic":
      import torch_reference  # pylint: disable=import-outside-toplevel
      model = torch_reference.ClassicGoogLeNet(args.num_classes)
    else:
      model = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False,
                                           num_classes=args.num_classes)
    model.load_state_dict(convert.flax_to_torch(variables, args.variant), strict=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    self.model = model.to(dev).to(memory_format=fmt)
    self.opt = torch.optim.SGD(self.model.parameters(), lr=config.learning_rate,
                               momentum=config.momentum, weight_decay=config.weight_decay)
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.randn(args.batch, 3, args.size, args.size).astype(np.float32))
    self.x = x.to(dev).contiguous(memory_format=fmt)
    self.labels = torch.from_numpy(
        rng.randint(0, args.num_classes, args.batch).astype(np.int64)).to(dev)
    self.autocast = (torch.autocast("cuda", torch.bfloat16) if self.cuda
                     else torch.autocast("cpu", enabled=False))
    self.infer_model = torch.compile(self.model) if compile_infer else self.model
    self.train_model = torch.compile(self.model) if compile_train else self.model
    self.compile_s = {}

  def _sync(self):
    if self.cuda:
      torch.cuda.synchronize()

  def train(self, iters):
    self.model.train()
    for _ in range(iters):
      with self.autocast:
        loss = _torch_loss(self.train_model(self.x), self.labels)
      self.opt.zero_grad(set_to_none=True)
      loss.backward()
      self.opt.step()
    self._sync()
    self.last_loss = float(loss.detach())

  def infer(self, iters):
    self.model.eval()
    with torch.no_grad(), self.autocast:
      for _ in range(iters):
        self.infer_model(self.x)
    self._sync()


def time_pipeline(args, steps=6):
  """Images/s of the input pipeline alone: a folder of JPEGs, inception crop, at --size."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import input_pipeline, sources  # pylint: disable=import-outside-toplevel
  config = make_config(args)
  root = tempfile.mkdtemp(prefix="gjax_pipe_")
  rng = np.random.RandomState(0)
  side = max(args.size * 8 // 7, 32)
  for c in range(2):
    os.makedirs(os.path.join(root, f"c{c}"))
    for i in range(max(args.batch, 16)):
      Image.fromarray(rng.randint(0, 255, (side, side + 20, 3), np.uint8)).save(
          os.path.join(root, f"c{c}", f"{i}.jpg"), quality=90)
  config.dataset = f"folder:{root}"
  config.augment = "inception_crop"
  config.random_flip = True
  config.normalize = "imagenet"
  source = sources.open_source(config)
  batches = input_pipeline.train_batches(source, config, 0, steps + 2, 0, 1)
  next(batches)
  t = time.perf_counter()
  for _ in range(steps):
    next(batches)
  return steps * args.batch / (time.perf_counter() - t)


# --------------------------------------------------------------------------------------------


def run(args) -> dict:
  ops = cpu.ops_named(args.ops)
  torch.set_num_threads(args.threads)
  load_start = os.getloadavg()
  config = make_config(args)
  gpu = jax.default_backend() != "cpu"
  res = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
         "dtype": "bfloat16" if gpu else "float32", "variant": args.variant,
         "batch": args.batch, "size": args.size, "ops": ops.name,
         "jax_version": jax.__version__, "torch_version": torch.__version__,
         "host_malloc_reused": host_memory.applied()}
  print(f"[{time.strftime('%H:%M:%S')}] JAX: init + compile ...", flush=True)
  jb = JaxBench(args, config, ops)
  res.update(init_s=jb.init_s, compile_s=jb.compile_s, infer_compile_s=jb.infer_compile_s,
             first_step_s=jb.first_step_s, jax_train_temp_gib=jb.train_temp_gib)
  variables = jax.device_get(jb.variables())
  runs = {"jax_train": jb.train, "jax_infer": jb.infer}
  modes = {}
  if args.also_plain:
    print(f"[{time.strftime('%H:%M:%S')}] JAX, plain lax: compile ...", flush=True)
    jp = JaxBench(args, config, LAX)
    res.update(plain_compile_s=jp.compile_s, plain_infer_compile_s=jp.infer_compile_s)
    runs.update(jaxplain_train=jp.train, jaxplain_infer=jp.infer)
  if not args.no_torch:
    print(f"[{time.strftime('%H:%M:%S')}] PyTorch: models ...", flush=True)
    modes = {"nchw": TorchBench(args, config, variables, False, False, False),
             "cl": TorchBench(args, config, variables, True, False, False)}
    if not args.no_compile_torch:
      modes["compile_cl"] = TorchBench(args, config, variables, True, True,
                                       args.torch_compile_train)
    for name, tb in modes.items():  # warm-up (and torch.compile's compilation)
      t = time.perf_counter()
      tb.infer(1)
      res[f"torch_{name}_infer_first_s"] = time.perf_counter() - t
      if name != "compile_cl" or args.torch_compile_train:
        t = time.perf_counter()
        tb.train(1)
        res[f"torch_{name}_train_first_s"] = time.perf_counter() - t
        runs[f"torch_{name}_train"] = tb.train
      runs[f"torch_{name}_infer"] = tb.infer
  for fn in runs.values():
    for _ in range(args.warmup):
      fn(1)
  times = {k: [] for k in runs}
  print(f"[{time.strftime('%H:%M:%S')}] timing {len(runs)} runs x {args.reps} rounds ...",
        flush=True)
  for _ in range(args.reps):
    for name, fn in runs.items():
      t = time.perf_counter()
      fn(args.iters)
      times[name].append((time.perf_counter() - t) / args.iters)
  for name, ts in times.items():
    res[f"{name}_img_s"] = _median_rate(ts, args.batch)
  # The last training loss of each implementation: timings of steps on inf/NaN values would
  # not be timings of training.
  res["jax_train_loss"] = jb.last_loss
  if args.also_plain:
    res["jaxplain_train_loss"] = jp.last_loss
  for name, tb in modes.items():
    if hasattr(tb, "last_loss"):
      res[f"torch_{name}_train_loss"] = tb.last_loss
  res["train_losses_finite"] = all(np.isfinite(v) for k, v in res.items()
                                   if k.endswith("_train_loss"))
  xla_mm, torch_mm = matmul_gflops()
  res.update(xla_matmul_gflops=xla_mm, torch_matmul_gflops=torch_mm,
             matmul_gflops=max(xla_mm, torch_mm))
  if not args.no_torch:
    for kind in ("train", "infer"):
      rates = {k: v for k, v in res.items()
               if k.startswith("torch_") and k.endswith(f"_{kind}_img_s")}
      best = max(rates, key=rates.get)
      res[f"torch_best_{kind}_img_s"] = rates[best]
      res[f"torch_best_{kind}_mode"] = best[len("torch_"):-len(f"_{kind}_img_s")]
      res[f"{kind}_ratio"] = res[f"jax_{kind}_img_s"] / rates[best]
      res[f"{kind}_ratio_vs_nchw"] = res[f"jax_{kind}_img_s"] / res[f"torch_nchw_{kind}_img_s"]
    train_f, infer_f = model_flops(modes["nchw"].model, args.batch, args.size, args.num_classes)
    res.update(train_gflop_per_img=train_f / 1e9, infer_gflop_per_img=infer_f / 1e9)
    for k in list(res):
      if k.endswith("_img_s") and not k.startswith("torch_best"):
        f = train_f if "_train_" in k else infer_f
        res[k.replace("_img_s", "_mfu")] = res[k] * f / (res["matmul_gflops"] * 1e9)
  if args.pipeline:
    res["pipeline_img_s"] = time_pipeline(args)
    res["pipeline_over_step"] = res["pipeline_img_s"] / res["jax_train_img_s"]
  res["peak_rss_gib"] = _rss_gib()
  res["loadavg_start"] = list(load_start)
  res["loadavg_end"] = list(os.getloadavg())
  return res


def table(res) -> str:
  lines = [f"GoogLeNet {res['variant']}, batch {res['batch']}, {res['size']}x{res['size']}, "
           f"{res['dtype']}, {res['backend']} ({res['device']}), ops={res['ops']}, "
           f"host malloc {'reused' if res.get('host_malloc_reused') else 'system default'}",
           "", "| implementation | train img/s | infer img/s | train MFU | infer MFU |",
           "|---|---|---|---|---|"]
  names = [("jax", "JAX (this project)"), ("jaxplain", "JAX, plain lax (ops.LAX)"), ("torch_nchw", "PyTorch eager NCHW"),
           ("torch_cl", "PyTorch eager channels_last"),
           ("torch_compile_cl", "PyTorch torch.compile channels_last")]
  for key, label in names:
    if f"{key}_infer_img_s" not in res:
      continue
    cells = []
    for kind in ("train", "infer"):
      v = res.get(f"{key}_{kind}_img_s")
      cells.append(f"{v:.1f}" if v is not None else "—")
    for kind in ("train", "infer"):
      v = res.get(f"{key}_{kind}_mfu")
      cells.append(f"{100 * v:.0f}%" if v is not None else "—")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append("")
  if "train_ratio" in res:
    lines.append(f"JAX / best PyTorch: train {res['train_ratio']:.2f}x "
                 f"(best: {res['torch_best_train_mode']}), infer {res['infer_ratio']:.2f}x "
                 f"(best: {res['torch_best_infer_mode']}); JAX / eager NCHW: train "
                 f"{res['train_ratio_vs_nchw']:.2f}x, infer {res['infer_ratio_vs_nchw']:.2f}x")
  lines.append(f"JAX compile: train step {res['compile_s']:.1f} s, inference "
               f"{res['infer_compile_s']:.1f} s, init (create_train_state) {res['init_s']:.1f} s;"
               f" train-step temp buffers {res['jax_train_temp_gib']:.2f} GiB; "
               f"peak RSS {res['peak_rss_gib']:.1f} GiB")
  lines.append(f"matmul peak fp32 (2048^3): XLA {res['xla_matmul_gflops']:.0f}, PyTorch "
               f"{res['torch_matmul_gflops']:.0f} GFLOP/s"
               + (f"; model {res['train_gflop_per_img']:.2f} GFLOP/img train, "
                  f"{res['infer_gflop_per_img']:.2f} infer" if "train_gflop_per_img" in res
                  else ""))
  if "plain_compile_s" in res:
    lines.append(f"plain-lax JAX: train {res['jaxplain_train_img_s'] / res['torch_best_train_img_s']:.2f}x, "
                 f"infer {res['jaxplain_infer_img_s'] / res['torch_best_infer_img_s']:.2f}x the best "
                 f"PyTorch; compile {res['plain_compile_s']:.1f} s")
  if "pipeline_img_s" in res:
    lines.append(f"input pipeline alone: {res['pipeline_img_s']:.1f} img/s "
                 f"({res['pipeline_over_step']:.1f}x the JAX train step)")
  losses = ", ".join(f"{k[:-len('_train_loss')]} {v:.4g}" for k, v in sorted(res.items())
                     if k.endswith("_train_loss"))
  lines.append(f"last training loss: {losses}"
               + ("" if res["train_losses_finite"] else
                  "  ** NOT FINITE: these are not timings of training; lower --lr **"))
  la, lb = res["loadavg_start"], res["loadavg_end"]
  lines.append(f"load average (1/5/15 min) at start {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, "
               f"at end {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f} on {os.cpu_count()} cores")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  if not args.system_malloc:  # before JAX's and PyTorch's threads first allocate
    cpu.setup_process()  # as train.py: freed memory reused, OpenMP waits passively
  else:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  res = run(args)
  print(table(res))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1, sort_keys=True)
  return res


if __name__ == "__main__":
  main()
