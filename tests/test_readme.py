"""Every shell command in README.md and docs/*.md is run here or listed with the test that
exercises it, and every Python snippet there is executed, so the pages cannot rot: adding a
command without registering it below fails, and so does a snippet that no longer runs."""

import glob
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from helpers import init_variables, subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# The pages whose commands and snippets are checked: the README, then docs/ by name.
PAGES = [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


class Run:
  """Run by `test_readme_commands_run` (slow) with the placeholders (runs/, downloaded files,
  images) replaced by test data and `tiny` overrides appended."""

  def __init__(self, *tiny):
    self.tiny = tiny


class Elsewhere:
  """Exercised by the named tests (`path::test_name`) or scripts; `why` says why not here."""

  def __init__(self, why, *where):
    self.why, self.where = why, where


CONFIG_CHECKED = "tests/test_readme.py::test_training_commands_have_valid_configs"
MULTIHOST = "tests/test_multihost.py"
TINY_TRAIN = ("--config.image_size=32", "--config.batch_size=16", "--config.num_train_steps=4",
              "--config.log_every_steps=2", "--config.eval_every_steps=4",
              "--config.eval_batch_size=64", "--config.progress_bar=false")

INSTALLS = ("installs from the package index; the extras are pyproject.toml's, installed by "
            "`make test` (`test`) and `make train` (`train`, `cpu`) in CI's fresh clone")

# Command in README.md or docs/*.md -> how it is exercised.
COMMANDS = {
    "pip install .": Elsewhere("a clean venv with the core install, checked to hold no extra",
                               "tests/core_install_check.sh", ".ci/run"),
    "pip install '.[train,cpu]'": Elsewhere(INSTALLS, "pyproject.toml", "Makefile"),
    "pip install '.[train,gpu]'": Elsewhere(
        INSTALLS + "; needs a GPU to be of use", "pyproject.toml",
        "tests/test_accelerator.py"),
    "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu":
        Elsewhere("PyTorch's own CPU wheel index; the versions are the `test` extra's",
                  "pyproject.toml"),
    "pip install '.[convert]'": Elsewhere(INSTALLS, "pyproject.toml", "Makefile"),
    "python tests/fault_injection.py --kills 8 --seed 1 --max-seconds 1500": Elsewhere(
        "kills and restarts a run 8 times (~12 minutes); the slow test runs it with 3 kills",
        "tests/test_reliability.py::test_fault_injection_every_kill_resumes_to_identical_parameters"),
    "make train": Elsewhere(
        "trains for minutes; the same train.py command is run to >= 95% by the slow test",
        "tests/test_end_to_end.py::test_default_run_reaches_95_percent", "Makefile"),
    "make test": Elsewhere("the test suite itself", ".ci/run"),
    "python -m googlenet_jax.tools.predict --workdir runs/default digit.png": Run(),
    "python -m googlenet_jax.tools.evaluate --workdir runs/default --multi_crop": Run(),
    "python -m googlenet_jax.tools.convert --torch googlenet-1378be20.pth --variant torchvision "
    "--out runs/torchvision_imagenet": Run(),
    "python -m googlenet_jax.tools.predict --workdir runs/torchvision_imagenet cat.jpg": Run(),
    # No ImageNet here: the same command on the digits, through the ImageNet config's
    # preprocessing (resize 256/224 of the size, centre crop, ImageNet mean/std).
    "python -m googlenet_jax.tools.evaluate --config configs/imagenet_torchvision.py "
    "--workdir runs/torchvision_imagenet": Run(
        "--config.dataset=sklearn_digits", "--config.image_size=32",
        "--config.eval_batch_size=64"),
    "python -m googlenet_jax.tools.convert --checkpoint runs/torchvision_imagenet "
    "--to-torch googlenet_roundtrip.pth": Run(),
    "python train.py --config configs/default.py --workdir runs/digits_from_imagenet "
    "--config.init_from=runs/torchvision_imagenet --config.normalize=imagenet "
    "--config.transform_input=true": Run(*TINY_TRAIN),
    "python -m googlenet_jax.tools.summary --variant paper --size 224": Elsewhere(
        "run as written, its output checked", "tests/test_cli.py::test_summary_command_line"),
    "googlenet-jax export --workdir runs/default --format jax --out runs/export/googlenet.jax":
        Elsewhere("run as written on a small random model, then loaded by jax.export",
                  "tests/test_export.py::test_jax_export_runs_in_jax_export_and_matches_the_model"),
    "googlenet-jax export --workdir runs/default --format onnx --out runs/export/googlenet.onnx":
        Elsewhere("run as written on a small random model, then loaded by onnxruntime",
                  "tests/test_export.py::test_onnx_export_runs_in_onnxruntime_and_matches_the_model"),
    "googlenet-jax export --workdir runs/default --format savedmodel "
    "--out runs/export/savedmodel": Elsewhere(
        "run as written on a small random model, then loaded by TensorFlow",
        "tests/test_export.py::test_savedmodel_export_runs_in_tensorflow_and_matches_the_model"),
    "python benchmarks/throughput.py --variant classic --batch 32 --size 224 "
    "--json runs/bench.json": Elsewhere(
        "takes ~8 minutes; the same script runs tiny (all JSON keys checked)",
        "tests/test_benchmark.py::test_tiny_run_writes_all_stable_keys"),
    "python benchmarks/pipeline.py --json runs/pipeline.json": Elsewhere(
        "takes ~5 minutes; the same script runs tiny on a tiny generated set (every key checked)",
        "tests/test_pipeline_benchmark.py::test_tiny_side_by_side_run_writes_every_key"),
    "python benchmarks/jpeg_set.py --out runs/jpeg_set --tfds": Elsewhere(
        "writes 2,500 JPEGs (~1 minute); the same generator and TFDS build run on 40",
        "tests/test_pipeline_benchmark.py::test_set_is_reproducible_and_tfds_keeps_the_bytes"),
    "tfds build imagenet2012 --data_dir ~/tensorflow_datasets --manual_dir ~/imagenet_archives":
        Elsewhere("TFDS's own tool, needs the ImageNet archives; train.py prints this command "
                  "for an unprepared dataset",
                  "tests/test_end_to_end.py::test_unprepared_tfds_dataset_says_how_to_prepare_it"),
    "python train.py --config configs/imagenet_torchvision.py --workdir runs/imagenet":
        Elsewhere("needs ImageNet; its config is loaded and validated", CONFIG_CHECKED,
                  "tests/test_end_to_end.py::test_tfds_pipeline_on_mock_data"),
    "python train.py --config configs/imagenet_torchvision.py --workdir /shared/runs/imagenet "
    "--config.data_dir=/shared/tensorflow_datasets --distributed --config.parallel=shard_map":
        Elsewhere("needs a pod and ImageNet; config validated, multi-process shard_map tested",
                  CONFIG_CHECKED, MULTIHOST),
    "python train.py --config configs/imagenet_torchvision.py --workdir /shared/runs/imagenet "
    "--config.data_dir=/shared/tensorflow_datasets --config.parallel=shard_map "
    "--coordinator_address host0:1234 --num_processes 2 --process_id 0":
        Elsewhere("needs two hosts and ImageNet; config validated, the same flags on 127.0.0.1",
                  CONFIG_CHECKED, MULTIHOST),
    "python train.py --config configs/imagenet_torchvision.py --workdir /shared/runs/imagenet "
    "--config.data_dir=/shared/tensorflow_datasets --config.parallel=shard_map "
    "--coordinator_address host0:1234 --num_processes 2 --process_id 1":
        Elsewhere("the second host of the command above", CONFIG_CHECKED, MULTIHOST),
}


def page_commands(page: str) -> list[str]:
  """Commands in a page's ```sh blocks: comments dropped, continuation lines joined."""
  text = open(page).read()
  commands = []
  for block in re.findall(r"```sh\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.split(" #")[0].strip()
      if line and not line.startswith("#"):
        commands.append(" ".join(line.split()))
  return commands


def readme_commands() -> list[str]:
  """The commands of README.md and of every docs/*.md page, page by page."""
  return [c for page in PAGES for c in page_commands(page)]


def test_every_readme_command_is_run_or_registered():
  assert len(PAGES) > 1, "no docs/*.md pages found"
  commands = readme_commands()
  assert page_commands(README), "no ```sh blocks found in README.md"
  unregistered = [(os.path.relpath(p, ROOT), c) for p in PAGES for c in page_commands(p)
                  if c not in COMMANDS]
  assert not unregistered, (
      "commands that no test runs; register them in tests/test_readme.py COMMANDS "
      f"(Run(...) or Elsewhere(...)): {unregistered}")
  stale = [c for c in COMMANDS if c not in commands]
  assert not stale, f"registered commands no longer in README.md or docs/: {stale}"


def test_links_resolve():
  """Every relative link of the pages names a file of the checkout (anchors: a heading)."""
  checked = 0
  for page in PAGES:
    text = re.sub(r"```.*?```|`[^`]*`", "", open(page).read(), flags=re.S)  # code is not links
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target):
        continue
      path, _, anchor = target.partition("#")
      full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
      assert os.path.exists(full), (os.path.relpath(page, ROOT), target)
      if anchor and full.endswith(".md"):
        slugs = {re.sub(r"[^a-z0-9 _-]", "", h.strip().lower()).replace(" ", "-")
                 for h in re.findall(r"^#+ (.*)$", open(full).read(), re.M)}
        assert anchor in slugs, (os.path.relpath(page, ROOT), target, sorted(slugs))
      checked += 1
  assert checked >= 5


def test_elsewhere_references_exist():
  for command, how in COMMANDS.items():
    if isinstance(how, Elsewhere):
      assert how.where and how.why, command
      for ref in how.where:
        path, _, test = ref.partition("::")
        assert os.path.exists(os.path.join(ROOT, path)), (command, ref)
        if test:
          assert f"def {test}(" in open(os.path.join(ROOT, path)).read(), (command, ref)
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert "make test" in ci
  makefile = open(os.path.join(ROOT, "Makefile")).read()
  assert "train.py --config configs/default.py" in makefile


def _config_of(command: str):
  """(config, num_processes) that a train.py command line asks for: the config file's
  get_config() with the --config.x=y overrides applied (typed like the field they replace)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  args = shlex.split(command)[2:]
  path = args[args.index("--config") + 1]
  spec = importlib.util.spec_from_file_location("readme_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  num_processes = 1
  for i, arg in enumerate(args):
    if arg.startswith("--config."):
      name, value = arg[len("--config."):].split("=", 1)
      assert name in config, f"{command}: no config field {name!r}"
      old = config[name]
      config[name] = (value.lower() == "true" if isinstance(old, bool) else type(old)(value)
                      if old is not None else value)
    elif arg == "--num_processes":
      num_processes = int(args[i + 1])
  return config, num_processes


def test_training_commands_have_valid_configs():
  from googlenet_jax import train as training  # pylint: disable=import-outside-toplevel
  checked = 0
  for command, how in COMMANDS.items():
    if isinstance(how, Elsewhere) and CONFIG_CHECKED in how.where:
      config, num_processes = _config_of(command)
      training.validate_config(config, num_processes)
      assert config.dataset == "imagenet2012" and config.num_classes == 1000
      checked += 1
  assert checked == 4


@pytest.mark.slow
def test_readme_commands_run(tmp_path):
  """Runs every `Run()` command in README order, as a user would after downloading the
  torchvision weights (a random-weight torchvision state_dict of the same format stands in)."""
  torch.manual_seed(0)
  weights = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
  torch.save(weights.state_dict(), tmp_path / "googlenet-1378be20.pth")
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  seven = (load_digits().images[7] * 255 / 16).astype(np.uint8)
  Image.fromarray(seven).resize((64, 64)).save(tmp_path / "digit.png")
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (300, 400, 3), np.uint8)).save(
      tmp_path / "cat.jpg")
  env = subprocess_env()
  data_dir = f"--config.data_dir={tmp_path / 'tfds'}"
  def stage(command):  # convert first, train before the commands that use its workdir
    return (0 if "--torch " in command else 2 if "train.py" in command
            else 3 if "runs/default" in command else 1)

  for command in sorted(readme_commands(), key=stage):
    how = COMMANDS[command]
    if not isinstance(how, Run):
      continue
    # runs/default (what `make train` leaves) is played by the fine-tuned run's workdir
    text = command.replace("runs/default", "runs/digits_from_imagenet")
    args = shlex.split(text)
    args = [sys.executable if a == "python" else a for a in args] + list(how.tiny)
    script = args[1] == "train.py"
    if script:
      args[1] = os.path.join(ROOT, "train.py")
      args.append(data_dir)
    elif "googlenet_jax.tools.evaluate" in args and "--config" in args:
      args.append(data_dir)
    if "--config" in args:
      i = args.index("--config") + 1
      args[i] = os.path.join(ROOT, args[i])
    run = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, (command, run.stderr[-3000:])
    if "predict" in command:
      assert "  1. " in run.stdout, (command, run.stdout)
    if "evaluate" in command:
      assert "top-1" in run.stdout and "examples" in run.stdout, (command, run.stdout)
    if "--to-torch" in command:
      back = torch.load(tmp_path / "googlenet_roundtrip.pth", weights_only=True)
      for key, value in weights.state_dict().items():
        if not key.endswith("num_batches_tracked"):
          np.testing.assert_array_equal(back[key].numpy(), value.numpy(), err_msg=key)
    if script:
      assert "initialised from" in run.stderr and "classifier" in run.stderr, run.stderr[-2000:]
  assert (tmp_path / "runs" / "digits_from_imagenet" / "config.json").exists()


def test_readme_cpu_kernels_line():
  """The API page's one line for XLA:CPU's kernels: the same values as the plain network."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from googlenet_jax import GoogLeNet, LAX, cpu  # pylint: disable=import-outside-toplevel
  blocks = [b for _, b in python_snippets() if "ops=cpu.ops()" in b]
  assert len(blocks) == 1
  scope = {"GoogLeNet": GoogLeNet}
  exec(compile(blocks[0].replace("num_classes=1000", "num_classes=10"), "docs/api.md", "exec"),
       scope)  # pylint: disable=exec-used
  model = scope["model"]
  assert model.ops in (cpu.ONEDNN, cpu.FAST_XLA) and model.ops is not LAX
  x = jnp.asarray(np.random.RandomState(0).randn(2, 64, 64, 3), jnp.float32)
  variables = init_variables(model, x.shape)
  fast = jax.jit(model.apply)(variables, x)
  plain = jax.jit(model.clone(ops=LAX).apply)(variables, x)
  assert float(jnp.linalg.norm(fast - plain) / jnp.linalg.norm(plain)) < 1e-4


def python_snippets() -> list[tuple[str, str]]:
  """(page, code) of every ```python block of the pages, in page order."""
  return [(os.path.relpath(page, ROOT), block) for page in PAGES
          for block in re.findall(r"```python\n(.*?)```", open(page).read(), re.S)]


# Snippets run by another test (a marker in the code -> that test), not by the one below.
SNIPPETS_ELSEWHERE = {"ops=cpu.ops()": "tests/test_readme.py::test_readme_cpu_kernels_line"}


@pytest.mark.slow
def test_python_snippets_run_as_written(tmp_path, monkeypatch, capsys):
  """Every Python snippet of README.md and docs/*.md, as written, in one process (so the
  224-px network's compiles are shared), the snippets of a page in order in one namespace (a
  snippet goes on from the ones above it), in an empty working directory. A snippet that needs
  a file makes it (the torchvision weights' stand-in: a random-weight state_dict of the same
  format)."""
  for marker, where in SNIPPETS_ELSEWHERE.items():
    path, _, test = where.partition("::")
    assert f"def {test}(" in open(os.path.join(ROOT, path)).read(), (marker, where)
  monkeypatch.chdir(tmp_path)
  torch.manual_seed(0)
  snippets = python_snippets()
  assert snippets, "no ```python blocks found"
  scopes = {}
  for page, code in snippets:
    if any(marker in code for marker in SNIPPETS_ELSEWHERE):
      continue
    scope = scopes.setdefault(page, {})
    try:
      exec(compile(code, page, "exec"), scope)  # pylint: disable=exec-used
    except Exception as e:  # pylint: disable=broad-except
      raise AssertionError(f"{page}: this snippet fails:\n{code}") from e
  printed = capsys.readouterr().out
  api = scopes["docs/api.md"]
  out = api["out"]
  assert out.logits.shape == out.aux1.shape == out.aux2.shape == (2, 1000)
  assert "(2, 1000) (2, 1000) (2, 1000)" in printed, printed
  assert list(api["feats"])[-1] == "inception_4e" and "(2, 14, 14, 832)" in printed, printed
  assert list(api["feats"]) == list(api["feature_names"]("torchvision")[:13])
  assert api["reinitialised"] == ["aux_after_4a/fc2", "aux_after_4d/fc2", "classifier"]
  assert np.isfinite(float(api["loss"])) and api["predictions"].shape == (4,)
  assert api["tuned"]["params"]["classifier"]["kernel"].shape == (1024, 5)
  # The NNX steps trained the parameters and running statistics of `variables` (unchanged).
  import jax  # pylint: disable=import-outside-toplevel
  start = dict(jax.tree_util.tree_leaves_with_path(api["variables"]))
  after = dict(jax.tree_util.tree_leaves_with_path(api["tuned"]))
  assert set(after) == set(start)
  changed = [k for k in start if not np.array_equal(np.asarray(start[k]), np.asarray(after[k]))]
  assert len(changed) > len(start) // 2, (len(changed), len(start))
