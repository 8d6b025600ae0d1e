"""googlenet_jax.tools.export: each format is written by the README's command, loaded in a
fresh process by its own runtime (jax.export, onnxruntime, TensorFlow; the last two with JAX
made unimportable), run on batch sizes the export never saw (its batch is symbolic), and
compared with the JAX model's logits. Also: the preprocessing record reproduces the evaluation
preprocessing, the usage errors, and the `googlenet-jax` dispatcher."""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import numpy as np
import pytest

from googlenet_jax import ops
from googlenet_jax.models import GoogLeNet
from googlenet_jax.tools import export
from googlenet_jax import model_dir
from test_readme import readme_commands

from helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, NUM_CLASSES, BATCH = 64, 7, 3
TOLERANCE = 1e-5  # max |export - JAX| / max |JAX|
COMMANDS = {
    "jax": "googlenet-jax export --workdir runs/default --format jax "
           "--out runs/export/googlenet.jax",
    "onnx": "googlenet-jax export --workdir runs/default --format onnx "
            "--out runs/export/googlenet.onnx",
    "savedmodel": "googlenet-jax export --workdir runs/default --format savedmodel "
                  "--out runs/export/savedmodel",
}
# Run first in the ONNX and TensorFlow processes: the export must not need JAX (nor this package).
NO_JAX = """
import importlib.abc, sys
class NoJax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("jax", "jaxlib", "flax", "googlenet_jax"):
      raise ImportError(f"No module named {name!r} (blocked by the test)")
sys.meta_path.insert(0, NoJax())
"""
RUNTIMES = {
    "jax": """
import jax, numpy as np
exported = jax.export.deserialize(open(PATH, "rb").read())
assert str(exported.in_avals[0].shape[0]) == "b", exported.in_avals
outputs = [np.asarray(exported.call(x)) for x in inputs]
""",
    "onnx": NO_JAX + """
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession(PATH, providers=["CPUExecutionProvider"])
(feed,), (fetch,) = session.get_inputs(), session.get_outputs()
assert (feed.name, feed.shape[0], fetch.name) == ("images", "batch", "logits"), (feed, fetch)
outputs = [session.run(["logits"], {"images": x})[0] for x in inputs]
meta = session.get_modelmeta().custom_metadata_map["preprocessing"]
""",
    "savedmodel": NO_JAX + """
import numpy as np, tensorflow as tf
serve = tf.saved_model.load(PATH).signatures["serving_default"]
outputs = [serve(images=tf.constant(x))["logits"].numpy() for x in inputs]
""",
}


def random_variables(model, seed=0):
  """Random weights (no compilation: shapes from eval_shape), BatchNorm statistics included."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), np.float32))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name.endswith("['var']"):
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name.endswith("['scale']"):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """(a directory with runs/default: a random torchvision-layout model with transform_input at
  64x64, random N(0, 1) images, the JAX model's logits for them)."""
  root = tmp_path_factory.mktemp("export")
  directory = str(root / "runs" / "default")
  net = GoogLeNet(variant="torchvision", num_classes=NUM_CLASSES, aux_logits=False,
                  transform_input=True)
  model_dir.save_variables(directory, random_variables(net))
  model_dir.write_config(directory, dict(
      variant="torchvision", aux_logits=False, transform_input=True, image_size=SIZE,
      channels=3, normalize="imagenet", eval_crop_fraction=0.875),
      num_classes=NUM_CLASSES, class_names=[f"c{i}" for i in range(NUM_CLASSES)])
  loaded = model_dir.load_for_inference(workdir=directory, ops=ops.LAX)
  images = np.random.default_rng(1).normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32)
  logits = np.asarray(jax.jit(lambda x: loaded.model.apply(loaded.variables, x))(images))
  assert logits.shape == (BATCH, NUM_CLASSES) and np.abs(logits).max() > 0.1
  return root, images, logits


def googlenet_jax_command():
  script = os.path.join(os.path.dirname(sys.executable), "googlenet-jax")
  if os.path.exists(script):
    return [script]
  return [sys.executable, "-m", "googlenet_jax.tools.main"]  # not pip-installed: the same main


def run_cli(args, cwd, timeout=600):
  env = subprocess_env()
  return subprocess.run(googlenet_jax_command() + list(args), cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def export_and_run(fmt, model, tmp_path):
  """Runs the README's command for `fmt`, then the export in a fresh process of its runtime on
  batches of BATCH and 1; returns (max relative error per batch, that process's namespace
  extras, the preprocessing record next to the export)."""
  root, images, logits = model
  command = COMMANDS[fmt]
  assert command in readme_commands(), command
  run = run_cli(command.split()[1:], cwd=root)
  assert run.returncode == 0, run.stderr[-3000:]
  out = str(root / command.split("--out ")[1])
  np.save(tmp_path / "inputs.npy", images)
  code = textwrap.dedent(f"""
      PATH = {out!r}
      import numpy
      batch = numpy.load({str(tmp_path / 'inputs.npy')!r})
      inputs = [batch, batch[:1]]
      """) + RUNTIMES[fmt] + textwrap.dedent(f"""
      numpy.savez({str(tmp_path / 'outputs.npz')!r}, *outputs)
      import json
      print(json.dumps({{"meta": globals().get("meta")}}))
      """)
  env = {**os.environ, "PYTHONPATH": "", "CUDA_VISIBLE_DEVICES": ""}
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  outputs = np.load(tmp_path / "outputs.npz")
  got = [outputs["arr_0"], outputs["arr_1"]]
  assert got[0].shape == (BATCH, NUM_CLASSES) and got[1].shape == (1, NUM_CLASSES)
  scale = np.abs(logits).max()
  errors = [float(np.abs(got[0] - logits).max() / scale),
            float(np.abs(got[1] - logits[:1]).max() / scale)]
  extras = json.loads(proc.stdout.strip().splitlines()[-1])
  with open(export.preprocessing_path(fmt, out)) as f:
    record = json.load(f)
  return errors, extras, record


def check_record(record, fmt):
  assert record["export_format"] == fmt
  assert record["input"] == {"name": "images", "dtype": "float32", "layout": "NHWC",
                             "shape": [None, SIZE, SIZE, 3]}
  assert record["output"]["shape"] == [None, NUM_CLASSES]
  assert record["preprocessing"]["inside_export"] == ["transform_input"]
  assert [s["op"] for s in record["preprocessing"]["before_export"]] == [
      "decode", "resize_shorter_side", "center_crop", "normalize", "stack"]
  assert record["class_names"] == [f"c{i}" for i in range(NUM_CLASSES)]


def test_jax_export_runs_in_jax_export_and_matches_the_model(model, tmp_path):
  errors, _, record = export_and_run("jax", model, tmp_path)
  assert max(errors) <= TOLERANCE, errors
  check_record(record, "jax")


@pytest.mark.slow  # (the fast tier's time: make test runs in <= 8 minutes)
def test_onnx_export_runs_in_onnxruntime_and_matches_the_model(model, tmp_path):
  errors, extras, record = export_and_run("onnx", model, tmp_path)
  assert max(errors) <= TOLERANCE, errors
  check_record(record, "onnx")
  assert json.loads(extras["meta"]) == record  # the same record inside the ONNX file


@pytest.mark.slow
def test_savedmodel_export_runs_in_tensorflow_and_matches_the_model(model, tmp_path):
  errors, _, record = export_and_run("savedmodel", model, tmp_path)
  assert max(errors) <= TOLERANCE, errors
  check_record(record, "savedmodel")


def apply_record(image, record):
  """The preprocessing record's steps, read as a serving client would (TensorFlow ops)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  x = tf.constant(image)  # the decoded uint8 image
  for step in record["preprocessing"]["before_export"]:
    if step["op"] == "to_float":
      x = tf.cast(x, tf.float32) * np.float32(step["scale"])
    elif step["op"] == "resize_shorter_side":
      hw = tf.cast(tf.shape(x)[:2], tf.float32)
      scale = step["target"] / tf.reduce_min(hw)
      x = tf.image.resize(x, tf.cast(tf.round(hw * scale), tf.int32), method=step["method"],
                          antialias=step["antialias"])
    elif step["op"] == "resize":
      x = tf.image.resize(x, (step["height"], step["width"]), method=step["method"],
                          antialias=step["antialias"])
    elif step["op"] == "center_crop":
      h, w = int(x.shape[0]), int(x.shape[1])
      top, left = (h - step["height"]) // 2, (w - step["width"]) // 2
      x = x[top:top + step["height"], left:left + step["width"]]
    elif step["op"] == "normalize":
      x = x * np.float32(step["scale"]) + np.float32(step["offset"])
  return x.numpy()


@pytest.mark.parametrize("fraction,normalize", [(0.875, "imagenet"), (1.0, "half")])
def test_preprocessing_record_is_the_evaluation_preprocessing(fraction, normalize):
  import ml_collections  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import preprocessing  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(dict(
      variant="torchvision", num_classes=3, aux_logits=False, transform_input=False,
      image_size=SIZE, channels=3, normalize=normalize, eval_crop_fraction=fraction))
  loaded = model_dir.LoadedModel(model_dir.create_model(config), None, config,
                                 ["a", "b", "c"], "step", "dir")
  record = export.preprocessing_record(loaded, "onnx")
  assert record["preprocessing"]["inside_export"] == []
  image = np.random.default_rng(0).integers(0, 256, (90, 123, 3), dtype=np.uint8)
  want = preprocessing.preprocess(tf.constant(image), tf.constant([0, 0], tf.int64), False,
                                   config).numpy()
  got = apply_record(image, json.loads(json.dumps(record)))
  # The evaluation computes only the crop's pixels of the resize (the kernel weights round
  # differently by ~0.01 of 255); without a crop the values are the same bit for bit.
  if fraction == 1.0:
    np.testing.assert_array_equal(got, want)
  else:
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-4)


def test_usage_errors_are_one_line_with_exit_status_2(model, monkeypatch, capsys):
  for fmt, out, message in [("pdf", "x", "--format must be one of jax, onnx, savedmodel"),
                            ("onnx", None, "--out PATH is needed")]:
    with pytest.raises(SystemExit) as exit_info:
      export.check_flags(fmt, out, ["cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
  monkeypatch.setitem(export.REQUIREMENTS, "onnx", (("no_such_module_x", "jax2onnx"),))
  with pytest.raises(SystemExit):
    export.check_flags("onnx", "m.onnx", ["cpu"])
  assert capsys.readouterr().err == (
      "error: --format onnx needs jax2onnx: pip install 'googlenet_jax[export]'\n")
  # The command's own path (flags as absl parsed them), minus the process set-up.
  root = model[0]
  flags = types.SimpleNamespace(workdir=str(root / "runs" / "none"), checkpoint=None,
                                format="jax", out=str(root / "m.jax"), platforms=["cpu"],
                                opset=21, use_ema=None)
  with pytest.raises(SystemExit) as exit_info:
    export.run(["export"], flags, setup=lambda: None)
  assert exit_info.value.code == 2
  assert capsys.readouterr().err == (
      f"error: {root / 'runs' / 'none'}: no such directory\n")
  assert not (root / "m.jax").exists()


def test_googlenet_jax_dispatches_to_each_tool(tmp_path, monkeypatch, capsys):
  from googlenet_jax.tools import main  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sys, "argv", list(sys.argv))  # the dispatcher sets it for the tool
  with pytest.raises(SystemExit) as exit_info:
    main.main(["--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert all(t in out for t in main.TOOLS), out
  with pytest.raises(SystemExit) as exit_info:
    main.main(["nonsense"])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.startswith("error: unknown tool 'nonsense'")
  main.main(["summary", "--variant", "paper", "--size", "224", "--json"])  # cli.parse_flags
  assert json.loads(capsys.readouterr().out)["rows"]
  # absl: the installed console script, the tool's docstring and flags in its help, and a usage
  # error caught before any set-up.
  run = run_cli(["export", "--help"], tmp_path)
  assert "--format" in run.stdout and "jax2onnx" in run.stdout, run.stdout + run.stderr
  run = run_cli(["export", "--workdir", "runs/none", "--format", "pdf", "--out", "m"], tmp_path)
  assert run.returncode == 2
  assert run.stderr == "error: --format must be one of jax, onnx, savedmodel, got 'pdf'\n"
