"""Throughput of MRI preprocessing (jaxsurv.data.mri.preprocess_case), with and without N4.

Runs the real pyradiomics 3.0.1 brain MRI cases (brain1 256x256x25 and brain2
256x256x23 at 0.78x0.78x6.5 mm, fetched once into the jaxsurv cache) through
``preprocess_case`` as 2-channel cases (the same scan as both channels, as in
the tests: no paired T2 exists), onto a ``--grid`` cube (default 128^3).
Reports cases/s and channel-volumes/s, prints one JSON line, and writes (or
replaces) the "Preprocessing" section of benchmarks/RESULTS.md with the
machine and the command.

Usage:
  python benchmarks/preprocess_benchmark.py [--grid 128] [--repeats 2] [--no-results]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

import SimpleITK as sitk

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from jaxsurv.data import mri  # noqa: E402

import common  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS.md"


def _machine() -> dict:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  return {"cpu": cpu, "cores": os.cpu_count(), "load_1min": load,
          "sitk_threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
          "simpleitk": sitk.Version_VersionString(), "python": platform.python_version()}


def _bench(cases, cfg: mri.PreprocessConfig, repeats: int) -> dict:
  times = []
  for _ in range(repeats):
    for img, lab in cases.values():
      t0 = time.perf_counter()
      out = mri.preprocess_case([img, img], lab, cfg)
      times.append(time.perf_counter() - t0)
      assert out.volume.shape == cfg.grid + (2,)
  total = sum(times)
  return {"cases": len(times), "seconds": round(total, 3),
          "cases_per_s": round(len(times) / total, 3),
          "channel_volumes_per_s": round(2 * len(times) / total, 3),
          "s_per_case_min": round(min(times), 3), "s_per_case_max": round(max(times), 3)}


def _write_section(text: str) -> None:
  common.write_section(RESULTS, "Preprocessing", "## Preprocessing\n\n" + text.strip() + "\n")


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--grid", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--n4-repeats", type=int, default=1)
  ap.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
  args = ap.parse_args(argv)

  cases = mri.pyradiomics_cases(("brain1", "brain2"))
  grid = (args.grid,) * 3
  plain = mri.PreprocessConfig(grid=grid)
  n4 = mri.PreprocessConfig(grid=grid, n4=True)
  mri.preprocess_case([cases["brain2"][0]], cases["brain2"][1], plain)  # Warm-up (imports, caches).
  result = {
      "benchmark": "preprocess", "grid": list(grid), "channels": 2,
      "cases": sorted(cases), "machine": _machine(),
      "no_n4": _bench(cases, plain, args.repeats),
      "n4": _bench(cases, n4, args.n4_repeats),
      "n4_settings": {"shrink": n4.n4_shrink, "iterations": list(n4.n4_iterations),
                      "convergence": n4.n4_convergence},
  }
  print(json.dumps(result))
  if args.no_results:
    return
  m = result["machine"]
  cmd = "python benchmarks/preprocess_benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
  rows = "\n".join(
      f"| {name} | {r['cases']} | {r['cases_per_s']} | {r['channel_volumes_per_s']} | "
      f"{r['s_per_case_min']}–{r['s_per_case_max']} |"
      for name, r in (("no N4", result["no_n4"]), ("N4 (shrink 4, iterations "
                                                   f"{list(n4.n4_iterations)})", result["n4"])))
  _write_section(f"""
`preprocess_case` on the real pyradiomics brain1/brain2 MRI (2 channels per case, same scan
twice), grid {args.grid}^3, 1 mm isotropic intermediate, margin 10 mm, z-score on.

| Setting | cases timed | cases/s | channel volumes/s | s per case |
|---|---|---|---|---|
{rows}

Machine: {m['cpu']}, {m['cores']} cores, SimpleITK {m['simpleitk']} with {m['sitk_threads']} threads,
Python {m['python']}, 1-min load average {m['load_1min']:.1f} at start.
Command: `{cmd.strip()}`.
""")


if __name__ == "__main__":
  main()
