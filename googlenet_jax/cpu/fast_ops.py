"""Backend-specific fast paths for the network's convolutions and max pools (NHWC / HWIO).

XLA:CPU's native convolution kernels are slow at two things this network does all the time:
weight gradients (XLA turns them into a convolution over the batch axis that runs several times
slower than the forward pass) and 1x1 convolutions (a plain matrix product in disguise). The
functions here compute the same values with matrix products that XLA:CPU runs well:

- `conv2d`: a 1x1 stride-1 convolution is a dot of the (N*H*W, C) view of the input; a k x k
  convolution keeps XLA's forward and input-gradient kernels but gets a custom VJP whose weight
  gradient, on feature maps of at least `TAPS_MIN_OUTPUT_PIXELS`, is one dot per kernel tap
  (shifted views of the input against the output gradient; on smaller maps XLA's own kernel is
  as fast and compiles faster); taps with few input channels share a dot, and a kernel with at
  most `ONE_DOT_MAX_ROWS` tap x channel rows (the 3-channel stem) is a single dot over all its
  taps. Every weight-gradient dot splits its long contraction axis into
  chunks, run as one batched dot and summed: XLA:CPU parallelises a dot over its output, and a
  (C_in x C_out) output is too small to keep more than one core busy.
- `max_pool`: forward as `lax.reduce_window`; the VJP routes each output gradient to the first
  maximum of its window in row-major window order -- what XLA's select-and-scatter with `ge`
  (the VJP of `lax.reduce_window` max) and PyTorch's max pool do. A strided pool records the
  winning tap of every window (int8) and assembles the input gradient one stride phase at a
  time from output-sized arrays; a stride-1 pool adds shifted views. Neither uses
  select-and-scatter.

`FAST_XLA` (in `googlenet_jax.cpu`) is the set of them as `Ops`; `googlenet_jax.cpu.ops()` adds the
oneDNN convolutions where they work. The values are those of `googlenet_jax.ops.LAX` to
rounding (tests/test_fast_ops.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from googlenet_jax.ops import Pads, lax_avg_pool, lax_conv2d


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


# A kernel with at most this many (tap x input channel) rows gets its weight gradient from one
# dot over all taps concatenated (the 7x7x3 stem: 147 rows; one pass over the output gradient
# instead of three, step -3 to -5% in two in-process A/Bs). Wider ones group taps to ~64 rows:
# one dot per tap row (3 taps) or all taps made the classic train step 9-11% slower.
ONE_DOT_MAX_ROWS = 256


def conv_weight_grad(x, dy, kernel: int, stride: int, pads: Pads) -> jax.Array:
  """d(conv)/d(kernel) as dots over shifted input views; taps with few input channels are
  grouped (concatenated on channels) so that every dot has at least ~64 rows of output, and
  a kernel of at most `ONE_DOT_MAX_ROWS` rows (the 3-channel stem) is one dot."""
  c, o = x.shape[-1], dy.shape[-1]
  dy2 = dy.reshape(-1, o)
  taps = list(_taps(x, kernel, stride, pads, dy.shape[1:3]))
  if len(taps) * c <= ONE_DOT_MAX_ROWS:
    group = len(taps)
  else:
    group = max(1, min(len(taps), 64 // c))
  grads = []
  for start in range(0, len(taps), group):
    part = taps[start:start + group]
    view = part[0] if len(part) == 1 else jnp.concatenate(part, axis=-1)
    grads.append(wgrad_dot(view.reshape(-1, view.shape[-1]), dy2))
  return jnp.concatenate(grads, axis=0).reshape(kernel, kernel, c, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_kxk(x, w, stride, pads):
  return lax_conv2d(x, w, stride, pads)


def _conv_kxk_fwd(x, w, stride, pads):
  return lax_conv2d(x, w, stride, pads), (x, w)


# Below this many output pixels per image XLA's weight-gradient kernel is as fast as the tap
# dots (batch 32 on the 2-core CPU: 3x3 at 14x14 57 vs 60 ms, at 7x7 21 vs 69 ms; at 28x28 the
# taps win 1.1-2.1x, at 56x56 4.3x) and it compiles faster.
TAPS_MIN_OUTPUT_PIXELS = 400


def _conv_kxk_bwd(stride, pads, res, dy):
  x, w = res
  if dy.shape[1] * dy.shape[2] >= TAPS_MIN_OUTPUT_PIXELS:
    _, vjp_x = jax.vjp(lambda x_: lax_conv2d(x_, w, stride, pads), x)
    (dx,) = vjp_x(dy)
    dw = conv_weight_grad(x, dy, w.shape[0], stride, pads).astype(w.dtype)
  else:
    _, vjp = jax.vjp(lambda x_, w_: lax_conv2d(x_, w_, stride, pads), x, w)
    dx, dw = vjp(dy)
  return dx, dw


_conv_kxk.defvjp(_conv_kxk_fwd, _conv_kxk_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: int, pads: Pads) -> jax.Array:
  """NHWC x HWIO convolution with explicit (low, high) padding per spatial axis."""
  pads = tuple(tuple(int(v) for v in p) for p in pads)
  if w.shape[0] != w.shape[1]:
    return lax_conv2d(x, w, stride, pads)
  if w.shape[0] == 1 and stride == 1 and pads == ((0, 0), (0, 0)):
    return _conv1x1(x, w)
  return _conv_kxk(x, w, stride, pads)


# --------------------------------------------------------------------------------------------
# Max pooling.


def _separable_max_pool(x, window, stride, pads):
  """The same maxima as one k x k window, taken over rows then columns: a stride-1 pool as
  maxima of shifted slices (one fused loop each way, 4x faster than reduce_window here), a
  strided one as two 1-D reduce_windows (1.3x)."""
  (plo, phi), (qlo, qhi) = pads
  if stride == 1:
    ho = x.shape[1] + plo + phi - window + 1
    wo = x.shape[2] + qlo + qhi - window + 1
    xp = jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)), constant_values=-jnp.inf)
    rows = functools.reduce(jnp.maximum, [xp[:, i:i + ho] for i in range(window)])
    return functools.reduce(jnp.maximum, [rows[:, :, j:j + wo] for j in range(window)])
  rows = lax.reduce_window(x, -jnp.inf, lax.max, (1, window, 1, 1), (1, stride, 1, 1),
                           ((0, 0), (plo, phi), (0, 0), (0, 0)))
  return lax.reduce_window(rows, -jnp.inf, lax.max, (1, 1, window, 1), (1, 1, stride, 1),
                           ((0, 0), (0, 0), (qlo, qhi), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, pads):
  return _separable_max_pool(x, window, stride, pads)


def _max_pool_fwd(x, window, stride, pads):
  return _separable_max_pool(x, window, stride, pads), x


def _max_pool_bwd(window, stride, pads, x, dy):
  if stride == 1:
    return (_max_pool_bwd_shifted(x, dy, window, pads),)
  return (_max_pool_bwd_phases(x, dy, window, stride, pads),)


def _window_winner(xp, window: int, stride: int, out_hw) -> jax.Array:
  """Index (row-major) of the first maximum in each window of the padded input, int16.

  A running strict maximum over the taps in window order, not `x == y` against the forward's
  output: XLA may recompute x inside a backward fusion with other rounding than the forward
  saw (seen in float64 after BatchNorm), and an equality test then routes gradients nowhere."""
  ho, wo = out_hw
  best, winner = None, None
  for tap in range(window * window):
    i, j = divmod(tap, window)
    view = xp[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
    if best is None:
      best, winner = view, jnp.zeros(view.shape, jnp.int16)
    else:
      better = view > best
      best = jnp.where(better, view, best)
      winner = jnp.where(better, jnp.int16(tap), winner)
  return winner


def _max_pool_bwd_shifted(x, dy, window, pads):
  """Stride 1: each tap's share of the gradient, padded back to input size and added."""
  h, w = x.shape[1:3]
  ho, wo = dy.shape[1:3]
  (plo, phi), (qlo, qhi) = pads
  xp = jnp.pad(x, ((0, 0), (plo, phi), (qlo, qhi), (0, 0)), constant_values=-jnp.inf)
  hp, wp = h + plo + phi, w + qlo + qhi
  winner = _window_winner(xp, window, 1, (ho, wo))
  dxp = jnp.zeros(xp.shape, dy.dtype)
  zero = jnp.zeros((), dy.dtype)
  for tap in range(window * window):
    i, j = divmod(tap, window)
    g = jnp.where(winner == tap, dy, zero)
    dxp = dxp + jnp.pad(g, ((0, 0), (i, hp - i - ho), (j, wp - j - wo), (0, 0)))
  return dxp[:, plo:plo + h, qlo:qlo + w, :]


def _max_pool_bwd_phases(x, dy, window, stride, pads):
  """Stride s > 1: input row s*q + a receives from taps i = a + s*m of window q - m, so each of
  the s*s phases of the (padded) input is a sum of shifted, output-sized selections of dy; the
  phases are then interleaved by one stack + reshape. ~4x less memory traffic than padding
  every tap's contribution to input size."""
  n, h, w, c = x.shape
  ho, wo = dy.shape[1:3]
  k, s = window, stride
  (plo, phi), (qlo, qhi) = pads
  hq, wq = -(-(h + plo + phi) // s), -(-(w + qlo + qhi) // s)  # phase sizes
  xp = jnp.pad(x, ((0, 0), (plo, hq * s - h - plo), (qlo, wq * s - w - qlo), (0, 0)),
               constant_values=-jnp.inf)
  winner = _window_winner(xp, k, s, (ho, wo))
  zero = jnp.zeros((), dy.dtype)
  rows = []
  for a in range(s):
    phases = []
    for b in range(s):
      acc = jnp.zeros((n, hq, wq, c), dy.dtype)
      for i in range(a, k, s):
        for j in range(b, k, s):
          mi, mj = (i - a) // s, (j - b) // s  # window q - mi feeds phase row q
          g = jnp.where(winner == i * k + j, dy, zero)
          acc = acc + jnp.pad(g, ((0, 0), (mi, hq - ho - mi), (mj, wq - wo - mj), (0, 0)))
      phases.append(acc)
    rows.append(jnp.stack(phases, axis=3))  # (n, hq, wq, s, c)
  dxp = jnp.stack(rows, axis=2).reshape(n, hq * s, wq * s, c)  # (n, hq, s, wq, s, c)
  return dxp[:, plo:plo + h, qlo:qlo + w, :]


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


# --------------------------------------------------------------------------------------------
# Average pooling (unpadded): reduce_window forward, its gradient as two small matrix products
# (XLA:CPU's gradient of a reduce_window sum is a padded reduce_window, ~10x slower here).


def _avg_matrix(size: int, window: int, stride: int, dtype) -> jax.Array:
  out = (size - window) // stride + 1
  starts = jnp.arange(out)[:, None] * stride
  cols = jnp.arange(size)[None, :]
  return jnp.where((cols >= starts) & (cols < starts + window), 1.0 / window, 0.0).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _avg_pool(x, window, stride):
  return lax_avg_pool(x, window, stride)


def _avg_pool_fwd(x, window, stride):
  # The residuals are the two pooling matrices (out x in per axis, a few hundred numbers).
  mh = _avg_matrix(x.shape[1], window, stride, x.dtype)
  mw = _avg_matrix(x.shape[2], window, stride, x.dtype)
  return lax_avg_pool(x, window, stride), (mh, mw)


def _avg_pool_bwd(window, stride, matrices, dy):
  mh, mw = matrices
  return (jnp.einsum("oh,nopc,pw->nhwc", mh, dy, mw),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def avg_pool(x: jax.Array, window: int, stride: int) -> jax.Array:
  """Unpadded (VALID) average pool; the gradient as two small matrix products."""
  return _avg_pool(x, window, stride)


def max_pool(x: jax.Array, window: int, stride: int, pads: Pads) -> jax.Array:
  """Max pool with explicit (low, high) padding per spatial axis that never wins (-inf)."""
  return _max_pool(x, window, stride, tuple(tuple(int(v) for v in p) for p in pads))
