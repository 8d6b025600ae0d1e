"""Building blocks in NHWC: convolution, PyTorch-exact BatchNorm, pooling helpers, LRN.

Pooling follows the frameworks the layouts come from, including their rounding:
PyTorch/Caffe `ceil_mode`, TF 'SAME' and PyTorch's adaptive average pooling.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from googlenet_jax.ops import LAX, Ops, conv_pads, same_padding

Dtype = Any
Initializer = Callable[..., jax.Array]
Padding = Union[int, str]  # an explicit symmetric amount, or "SAME"

# --------------------------------------------------------------------------------------------
# Output-size arithmetic, shared by the pooling ops and the model's input checks.


def pool_padding(size: int, window: int, stride: int, padding: Padding,
                 ceil_mode: bool = False) -> tuple[int, int]:
  """(low, high) padding that makes a VALID window reproduce the framework's rounding."""
  if padding == "SAME":
    return same_padding(size, window, stride)
  if not ceil_mode:
    return padding, padding
  # PyTorch ceil_mode: round the window count up, but never start a window in the right padding.
  out = -(-(size + 2 * padding - window) // stride) + 1
  if (out - 1) * stride >= size + padding:
    out -= 1
  return padding, max((out - 1) * stride + window - size - padding, 0)


def out_size(size: int, window: int, stride: int, padding: Padding,
             ceil_mode: bool = False) -> int:
  lo, hi = pool_padding(size, window, stride, padding, ceil_mode)
  return (size + lo + hi - window) // stride + 1


# --------------------------------------------------------------------------------------------
# Pooling and normalisation functions.


def max_pool(x: jax.Array, window: int, stride: int, padding: Padding = 0,
             ceil_mode: bool = False, ops: Ops = LAX) -> jax.Array:
  """Max pool whose padding never wins (it is -inf), as in PyTorch, Caffe and TF."""
  pads = tuple(pool_padding(n, window, stride, padding, ceil_mode) for n in x.shape[1:3])
  return ops.max_pool(x, window, stride, pads)


def avg_pool(x: jax.Array, window: int, stride: int, ops: Ops = LAX) -> jax.Array:
  """Unpadded average pool (the aux heads' 5x5/3, the paper's 7x7/1 head)."""
  return ops.avg_pool(x, window, stride)


@functools.lru_cache(maxsize=None)
def _adaptive_matrix(size: int, out: int) -> np.ndarray:
  m = np.zeros((out, size), np.float64)
  for i in range(out):
    start, end = (i * size) // out, -(-((i + 1) * size) // out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out: int) -> jax.Array:
  """PyTorch's AdaptiveAvgPool2d: windows [floor(i*n/out), ceil((i+1)*n/out)), overlapping and
  irregular (14 -> 4 uses [0,4) [3,7) [7,11) [10,14)), so no single strided pool matches it."""
  mh = jnp.asarray(_adaptive_matrix(x.shape[1], out), x.dtype)
  mw = jnp.asarray(_adaptive_matrix(x.shape[2], out), x.dtype)
  return jnp.einsum("oh,nhwc,pw->nopc", mh, x, mw)


def local_response_norm(x: jax.Array, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> jax.Array:
  """Cross-channel LRN as Caffe (and torch.nn.LocalResponseNorm) define it: alpha is divided
  by `size` (TF's local_response_normalization does not)."""
  summed = lax.reduce_window(x * x, 0.0, lax.add, (1, 1, 1, size),
                             (1, 1, 1, 1), ((0, 0), (0, 0), (0, 0), (size // 2, (size - 1) // 2)))
  return x / (k + (alpha / size) * summed) ** beta


# --------------------------------------------------------------------------------------------
# Modules.


class Conv(nn.Module):
  """2-D convolution, NHWC input and HWIO kernel (PyTorch OIHW is `transpose(2, 3, 1, 0)`)."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: Padding = 0
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  ops: Ops = LAX  # the convolution's implementation (`googlenet_jax.ops`)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    pads = conv_pads(self.padding, k, self.stride, x.shape[1:3])
    y = self.ops.conv2d(x, kernel, self.stride, pads)
    if bias is not None:
      y = y + bias
    return y


class BatchNorm(nn.Module):
  """BatchNorm with PyTorch's semantics, so that running statistics match it step for step.

  Differs from `flax.linen.BatchNorm` in one place: the running variance is updated with the
  unbiased batch variance (n / (n - 1)), as PyTorch does. `momentum` follows Flax's convention
  (PyTorch's 0.1 is 0.9 here). With `axis_name` the statistics are averaged across devices
  (cross-replica BatchNorm under pmap / shard_map). Statistics are computed in at least float32.
  """
  momentum: float = 0.9
  epsilon: float = 1e-3
  axis_name: Optional[str] = None
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    stat_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), stat_dtype)
    running_var = self.variable("batch_stats", "var", jnp.ones, (c,), stat_dtype)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      xs = x.astype(jnp.promote_types(x.dtype, stat_dtype))
      mean = xs.mean(axis=(0, 1, 2))
      if self.axis_name is not None:
        mean = lax.pmean(mean, self.axis_name)
      var = jnp.square(xs - mean).mean(axis=(0, 1, 2))
      count = x.size // c
      if self.axis_name is not None:
        var = lax.pmean(var, self.axis_name)
        count = count * lax.psum(1, self.axis_name)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean.astype(stat_dtype)
        unbiased = var * (count / max(count - 1, 1))
        running_var.value = m * running_var.value + (1 - m) * unbiased.astype(stat_dtype)
    dtype = self.dtype or jnp.result_type(x, scale)
    inv = (scale * lax.rsqrt(var + self.epsilon)).astype(dtype)
    return (x.astype(dtype) - mean.astype(dtype)) * inv + bias.astype(dtype)


class ConvUnit(nn.Module):
  """conv(+bias) -> ReLU, or conv(no bias) -> BatchNorm -> ReLU (torchvision's BasicConv2d)."""
  features: int
  kernel_size: int
  stride: int = 1
  same_padding: bool = False
  batch_norm: bool = False
  bn_epsilon: float = 1e-3
  bn_axis_name: Optional[str] = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  # fan_in -> bias initializer (PyTorch's default bias init depends on the fan-in).
  bias_init_for_fan_in: Callable[[int], Initializer] = lambda fan_in: nn.initializers.zeros
  dtype: Optional[Dtype] = None
  param_dtype: Dtype = jnp.float32
  ops: Ops = LAX

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    padding = "SAME" if self.same_padding else self.kernel_size // 2
    bias_init = self.bias_init_for_fan_in(x.shape[-1] * self.kernel_size ** 2)
    x = Conv(self.features, self.kernel_size, self.stride, padding, use_bias=not self.batch_norm,
             kernel_init=self.kernel_init, bias_init=bias_init, dtype=self.dtype,
             param_dtype=self.param_dtype, ops=self.ops, name="conv")(x)
    if self.batch_norm:
      x = BatchNorm(epsilon=self.bn_epsilon, axis_name=self.bn_axis_name, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="bn")(x, use_running_average=not train)
    return nn.relu(x)
