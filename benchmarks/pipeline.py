"""Input pipeline throughput per CPU core: this project's training and evaluation pipelines
(a JPEG folder and the same images as TFDS records) against torchvision's ImageFolder +
DataLoader, on the same images in one run (see benchmarks/NOTES.md).

  python benchmarks/pipeline.py --json runs/pipeline.json

The images: benchmarks/jpeg_set.py's ImageNet-like set (written into --root once). The work,
at --size (224) in batches of --batch:
- training: random-resized crop (area 8-100%, aspect 3/4-4/3), horizontal flip, ImageNet
  normalisation; the project's `input_pipeline.train_batches` with configs/imagenet_torchvision
  (`augment="inception_crop"`; JPEGs decoded only around the crop window) against
  RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize;
- evaluation: resize the shorter side to size / 0.875 (256), centre crop, normalise:
  `input_pipeline.eval_batches` against Resize + CenterCrop + ToTensor + Normalize.
Each pipeline gets the same number of workers: `config.data_threads` tf.data threads against
DataLoader `num_workers` processes, for each count in --threads. Measured after --warmup
batches, over --images images: the wall-clock rate and the CPU time the pipeline used (this
process and its DataLoader workers), so "per core" is images per CPU-second, whatever the
number of threads each framework started. Each round times every pipeline once, so other load
on the machine hits all of them alike; the median over --rounds is reported, and with it the
cores each pipeline needs for 5,000 img/s (a modern GPU's GoogLeNet training rate).
`--json` keys (at the largest --threads): pipeline_train_img_s_per_core,
pipeline_eval_img_s_per_core (folder), tfds_train_img_s_per_core, tfds_eval_img_s_per_core,
torch_loader_train_img_s_per_core, torch_loader_eval_img_s_per_core, train_ratio_per_core,
eval_ratio_per_core (project folder / torchvision), plus every measurement under "runs".
The DALI pipeline (`config.data_loader="dali"`, CPU operators here) on the same folder:
dali_train_img_s_per_core, dali_eval_img_s_per_core, dali_train_ratio_per_core and
dali_eval_ratio_per_core (DALI / the tf.data folder pipeline), and dali_{train,eval}_mean_abs_diff
/ _max_abs_diff: DALI's first batch against tf.data's (the same examples, windows and flips).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "benchmarks"))

# PyTorch before TensorFlow: the other order crashes.
import torch  # noqa: E402
import torchvision  # noqa: E402
from torchvision import transforms  # noqa: E402

import jpeg_set  # noqa: E402  (registers the TFDS dataset)
from configs import imagenet_torchvision  # noqa: E402
from googlenet_jax.train import dali_pipeline, input_pipeline, preprocessing, sources  # noqa: E402

TARGET_IMG_S = 5000
MEAN, STD = preprocessing.MEANS["imagenet"], preprocessing.STDS["imagenet"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", default="runs/jpeg_set", help="the benchmark set (made if missing)")
  p.add_argument("--train-images", type=int, default=2000)
  p.add_argument("--val-images", type=int, default=500)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--threads", default="1,2",
                 help="comma-separated worker counts (tf.data threads, DataLoader workers)")
  p.add_argument("--images", type=int, default=1280, help="images timed per measurement")
  p.add_argument("--warmup", type=int, default=3, help="batches before the timing starts")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--only", default="folder,tfds,dali,torch", help="pipelines to time")
  p.add_argument("--json", default="")
  return p.parse_args(argv)


# --------------------------------------------------------------------------------------------
# CPU time of this process and its children (the DataLoader's worker processes).


def _descendants(pid: int) -> list[int]:
  found = []
  for path in glob.glob(f"/proc/{pid}/task/*/children"):
    try:
      with open(path) as f:
        found += [int(c) for c in f.read().split()]
    except OSError:
      pass
  return found + [d for c in found for d in _descendants(c)]


def _cpu_seconds(pid: int) -> float:
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_seconds() -> float:
  """CPU time used so far by this process (all threads) and its live descendants."""
  own = os.times()
  return own.user + own.system + sum(_cpu_seconds(c) for c in _descendants(os.getpid()))


# --------------------------------------------------------------------------------------------
# The pipelines: each an endless iterator of (batch, number of real images in it).


def project_config(args, threads: int, dataset: str, data_dir: str = ""):
  config = imagenet_torchvision.get_config()
  config.dataset = dataset
  config.data_dir = data_dir
  config.image_size = args.size
  config.augment = "inception_crop"  # torchvision's RandomResizedCrop + flip
  config.random_flip = True
  config.batch_size = config.eval_batch_size = args.batch
  config.data_threads = threads
  config.num_train_steps = 10 ** 6
  return config


def project_batches(config, train: bool, loader=input_pipeline):
  source = sources.open_source(config)
  if train:
    for batch in loader.train_batches(source, config, 0, config.num_train_steps):
      yield batch, len(batch["label"])
  else:
    while True:  # passes over the validation split
      for batch in loader.eval_batches(source, config):
        yield batch, int(batch["mask"].sum())


def batch_differences(args, train: bool) -> tuple[float, float]:
  """Mean and max |DALI - tf.data| over the first batch of the folder pipeline."""
  config = project_config(args, 0, f"folder:{args.root}")
  tf_batch = next(project_batches(config, train))[0]["image"]
  dali_batch = next(project_batches(config, train, dali_pipeline))[0]["image"]
  diff = abs(dali_batch.astype("float64") - tf_batch.astype("float64"))
  return float(diff.mean()), float(diff.max())


def torch_batches(args, threads: int, train: bool):
  normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
  if train:
    transform = transforms.Compose([transforms.RandomResizedCrop(args.size),
                                    transforms.RandomHorizontalFlip()] + normalize)
  else:
    transform = transforms.Compose([transforms.Resize(round(args.size / 0.875)),
                                    transforms.CenterCrop(args.size)] + normalize)
  folder = torchvision.datasets.ImageFolder(
      os.path.join(args.root, "train" if train else "val"), transform)
  loader = torch.utils.data.DataLoader(
      folder, batch_size=args.batch, shuffle=train, drop_last=train, num_workers=threads,
      persistent_workers=True, prefetch_factor=2)
  while True:
    for images, labels in loader:
      yield (images, labels), len(labels)


def pipelines(args):
  """name -> (mode -> function of the worker count returning an iterator)."""
  folder = f"folder:{args.root}"
  tfds_dir = os.path.join(args.root, "tfds")
  named = {
      "folder": lambda n, train: project_batches(project_config(args, n, folder), train),
      "tfds": lambda n, train: project_batches(
          project_config(args, n, "jpeg_benchmark_set", tfds_dir), train),
      "dali": lambda n, train: project_batches(project_config(args, n, folder), train,
                                               dali_pipeline),
      "torch": lambda n, train: torch_batches(args, n, train),
  }
  return {k: named[k] for k in args.only.split(",")}


def measure(make, threads: int, train: bool, args) -> dict:
  batches = make(threads, train)
  for _ in range(args.warmup):
    next(batches)
  images, start_cpu, start = 0, cpu_seconds(), time.perf_counter()
  while images < args.images:
    images += next(batches)[1]
  wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
  batches.close()  # ends the DataLoader's workers / the tf.data iterator
  return {"img_s": images / wall, "img_s_per_core": images / cpu, "cpu_util": cpu / wall}


def run(args) -> dict:
  manifest = jpeg_set.generate(args.root, args.train_images, args.val_images, quiet=True)
  if "tfds" in args.only:
    jpeg_set.prepare_tfds(args.root)
  counts = [int(t) for t in args.threads.split(",")]
  runs: dict = {}
  for _ in range(args.rounds):
    for name, make in pipelines(args).items():
      for mode in ("train", "eval"):
        for n in counts:
          runs.setdefault(f"{name}_{mode}_{n}", []).append(measure(make, n, mode == "train", args))
  median = {key: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
            for key, rs in runs.items()}
  res = {"set": manifest, "threads": counts, "batch": args.batch, "size": args.size,
         "cpu_count": os.cpu_count(), "runs": median}
  top = max(counts)
  prefix = {"folder": "pipeline", "tfds": "tfds", "dali": "dali", "torch": "torch_loader"}
  for name in args.only.split(","):
    for mode in ("train", "eval"):
      per_core = median[f"{name}_{mode}_{top}"]["img_s_per_core"]
      res[f"{prefix[name]}_{mode}_img_s_per_core"] = per_core
      res[f"{prefix[name]}_{mode}_cores_for_{TARGET_IMG_S}"] = TARGET_IMG_S / per_core
  if "folder" in args.only and "torch" in args.only:
    for mode in ("train", "eval"):
      res[f"{mode}_ratio_per_core"] = (res[f"pipeline_{mode}_img_s_per_core"]
                                       / res[f"torch_loader_{mode}_img_s_per_core"])
  if "folder" in args.only and "dali" in args.only:
    for mode in ("train", "eval"):
      res[f"dali_{mode}_ratio_per_core"] = (res[f"dali_{mode}_img_s_per_core"]
                                            / res[f"pipeline_{mode}_img_s_per_core"])
      res[f"dali_{mode}_mean_abs_diff"], res[f"dali_{mode}_max_abs_diff"] = batch_differences(
          args, mode == "train")
  return res


def report(res: dict) -> str:
  s = res["set"]
  lines = [f"images: {s['params']['train']} train + {s['params']['val']} val JPEGs, mean "
           f"{s['mean_width']:.0f}x{s['mean_height']:.0f}, {s['mean_kbytes']:.0f} KB, "
           f"{s['bytes_per_pixel']:.2f} B/px; batch {res['batch']}, {res['size']} px, "
           f"{res['cpu_count']} cores",
           f"{'pipeline':<24} {'workers':>7} {'img/s':>8} {'img/s/core':>10} {'cpu use':>7} "
           f"{'cores for ' + str(TARGET_IMG_S):>15}"]
  for key, r in res["runs"].items():
    name, mode, n = key.rsplit("_", 2)
    lines.append(f"{name + ' ' + mode:<24} {n:>7} {r['img_s']:>8.1f} {r['img_s_per_core']:>10.1f}"
                 f" {r['cpu_util']:>7.2f} {TARGET_IMG_S / r['img_s_per_core']:>15.1f}")
  for mode in ("train", "eval"):
    if f"{mode}_ratio_per_core" in res:
      lines.append(f"{mode}: project folder / torchvision per core = "
                   f"{res[f'{mode}_ratio_per_core']:.2f}x")
    if f"dali_{mode}_ratio_per_core" in res:
      lines.append(f"{mode}: DALI / tf.data folder per core = "
                   f"{res[f'dali_{mode}_ratio_per_core']:.2f}x; |DALI - tf.data| mean "
                   f"{res[f'dali_{mode}_mean_abs_diff']:.4f}, max "
                   f"{res[f'dali_{mode}_max_abs_diff']:.4f}")
  return "\n".join(lines)


def main(argv=None):
  args = parse_args(argv)
  res = run(args)
  print(report(res))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(res, f, indent=1)


if __name__ == "__main__":
  main()
