"""Importing the model directory module or a tool imports neither TensorFlow nor the training
system (`googlenet_jax.train`): a tool that needs them for a code path imports them inside it.
One fresh interpreter imports the modules one after the other and reports, per module, what its
import pulled in."""

import json
import subprocess
import sys
import textwrap

from helpers import ROOT, subprocess_env

MODULES = ("googlenet_jax.model_dir", "googlenet_jax.tools.cli", "googlenet_jax.tools.main",
           "googlenet_jax.tools.predict", "googlenet_jax.tools.evaluate",
           "googlenet_jax.tools.export", "googlenet_jax.tools.convert",
           "googlenet_jax.tools.summary")
HEAVY = ("tensorflow", "googlenet_jax.train")


def test_model_dir_and_tools_import_neither_tensorflow_nor_training():
  code = textwrap.dedent(f"""
      import importlib, json, sys

      def heavy():
        return sorted(h for h in {HEAVY!r} if h in sys.modules)

      report = {{}}
      for name in {MODULES!r}:
        before = set(heavy())
        importlib.import_module(name)
        report[name] = [h for h in heavy() if h not in before]
      print(json.dumps(report))
      """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert sorted(report) == sorted(MODULES)
  pulled = {name: got for name, got in report.items() if got}
  assert not pulled, f"imported at module import (module: what it pulled in): {pulled}"
