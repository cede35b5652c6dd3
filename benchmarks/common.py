"""Helpers shared by the benchmark scripts: machine description, RESULTS.md sections."""

from __future__ import annotations

import json
import pathlib
import platform
import re
import subprocess
import sys
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
# A worker process prints its result as one line: RESULT_TAG + JSON.
RESULT_TAG = "RESULT "


def run_worker(script: str, args: list[str], timeout: float | None = None,
               tail_lines: int = 15) -> tuple[Any, str | None]:
  """Runs ``python script *args`` in a fresh process from the repository root.

  Returns:
    ``(result, None)``: the JSON after the last ``RESULT_TAG`` line of its
    stdout; or ``(None, why)``: "timed out after N s", or "exited RC: " and
    the last ``tail_lines`` lines of its stderr (else stdout) joined by " | ".
  """
  try:
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, check=False)
  except subprocess.TimeoutExpired:
    return None, f"timed out after {timeout:.0f} s"
  for line in reversed(proc.stdout.splitlines()):
    if line.startswith(RESULT_TAG):
      return json.loads(line[len(RESULT_TAG):]), None
  tail = (proc.stderr or proc.stdout).strip().splitlines()[-tail_lines:]
  return None, f"exited {proc.returncode}: " + " | ".join(tail)


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
