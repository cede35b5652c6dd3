"""The one-shot GPU benchmark (benchmarks/gpu_benchmark.sh) at tiny shapes on CPU.

Runs the shell script as a user would (``--no-install``: no package index here)
on the ``local`` network at 8^3, batch 2, fp32, remat off and on, and checks
every framework's rows and the RESULTS.md section it writes. MONAI and torch
are optional: without them their rows must say so, and the run must still
succeed. Also the script's ``--check`` (what the Python lacks) and its offline
``--wheels`` install, with a hand-made wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import zipfile

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


def _script(*args, env=None, cwd=None):
  return subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_benchmark.sh"), *args],
                        cwd=cwd, env=dict(os.environ, PYTHON=sys.executable, **(env or {})),
                        capture_output=True, text=True, timeout=300)


def _probe_wheel(folder: pathlib.Path) -> pathlib.Path:
  """A minimal pure-Python wheel (PEP 427) holding the module ``jaxsurv_wheel_probe``."""
  name, info = "jaxsurv_wheel_probe", "jaxsurv_wheel_probe-0.1.dist-info"
  files = {
      f"{name}/__init__.py": "VALUE = 41 + 1\n",
      f"{info}/METADATA": "Metadata-Version: 2.1\nName: jaxsurv-wheel-probe\nVersion: 0.1\n",
      f"{info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                        "Tag: py3-none-any\n"),
  }
  files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
  path = folder / "jaxsurv_wheel_probe-0.1-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as zf:
    for k, v in files.items():
      zf.writestr(k, v)
  return path


def test_check_names_the_gpu_as_missing_on_cpu():
  import jax  # pylint: disable=import-outside-toplevel
  proc = _script("--check")
  if jax.default_backend() == "gpu":
    assert "  jax-gpu" not in proc.stdout.splitlines(), proc.stdout
    return
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert "lacks:" in proc.stdout and "  jax-gpu" in proc.stdout.splitlines(), proc.stdout


def test_wheels_are_installed_offline_into_a_private_site(tmp_path):
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  _probe_wheel(wheels)
  proc = _script("--wheels", "wheels", "--check", cwd=tmp_path,  # relative to the caller's folder
                 env={"TMPDIR": str(tmp_path), "JAXSURV_GPU_BENCHMARK_ON_CPU": "1"})
  assert "installing 1 wheels" in proc.stdout, proc.stdout + proc.stderr
  site = tmp_path / "jaxsurv-gpu-site"
  assert (site / "jaxsurv_wheel_probe" / "__init__.py").is_file(), proc.stdout + proc.stderr
  # The check saw the CPU as acceptable: at most the optional frameworks are missing.
  lacking = {line.strip() for line in proc.stdout.splitlines()[2:]}
  assert lacking <= {"torch", "monai==1.6.1"}, proc.stdout
  got = subprocess.run([sys.executable, "-c", "import jaxsurv_wheel_probe as m; print(m.VALUE)"],
                       env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True)
  assert got.stdout.strip() == "42", got.stderr


def test_wheels_folder_without_wheels_is_refused(tmp_path):
  proc = _script("--wheels", str(tmp_path), "--check", env={"TMPDIR": str(tmp_path)})
  assert proc.returncode == 2
  assert "no .whl files there" in proc.stderr
  assert not (tmp_path / "jaxsurv-gpu-site").exists()
