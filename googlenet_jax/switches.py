"""A process-wide on/off setting for a backend-specific path: an explicit override (function or
context manager, read when a function is traced), else an environment variable, else None
(the caller's default). Used by `fast_ops` and `onednn`."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

_FALSE = ("0", "false", "no", "off")
_TRUE = ("1", "true", "yes", "on")


class Switch:

  def __init__(self, env_var: str):
    self.env_var = env_var
    self.override: Optional[bool] = None

  def from_env(self) -> Optional[bool]:
    """True / False for a yes / no value of the environment variable, else None."""
    value = os.environ.get(self.env_var, "").strip().lower()
    return False if value in _FALSE else True if value in _TRUE else None

  def set(self, value: Optional[bool]) -> None:
    self.override = value

  @contextlib.contextmanager
  def use(self, value: Optional[bool]) -> Iterator[None]:
    old, self.override = self.override, value
    try:
      yield
    finally:
      self.override = old

  def value(self) -> Optional[bool]:
    """The override if set, else the environment variable's setting, else None."""
    return self.override if self.override is not None else self.from_env()
