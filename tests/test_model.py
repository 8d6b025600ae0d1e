"""The network's API: parameter counts, modes, dtypes, input checks and pooling semantics."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from googlenet_jax import GoogLeNet, GoogLeNetOutputs, TABLE_1, count_params, layers
from googlenet_jax.convert import flax_to_torch, torch_to_flax
from googlenet_jax.variants import Inception
import torch_reference
from helpers import dropout_calls, init_variables, nchw_to_nhwc, rel_err


def param_shapes(variant, size=224, channels=3, **kw):
  model = GoogLeNet(variant=variant, **kw)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, channels)))


@pytest.mark.parametrize("variant,aux,expected", [
    ("torchvision", None, 13_004_888), ("torchvision", False, 6_624_904),
    ("classic", None, 13_378_280), ("classic", False, 6_998_552),
    ("paper", False, 6_998_552), ("keras", None, 13_378_280)])
def test_parameter_counts_match_the_reference(variant, aux, expected):
  assert count_params(param_shapes(variant, aux_logits=aux)["params"]) == expected


def test_table_1_output_channels():
  blocks = [r for r in TABLE_1 if isinstance(r, Inception)]
  assert [b.out_channels for b in blocks] == [256, 480, 512, 512, 512, 528, 832, 832, 1024]


def test_init_creates_aux_heads_in_eval_mode_and_at_any_size():
  shapes = param_shapes("classic", size=96)  # the aux heads could not run at 96x96
  assert {"aux_after_4a", "aux_after_4d"} <= set(shapes["params"])
  assert shapes["params"]["aux_after_4a"]["fc1"]["kernel"].shape == (2048, 1024)


MODEL = GoogLeNet(variant="torchvision", num_classes=7)
X = jnp.asarray(np.random.RandomState(0).rand(2, 64, 64, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def _variables():
  return init_variables(MODEL, X.shape)


@pytest.fixture(scope="module")
def variables():
  return _variables()


class EvalModeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_eval_returns_logits(self):
    variables = _variables()
    logits = self.variant(lambda v, x: MODEL.apply(v, x))(variables, X)
    chex.assert_shape(logits, (2, 7))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite(logits)


@jax.jit
def _train_apply(variables, x, seed, deterministic=False):
  return MODEL.apply(variables, x, train=True, deterministic=deterministic,
                     mutable=["batch_stats"], rngs={"dropout": jax.random.key(seed)})


def test_train_returns_three_outputs_and_updates_batch_stats(variables):
  out, updates = _train_apply(variables, X, 1)
  assert isinstance(out, GoogLeNetOutputs)
  chex.assert_shape([out.logits, out.aux1, out.aux2], (2, 7))
  assert not np.allclose(updates["batch_stats"]["conv1"]["bn"]["mean"],
                         variables["batch_stats"]["conv1"]["bn"]["mean"])


def _without_aux_heads(variables):
  return {c: {k: v for k, v in t.items() if not k.startswith("aux_")}
          for c, t in variables.items()}


def _train_shapes(model, variables, x=X):
  """The train-mode output of `model` on `variables`, traced only (nothing compiles)."""
  return jax.eval_shape(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                 rngs={"dropout": jax.random.key(0)})[0],
                        variables, x)


def test_train_without_aux_heads_returns_outputs_with_none_heads(variables):
  model = MODEL.clone(aux_logits=False)
  out = _train_shapes(model, _without_aux_heads(variables))
  assert isinstance(out, GoogLeNetOutputs)
  assert out.logits.shape == (2, 7) and out.aux1 is None and out.aux2 is None
  assert jax.eval_shape(model.apply, _without_aux_heads(variables), X).shape == (2, 7)  # eval


def test_variables_without_aux_heads_in_train_mode_say_to_drop_them(variables):
  with pytest.raises(ValueError, match="no auxiliary heads.*build the model with aux_logits=False"):
    _train_shapes(MODEL, _without_aux_heads(variables))
  jax.eval_shape(MODEL.apply, _without_aux_heads(variables), X)  # eval mode needs none


def test_variables_for_other_classes_name_both_counts_and_merge_pretrained(variables):
  model = MODEL.clone(num_classes=10)
  for apply in (lambda: jax.eval_shape(model.apply, variables, X),
                lambda: _train_shapes(model, variables)):
    with pytest.raises(ValueError, match=r"num_classes=10\).*variables for 7 classes.*"
                                         r"num_classes=7.*model_dir\.merge_pretrained"):
      apply()


def test_deterministic_switches_dropout(variables):
  det = jax.jit(lambda v, x, s: MODEL.apply(v, x, train=True, deterministic=True,
                                            mutable=["batch_stats"],
                                            rngs={"dropout": jax.random.key(s)})[0].logits)
  np.testing.assert_array_equal(det(variables, X, 0), det(variables, X, 1))
  assert not np.allclose(_train_apply(variables, X, 0)[0].logits,
                         _train_apply(variables, X, 1)[0].logits)


def test_bfloat16_compute_keeps_float32_params(variables):
  model = GoogLeNet(variant="torchvision", num_classes=7, dtype=jnp.bfloat16)
  logits = jax.jit(model.apply)(variables, X)
  assert logits.dtype == jnp.bfloat16
  fresh = jax.eval_shape(model.init, jax.random.key(0), X)
  assert {p.dtype for p in jax.tree.leaves(fresh["params"])} == {jnp.dtype(jnp.float32)}
  ref = jax.jit(MODEL.apply)(variables, X)
  assert rel_err(logits.astype(jnp.float32), ref) < 5e-2


@pytest.mark.parametrize("x,match", [
    (np.zeros((224, 224, 3), np.float32), "rank 4"),
    (np.zeros((1, 224, 224, 1), np.float32), "3 input channel"),
    (np.zeros((1, 3, 224, 224), np.float32), r"NCHW, transpose it: x\.transpose\(0, 2, 3, 1\)"),
    (np.zeros((1, 224, 224, 3), np.uint8), "floating-point"),
    (np.zeros((1, 16, 16, 3), np.float32), "too small"),
])
def test_bad_input_is_a_clear_value_error(x, match):
  model = GoogLeNet(variant="classic", num_classes=5)
  variables = param_shapes("classic", num_classes=5)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)
  with pytest.raises(ValueError, match=match):
    jax.jit(model.apply)(variables, x)


def test_aux_heads_at_a_size_they_cannot_take_say_which_sizes_fit():
  model = GoogLeNet(variant="classic", num_classes=5)
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           param_shapes("classic", num_classes=5))
  with pytest.raises(ValueError, match="aux_after_4a.*Square inputs that fit"):
    jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, jnp.zeros((1, 160, 160, 3)))
  # eval mode has no aux heads: fine
  jax.jit(model.apply)(variables, jnp.zeros((1, 160, 160, 3)))


@pytest.mark.parametrize("size", [7, 8, 112, 113, 28, 14])
@pytest.mark.parametrize("window", [2, 3])
def test_ceil_mode_max_pool_matches_pytorch(size, window):
  x = np.random.RandomState(size).randn(2, 3, size, size).astype(np.float32)
  ref = torch.nn.functional.max_pool2d(torch.from_numpy(x), window, 2, ceil_mode=True).numpy()
  got = layers.max_pool(jnp.asarray(nchw_to_nhwc(x)), window, 2, ceil_mode=True)
  np.testing.assert_array_equal(got, nchw_to_nhwc(ref))


@pytest.mark.parametrize("size,out", [(14, 4), (10, 4), (7, 4), (13, 3), (5, 1)])
def test_adaptive_average_pool_matches_pytorch(size, out):
  x = np.random.RandomState(size).randn(2, 5, size, size).astype(np.float32)
  ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x), out).numpy()
  got = layers.adaptive_avg_pool(jnp.asarray(nchw_to_nhwc(x)), out)
  assert rel_err(got, nchw_to_nhwc(ref)) < 1e-6


def test_lrn_matches_pytorch_local_response_norm():
  x = np.random.RandomState(0).randn(2, 16, 9, 9).astype(np.float32) * 30
  ref = torch.nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(torch.from_numpy(x)).numpy()
  got = layers.local_response_norm(jnp.asarray(nchw_to_nhwc(x)))
  assert rel_err(got, nchw_to_nhwc(ref)) < 1e-6


def test_paper_layout_runs_with_lrn_and_7x7_head():
  model = GoogLeNet(variant="paper", num_classes=3)
  x = jnp.ones((1, 224, 224, 3))
  variables = init_variables(model, x.shape)
  assert jax.jit(model.apply)(variables, x).shape == (1, 3)
  # Caffe's initialisation: biases 0.2, classifier bias 0.
  assert np.all(variables["params"]["conv1"]["conv"]["bias"] == 0.2)
  assert np.all(variables["params"]["classifier"]["bias"] == 0.0)


def test_paper_layout_drops_out_where_the_paper_says():
  """Szegedy et al. 2014, section 5: the main classifier has "a dropout layer with 40% ratio of
  dropped outputs" before its linear layer; each auxiliary classifier "a fully connected layer
  with 1024 units" then "a dropout layer with 70% ratio of dropped outputs" (no reference
  implementation of the paper's layout is run here: its text is the reference)."""
  got = dropout_calls(GoogLeNet(variant="paper", num_classes=3), (2, 224, 224, 3))
  assert got == [(0.4, 1024), (0.7, 1024), (0.7, 1024)], got


def test_converter_lists_every_bad_key_at_once():
  sd = flax_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                  param_shapes("classic", num_classes=10)), "classic",
                     as_numpy=True)
  del sd["conv1.conv.weight"], sd["inception4b.branch3.1.conv.bias"]
  sd["surprise.weight"] = np.zeros(3)
  sd["inception3a.branch1.conv.weight"] = np.zeros((64, 192, 3, 3), np.float32)
  with pytest.raises(ValueError) as err:
    torch_to_flax(sd, "classic")
  msg = str(err.value)
  for key in ("conv1.conv.weight", "inception4b.branch3.1.conv.bias", "surprise.weight",
              "inception3a.branch1.conv.weight: got (64, 192, 3, 3)"):
    assert key in msg


def test_converter_names_the_variant_a_checkpoint_looks_like():
  sd = flax_to_torch(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                  param_shapes("torchvision", num_classes=10)), "torchvision",
                     as_numpy=True)
  with pytest.raises(ValueError) as err:
    torch_to_flax(sd, "classic")
  assert str(err.value).splitlines()[0] == (
      "this state_dict is a 'torchvision' checkpoint, not 'classic': pass variant='torchvision'")


@functools.lru_cache(maxsize=None)
def _torchvision_state_dict(aux_logits: bool) -> dict:
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = torchvision.models.googlenet(weights=None, aux_logits=aux_logits, init_weights=True)
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _conversion_error(state_dict, **kwargs) -> tuple[str, str]:
  """(first line, whole message) of the ValueError torch_to_flax raises."""
  with pytest.raises(ValueError) as err:
    torch_to_flax(state_dict, **kwargs)
  msg = str(err.value)
  assert len(msg) <= 600, msg
  return msg.splitlines()[0], msg


@pytest.mark.parametrize("kwargs, first", [
    (dict(variant="classic"),
     "this state_dict is a 'torchvision' checkpoint, not 'classic': pass variant='torchvision'"),
    (dict(variant="d2l"),
     "this state_dict is a 'torchvision' checkpoint, not 'd2l': pass variant='torchvision'"),
    (dict(variant="d2l", aux_logits=False),
     "this state_dict is a 'torchvision' checkpoint, not 'd2l': pass variant='torchvision' and "
     "aux_logits=None (it has auxiliary heads)"),
])
def test_converter_error_leads_with_the_right_variant(kwargs, first):
  got, msg = _conversion_error(_torchvision_state_dict(True), **kwargs)
  assert got == first
  assert "aux_logits=None" not in got or kwargs.get("aux_logits") is not None
  assert "missing keys (" in msg and "... and" in msg


def test_converter_error_names_missing_aux_heads():
  first, msg = _conversion_error(_torchvision_state_dict(False), variant="torchvision",
                                 aux_logits=True)
  assert first == ("this state_dict has no auxiliary heads: pass aux_logits=False (and build "
                   "GoogLeNet(..., aux_logits=False))")
  assert "missing keys (18): aux1." in msg
  first, _ = _conversion_error(torch_reference.d2l_googlenet().state_dict(), variant="d2l",
                               aux_logits=True)
  assert first.startswith("the 'd2l' layout has no auxiliary heads: pass aux_logits=False")
  variables = torch_to_flax(_torchvision_state_dict(False), "torchvision")
  assert "aux1" not in variables["params"] and "aux2" not in variables["params"]


def test_converter_error_names_merge_pretrained_for_another_class_count():
  first, msg = _conversion_error(_torchvision_state_dict(True), variant="torchvision",
                                 num_classes=10)
  assert first.startswith("this state_dict has a 1000-class classifier, not 10:")
  assert "merge_pretrained" in first and "wrongly shaped (6): aux1.fc2.weight: got (1000" in msg


@pytest.mark.parametrize("aux", [True, False])
def test_converter_detects_the_variant(aux):
  sd = _torchvision_state_dict(aux)
  chex.assert_trees_all_equal(torch_to_flax(sd), torch_to_flax(sd, "torchvision"))
  d2l = torch_reference.d2l_googlenet().state_dict()
  chex.assert_trees_all_equal(torch_to_flax(d2l), torch_to_flax(d2l, "d2l"))
  classic = torch_reference.ClassicGoogLeNet(num_classes=10).state_dict()
  chex.assert_trees_all_equal(torch_to_flax(classic), torch_to_flax(classic, "classic"))


def test_converter_detection_failure_lists_the_variants_tried():
  sd = dict(_torchvision_state_dict(False))
  del sd["conv1.conv.weight"]
  first, msg = _conversion_error(sd)
  assert first.startswith("cannot tell this state_dict's variant: it fits none of "
                          "['classic', 'torchvision', 'd2l']")
  assert "torchvision: 1 missing" in msg
