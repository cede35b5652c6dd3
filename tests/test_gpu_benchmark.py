"""The one-shot GPU benchmark (benchmarks/gpu_benchmark.sh) at tiny shapes on CPU.

Runs the shell script as a user would (``--no-install``: no package index here)
on the ``local`` network at 8^3, batch 2, fp32, remat off and on, and checks
every framework's rows and the RESULTS.md section it writes. MONAI and torch
are optional: without them their rows must say so, and the run must still
succeed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
CACHE = pathlib.Path(os.environ.get("JAXSURV_CACHE", "~/.cache/jaxsurv")).expanduser()


def test_gpu_benchmark_runs_at_tiny_shapes_and_writes_its_section(tmp_path):
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n\n## Other\n\nkept\n")
  cmd = ["bash", str(REPO / "benchmarks" / "gpu_benchmark.sh"), "--no-install", "--",
         "--model", "local", "--grid", "8", "--batches", "2", "--dtypes", "float32",
         "--remat", "off", "on", "--warmup", "1", "--steps", "2", "--budget", "400",
         "--compile-cache", str(CACHE / "jax_compilation_cache"), "--results", str(results)]
  proc = subprocess.run(cmd, cwd=tmp_path, env=dict(os.environ, PYTHON=sys.executable),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
          if line.startswith("RESULT ")]
  by = {}
  for r in rows:
    by.setdefault(r["framework"], []).append(r)
  assert sorted(by) == ["jaxsurv", "monai", "torch"]
  assert sorted(r["remat"] for r in by["jaxsurv"]) == [False, True]
  for r in by["jaxsurv"]:
    assert "error" not in r, r
    assert r["batch"] == 2 and r["dtype"] == "float32" and r["backend"] == "cpu"
    assert r["samples_per_s"] > 0 and r["step_ms_min"] <= r["step_ms_median"]
    assert r["compile_s"] > 0 and r["memory_mib"] > 0
    assert r["n_params"] == 6334  # configs/mmnn.py:local (RESULTS.md, "Train step")
  has_torch = importlib.util.find_spec("torch") is not None
  has_monai = has_torch and importlib.util.find_spec("monai") is not None
  for fw, present in (("torch", has_torch), ("monai", has_monai)):
    assert len(by[fw]) == 2
    for r in by[fw]:
      if present:
        assert "error" not in r, r
        assert r["samples_per_s"] > 0
      else:
        assert r["error"].startswith("skipped:") and "not installed" in r["error"]
  if has_torch:  # The reference is the same network as jaxsurv's.
    assert {r["n_params"] for r in by["torch"]} == {6334}
  text = results.read_text()
  assert text.startswith("# Benchmark results\n\n## Other\n\nkept\n")
  assert "## One-shot GPU benchmark" in text
  assert "| jaxsurv | 2 | float32 | off |" in text and "| jaxsurv | 2 | float32 | on |" in text
  assert "Largest batch that ran, jaxsurv float32 remat on: 2" in text
