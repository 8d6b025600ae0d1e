"""The array operations the network is built from, as one value chosen where a model is built.

`GoogLeNet(ops=...)` takes an `Ops`: its convolution, max pool and average pool. The default,
`LAX`, is the reference network: plain `lax` on every backend (cuDNN & co. on accelerators,
XLA's own kernels on CPU), exportable with `jax.export`. `googlenet_jax.cpu.ops()` gives the
same values from faster XLA:CPU paths (oneDNN convolutions, matrix-product gradients); nothing
else changes, so variables move freely between models built with either.

All three take NHWC activations; `conv2d` an HWIO kernel and explicit (low, high) padding per
spatial axis; `max_pool` padding that never wins (-inf), as in PyTorch, Caffe and TF.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Pads = Sequence[tuple[int, int]]
DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def same_padding(size: int, window: int, stride: int) -> tuple[int, int]:
  """TensorFlow's 'SAME' as explicit (low, high) padding of one axis: out = ceil(size / stride),
  the odd row/column of padding at the high end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + window - size, 0)
  return total // 2, total - total // 2


def conv_pads(padding, kernel: int, stride: int, hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Explicit (low, high) padding per spatial axis for an int (symmetric) or 'SAME' padding."""
  if padding == "SAME":
    return tuple(same_padding(n, kernel, stride) for n in hw)
  return ((padding, padding), (padding, padding))


def lax_conv2d(x: jax.Array, w: jax.Array, stride: int, pads: Pads) -> jax.Array:
  return lax.conv_general_dilated(x, w, (stride, stride), tuple(tuple(p) for p in pads),
                                  dimension_numbers=DIMENSION_NUMBERS)


def lax_max_pool(x: jax.Array, window: int, stride: int, pads: Pads) -> jax.Array:
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           ((0, 0), *(tuple(p) for p in pads), (0, 0)))


def lax_avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Unpadded (VALID) average pool."""
  # A Python 0.0 init keeps this JAX's differentiable reduce_window_sum.
  summed = lax.reduce_window(x, 0.0, lax.add, (1, window, window, 1), (1, stride, stride, 1),
                             "VALID")
  return summed / (window * window)


@dataclasses.dataclass(frozen=True)
class Ops:
  """A convolution, a max pool and an average pool with the signatures of `lax_conv2d`,
  `lax_max_pool` and `lax_avg_pool`, and a name for logs and reprs."""
  name: str
  conv2d: Callable[[jax.Array, jax.Array, int, Pads], jax.Array]
  max_pool: Callable[[jax.Array, int, int, Pads], jax.Array]
  avg_pool: Callable[[jax.Array, int, int], jax.Array]

  def __repr__(self) -> str:
    return f"Ops({self.name!r})"


LAX = Ops("lax", lax_conv2d, lax_max_pool, lax_avg_pool)
