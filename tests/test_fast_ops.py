"""The fast (matrix-product) convolution and max-pool paths against plain lax: values and
gradients on random inputs, every padding/stride the layouts use, and ties in max pools."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from googlenet_jax import cpu, layers
from googlenet_jax.cpu import fast_ops, onednn
from googlenet_jax.ops import LAX, conv_pads, lax_avg_pool
from googlenet_jax.models import GoogLeNet
from helpers import assert_conv_matches_lax, init_variables, rel_err


def _rand(shape, seed):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape).astype(np.float32))


def _lax_conv(x, w, stride, padding):
  pads = "SAME" if padding == "SAME" else ((padding, padding), (padding, padding))
  return lax.conv_general_dilated(x, w, (stride, stride), pads,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _fast_conv(x, w, stride, padding):
  return fast_ops.conv2d(x, w, stride, conv_pads(padding, w.shape[0], stride, x.shape[1:3]))


def _value_and_grads(f, x, w, dy):
  y, vjp = jax.vjp(f, x, w)
  return (y, *vjp(dy))


CONV_CASES = [  # (batch, size, c_in, c_out, kernel, stride, padding)
    (2, 9, 16, 8, 1, 1, 0),       # 1x1 as a dot
    (3, 8, 5, 7, 3, 1, 1),        # 3x3, few channels (all taps in one dot)
    (2, 9, 70, 6, 3, 1, 1),       # 3x3, one tap per dot
    (2, 7, 4, 6, 5, 1, 2),        # 5x5
    (2, 7, 16, 6, 5, 1, 2),       # 5x5 on 16 channels (3a): groups of 4 taps, the last short
    (2, 23, 3, 8, 7, 2, 3),       # the stem: 7x7/2 on an odd size (one dot)
    (2, 24, 3, 8, 7, 2, "SAME"),  # keras: SAME padding, asymmetric at stride 2
    (2, 10, 4, 5, 5, 1, "SAME"),
    (2, 5, 6, 4, 1, 1, "SAME"),
    (1, 64, 8, 4, 1, 1, 0),       # long contraction: chunked weight-gradient dot
]


@pytest.fixture(autouse=True)
def weight_gradients_by_taps(monkeypatch):
  """The test shapes are small: make every k x k weight gradient take the tap-dot path (the
  default keeps XLA's kernel below TAPS_MIN_OUTPUT_PIXELS; `test_small_maps_...` checks it).
  These are the XLA paths (`cpu.FAST_XLA`); the oneDNN convolutions are tests/test_onednn.py's."""
  monkeypatch.setattr(fast_ops, "TAPS_MIN_OUTPUT_PIXELS", 0)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_values_and_gradients_match_lax(case):
  n, size, ci, co, k, stride, padding = case
  x, w = _rand((n, size, size, ci), 0), _rand((k, k, ci, co), 1)
  lax_padding = "SAME" if padding == "SAME" else ((padding, padding), (padding, padding))
  assert_conv_matches_lax(lambda a, b: _fast_conv(a, b, stride, padding),
                          x, w, stride, lax_padding)


def test_small_maps_keep_xlas_weight_gradient(monkeypatch):
  monkeypatch.setattr(fast_ops, "TAPS_MIN_OUTPUT_PIXELS", 10 * 10)
  for size, taps in ((9, False), (10, True)):
    x, w = _rand((2, size, size, 4), 0), _rand((3, 3, 4, 5), 1)
    f = lambda a, b: _fast_conv(a, b, 1, 1)
    jaxpr = str(jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[1](jnp.ones((2, size, size, 5))))(x, w))
    assert ("dot_general" in jaxpr) == taps, size
    got = _value_and_grads(f, x, w, jnp.ones((2, size, size, 5)))
    ref = _value_and_grads(lambda a, b: _lax_conv(a, b, 1, 1), x, w, jnp.ones((2, size, size, 5)))
    for g, r in zip(got, ref):
      assert rel_err(g, r) <= 1e-5


@pytest.mark.parametrize("c_in, kernel, dots", [(3, 7, 1), (1, 7, 1), (16, 5, 7), (70, 3, 9)])
def test_weight_gradient_dot_count(c_in, kernel, dots):
  """How the taps are grouped: the stem's 147 (tap x channel) rows and d2l's 49 are one dot;
  16 channels take 4 taps per dot (25 taps: 7 dots), 70 channels one tap per dot."""
  x, w = _rand((2, 12, 12, c_in), 0), _rand((kernel, kernel, c_in, 5), 1)
  f = lambda a, b: _fast_conv(a, b, 1, kernel // 2)
  dy = jnp.ones((2, 12, 12, 5))
  jaxpr = str(jax.make_jaxpr(lambda x, w: jax.vjp(f, x, w)[1](dy))(x, w))
  assert jaxpr.count("dot_general") == dots


def test_conv_float64_is_exact_to_float64_rounding():
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.RandomState(0).randn(2, 11, 11, 5))
    w = jnp.asarray(np.random.RandomState(1).randn(3, 3, 5, 4))
    dy = jnp.asarray(np.random.RandomState(2).randn(2, 11, 11, 4))
    ref = _value_and_grads(lambda a, b: _lax_conv(a, b, 1, 1), x, w, dy)
    got = _value_and_grads(lambda a, b: _fast_conv(a, b, 1, 1), x, w, dy)
    for g, r in zip(got, ref):
      assert g.dtype == jnp.float64 and rel_err(g, r) <= 1e-12


def test_conv_bfloat16_close_to_float32():
  x, w = _rand((1, 64, 8, 8), 0), _rand((3, 3, 8, 4), 1)
  dy = _rand((1, 64, 8, 4), 2)
  ref = _value_and_grads(lambda a, b: _lax_conv(a, b, 1, 1), x, w, dy)
  bf = lambda t: t.astype(jnp.bfloat16)
  got = _value_and_grads(lambda a, b: _fast_conv(a, b, 1, 1), bf(x), bf(w), bf(dy))
  for g, r in zip(got, ref):
    assert g.dtype == jnp.bfloat16 and rel_err(g.astype(jnp.float32), r) <= 2e-2


POOL_CASES = [  # (size, window, stride, padding, ceil_mode)
    (8, 3, 1, 1, False),   # the Inception blocks' 3x3/1 pad 1
    (112, 3, 2, 0, True),  # classic/torchvision stage pools: ceil mode, last window partial
    (13, 3, 2, 0, True),
    (14, 3, 2, 0, True),
    (14, 2, 2, 0, True),   # torchvision's 2x2/2 before 5a
    (7, 2, 2, 0, True),    # ceil mode on an odd size: a window of one real pixel
    (12, 3, 2, 1, False),  # d2l: padding 1, floor
    (12, 3, 2, "SAME", False),
    (11, 3, 2, "SAME", False),
    (16, 3, 3, 1, True),   # stride 3: 9 phases
    (9, 2, 3, 0, True),    # window smaller than the stride: phases no window reaches
]


def _pool_grads(x, dy, *args, fast):
  return _value_and_grads(lambda a, _: layers.max_pool(a, *args, ops=cpu.FAST_XLA if fast else LAX), x, None, dy)[:2]


@pytest.mark.parametrize("case", POOL_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool_values_and_gradients_match_lax(case, ties):
  size, window, stride, padding, ceil_mode = case
  x = _rand((2, size, size, 3), 3)
  if ties:  # few distinct values: most windows hold several maxima
    x = jnp.round(x)
  y = layers.max_pool(x, window, stride, padding, ceil_mode)
  dy = _rand(y.shape, 4)
  args = (window, stride, padding, ceil_mode)
  ref = jax.jit(lambda x, dy: _pool_grads(x, dy, *args, fast=False))(x, dy)
  got = jax.jit(lambda x, dy: _pool_grads(x, dy, *args, fast=True))(x, dy)
  np.testing.assert_array_equal(got[0], ref[0])
  # Each output gradient goes to the same single input position (a wrong routing is an O(1)
  # error); overlapping windows may add their contributions in another order.
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("size,window,stride", [(14, 5, 3), (13, 5, 3), (7, 7, 1), (9, 3, 2)])
def test_avg_pool_values_and_gradients_match_lax(size, window, stride, fast):
  x = _rand((2, size, size, 5), 6)
  def lax_avg(a):
    return lax.reduce_window(a, 0.0, lax.add, (1, window, window, 1), (1, stride, stride, 1),
                             "VALID") / window ** 2
  y_ref, vjp_ref = jax.vjp(lax_avg, x)
  y, vjp = jax.vjp(lambda a: (fast_ops.avg_pool if fast else lax_avg_pool)(a, window, stride), x)
  dy = _rand(y_ref.shape, 7)
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vjp(dy)[0], vjp_ref(dy)[0], rtol=1e-6, atol=1e-6)


def test_max_pool_tie_goes_to_first_maximum_in_window_order():
  x = jnp.ones((1, 3, 3, 1))
  dy = jnp.ones((1, 1, 1, 1))
  for fast in (False, True):
    _, vjp = jax.vjp(lambda a: layers.max_pool(a, 3, 1, 0, ops=cpu.FAST_XLA if fast else LAX), x)
    dx = vjp(dy)[0][0, :, :, 0]
    expected = np.zeros((3, 3))
    expected[0, 0] = 1.0  # like PyTorch: the first maximum in row-major window order
    np.testing.assert_array_equal(dx, expected)


def test_the_reference_network_is_plain_lax():
  """`GoogLeNet()` lowers to lax's convolutions and pools on every backend; `cpu.FAST_XLA`
  to the matrix-product paths (no convolution left in the forward pass of a 1x1)."""
  x = _rand((1, 32, 32, 3), 0)
  plain = GoogLeNet(num_classes=3, aux_logits=False)
  assert plain.ops is LAX
  variables = jax.eval_shape(plain.init, jax.random.key(0), x)
  hlo = lambda model: jax.jit(model.apply).lower(variables, x).as_text()
  text = hlo(plain)
  assert text.count("stablehlo.convolution") == 57 and "onednn" not in text
  text = hlo(plain.clone(ops=cpu.FAST_XLA))
  assert text.count("stablehlo.convolution") < 57 and "onednn" not in text


@pytest.mark.slow
def test_network_same_parameters_outputs_and_gradients_on_every_kernel_set():
  """The whole network (train mode, dropout on) on `cpu.FAST_XLA` against plain lax, and on
  `cpu.ONEDNN` (where it loads) against `cpu.FAST_XLA`: the same parameters, outputs within
  1e-5 and gradients within 1e-4. (The PyTorch parity tests in the default run take the
  oneDNN path too.)"""
  x = _rand((2, 48, 48, 3), 5)
  plain = GoogLeNet(num_classes=7, aux_logits=False)
  variables = init_variables(plain, x.shape)

  def loss(params, model):
    out = model.apply({"params": params}, x, train=True,
                      rngs={"dropout": jax.random.key(1)}).logits
    return (out * jnp.arange(7.0)).sum(), out

  flat = lambda g: np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
  results = {}
  for ops in (LAX, cpu.FAST_XLA) + ((cpu.ONEDNN,) if onednn.available() else ()):
    model = plain.clone(ops=ops)
    assert (jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0), x))
            == jax.tree.structure(variables))
    (_, y), g = jax.jit(jax.value_and_grad(lambda p, m=model: loss(p, m), has_aux=True))(
        variables["params"])
    results[ops] = y, flat(g)
  for ops, ref in ((cpu.FAST_XLA, LAX), (cpu.ONEDNN, cpu.FAST_XLA)):
    if ops in results:
      assert rel_err(results[ops][0], results[ref][0]) <= 1e-5, ops
      assert rel_err(results[ops][1], results[ref][1]) <= 1e-4, ops
  assert len(results) == 3 or not onednn.available()
