"""The architecture as data: the paper's Table 1, and each layout as a list of its differences.

Every variant runs the same rows of `TABLE_1` through one implementation (`models.py`); a
`Layout` says only how a variant differs (normalisation, padding, pooling, heads, initialisers).
Provenance of each choice: the README's Variants section (which framework each layout follows).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple, Optional, Union


class Conv(NamedTuple):
  """A stem convolution unit: conv (+ BatchNorm where the layout has it) + ReLU."""
  name: str
  features: int
  kernel: int
  stride: int = 1


class MaxPool(NamedTuple):
  """A stride-2 max pool between stages; its window and rounding come from the layout."""
  name: str


class LRN(NamedTuple):
  """Local response normalisation; present only in layouts with `lrn=True` (the paper's)."""
  name: str


class Inception(NamedTuple):
  """One row of the paper's Table 1 (channel counts of the four branches)."""
  name: str
  conv_1x1: int
  conv_3x3_reduce: int
  conv_3x3: int
  conv_5x5_reduce: int
  conv_5x5: int
  pool_proj: int

  @property
  def out_channels(self) -> int:
    return self.conv_1x1 + self.conv_3x3 + self.conv_5x5 + self.pool_proj


class AuxTap(NamedTuple):
  """Where an auxiliary classifier reads the feature map (train mode only)."""
  name: str


Row = Union[Conv, MaxPool, LRN, Inception, AuxTap]

# Szegedy et al. 2014, Table 1, top to bottom (the head follows the last row).
#                  name            #1x1  #3x3red  #3x3  #5x5red  #5x5  pool proj
TABLE_1: tuple[Row, ...] = (
    Conv("conv1", 64, kernel=7, stride=2),
    MaxPool("maxpool1"),
    LRN("lrn1"),
    Conv("conv2", 64, kernel=1),
    Conv("conv3", 192, kernel=3),
    LRN("lrn2"),
    MaxPool("maxpool2"),
    Inception("inception_3a", 64,   96,     128,  16,      32,   32),
    Inception("inception_3b", 128,  128,    192,  32,      96,   64),
    MaxPool("maxpool3"),
    Inception("inception_4a", 192,  96,     208,  16,      48,   64),
    AuxTap("aux_after_4a"),
    Inception("inception_4b", 160,  112,    224,  24,      64,   64),
    Inception("inception_4c", 128,  128,    256,  24,      64,   64),
    Inception("inception_4d", 112,  144,    288,  32,      64,   64),
    AuxTap("aux_after_4d"),
    Inception("inception_4e", 256,  160,    320,  32,      128,  128),
    MaxPool("maxpool4"),
    Inception("inception_5a", 256,  160,    320,  32,      128,  128),
    Inception("inception_5b", 384,  192,    384,  48,      128,  128),
)

AUX_TAPS = tuple(row.name for row in TABLE_1 if isinstance(row, AuxTap))
FEATURES = 1024  # channels of inception_5b, the classifier's input
AUX_CONV_FEATURES = 128
AUX_FC_FEATURES = 1024


class Option(str, enum.Enum):
  """A layout option: one of a fixed set of names, equal (and hashing equal) to its string, so
  that configs and JSON that hold the strings keep working."""
  __hash__ = str.__hash__

  def __str__(self) -> str:
    return self.value


class Pool(Option):
  """The stride-2 max pools between stages."""
  CEIL = "ceil"  # 3x3/2, ceil_mode (PyTorch, Caffe)
  FLOOR_PAD1 = "floor_pad1"  # 3x3/2, padding 1 (d2l)
  SAME = "same"  # 3x3/2, TF 'SAME'


class AuxPool(Option):
  """The aux heads' pool to 4x4."""
  AVG5S3 = "avg5s3"  # 5x5/3 average
  ADAPTIVE4 = "adaptive4"  # PyTorch's adaptive average to 4x4


class HeadPool(Option):
  """The pool before the classifier."""
  GLOBAL = "global"  # global mean
  AVG7 = "avg7"  # 7x7/1 average, then flatten


class Init(Option):
  """The initialisers of a fresh model (`models.INITIALIZERS`)."""
  KAIMING = "kaiming"
  CAFFE = "caffe"
  TORCHVISION = "torchvision"
  XAVIER = "xavier"
  GLOROT = "glorot"


class TorchNames(Option):
  """How a PyTorch state_dict of the layout names its entries."""
  MODULE = "module"  # torchvision-style modules (conv1.conv, inception3a.branch1, ...)
  SEQUENTIAL = "sequential"  # d2l's nn.Sequential indices


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one variant realises Table 1. Defaults are the classic PyTorch course model."""
  name: str
  in_channels: int = 3
  batch_norm: bool = False  # conv (no bias) -> BatchNorm -> ReLU instead of conv(+bias) -> ReLU
  bn_epsilon: float = 1e-3
  same_padding: bool = False  # TF 'SAME' (asymmetric for even sizes) instead of explicit k//2
  pool: Pool = Pool.CEIL
  maxpool4_window: int = 3  # torchvision uses 2x2/2 before inception_5a
  lrn: bool = False
  conv_5x5_kernel: int = 5  # torchvision's branch is 3x3 (its "known bug", kept for its weights)
  aux_logits: bool = True  # whether the layout has auxiliary heads at all
  aux_pool: AuxPool = AuxPool.AVG5S3
  aux_dropout_before_fc1: bool = True
  aux_dropout: float = 0.5
  head_pool: HeadPool = HeadPool.GLOBAL
  dropout: float = 0.4
  init: Init = Init.KAIMING
  torch_names: Optional[TorchNames] = TorchNames.MODULE  # None: no PyTorch weights to convert
  default_size: int = 224

  def __post_init__(self):
    # The options given as strings become members; an unknown one is a ValueError here.
    for field, option in (("pool", Pool), ("aux_pool", AuxPool), ("head_pool", HeadPool),
                          ("init", Init), ("torch_names", TorchNames)):
      value = getattr(self, field)
      if value is None and field == "torch_names":
        continue
      try:
        object.__setattr__(self, field, option(value))
      except ValueError:
        raise ValueError(f"Layout {self.name!r}: {field}={value!r} is not one of "
                         f"{[str(o) for o in option]}") from None

  @property
  def conv_bias(self) -> bool:
    return not self.batch_norm


LAYOUTS: dict[str, Layout] = {
    # The reference PyTorch implementation of the classic layout (a PyTorch course model).
    "classic": Layout("classic"),
    # Szegedy et al. 2014 / Caffe bvlc_googlenet.
    "paper": Layout(
        "paper", lrn=True, aux_dropout_before_fc1=False, aux_dropout=0.7,
        head_pool=HeadPool.AVG7, init=Init.CAFFE, torch_names=None),
    # torchvision.models.googlenet.
    "torchvision": Layout(
        "torchvision", batch_norm=True, maxpool4_window=2, conv_5x5_kernel=3,
        aux_pool=AuxPool.ADAPTIVE4, aux_dropout_before_fc1=False, aux_dropout=0.7, dropout=0.2,
        init=Init.TORCHVISION),
    # Dive into Deep Learning section 7.4: Fashion-MNIST, 1 channel, 96x96.
    "d2l": Layout(
        "d2l", in_channels=1, pool=Pool.FLOOR_PAD1, aux_logits=False, dropout=0.0,
        init=Init.XAVIER, torch_names=TorchNames.SEQUENTIAL, default_size=96),
    # The reference TF2/Keras model of this layout ('same' padding and pools).
    "keras": Layout(
        "keras", same_padding=True, pool=Pool.SAME, head_pool=HeadPool.AVG7, init=Init.GLOROT,
        torch_names=None),
}


def get_layout(variant: str) -> Layout:
  try:
    return LAYOUTS[variant]
  except KeyError:
    raise ValueError(
        f"unknown GoogLeNet variant {variant!r}; expected one of {sorted(LAYOUTS)}") from None
