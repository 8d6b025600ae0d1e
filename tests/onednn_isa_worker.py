"""Run by tests/test_onednn_isa.py in a fresh process per `ONEDNN_MAX_CPU_ISA` cap (oneDNN reads
the cap once, when it loads).

    python onednn_isa_worker.py passes CASES.json   # the conv cover set against lax
    python onednn_isa_worker.py steps               # whole training steps against XLA's kernels

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

# The suite's compilation cache: every cap compiles the same programs (the cap acts when
# oneDNN creates its primitives, at run time), so caps after the first reuse them.
jax.config.update("jax_compilation_cache_dir", os.environ.get(
    "JAX_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".jax_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

from googlenet_jax import cpu  # noqa: E402
from googlenet_jax.cpu import onednn  # noqa: E402
from helpers import assert_conv_matches_lax, rel_err  # noqa: E402

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


# (layout, parallel mode, devices): every pair of (layout, mode), (layout, devices) and
# (mode, devices) values occurs once.
STEP_RUNS = (("classic", "pmap", 1), ("classic", "shard_map", 8),
             ("torchvision", "pmap", 8), ("torchvision", "shard_map", 1))


def _train(layout, mode, devices, batches, use_onednn):
  from configs import default  # pylint: disable=import-outside-toplevel
  from googlenet_jax import train as training  # pylint: disable=import-outside-toplevel

  config = default.get_config()
  # classic's aux heads need >= 223-pixel inputs; torchvision's (adaptive pool) run at 64
  config.update(dict(variant=layout, image_size=64, batch_size=16, dropout=0.0,
                     aux_dropout=0.0, learning_rate=1e-5, aux_logits=layout != "classic"))
  parallel = training.Parallel(mode, jax.devices()[:devices])
  model = training.create_model(config, 10, cpu.ONEDNN if use_onednn else cpu.FAST_XLA)
  tx = training.create_optimizer(config, steps_per_epoch=10, num_steps=10)
  state = parallel.replicate(training.create_train_state(model, tx, config, (1, 64, 64, 3)))
  step = parallel.compile(functools.partial(training.train_step, model=model, tx=tx,
                                            aux_loss_weight=config.aux_loss_weight))
  losses = []
  for batch in batches:
    state, metrics = step(state, parallel.batch(batch))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state.params), losses


def steps():
  assert onednn.available(), onednn._load()  # pylint: disable=protected-access
  rng = np.random.RandomState(0)
  batches = [{"image": rng.randn(16, 64, 64, 3).astype(np.float32),
              "label": rng.randint(0, 10, 16).astype(np.int32)} for _ in range(2)]
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  references, report = {}, {}
  for layout, mode, devices in STEP_RUNS:
    if layout not in references:  # XLA's kernels, one device
      references[layout] = _train(layout, "shard_map", 1, batches, use_onednn=False)
    ref_params, ref_losses = references[layout]
    params, losses = _train(layout, mode, devices, batches, use_onednn=True)
    loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
    report[f"{layout}/{mode}/{devices}"] = {
        "losses": losses, "xla_losses": ref_losses, "loss_rel_err": loss_err,
        "params_rel_err": rel_err(flat(params), flat(ref_params))}
  # oneDNN and XLA sum each convolution in another order (~1e-6 relative per pass); two small
  # steps that do not diverge keep that near 1e-6 in the loss and the parameters.
  for run in report.values():
    assert np.all(np.isfinite(run["losses"])) and run["loss_rel_err"] < 1e-4, report
    assert run["params_rel_err"] < 1e-4, report
  return report


if __name__ == "__main__":
  result = passes(sys.argv[2]) if sys.argv[1] == "passes" else steps()
  result["isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA", "host")
  print(json.dumps(result))
