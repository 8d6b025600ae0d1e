"""Metrics output: metrics.jsonl, TensorBoard events and a PNG of the curves."""

from __future__ import annotations

import json
import logging
import os

log = logging.getLogger("googlenet_jax")


class MetricWriter:

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from flax.metrics import tensorboard  # pylint: disable=import-outside-toplevel
      self.tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split,
              **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in metrics.items():
      self.tb.scalar(f"{split}/{k}", float(v), int(step))
    self.tb.flush()

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    records = []
    with open(self.path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except ValueError:  # a line cut short by a killed run
          log.warning("%s: skipping a malformed line: %r", self.path, line[:80])
    return records

  def truncate_after(self, step: int) -> None:
    """On resume, drop records a stopped run wrote after its last checkpoint."""
    if self.enabled and os.path.exists(self.path):
      keep = [r for r in self.read() if r["step"] <= step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
      os.replace(tmp, self.path)

  def plot(self, png_path: str) -> None:
    if not self.enabled:
      return
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    records = self.read()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("eval", "o-")):
      rows = [r for r in records if r["split"] == split]
      if rows:
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], style, label=split)
        axes[1].plot(steps, [r["top1"] for r in rows], style, label=f"{split} top-1")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[1].set(xlabel="step", ylabel="accuracy", title="top-1 accuracy", ylim=(0, 1))
    for ax in axes:
      ax.legend()
      ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)

  def close(self):
    if self.tb is not None:
      self.tb.close()
