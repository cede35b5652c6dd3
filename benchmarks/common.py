"""Helpers shared by the benchmark scripts: machine description, RESULTS.md sections."""

from __future__ import annotations

import pathlib
import platform
import re


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (or the platform's description)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def write_section(path: pathlib.Path, section: str, text: str) -> None:
  """Replaces (or appends) the ``## <section>`` of RESULTS.md, leaving the others alone."""
  old = path.read_text() if path.is_file() else "# Benchmark results\n\n"
  pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
  if pattern.search(old):
    new = pattern.sub(lambda _: text.rstrip("\n") + "\n\n", old, count=1)
  else:
    new = old.rstrip("\n") + "\n\n" + text
  path.write_text(new.rstrip("\n") + "\n")
