"""The command-line tools: convert (both directions, against a real PyTorch model), predict,
evaluate (single and 10-crop), summary, and the pieces of fine-tuning (`init_from`)."""

import json
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from configs import default
from googlenet_jax import count_params
from googlenet_jax.tools import convert
from googlenet_jax.tools import evaluate, predict, summary
from googlenet_jax import model_dir
from googlenet_jax.models import GoogLeNet
from helpers import nchw_to_nhwc, rel_err, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 12
SIZE = 32


def run_module(module, *args, timeout=600):
  env = subprocess_env()
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def torchvision_model(num_classes=NUM_CLASSES, seed=0):
  """A randomly initialised torchvision GoogLeNet with non-trivial BatchNorm statistics."""
  torch.manual_seed(seed)
  model = torchvision.models.googlenet(weights=None, num_classes=num_classes, aux_logits=True,
                                       init_weights=True, transform_input=True)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.1, 0.1)
        m.running_var.uniform_(0.5, 1.5)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.1, 0.1)
  return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(model directory converted from a torchvision state_dict file, the PyTorch model)."""
  tmp = tmp_path_factory.mktemp("converted")
  model = torchvision_model()
  torch.save(model.state_dict(), tmp / "weights.pth")
  convert.torch_file_to_model_dir(str(tmp / "weights.pth"), "torchvision", str(tmp / "model"),
                                  image_size=SIZE)
  return tmp / "model", model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("images")
  rng = np.random.RandomState(1)
  Image.fromarray(rng.randint(0, 255, (40, 50, 3), np.uint8)).save(tmp / "wide.png")
  Image.fromarray(rng.randint(0, 255, (36, 36), np.uint8)).save(tmp / "grey.jpg")
  (tmp / "broken.jpg").write_bytes(b"not an image")
  return tmp


def test_converted_directory_layout_and_config(converted):
  directory, _ = converted
  record = json.loads((directory / "config.json").read_text())
  assert record["variant"] == "torchvision" and record["num_classes"] == NUM_CLASSES
  assert record["transform_input"] is True and record["aux_logits"] is True
  assert record["normalize"] == "imagenet" and record["image_size"] == SIZE
  assert os.listdir(directory / "checkpoints") == ["0"]


def test_convert_round_trip_matches_pytorch(converted, tmp_path):
  directory, torch_model = converted
  loaded = model_dir.load_for_inference(workdir=str(directory))
  x = np.random.RandomState(0).randn(3, 3, SIZE + 8, SIZE + 8).astype(np.float32)
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x)).numpy()
  got = jax.jit(lambda v, x: loaded.model.apply(v, x))(loaded.variables, nchw_to_nhwc(x))
  assert rel_err(got, want) < 1e-5
  # ... and back to a strict-loadable state_dict equal to the original
  convert.model_dir_to_torch_file(str(directory), str(tmp_path / "back.pth"))
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  fresh = torchvision.models.googlenet(weights=None, num_classes=NUM_CLASSES, aux_logits=True,
                                       init_weights=False)
  fresh.load_state_dict(back, strict=True)
  original = torch_model.state_dict()
  for key, value in back.items():
    if not key.endswith("num_batches_tracked"):
      np.testing.assert_array_equal(value.numpy(), original[key].numpy(), err_msg=key)


def test_predict_probabilities_match_pytorch_and_bad_files_are_reported(converted, images):
  directory, torch_model = converted
  run = run_module("googlenet_jax.tools.predict", "--workdir", directory, "--json", "--top_k", 3,
                   images / "wide.png", images / "broken.jpg", images / "grey.jpg",
                   images / "missing.png")
  assert run.returncode == 0, run.stderr[-3000:]
  records = json.loads(run.stdout)
  assert [r["image"] for r in records] == [str(images / n) for n in
                                           ("wide.png", "broken.jpg", "grey.jpg", "missing.png")]
  assert "broken.jpg: not a decodable image" in run.stderr
  assert "missing.png: cannot read" in run.stderr and "Traceback" not in run.stderr
  assert "error" in records[1] and "error" in records[3]
  # the same preprocessing as the evaluation, then PyTorch on the same pixels
  config = model_dir.inference_config(model_dir.read_config(str(directory)), None, "")
  for record in (records[0], records[2]):
    pixels = predict.load_image(record["image"], config)
    assert pixels.shape == (SIZE, SIZE, 3)
    with torch.no_grad():
      probs = torch.softmax(torch_model(torch.from_numpy(pixels.transpose(2, 0, 1)[None])), -1)
    probs = probs.numpy()[0]
    order = np.argsort(-probs)[:3]
    assert [t["index"] for t in record["top"]] == list(order)
    assert rel_err([t["probability"] for t in record["top"]], probs[order]) < 1e-5
    assert record["top"][0]["class"] == f"class {order[0]}"


def test_predict_exit_status(converted, images, tmp_path):
  directory, _ = converted
  run = run_module("googlenet_jax.tools.predict", "--workdir", directory, images / "broken.jpg")
  assert run.returncode == 1 and "not a decodable image" in run.stderr
  with pytest.raises(model_dir.ModelDirError, match="no such directory"):
    model_dir.locate(workdir=str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(model_dir.ModelDirError, match="no checkpoints"):
    model_dir.locate(checkpoint=str(tmp_path / "empty"))
  step_dir, found = model_dir.locate(checkpoint=str(directory / "checkpoints" / "0"))
  assert found == str(directory) and step_dir.endswith("checkpoints/0")


def test_convert_command_line_errors(tmp_path):
  run = run_module("googlenet_jax.tools.convert", "--torch", tmp_path / "missing.pth", "--variant",
                   "torchvision", "--out", tmp_path / "out")
  assert run.returncode == 2 and "missing.pth: no such file" in run.stderr
  assert "Traceback" not in run.stderr


def test_convert_wrong_variant_is_one_short_error(tmp_path, capsys):
  torch.save(torchvision_model().state_dict(), tmp_path / "weights.pth")
  with pytest.raises(SystemExit) as exit_info:
    convert.main(["--torch", str(tmp_path / "weights.pth"), "--variant", "classic", "--out",
                  str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and len(err) <= 600, err
  assert err.splitlines()[0] == ("error: this state_dict is a 'torchvision' checkpoint, not "
                                 "'classic': pass --variant torchvision")
  # Without --variant the layout is detected and written into config.json.
  convert.main(["--torch", str(tmp_path / "weights.pth"), "--out", str(tmp_path / "detected")])
  record = json.load(open(tmp_path / "detected" / "config.json"))
  assert record["variant"] == "torchvision" and record["transform_input"] is True, record


def test_a_model_config_without_its_feeding_fields_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="needs channels, eval_crop_fraction"):
    model_dir.write_config(str(tmp_path), dict(variant="torchvision", image_size=64,
                                               normalize="imagenet"), num_classes=3)
  assert not os.path.exists(tmp_path / "config.json")
  record = dict(variant="torchvision", num_classes=3, image_size=64, channels=3)
  with pytest.raises(model_dir.ModelDirError,
                     match=r"config.json lacks normalize, eval_crop_fraction: add them"):
    model_dir.inference_config(record, None, str(tmp_path))
  override = default.get_config()
  assert model_dir.inference_config(record, override, str(tmp_path)).normalize == "half"


def test_class_names():
  assert model_dir.class_names({"num_classes": 3, "class_names": ["a", "b", "c"]}) == [
      "a", "b", "c"]
  names = model_dir.class_names({"num_classes": 1000})
  assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"
  assert model_dir.class_names({"num_classes": 2}) == ["class 0", "class 1"]


def test_wrong_variant_or_shape_is_a_clear_error(converted):
  directory, _ = converted
  step_dir, _ = model_dir.locate(workdir=str(directory))
  variables = model_dir.restore_variables(step_dir)
  with pytest.raises(model_dir.ModelDirError, match="does not fit GoogLeNet.*'classic'"):
    model_dir.check_fits(variables, GoogLeNet(variant="classic", num_classes=NUM_CLASSES), "x")
  config = default.get_config()
  config.variant = "classic"
  with pytest.raises(ValueError, match="holds a 'torchvision' GoogLeNet.*variant='classic'"):
    model_dir.load_pretrained(str(directory), config)


def test_merge_pretrained_replaces_classifiers_of_another_size():
  def shapes(num_classes, aux):
    model = GoogLeNet(variant="torchvision", num_classes=num_classes, aux_logits=aux)
    abstract = model_dir.expected_variables(model)
    return jax.tree.map(lambda s: jnp.full(s.shape, num_classes, s.dtype), abstract)

  pretrained, fresh = shapes(7, False), shapes(5, True)
  merged, reinitialised, ignored = model_dir.merge_pretrained(fresh, pretrained)
  assert reinitialised == ["aux_after_4a", "aux_after_4d", "classifier"] and ignored == []
  assert float(merged["params"]["conv1"]["conv"]["kernel"][0, 0, 0, 0]) == 7  # copied
  assert float(merged["batch_stats"]["inception_5b"]["pool_proj"]["bn"]["var"][0]) == 7
  assert float(merged["params"]["classifier"]["kernel"][0, 0]) == 5  # fresh
  assert count_params(merged) == count_params(fresh)
  # the other way round, the pretrained aux heads are ignored
  merged, reinitialised, ignored = model_dir.merge_pretrained(shapes(7, False), shapes(7, True))
  assert reinitialised == [] and ignored == ["aux_after_4a", "aux_after_4d"]
  # another architecture is an error
  broken = jax.tree.map(lambda x: x, pretrained)
  broken["params"]["inception_3a"]["conv_1x1"]["conv"]["kernel"] = jnp.zeros((1, 1, 3, 3))
  with pytest.raises(ValueError, match="inception_3a/conv_1x1/conv/kernel is"):
    model_dir.merge_pretrained(fresh, broken)


# --------------------------------------------------------------------------------------------
# evaluate


def _crop_config(size, fraction, normalize="unit", channels=3):
  return ml_collections.ConfigDict(dict(image_size=size, eval_crop_fraction=fraction,
                                        normalize=normalize, channels=channels))


def test_ten_crops_are_the_corners_the_centre_and_their_mirrors():
  config = _crop_config(8, 0.5)  # crops of 8 from a 16x16 square
  assert evaluate.multi_crop_resize(config) == 16
  # each pixel holds its own position, so every crop says where it came from
  image = np.arange(20 * 16, dtype=np.int32).reshape(20, 16)  # taller than wide
  square = image[2:18]  # the central square: rows 2..17
  rgb = np.stack([square % 256, square // 256, np.zeros_like(square)], -1).astype(np.uint8)
  padded = np.zeros((20, 16, 3), np.uint8)
  padded[2:18] = rgb
  padded[:2] = 255
  padded[18:] = 255
  crops = evaluate.ten_crops(padded, config).numpy()
  assert crops.shape == (10, 8, 8, 3)
  position = np.rint(crops[..., 0] * 255) + 256 * np.rint(crops[..., 1] * 255)
  expected = [square[:8, :8], square[:8, 8:], square[8:, :8], square[8:, 8:], square[4:12, 4:12]]
  for i, want in enumerate(expected):
    np.testing.assert_array_equal(position[i], want, err_msg=f"crop {i}")
    np.testing.assert_array_equal(position[5 + i], want[:, ::-1], err_msg=f"mirror {i}")


def test_ten_crops_resize_the_shorter_side_and_normalise():
  config = _crop_config(224, 0.875, normalize="imagenet")
  assert evaluate.multi_crop_resize(config) == 256
  image = np.full((300, 400, 1), 128, np.uint8)  # grey, converted to the 3 channels
  crops = evaluate.ten_crops(image, config).numpy()
  assert crops.shape == (10, 224, 224, 3)
  want = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(crops[3, 100, 100], want, atol=1e-5)
  assert evaluate.multi_crop_resize(_crop_config(64, 1.0)) == 73  # whole-image configs


@pytest.fixture(scope="module")
def folder_config(tmp_path_factory):
  """A folder dataset of 3 classes with a val/ split of 5 images."""
  root = tmp_path_factory.mktemp("folder")
  rng = np.random.RandomState(2)
  for split, per_class in (("train", 1), ("val", 2)):
    for cls in ("ant", "bee", "cat"):
      os.makedirs(root / split / cls)
      for i in range(per_class if cls != "cat" else 1):
        Image.fromarray(rng.randint(0, 255, (30, 40, 3), np.uint8)).save(
            root / split / cls / f"{i}.png")
  config = default.get_config()
  config.update(dict(dataset=f"folder:{root}", image_size=SIZE, eval_batch_size=8,
                     eval_crop_fraction=0.875))
  return config


def test_evaluate_single_and_multi_crop(converted, folder_config):
  directory, torch_model = converted
  loaded = model_dir.load_for_inference(workdir=str(directory), config=folder_config)
  assert loaded.model.variant == "torchvision" and loaded.model.num_classes == NUM_CLASSES
  assert loaded.config.dataset.startswith("folder:") and loaded.config.transform_input
  single = evaluate.evaluate_model(loaded, loaded.config)
  multi = evaluate.evaluate_model(loaded, loaded.config, multi_crop=True)
  for result in (single, multi):
    assert result["count"] == 5 and result["split"] == "val"
    assert 0 <= result["top1"] <= result["top5"] <= 1 and np.isfinite(result["loss"])
  assert (single["crops"], multi["crops"]) == (1, 10)
  assert evaluate.format_result(multi).endswith("(val, 10 crops)")
  # the 10-crop numbers are PyTorch's on the same crops, softmax averaged
  from googlenet_jax.train import sources  # pylint: disable=import-outside-toplevel
  source = sources.open_source(loaded.config)
  split = source.splits["val"]
  nll = []
  for path, label in zip(split.paths, split.labels):
    crops = evaluate.ten_crops(np.asarray(Image.open(path).convert("RGB")), loaded.config)
    with torch.no_grad():
      probs = torch.softmax(torch_model(torch.from_numpy(crops.numpy().transpose(0, 3, 1, 2))),
                            -1).mean(0).numpy()
    nll.append(-np.log(probs[label]))
  assert abs(multi["loss"] - np.mean(nll)) < 1e-4
  with pytest.raises(ValueError, match="no split 'validation'"):
    evaluate.evaluate_model(loaded, loaded.config, split="validation")


def test_evaluate_command_line_errors(converted):
  directory, _ = converted
  run = run_module("googlenet_jax.tools.evaluate", "--workdir", directory)
  assert run.returncode == 2 and "names no dataset" in run.stderr, run.stderr[-2000:]
  assert "Traceback" not in run.stderr


# --------------------------------------------------------------------------------------------
# summary


def test_summary_totals_match_the_initialised_model():
  for variant, size in (("paper", 224), ("torchvision", 224), ("d2l", 96)):
    model = GoogLeNet(variant=variant, num_classes=1000)
    params = model_dir.expected_variables(model)["params"]
    rows = summary.table(variant, size)
    totals = summary.totals(rows)
    assert totals["params_with_aux"] == count_params(params)
    without_aux = {k: v for k, v in params.items() if not k.startswith("aux")}
    assert totals["params"] == count_params(without_aux)
  # torchvision's own parameter count and its published 1.498 GFLOPS
  assert summary.totals(summary.table("torchvision", 224))["params_with_aux"] == 13_004_888
  assert abs(summary.totals(summary.table("torchvision", 224))["macs"] / 1.498e9 - 1) < 1e-3


def test_summary_rows_match_hand_computed_values():
  rows = {r.name: r for r in summary.table("paper", 224)}
  assert rows["conv1"].output == (112, 112, 64)
  assert rows["conv1"].params == 7 * 7 * 3 * 64 + 64
  assert rows["conv1"].macs == 112 * 112 * 7 * 7 * 3 * 64
  weights_3a = 192 * 64 + 192 * 96 + 96 * 9 * 128 + 192 * 16 + 16 * 25 * 32 + 192 * 32
  assert weights_3a == 163_328  # the paper's "159K" (K = 1024), "128M"
  assert rows["inception_3a"].params == weights_3a + 64 + 96 + 128 + 16 + 32 + 32
  assert rows["inception_3a"].macs == 28 * 28 * weights_3a
  assert rows["inception_3a"].output == (28, 28, 256)
  assert rows["conv2+conv3"].params == 64 * 64 + 64 + 3 * 3 * 64 * 192 + 192
  assert rows["inception_5b"].output == (7, 7, 1024) and rows["avgpool"].output == (1, 1, 1024)
  assert rows["classifier"].macs == 1024 * 1000
  assert (rows["inception_5b"].paper_params, rows["inception_5b"].paper_ops) == (1388, 71)
  totals = summary.totals(list(rows.values()))
  assert totals["paper_ops"] == 1502e6 and abs(totals["macs"] / 1.5e9 - 1) < 0.06
  # the README's figures
  assert totals["params"] == 6_998_552 and round(totals["macs"] / 1e6) == 1583
  assert round(totals["paper_params"] / 1024, 1) == 6797.7


def test_flags_help_and_usage_errors(capsys):
  """Every tool (`cli.parse_flags`): --help on stdout with exit status 0, a flag error or a stray
  argument as one `error: ...` line with exit status 2; twice in one process."""
  from googlenet_jax.tools import export  # pylint: disable=import-outside-toplevel
  for tool, flag in [(predict, "--top_k"), (evaluate, "--multi_crop"), (export, "--format"),
                     (convert, "--to-torch"), (summary, "--markdown")]:
    with pytest.raises(SystemExit) as exit_info:
      tool.main(["--help"])
    assert exit_info.value.code == 0 and flag in capsys.readouterr().out, tool
    with pytest.raises(SystemExit) as exit_info:
      tool.main(["--bogus"])
    assert exit_info.value.code == 2, tool
    assert capsys.readouterr().err == "error: Unknown command line flag 'bogus'\n", tool
  for _ in range(2):
    with pytest.raises(SystemExit) as exit_info:
      summary.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "Table 1" in out and "--markdown" in out, out
  for argv, message in [(["--bogus"], "Unknown command line flag 'bogus'"),
                        (["--variant", "nope"], "flag --variant=nope: value should be one of"),
                        (["extra"], "unexpected arguments: extra")]:
    with pytest.raises(SystemExit) as exit_info:
      summary.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(f"error: {message}"), err
    assert err.count("\n") == 1, err


def test_summary_command_line():
  """The README's command as written, its --markdown form, and a size the layout cannot take."""
  import test_readme  # pylint: disable=import-outside-toplevel
  command = "python -m googlenet_jax.tools.summary --variant paper --size 224"
  assert command in test_readme.readme_commands()
  run = run_module(*shlex.split(command)[2:])
  assert run.returncode == 0, run.stderr
  assert "inception_5b" in run.stdout and "1388K" in run.stdout and "1502M" in run.stdout
  run = run_module("googlenet_jax.tools.summary", "--variant", "paper", "--size", "224", "--markdown")
  assert run.returncode == 0, run.stderr
  assert "| inception_3a | inception |" in run.stdout and "1502M" in run.stdout
  run = run_module("googlenet_jax.tools.summary", "--variant", "paper", "--size", "200")
  assert run.returncode == 2 and "7x7 map" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow  # ~90 s on 2 busy cores: 8 replicas of 3 weight trees
def test_train_state_written_on_8_devices_restores_for_inference_on_1(converted, tmp_path):
  from googlenet_jax import train as training  # pylint: disable=import-outside-toplevel
  from googlenet_jax.train import checkpointing  # pylint: disable=import-outside-toplevel
  directory, _ = converted
  variables = model_dir.restore_variables(model_dir.locate(workdir=str(directory))[0])
  config = default.get_config()
  config.update(dict(async_checkpointing=False, ema_decay=0.999))
  tx = training.create_optimizer(config, 10, 10)
  ema = jax.tree.map(lambda x: x * 2, variables["params"])
  state = training.TrainState(step=jnp.asarray(7, jnp.int32), params=variables["params"],
                              batch_stats=variables["batch_stats"],
                              opt_state=tx.init(variables["params"]), ema_params=ema,
                              rng=np.zeros((2,), np.uint32))
  eight = training.Parallel("shard_map", jax.devices())
  ckpt = checkpointing.Checkpointer(str(tmp_path), config)
  ckpt.save(7, eight.replicate(state), force=True)
  ckpt.close()
  model_dir.write_config(str(tmp_path), config, num_classes=NUM_CLASSES)
  step_dir, _ = model_dir.locate(workdir=str(tmp_path))
  assert step_dir.endswith("checkpoints/7")
  for use_ema, want in ((False, variables["params"]), (True, ema)):
    restored = model_dir.restore_variables(step_dir, use_ema=use_ema)
    assert set(restored) == {"params", "batch_stats"}  # no optimiser state
    leaf = restored["params"]["conv1"]["conv"]["kernel"]
    assert leaf.sharding.device_set == {jax.local_devices()[0]}
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["params"]),
                 jax.device_get(want))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["batch_stats"]),
               jax.device_get(variables["batch_stats"]))
  loaded = model_dir.load_for_inference(checkpoint=step_dir)  # config.json: eval_with_ema off
  assert loaded.model_dir == str(tmp_path) and loaded.class_names[0] == "class 0"
