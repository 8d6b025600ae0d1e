"""Run by tests/test_onednn_isa.py in a fresh process per `ONEDNN_MAX_CPU_ISA` cap (oneDNN reads
the cap once, when it loads).

    python onednn_isa_worker.py passes CASES.json   # the conv cover set against lax
    python onednn_isa_worker.py steps LAYOUT MODE DEVICES  # a training step against XLA's kernels

Prints one JSON line (what ran, which implementations oneDNN picked) and exits 0, or fails
with an assertion (or crashes, which the parent reports with the signal)."""

import functools
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from googlenet_jax import cpu  # noqa: E402
from googlenet_jax.cpu import onednn  # noqa: E402
from googlenet_jax.tools import cli  # noqa: E402
from helpers import assert_conv_matches_lax, rel_err  # noqa: E402

# The suite's compilation cache: every cap compiles the same programs (the cap acts when
# oneDNN creates its primitives, at run time), so caps after the first reuse them.
cli.enable_compilation_cache()

PASSES = ("forward", "backward_data", "backward_weights")


def _flops(case, batch):
  (h, w, c), (kh, kw, _, o), stride, pads = case["x"], case["w"], case["stride"], case["pads"]
  oh = (h + sum(pads[0]) - kh) // stride + 1
  ow = (w + sum(pads[1]) - kw) // stride + 1
  return batch * oh * ow * kh * kw * c * o


def cover_set(cases, batches):
  """The cheapest (case, batch) for every (pass, implementation, batch, input size) that
  occurs: each implementation oneDNN picks on this CPU runs at every batch and input size
  that reaches it, and nothing else runs."""
  cheapest, seen = {}, {}
  for case in cases:
    for batch in batches:
      names = onednn.implementations((batch, *case["x"]), case["w"], case["stride"],
                                     case["pads"])
      for kind in PASSES:
        seen.setdefault(kind, set()).add(names[kind])
        for size in case["sizes"]:
          key = (kind, names[kind], batch, size)
          cost = _flops(case, batch)
          if key not in cheapest or cost < cheapest[key][0]:
            cheapest[key] = (cost, json.dumps(case, sort_keys=True), batch)
  chosen = sorted({(c, b) for _, c, b in cheapest.values()})
  return [(json.loads(c), b) for c, b in chosen], {k: sorted(v) for k, v in seen.items()}


def passes(path):
  assert onednn.available(), onednn._load()  # pylint: disable=protected-access
  assert onednn.self_check() == 0  # several threads; the gemm kernels' scratchpads
  with open(path) as f:
    spec = json.load(f)
  chosen, seen = cover_set(spec["cases"], spec["batches"])
  rng = np.random.RandomState(0)
  for case, batch in chosen:
    x = rng.randn(batch, *case["x"]).astype(np.float32)
    w = rng.randn(*case["w"]).astype(np.float32)
    pads = tuple(tuple(p) for p in case["pads"])
    stride = case["stride"]
    assert_conv_matches_lax(lambda a, b, s=stride, p=pads: onednn.conv2d(a, b, s, p),
                            x, w, stride, pads, tol=2e-5)
  return {"shapes": len(spec["cases"]), "cases_run": len(chosen), "implementations": seen}


# One SGD step: the update is the gradient (times the rate), and at this rate it is ~1e-3 of
# the parameters, so float32 parameters resolve it to ~1e-4 (see steps()).
STEP_LR = 0.01
# Bounds on the step's update, over all parameters and per tensor. Measured on an AVX-512 host
# (oneDNN against XLA's kernels): classic (no BatchNorm) 3.5e-7 to 5.8e-5 overall, 2.7e-6 per
# tensor at worst; torchvision, whose BatchNorm on batch statistics amplifies float32 rounding
# (PyTorch's own float32 gradients are ~5e-3 from float64 here, tests/test_parity_torch.py),
# 1.1e-3 / 5.1e-3 overall and 5.0e-3 / 9.1e-3 per tensor (8 devices / 1). A wrong gradient of
# one convolution moves its tensor's update by O(1).
UPDATE_RTOL = {"classic": 1e-3, "torchvision": 2e-2}
TENSOR_UPDATE_RTOL = {"classic": 1e-2, "torchvision": 1e-1}


def _train(layout, mode, devices, batch, use_onednn):
  """(parameters before, parameters after one step, loss) on these kernels."""
  from configs import default  # pylint: disable=import-outside-toplevel
  from googlenet_jax import train as training  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  # classic's aux heads need >= 223-pixel inputs; torchvision's (adaptive pool) run at 64
  config.update(dict(variant=layout, image_size=64, batch_size=16, dropout=0.0,
                     aux_dropout=0.0, learning_rate=STEP_LR, lr_schedule="constant",
                     aux_logits=layout != "classic"))
  parallel = training.Parallel(mode, jax.devices()[:devices])
  model = training.create_model(config, 10, cpu.ONEDNN if use_onednn else cpu.FAST_XLA)
  tx = training.create_optimizer(config, steps_per_epoch=10, num_steps=10)
  state = training.create_train_state(model, tx, config, (1, 64, 64, 3), fast_init=True)
  before = jax.device_get(state.params)
  step = parallel.compile(functools.partial(training.train_step, model=model, tx=tx,
                                            aux_loss_weight=config.aux_loss_weight))
  state, metrics = step(parallel.replicate(state), parallel.batch(batch))
  return before, jax.device_get(state.params), float(metrics["loss"])


def steps(layout, mode, devices):
  """One training step on oneDNN's kernels against the same step on XLA's (one device)."""
  assert onednn.available(), onednn._load()  # pylint: disable=protected-access
  rng = np.random.RandomState(0)
  batch = {"image": rng.randn(16, 64, 64, 3).astype(np.float32),
           "label": rng.randint(0, 10, 16).astype(np.int32)}
  flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)])
  init, ref_params, ref_loss = _train(layout, "shard_map", 1, batch, use_onednn=False)
  init_onednn, params, loss = _train(layout, mode, devices, batch, use_onednn=True)
  assert np.array_equal(flat(init), flat(init_onednn))  # the same start
  ref_update = flat(ref_params) - flat(init)
  # The step itself, per parameter tensor (a wrong weight gradient of one convolution shows
  # there at O(1)) and over all of them: relative to the parameters, any bound above ~1e-7
  # would pass whatever the gradient.
  leaf_errors = {
      jax.tree_util.keystr(path): rel_err(np.float64(p) - np.float64(i), np.float64(r) - np.float64(i))
      for (path, p), i, r in zip(jax.tree_util.tree_leaves_with_path(params),
                                 jax.tree.leaves(init), jax.tree.leaves(ref_params))
      if np.any(np.float64(r) != np.float64(i))}
  worst = max(leaf_errors, key=leaf_errors.get)
  report = {"run": f"{layout}/{mode}/{devices}", "loss": loss, "xla_loss": ref_loss,
            "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
            "update_rel_err": rel_err(flat(params) - flat(init), ref_update),
            "worst_tensor": worst, "worst_tensor_update_rel_err": leaf_errors[worst],
            "tensors_moved": len(leaf_errors),
            "update_to_params": float(np.linalg.norm(ref_update) / np.linalg.norm(flat(init)))}
  # oneDNN and XLA sum each convolution in another order (~1e-6 relative per pass): the loss
  # agrees to ~1e-6; the update as measured above.
  assert np.isfinite(loss) and report["loss_rel_err"] < 1e-4, report
  assert report["update_to_params"] > 1e-3, report  # resolved by float32 parameters
  assert report["tensors_moved"] == len(jax.tree.leaves(init)), report
  assert report["update_rel_err"] < UPDATE_RTOL[layout], report
  assert report["worst_tensor_update_rel_err"] < TENSOR_UPDATE_RTOL[layout], report
  return report


if __name__ == "__main__":
  if sys.argv[1] == "passes":
    result = passes(sys.argv[2])
  else:
    result = steps(sys.argv[2], sys.argv[3], int(sys.argv[4]))
  result["isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "host")
  print(json.dumps(result))
