"""The `googlenet-jax` command: one entry point for the tools.

  googlenet-jax predict --workdir DIR IMAGE...        (googlenet_jax.tools.predict)
  googlenet-jax evaluate --workdir DIR [--multi_crop]  (googlenet_jax.tools.evaluate)
  googlenet-jax convert --torch FILE.pth ...          (googlenet_jax.tools.convert)
  googlenet-jax summary --variant paper --size 224    (googlenet_jax.tools.summary)
  googlenet-jax export --workdir DIR --format F --out PATH  (googlenet_jax.tools.export)

`googlenet-jax TOOL ARGS...` is `python -m googlenet_jax.tools.TOOL ARGS...`: the tool parses
ARGS itself (absl flags), `googlenet-jax TOOL --help` shows its flags.
"""

from __future__ import annotations

import runpy
import sys
from typing import Optional, Sequence

TOOLS = {
    "predict": "classify image files",
    "evaluate": "top-1 / top-5 on a dataset split",
    "convert": "PyTorch state_dict files <-> model directories",
    "summary": "the paper's Table 1 rebuilt from the code",
    "export": "a model directory as jax.export bytes, ONNX or a TensorFlow SavedModel",
}
PROG = "googlenet-jax"


def usage() -> str:
  width = max(len(t) for t in TOOLS)
  lines = [f"usage: {PROG} TOOL [ARGS...]   ({PROG} TOOL --help for its flags)", "", "tools:"]
  lines += [f"  {name.ljust(width)}  {what}" for name, what in TOOLS.items()]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv:
    print(usage(), file=sys.stderr)
    sys.exit(2)
  if argv[0] in ("-h", "--help", "help"):
    print(usage())
    sys.exit(0)
  tool, rest = argv[0], argv[1:]
  if tool not in TOOLS:
    print(f"error: unknown tool {tool!r}; expected one of {', '.join(TOOLS)}", file=sys.stderr)
    sys.exit(2)
  # Run as `python -m` would: the tool is __main__ and reads sys.argv (`cli.parse_flags`); its
  # --help then shows its docstring and flags.
  sys.argv = [f"{PROG} {tool}"] + rest
  runpy.run_module(f"googlenet_jax.tools.{tool}", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
