"""Helpers shared by the benchmark scripts: machine description, RESULTS.md sections."""

from __future__ import annotations

import json
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

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


def interleaved_s(fns: dict, reps: int, args: tuple = (),
                  block: Callable[[Any], Any] = lambda _: None) -> dict:
  """Seconds per call of each ``fns`` entry: each runs once untimed, then
  ``reps`` rounds call every entry once (``block(fn(*args))``), so a slow
  spell of a shared machine falls on all of them.

  Returns:
    ``{name: [seconds, ...]}`` (``reps`` values each).
  """
  for fn in fns.values():
    block(fn(*args))
  out = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t = time.perf_counter()
      block(fn(*args))
      out[name].append(time.perf_counter() - t)
  return out


def summary_ms(seconds) -> dict:
  """``{"median_ms", "p25_ms"}`` of a non-empty list of seconds."""
  v = sorted(seconds)
  return {"median_ms": statistics.median(v) * 1e3, "p25_ms": v[len(v) // 4] * 1e3}


def cpu_model() -> str:
  """The CPU model name from /proc/cpuinfo (or the platform's description)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def git_commit() -> str:
  """This checkout's short commit hash, or ``"unknown"`` outside a git checkout."""
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _subsections(body: str) -> list[tuple[str, str]]:
  """``(title, text)`` of each ``### `` subsection of a section's text, in order."""
  parts = re.split(r"^(?=### )", body, flags=re.M)
  return [(part.split("\n", 1)[0][4:].strip(), part) for part in parts if part.startswith("### ")]


def write_section(path: pathlib.Path, section: str, text: str) -> None:
  """Replaces (or appends) the ``## <section>`` of RESULTS.md, leaving the others alone.

  Within the section, ``text`` replaces the head (the part before the first
  ``### `` heading) and any ``### `` subsection of the same title; the other
  subsections of the old section (dated records written by hand or by other
  commands) are kept, after ``text``. The file is replaced atomically.
  """
  old = path.read_text() if path.is_file() else "# Benchmark results\n\n"
  pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
  match = pattern.search(old)
  if match:
    generated = {title for title, _ in _subsections(text)}
    kept = [part.rstrip("\n") for title, part in _subsections(match.group(0))
            if title not in generated]
    body = "\n\n".join([text.rstrip("\n")] + kept) + "\n\n"
    new = old[:match.start()] + body + old[match.end():]
  else:
    new = old.rstrip("\n") + "\n\n" + text
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(new.rstrip("\n") + "\n")
  tmp.replace(path)
