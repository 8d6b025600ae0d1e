"""The paper's Table 1 rebuilt from the code: per layer output size, parameters and
multiply-adds, with the paper's own params / ops columns and the difference.

  python -m googlenet_jax.tools.summary --variant paper --size 224 [--classes 1000] [--markdown]

Everything on the left is computed from the network as built (`jax.eval_shape` of `model.init`
for the parameter shapes, the layout's size arithmetic for the feature maps): a layout's
differences (torchvision's 3x3 "5x5" branch, BatchNorm, ...) show up in its numbers.
Multiply-adds count convolutions and fully connected layers (H_out x W_out x k x k x C_in x
C_out), as the paper does; pooling, LRN, BatchNorm and ReLU are not counted. Parameters include
biases and BatchNorm scales/offsets (running statistics are not parameters).

The paper's columns (Szegedy et al. 2014, Table 1) use K = 1024 weights (its linear layer,
1024 x 1000 weights, is "1000K"; conv2 + conv3, 114,688 weights, "112K") and M = 10^6
operations; it leaves out biases and the auxiliary heads. Its conv1 row (2.7K, 34M) does not
match a 7x7x3x64 convolution at 112x112 (9.4K, 118M): one of the table's known slips.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Optional

from googlenet_jax import variants as V
from googlenet_jax.tools import cli

AUX_KIND = "aux head (training only)"
K = 1024  # the paper's "K" for parameters
M = 1_000_000  # its "M" for operations

# Szegedy et al. 2014, Table 1: (params in K, ops in M) per row; rows without figures have 0.
PAPER_TABLE_1 = {
    "conv1": (2.7, 34), "conv2+conv3": (112, 360),
    "inception_3a": (159, 128), "inception_3b": (380, 304),
    "inception_4a": (364, 73), "inception_4b": (437, 88), "inception_4c": (463, 100),
    "inception_4d": (580, 119), "inception_4e": (840, 170),
    "inception_5a": (1072, 54), "inception_5b": (1388, 71),
    "classifier": (1000, 1),
}


@dataclasses.dataclass
class Row:
  name: str
  kind: str  # "convolution", "max pool", "inception", ...
  patch: str  # "7x7/2", "" for inception blocks
  output: tuple[int, int, int]  # H, W, C
  depth: int
  channels: tuple  # #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj ("" where none)
  params: int
  macs: int
  paper_params: Optional[float] = None  # in K (1024)
  paper_ops: Optional[float] = None  # in M
  in_table_1: bool = True  # False: LRN rows and the aux heads


def _leaves(tree) -> list:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_leaves(tree)


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in _leaves(tree))


def _macs(tree, out_hw: tuple[int, int]) -> int:
  """Multiply-adds of the convolutions (4-D kernels, at `out_hw`) and dense layers in `tree`."""
  import jax  # pylint: disable=import-outside-toplevel
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if getattr(path[-1], "key", None) != "kernel":
      continue
    if len(leaf.shape) == 4:
      total += out_hw[0] * out_hw[1] * math.prod(leaf.shape)
    elif len(leaf.shape) == 2:
      total += math.prod(leaf.shape)
  return total


def table(variant: str = "paper", size: Optional[int] = None, num_classes: int = 1000) -> list[Row]:
  """Table 1's rows for `variant` at `size` x `size` (default: the layout's size), computed
  from the code; aux heads last (`in_table_1=False`)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from googlenet_jax import models  # pylint: disable=import-outside-toplevel
  layout = V.get_layout(variant)
  size = size or layout.default_size
  model = models.GoogLeNet(variant=variant, num_classes=num_classes)
  x = jax.ShapeDtypeStruct((1, size, size, layout.in_channels), jnp.float32)
  model.check_input(x, train=False)
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  sizes = models.feature_map_sizes(layout, size, size)
  rows: list[Row] = []
  channels = layout.in_channels
  blank = ("",) * 6
  pending_conv2 = None
  for spec in V.TABLE_1:
    hw = sizes[spec.name]
    if isinstance(spec, V.Conv):
      channels = spec.features
      tree = params[spec.name]
      if spec.name == "conv2":  # the paper's "convolution 3x3/1, depth 2" is conv2 + conv3
        pending_conv2 = (_count(tree), _macs(tree, hw))
        continue
      n, macs = _count(tree), _macs(tree, hw)
      name, depth, cols = spec.name, 1, blank
      if spec.name == "conv3" and pending_conv2:
        n, macs = n + pending_conv2[0], macs + pending_conv2[1]
        name, depth = "conv2+conv3", 2
        cols = ("", params["conv2"]["conv"]["kernel"].shape[-1], spec.features, "", "", "")
      rows.append(Row(name, "convolution", f"{spec.kernel}x{spec.kernel}/{spec.stride}",
                      (*hw, channels), depth, cols, n, macs))
    elif isinstance(spec, V.MaxPool):
      window, stride, _, _ = models.stage_pool(layout, spec.name)
      rows.append(Row(spec.name, "max pool", f"{window}x{window}/{stride}", (*hw, channels), 0,
                      blank, 0, 0))
    elif isinstance(spec, V.LRN):
      if layout.lrn:
        rows.append(Row(spec.name, "local response norm", "5", (*hw, channels), 0, blank, 0, 0,
                        in_table_1=False))
    elif isinstance(spec, V.Inception):
      channels = spec.out_channels
      tree = params[spec.name]
      rows.append(Row(spec.name, "inception", "", (*hw, channels), 2,
                      tuple(spec[1:]), _count(tree), _macs(tree, hw)))
  head_hw = sizes["inception_5b"]
  if layout.head_pool == "avg7":
    rows.append(Row("avgpool", "avg pool", "7x7/1", (head_hw[0] - 6, head_hw[1] - 6, channels),
                    0, blank, 0, 0))
  else:
    rows.append(Row("avgpool", "avg pool", f"global {head_hw[0]}x{head_hw[1]}",
                    (1, 1, channels), 0, blank, 0, 0))
  if layout.dropout:
    rows.append(Row("dropout", f"dropout ({layout.dropout:.0%})", "", (1, 1, channels), 0,
                    blank, 0, 0))
  head = params["classifier"]
  rows.append(Row("classifier", "linear", "", (1, 1, num_classes), 1, blank, _count(head),
                  _macs(head, (1, 1))))
  rows.append(Row("softmax", "softmax", "", (1, 1, num_classes), 0, blank, 0, 0))
  for tap in V.AUX_TAPS:
    if tap in params:
      rows.append(Row(tap, AUX_KIND, "", (1, 1, num_classes), 3, blank,
                      _count(params[tap]), _macs(params[tap], (4, 4)), in_table_1=False))
  for row in rows:
    if row.name in PAPER_TABLE_1 and row.in_table_1:
      row.paper_params, row.paper_ops = PAPER_TABLE_1[row.name]
  return rows


def totals(rows: list[Row]) -> dict:
  main = [r for r in rows if r.kind != AUX_KIND]
  return {"params": sum(r.params for r in main), "macs": sum(r.macs for r in main),
          "params_with_aux": sum(r.params for r in rows),
          "macs_with_aux": sum(r.macs for r in rows),
          "paper_params": sum(r.paper_params or 0 for r in rows) * K,
          "paper_ops": sum(r.paper_ops or 0 for r in rows) * M}


def _diff(ours: float, paper: Optional[float]) -> str:
  if not paper:
    return ""
  return f"{(ours - paper) / paper:+.1%}"


_HEADER = ("layer", "type", "patch/stride", "output", "depth", "#1x1", "#3x3red", "#3x3",
           "#5x5red", "#5x5", "pool proj", "params", "ops", "paper params", "paper ops",
           "diff params", "diff ops")


def _cells(row: Row) -> list[str]:
  paper = (f"{row.paper_params:g}K" if row.paper_params else "",
           f"{row.paper_ops:g}M" if row.paper_ops else "")
  return [row.name, row.kind, row.patch, "x".join(map(str, row.output)), str(row.depth),
          *map(str, row.channels),
          f"{row.params / K:.1f}K" if row.params else "0",
          f"{row.macs / M:.1f}M" if row.macs else "0", *paper,
          _diff(row.params, row.paper_params and row.paper_params * K),
          _diff(row.macs, row.paper_ops and row.paper_ops * M)]


def render(rows: list[Row], variant: str, size: int, markdown: bool = False) -> str:
  t = totals(rows)
  body = [_cells(r) for r in rows]
  total = ["total (Table 1 rows)", "", "", "", "", "", "", "", "", "", "",
           f"{t['params'] / K:.1f}K", f"{t['macs'] / M:.1f}M", f"{t['paper_params'] / K:g}K",
           f"{t['paper_ops'] / M:g}M", _diff(t["params"], t["paper_params"]),
           _diff(t["macs"], t["paper_ops"])]
  title = (f"GoogLeNet variant={variant!r} at {size}x{size}: {t['params']:,} parameters and "
           f"{t['macs'] / 1e9:.3f} G multiply-adds per image without the aux heads "
           f"({t['params_with_aux']:,} / {t['macs_with_aux'] / 1e9:.3f} G with them); "
           f"the paper's columns add up to {t['paper_params'] / K:g}K / {t['paper_ops'] / M:g}M "
           "(K = 1024 parameters, M = 10^6 multiply-adds)")
  lines = [title, ""]
  if markdown:
    lines.append("| " + " | ".join(_HEADER) + " |")
    lines.append("|" + "---|" * len(_HEADER))
    lines += ["| " + " | ".join(c) + " |" for c in body + [total]]
  else:
    widths = [max(len(r[i]) for r in [list(_HEADER)] + body + [total])
              for i in range(len(_HEADER))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    lines.append(fmt(_HEADER))
    lines += [fmt(c) for c in body]
    lines.append(fmt(total))
  return "\n".join(lines)


def define_flags(values, argv) -> None:
  """The command's flags, in the absl FlagValues `values` (`cli.parse_flags`)."""
  del argv
  from absl import flags  # pylint: disable=import-outside-toplevel
  define = dict(flag_values=values)
  flags.DEFINE_enum("variant", "paper", sorted(V.LAYOUTS), "The layout.", **define)
  flags.DEFINE_integer("size", None, "Input height = width (default: the layout's, 224 or 96).",
                       **define)
  flags.DEFINE_integer("classes", 1000, "Classifier outputs.", **define)
  flags.DEFINE_bool("markdown", False, "A Markdown table.", **define)
  flags.DEFINE_bool("json", False, "Rows and totals as JSON.", **define)


def main(argv: Optional[list[str]] = None) -> None:
  """The command on `argv` (default: sys.argv's arguments); usage errors exit with status 2."""
  args, _ = cli.parse_flags(define_flags, argv, __doc__)
  with cli.user_errors():
    rows = table(args.variant, args.size, args.classes)
  size = args.size or V.get_layout(args.variant).default_size
  if args.json:
    print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "totals": totals(rows)},
                     indent=1))
  else:
    print(render(rows, args.variant, size, args.markdown))


if __name__ == "__main__":
  main()
