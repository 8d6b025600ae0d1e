"""The default recipe trained to completion in JAX (train.py's loop) and in PyTorch (a plain
torch.optim loop, benchmarks/torch_recipe.py), from the same initial weights and in the same
data order, for several seeds; the validation curves overlaid in a PNG (see benchmarks/NOTES.md).

  python benchmarks/fidelity.py --seeds 0,1,2,3 --out benchmarks/fidelity

For each seed: torchvision's GoogLeNet is initialised under torch.manual_seed(seed) and
converted (`torch_to_flax`) into a model directory; the JAX run is `train_and_evaluate` with
`init_from` that directory and `seed` the seed (so its batches are the input pipeline's for that
seed); the PyTorch run trains the same weights on the same batches (the same input pipeline,
read as numpy) and evaluates on the same validation images after every epoch. Dropout stays
on: each framework draws its own masks, as a user's two runs would. The seeds therefore measure
the run-to-run noise that decides "the same curve": the spread of the final validation top-1
over the seeds within each framework, against the difference of the two frameworks' means.

Written: fidelity.json (every curve and the summary; --json PATH writes the summary alone),
fidelity.png (validation top-1 and training loss against the epoch, one line per run).
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# PyTorch before TensorFlow (imported by the input pipeline): the other order crashes.
import torch  # noqa: E402
import torchvision  # noqa: E402

import numpy as np  # noqa: E402

import torch_recipe  # noqa: E402

SUMMARY_KEYS = ("jax_final_top1_mean", "jax_final_top1_std", "torch_final_top1_mean",
                "torch_final_top1_std", "final_top1_difference", "difference_over_noise")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default=os.path.join(_ROOT, "configs", "default.py"),
                 help="a configs/*.py file (its get_config()); default: the README's main job")
  p.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds")
  p.add_argument("--out", default=os.path.join(_ROOT, "benchmarks", "fidelity"),
                 help="directory for fidelity.json, fidelity.png and the runs' workdirs")
  p.add_argument("--num_train_steps", type=int, default=0,
                 help="> 0: stop there (a smoke test); default: the config's epochs")
  p.add_argument("--eval_every_steps", type=int, default=0, help="0: once per epoch")
  p.add_argument("--json", default="", help="also write the summary here")
  p.add_argument("--threads", type=int, default=0, help="PyTorch threads (0: the cores)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="override a config field (Python literal), e.g. --set dropout=0.0")
  return p.parse_args(argv)


def load_config(path: str, args):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("fidelity_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.progress_bar = False
  if args.num_train_steps:
    config.num_train_steps = args.num_train_steps
  if args.eval_every_steps:
    config.eval_every_steps = args.eval_every_steps
  for item in args.set:
    field, _, value = item.partition("=")
    if field not in config:
      raise SystemExit(f"--set {item}: the config has no field {field!r}")
    try:
      config[field] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      config[field] = value
  return config


def torch_model(config, num_classes: int, seed: int) -> torch.nn.Module:
  if config.variant != "torchvision":
    raise SystemExit(f"fidelity.py compares the torchvision layout (torchvision.models.googlenet"
                     f"); the config's variant is {config.variant!r}")
  torch.manual_seed(seed)
  kwargs = {}
  for name, key in (("dropout", "dropout"), ("dropout_aux", "aux_dropout")):
    if config[key] is not None:
      kwargs[name] = config[key]
  return torchvision.models.googlenet(
      weights=None, init_weights=True, num_classes=num_classes,
      aux_logits=config.aux_logits if config.aux_logits is not None else True,
      transform_input=config.transform_input, **kwargs)


def _nchw(images: np.ndarray, dtype=torch.float32) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(images, (0, 3, 1, 2)))).to(dtype)


def torch_evaluate(model, source, config) -> dict:
  from googlenet_jax.train import input_pipeline  # pylint: disable=import-outside-toplevel
  model.eval()
  loss = correct = count = 0.0
  with torch.no_grad():
    for batch in input_pipeline.eval_batches(source, config):
      mask = torch.from_numpy(batch["mask"]).bool()
      labels = torch.from_numpy(batch["label"]).long()[mask]
      logits = model(_nchw(batch["image"], next(model.parameters()).dtype))[mask]
      loss += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
      correct += (logits.argmax(-1) == labels).sum().item()
      count += mask.sum().item()
  model.train()
  return {"loss": loss / count, "top1": correct / count}


def run_torch(config, source, init_state: dict, seed: int, num_classes: int, per_epoch: int,
              num_steps: int) -> dict:
  from googlenet_jax.train import input_pipeline  # pylint: disable=import-outside-toplevel
  dtype = torch.float64 if config.float64 else torch.float32
  model = torch_model(config, num_classes, seed).to(dtype)
  model.load_state_dict(init_state)
  eval_every = config.eval_every_steps or per_epoch
  curve = {"train": [], "eval": []}
  log_every = config.log_every_steps

  def batches():
    for batch in input_pipeline.train_batches(source, config, 0, num_steps):
      yield _nchw(batch["image"], dtype), torch.from_numpy(batch["label"]).long()

  def on_step(step, model, losses):
    if step % log_every == 0 or step == num_steps:  # as train.py logs: interval means
      since = curve["train"][-1]["step"] if curve["train"] else 0
      curve["train"].append({"step": step, "loss": float(np.mean(losses[since:]))})
    if step % eval_every == 0 or step == num_steps:
      curve["eval"].append({"step": step, **torch_evaluate(model, source, config)})

  t0 = time.time()
  torch_recipe.train(model, batches(), config, per_epoch, num_steps, on_step=on_step)
  curve["seconds"] = time.time() - t0
  return curve


def run_jax(config, workdir: str, init_dir: str, seed: int) -> dict:
  from googlenet_jax import cpu  # pylint: disable=import-outside-toplevel
  from googlenet_jax import train as training  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train.metrics import MetricWriter  # pylint: disable=import-outside-toplevel
  config = config.copy_and_resolve_references()
  config.seed = seed
  config.init_from = init_dir
  t0 = time.time()
  training.train_and_evaluate(config, workdir, ops=cpu.ops_for_backend(), fast_init=True)
  rows = MetricWriter(workdir, False).read()
  return {"train": [{"step": r["step"], "loss": r["loss"]} for r in rows if r["split"] == "train"],
          "eval": [{"step": r["step"], "loss": r["loss"], "top1": r["top1"]}
                   for r in rows if r["split"] == "eval"],
          "seconds": time.time() - t0}


def summarize(runs: dict) -> dict:
  finals = {fw: np.array([r["eval"][-1]["top1"] for r in runs[fw].values()]) for fw in runs}
  out = {}
  for fw, values in finals.items():
    out[f"{fw}_final_top1_mean"] = float(values.mean())
    out[f"{fw}_final_top1_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    out[f"{fw}_final_top1"] = values.tolist()
  out["final_top1_difference"] = out["jax_final_top1_mean"] - out["torch_final_top1_mean"]
  # The standard error of the difference of two means (each over its seeds): the difference
  # is "within noise" when it is a small multiple of this.
  n = len(finals["jax"])
  se = math.sqrt((out["jax_final_top1_std"] ** 2 + out["torch_final_top1_std"] ** 2) / n) \
      if n > 1 else float("nan")
  out["difference_standard_error"] = se
  if not n > 1:  # no noise estimate from one seed
    out["difference_over_noise"] = float("nan")
  else:
    out["difference_over_noise"] = (abs(out["final_top1_difference"]) / se if se > 0 else
                                    (0.0 if out["final_top1_difference"] == 0 else float("inf")))
  out["paired_differences"] = (finals["jax"] - finals["torch"]).tolist()
  return out


def plot(runs: dict, per_epoch: int, summary: dict, path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  colours = {"jax": "tab:blue", "torch": "tab:orange"}
  names = {"jax": "JAX (this project)", "torch": "PyTorch"}
  for fw, seeds in runs.items():
    for i, curve in enumerate(seeds.values()):
      label = names[fw] if i == 0 else None
      ev = curve["eval"]
      axes[0].plot([r["step"] / per_epoch for r in ev], [r["top1"] for r in ev], "o-",
                   color=colours[fw], alpha=0.6, ms=3, label=label)
      tr = curve["train"]
      axes[1].plot([r["step"] / per_epoch for r in tr], [r["loss"] for r in tr], "-",
                   color=colours[fw], alpha=0.5, label=label)
  axes[0].set(xlabel="epoch", ylabel="validation top-1",
              title=f"validation top-1 (final: JAX {summary['jax_final_top1_mean']:.3f} ± "
                    f"{summary['jax_final_top1_std']:.3f}, PyTorch "
                    f"{summary['torch_final_top1_mean']:.3f} ± "
                    f"{summary['torch_final_top1_std']:.3f})")
  axes[0].title.set_fontsize(9)
  axes[1].set(xlabel="epoch", ylabel="training loss", yscale="log",
              title="training loss (mean over each logging interval)")
  axes[1].title.set_fontsize(9)
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  from googlenet_jax import cpu  # pylint: disable=import-outside-toplevel
  cpu.setup_process()  # as train.py: before JAX starts its threads
  import jax  # pylint: disable=import-outside-toplevel
  from googlenet_jax.convert import torch_to_flax  # pylint: disable=import-outside-toplevel
  from googlenet_jax.tools import cli  # pylint: disable=import-outside-toplevel
  from googlenet_jax import model_dir  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import input_pipeline, sources  # pylint: disable=import-outside-toplevel
  cli.enable_compilation_cache()
  cli.configure_logging("%(asctime)s %(levelname)s %(message)s")
  input_pipeline.keep_tensorflow_off_accelerators()
  torch.set_num_threads(args.threads or os.cpu_count())
  config = load_config(args.config, args)
  if config.float64:
    jax.config.update("jax_enable_x64", True)
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  os.makedirs(args.out, exist_ok=True)
  source = sources.open_source(config)
  num_classes = config.num_classes or source.num_classes
  per_epoch = input_pipeline.steps_per_epoch(source, config)
  num_steps = config.num_train_steps or int(math.ceil(config.num_epochs * per_epoch))
  runs = {"jax": {}, "torch": {}}
  with tempfile.TemporaryDirectory() as scratch:
    for seed in seeds:
      config.seed = seed
      model = torch_model(config, num_classes, seed)
      init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
      init_dir = os.path.join(scratch, f"init_{seed}")
      model_dir.save_variables(init_dir, torch_to_flax(
          {k: v.numpy() for k, v in init_state.items()}, config.variant))
      model_dir.write_config(init_dir, config, num_classes=num_classes,
                             class_names=source.class_names)
      workdir = os.path.join(args.out, f"jax_seed{seed}")
      if os.path.exists(workdir):  # a fresh run, not a resumed one
        import shutil  # pylint: disable=import-outside-toplevel
        shutil.rmtree(workdir)
      runs["jax"][seed] = run_jax(config, workdir, init_dir, seed)
      runs["torch"][seed] = run_torch(config, source, init_state, seed, num_classes, per_epoch,
                                      num_steps)
      for fw in ("jax", "torch"):
        last = runs[fw][seed]["eval"][-1]
        print(f"seed {seed} {fw:5s}: final top-1 {last['top1']:.4f} loss {last['loss']:.4f} "
              f"({runs[fw][seed]['seconds']:.0f} s)", flush=True)
  summary = summarize(runs)
  summary.update(seeds=seeds, num_steps=num_steps, steps_per_epoch=per_epoch,
                 config=os.path.relpath(args.config, _ROOT), dataset=source.name,
                 host=cpu_name(), torch=torch.__version__, jax=jax.__version__)
  with open(os.path.join(args.out, "fidelity.json"), "w") as f:
    json.dump({"summary": summary, "runs": runs}, f, indent=1)
  plot(runs, per_epoch, summary, os.path.join(args.out, "fidelity.png"),
       f"{summary['config']} on {source.name}, {len(seeds)} seeds per framework, same initial "
       f"weights and batches per seed")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=1)
  print(f"final validation top-1: JAX {summary['jax_final_top1_mean']:.4f} ± "
        f"{summary['jax_final_top1_std']:.4f}, PyTorch {summary['torch_final_top1_mean']:.4f} ± "
        f"{summary['torch_final_top1_std']:.4f} (std over {len(seeds)} seeds); difference "
        f"{summary['final_top1_difference']:+.4f} = {summary['difference_over_noise']:.2f} "
        f"standard errors")
  return summary


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


if __name__ == "__main__":
  main()
