"""Backend-specific fast paths for the network's convolutions and max pools (NHWC / HWIO).

XLA:CPU's native convolution kernels are slow at two things this network does all the time:
weight gradients (XLA turns them into a convolution over the batch axis that runs several times
slower than the forward pass) and 1x1 convolutions (a plain matrix product in disguise). The
functions here compute the same values with matrix products that XLA:CPU runs well:

- `conv2d`: a 1x1 stride-1 convolution is a dot of the (N*H*W, C) view of the input; a k x k
  convolution keeps XLA's forward and input-gradient kernels but gets a custom VJP whose weight
  gradient is one dot per kernel tap (shifted views of the input against the output gradient).
  Every weight-gradient dot splits its long contraction axis into chunks, run as one batched
  dot and summed: XLA:CPU parallelises a dot over its output, and a (C_in x C_out) output is too
  small to keep more than one core busy. A strided convolution on few channels (the 7x7/2 stem
  on RGB) first becomes a stride-1 one on space-to-depth channels (`space_to_depth_conv`).
- `max_pool`: forward as `lax.reduce_window`; the VJP routes each output gradient to the first
  maximum of its window in row-major window order -- what XLA's select-and-scatter with `ge`
  (the VJP of `lax.reduce_window` max) and PyTorch's max pool do -- with shifted views instead
  of select-and-scatter.

Selection: `enabled()` is True on the CPU backend unless switched off, globally with
`set_enabled(False)` / the `use_fast_ops(False)` context manager / the environment variable
`GOOGLENET_JAX_FAST_OPS=0` (or `=1` to force them on any backend), or per model with
`GoogLeNet(fast_ops=False)`. GPU and TPU keep the native XLA kernels (cuDNN & co.) by default.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Pads = Sequence[tuple[int, int]]

_OVERRIDE: Optional[bool] = None
_DIMS = ("NHWC", "HWIO", "NHWC")


def _env_setting() -> Optional[bool]:
  value = os.environ.get("GOOGLENET_JAX_FAST_OPS", "").strip().lower()
  if value in ("0", "false", "no", "off"):
    return False
  if value in ("1", "true", "yes", "on"):
    return True
  return None


def set_enabled(value: Optional[bool]) -> None:
  """True/False forces the fast paths on/off; None restores the per-backend default."""
  global _OVERRIDE
  _OVERRIDE = value


@contextlib.contextmanager
def use_fast_ops(value: Optional[bool]):
  """Context manager form of `set_enabled` (takes effect when a function is traced)."""
  global _OVERRIDE
  old, _OVERRIDE = _OVERRIDE, value
  try:
    yield
  finally:
    _OVERRIDE = old


def enabled(override: Optional[bool] = None) -> bool:
  """Whether to use the fast paths: a module's explicit setting, else the global switch, else
  the environment variable, else the backend (only XLA:CPU benefits)."""
  for value in (override, _OVERRIDE, _env_setting()):
    if value is not None:
      return value
  return jax.default_backend() == "cpu"


# --------------------------------------------------------------------------------------------
# Weight-gradient products.


def _chunks(rows: int) -> int:
  """How many pieces to split a weight gradient's contraction into (see module docstring)."""
  for n in (8, 4, 2):
    if rows % n == 0 and rows // n >= 256:
      return n
  return 1


def wgrad_dot(a: jax.Array, b: jax.Array) -> jax.Array:
  """a.T @ b for tall a (M, K) and b (M, N), the contraction split so that both cores work."""
  m = a.shape[0]
  n = _chunks(m)
  if n == 1:
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())))
  out = jnp.result_type(a, b)
  acc = jnp.promote_types(out, jnp.float32)  # sum the partial products in >= float32
  parts = lax.dot_general(a.reshape(n, m // n, a.shape[1]), b.reshape(n, m // n, b.shape[1]),
                          (((1,), (1,)), ((0,), (0,))), preferred_element_type=acc)
  return parts.sum(0).astype(out)


# --------------------------------------------------------------------------------------------
# Convolutions.


def _native_conv(x, w, stride: int, pads: Pads):
  return lax.conv_general_dilated(x, w, (stride, stride), tuple(pads), dimension_numbers=_DIMS)


def conv_pads(padding, kernel: int, stride: int, hw: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """Explicit (low, high) padding per spatial axis for an int or 'SAME' padding."""
  if padding == "SAME":
    out = []
    for n in hw:
      o = -(-n // stride)
      total = max((o - 1) * stride + kernel - n, 0)
      out.append((total // 2, total - total // 2))
    return tuple(out)
  return ((padding, padding), (padding, padding))


@jax.custom_vjp
def _conv1x1(x, w):
  n, h, wd, c = x.shape
  return jnp.dot(x.reshape(-1, c), w.reshape(c, -1)).reshape(n, h, wd, -1)


def _conv1x1_fwd(x, w):
  return _conv1x1(x, w), (x, w)


def _conv1x1_bwd(res, dy):
  x, w = res
  c, o = x.shape[-1], dy.shape[-1]
  dy2 = dy.reshape(-1, o)
  dx = jnp.dot(dy2, w.reshape(c, o).T).reshape(x.shape)
  dw = wgrad_dot(x.reshape(-1, c), dy2).reshape(w.shape)
  return dx, dw.astype(w.dtype)


_conv1x1.defvjp(_conv1x1_fwd, _conv1x1_bwd)


def _taps(x, kernel: int, stride: int, pads: Pads, out_hw):
  """The input view each kernel tap (i, j) multiplies, in row-major tap order: (N, Ho, Wo, C)."""
  xp = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  ho, wo = out_hw
  for i in range(kernel):
    for j in range(kernel):
      yield xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]


def conv_weight_grad(x, dy, kernel: int, stride: int, pads: Pads) -> jax.Array:
  """d(conv)/d(kernel) as dots over shifted input views; taps with few input channels are
  grouped (concatenated on channels) so that every dot has at least ~64 rows of output."""
  c, o = x.shape[-1], dy.shape[-1]
  dy2 = dy.reshape(-1, o)
  taps = list(_taps(x, kernel, stride, pads, dy.shape[1:3]))
  group = max(1, min(len(taps), 64 // c))
  grads = []
  for start in range(0, len(taps), group):
    part = taps[start:start + group]
    view = part[0] if len(part) == 1 else jnp.concatenate(part, axis=-1)
    grads.append(wgrad_dot(view.reshape(-1, view.shape[-1]), dy2))
  return jnp.concatenate(grads, axis=0).reshape(kernel, kernel, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_kxk(x, w, stride, pads):
  return _native_conv(x, w, stride, pads)


def _conv_kxk_fwd(x, w, stride, pads):
  return _native_conv(x, w, stride, pads), (x, w)


def _conv_kxk_bwd(stride, pads, res, dy):
  x, w = res
  _, vjp_x = jax.vjp(lambda x_: _native_conv(x_, w, stride, pads), x)
  (dx,) = vjp_x(dy)
  dw = conv_weight_grad(x, dy, w.shape[0], stride, pads)
  return dx, dw.astype(w.dtype)


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def space_to_depth_conv(x, w, stride: int, pads: Pads):
  """A stride-s k x k convolution as a stride-1 ceil(k/s) x ceil(k/s) one on s*s*C channels
  (input pixels regrouped in s x s blocks, kernel zero-padded to a multiple of s): the stem's
  7x7/2 on 3 channels becomes 4x4/1 on 12, which XLA:CPU's kernels handle far better."""
  n, h, wd, c = x.shape
  k, o, s = w.shape[0], w.shape[-1], stride
  kb = -(-k // s)
  ho = (h + pads[0][0] + pads[0][1] - k) // s + 1
  wo = (wd + pads[1][0] + pads[1][1] - k) // s + 1
  hb, wb = ho + kb - 1, wo + kb - 1  # blocks the output needs
  xp = jnp.pad(x, ((0, 0), (pads[0][0], max(0, hb * s - h - pads[0][0])),
                   (pads[1][0], max(0, wb * s - wd - pads[1][0])), (0, 0)))[:, :hb * s, :wb * s]
  xs = xp.reshape(n, hb, s, wb, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hb, wb, s * s * c)
  wp = jnp.pad(w, ((0, kb * s - k), (0, kb * s - k), (0, 0), (0, 0)))
  ws = wp.reshape(kb, s, kb, s, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(kb, kb, s * s * c, o)
  return _conv_kxk(xs, ws, 1, ((0, 0), (0, 0)))


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1, padding=0,
           fast: Optional[bool] = None) -> jax.Array:
  """NHWC x HWIO convolution, `padding` an int (symmetric) or 'SAME'; `fast` as `enabled()`."""
  k = w.shape[0]
  pads = conv_pads(padding, k, stride, x.shape[1:3])
  if not enabled(fast) or w.shape[0] != w.shape[1]:
    return _native_conv(x, w, stride, pads)
  if k == 1 and stride == 1 and pads == ((0, 0), (0, 0)):
    return _conv1x1(x, w)
  pads = tuple(tuple(p) for p in pads)
  if stride > 1 and x.shape[-1] * stride * stride <= 64 and _S2D:
    return space_to_depth_conv(x, w, stride, pads)
  return _conv_kxk(x, w, stride, pads)


_S2D = True


# --------------------------------------------------------------------------------------------
# Max pooling.


def _native_max_pool(x, window, stride, pads):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1),
                           ((0, 0), *pads, (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, pads):
  return _native_max_pool(x, window, stride, pads)


def _max_pool_fwd(x, window, stride, pads):
  y = _native_max_pool(x, window, stride, pads)
  return y, (x, y)


def _max_pool_bwd(window, stride, pads, res, dy):
  x, y = res
  n, h, w, c = x.shape
  ho, wo = y.shape[1:3]
  (plo, phi), (qlo, qhi) = pads
  neg = jnp.asarray(-jnp.inf, x.dtype)
  xp = jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)), constant_values=neg)
  hp, wp = h + plo + phi, w + qlo + qhi
  found = jnp.zeros(y.shape, bool)
  dxp = jnp.zeros(xp.shape, dy.dtype)
  zero = jnp.zeros((), dy.dtype)
  for i in range(window):
    for j in range(window):
      view = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
      hit = (view == y) & ~found
      found = found | hit
      g = jnp.where(hit, dy, zero)
      if stride > 1:  # spread onto the stride grid: interior padding
        dxp = dxp + lax.pad(g, zero, ((0, 0, 0), (i, hp - i - stride * (ho - 1) - 1, stride - 1),
                                      (j, wp - j - stride * (wo - 1) - 1, stride - 1), (0, 0, 0)))
      else:
        dxp = dxp + jnp.pad(g, ((0, 0), (i, hp - i - ho), (j, wp - j - wo), (0, 0)))
  return (dxp[:, plo:plo + h, qlo:qlo + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x: jax.Array, window: int, stride: int, pads: Pads,
             fast: Optional[bool] = None) -> jax.Array:
  """Max pool with explicit (low, high) padding per spatial axis that never wins (-inf)."""
  pads = tuple(tuple(p) for p in pads)
  if not enabled(fast):
    return _native_max_pool(x, window, stride, pads)
  return _max_pool(x, window, stride, pads)
