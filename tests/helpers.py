"""Small helpers shared by the tests."""

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
