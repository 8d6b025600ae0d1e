"""Small helpers shared by the tests."""

import os

import numpy as np


def rel_err(got, ref) -> float:
  """Relative L2 error ||got - ref|| / ||ref||, in float64."""
  got = np.asarray(got, np.float64)
  ref = np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (got.shape, ref.shape)
  return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def nchw_to_nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def assert_conv_matches_lax(conv, x, w, stride, lax_padding, tol=1e-5):
  """`conv(x, w)` against `lax.conv_general_dilated` (NHWC / HWIO, `lax_padding` explicit pairs
  or 'SAME'): the value and both gradients for a random output cotangent, jitted."""
  import jax  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel

  ref_conv = lambda a, b: lax.conv_general_dilated(a, b, (stride, stride), lax_padding,
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def value_and_grads(f, x, w, dy):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(dy))

  y_shape = jax.eval_shape(ref_conv, x, w).shape
  dy = np.random.RandomState(2).randn(*y_shape).astype(np.float32)
  ref = jax.jit(lambda x, w, dy: value_and_grads(ref_conv, x, w, dy))(x, w, dy)
  got = jax.jit(lambda x, w, dy: value_and_grads(conv, x, w, dy))(x, w, dy)
  for g, r, name in zip(got, ref, ("y", "dx", "dw")):
    assert g.shape == r.shape and g.dtype == r.dtype, name
    assert rel_err(g, r) <= tol, name


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra) -> dict:
  """The environment of the train.py / tool / worker processes the tests start: one device (no
  simulated 8), the repository importable, and the suite's compilation cache (conftest.py)."""
  from googlenet_jax.tools import cli  # pylint: disable=import-outside-toplevel
  return {**os.environ, "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "2",
          "JAX_CACHE_DIR": cli.default_cache_dir(),
          "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra}


_VARIABLES = {}


def init_variables(model, shape, seed=0):
  """`googlenet_jax.init_variables(model, jax.random.key(seed), shape)` (`model.init` on zeros,
  compiled fast), once per process for each (model, shape, seed)."""
  import jax  # pylint: disable=import-outside-toplevel
  import googlenet_jax  # pylint: disable=import-outside-toplevel
  key = (repr(model), tuple(shape), seed)
  if key not in _VARIABLES:
    _VARIABLES[key] = googlenet_jax.init_variables(model, jax.random.key(seed), shape)
  return _VARIABLES[key]


def dropout_calls(model, shape):
  """(rate, features) of every dropout a train-mode pass of `model` on inputs of `shape` applies
  (rate > 0, not deterministic), sorted: traced with abstract values, nothing runs."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  calls = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Dropout) and context.method_name == "__call__":
      deterministic = kwargs.get("deterministic", module.deterministic)
      if not deterministic and module.rate > 0:
        calls.append((round(float(module.rate), 6), int(args[0].shape[-1])))
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.key(1)}), variables, x)
  return sorted(calls)


def torch_dropout_calls(model, x):
  """The same for a PyTorch module (its nn.Dropout modules and F.dropout calls) on tensor `x`."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch.nn import functional  # pylint: disable=import-outside-toplevel
  calls, real = [], functional.dropout

  def record(inputs, p=0.5, training=True, inplace=False):
    if training and p > 0:
      calls.append((round(float(p), 6), int(inputs.shape[-1])))
    return real(inputs, p, training, inplace)

  functional.dropout = record
  try:
    with torch.no_grad():
      model.train()(x)
  finally:
    functional.dropout = real
  return sorted(calls)
