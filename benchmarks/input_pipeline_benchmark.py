"""Input-pipeline throughput: prepared TFDS/ArrayRecord cohort read with grain vs in memory.

Prepares a small sarcoma_phantom (default 40 patients) once per grid with
``jaxsurv.data.prepare`` (reused on later runs), then measures training-style
reading in samples/s (one sample = one patient's ``image`` float32
``[D, H, W, 2]`` + ``mask`` + outcomes) at batch 8:

* ``grain``: ``prepare.grain_batches`` iterated directly (shuffled, several
  epochs). Each batch is one ``__getitems__`` call on the TFDS
  ``ArrayRecordDataSource``, which reads the batch's records in parallel with
  its own thread pool, then parses them (proto + mask zlib) and stacks them;
* ``grain + T read threads``: the same ``MapDataset`` through
  ``.to_iter_dataset(grain.ReadOptions(num_threads=T, prefetch_buffer_size=4))``
  (grain prefetches whole batches in T threads);
* ``memory``: ``PreparedCohort`` arrays gathered with numpy fancy indexing on
  a fresh permutation per epoch (what the trainer does when the cohort fits).

Preprocessing throughput is measured elsewhere. The train-step side (the
pipeline must deliver >= 5x the train step's samples/s at the configured
grid) is added to ``RESULTS.md`` by the trainer's benchmark.

Usage::

  python benchmarks/input_pipeline_benchmark.py [--n-patients 40] [--grids 32 64]
      [--batch-size 8] [--epochs 5] [--repeats 3] [--threads 4] [--data-dir DIR]
      [--write-results]

``--write-results`` replaces the "Input pipeline" section of
``benchmarks/RESULTS.md`` (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # pylint: disable=wrong-import-position

from jaxsurv.data import prepare  # pylint: disable=wrong-import-position

SECTION = "Input pipeline"


def _time_batches(batches) -> tuple[float, int]:
  """Consumes an iterable of batches; returns (seconds, samples) after one warm-up batch."""
  it = iter(batches)
  first = next(it)
  _touch(first)
  t0 = time.perf_counter()
  n = 0
  for b in it:
    _touch(b)
    n += len(b["index"])
  return time.perf_counter() - t0, n


def _touch(batch) -> None:
  """Reads one value per array so that lazily produced data is materialised."""
  for v in batch.values():
    np.asarray(v).reshape(-1)[:1].sum()


def memory_batches(pc: prepare.PreparedCohort, batch_size: int, epochs: int, seed: int):
  """Yields shuffled in-memory batches (numpy fancy indexing, drop remainder)."""
  rng = np.random.default_rng(seed)
  n = len(pc)
  os_time = pc.table["os_time"].to_numpy(np.float32)
  os_event = pc.table["os_event"].to_numpy(np.int32)
  for _ in range(epochs):
    perm = rng.permutation(n)
    for s in range(0, n - batch_size + 1, batch_size):
      idx = perm[s:s + batch_size]
      yield {"image": pc.images[idx], "mask": pc.masks[idx], "image_present": pc.image_present[idx],
             "index": idx, "os_time": os_time[idx], "os_event": os_event[idx]}


@dataclasses.dataclass
class Row:
  """One reader at one grid: median and range of samples/s over the repeats."""
  grid: int
  method: str
  samples_per_s: float  # Median over repeats.
  lo: float
  hi: float
  mb_per_s: float  # At the median.
  samples: int  # Timed samples per repeat.


def run(args) -> tuple[list[Row], list[str]]:
  import grain  # pylint: disable=import-outside-toplevel
  rows, notes = [], []
  for g in args.grids:
    cfg = dataclasses.replace(prepare.DEFAULT_PREPROCESS, grid=(g, g, g))
    t0 = time.perf_counter()
    dataset_dir, reused = prepare.prepare_dataset(
        "sarcoma_phantom", n_patients=args.n_patients, seed=0, preprocess=cfg,
        data_dir=args.data_dir, workers=args.workers, progress=not args.no_progress)
    t_prep = time.perf_counter() - t0
    size = prepare.dataset_bytes(dataset_dir)
    notes.append(f"{g}^3: {'reused' if reused else f'prepared in {t_prep:.1f} s'}; "
                 f"{size / 2**20:.1f} MiB on disk for {args.n_patients} patients "
                 f"({size / args.n_patients / 2**10:.0f} KiB/patient, raw float32 image "
                 f"{g ** 3 * 2 * 4 / 2**10:.0f} KiB); config `{dataset_dir.parent.name}`")
    sample_mb = (g ** 3 * 2 * 4 + g ** 3) / 2**20

    t0 = time.perf_counter()
    pc = prepare.load_prepared(dataset_dir)
    t_load = time.perf_counter() - t0
    notes.append(f"{g}^3: load_prepared (whole cohort into memory) {t_load:.2f} s = "
                 f"{len(pc) / t_load:.0f} samples/s")

    def record(method, make):
      rates, n = [], 0
      for r in range(args.repeats):
        secs, n = _time_batches(make(r))
        rates.append(n / secs)
      med = float(np.median(rates))
      rows.append(Row(g, method, med, min(rates), max(rates), med * sample_mb, n))
      print(f"grid {g:>3}^3  {method:<34} {med:10.1f} samples/s (range {min(rates):.1f}-"
            f"{max(rates):.1f})  {med * sample_mb:8.1f} MB/s", flush=True)

    record("grain_batches (MapDataset)",
           lambda r: prepare.grain_batches(dataset_dir, args.batch_size, seed=r,
                                           num_epochs=args.epochs))
    for threads in args.threads:
      record(f"grain + {threads} read threads (IterDataset)",
             lambda r, t=threads: prepare.grain_batches(
                 dataset_dir, args.batch_size, seed=r, num_epochs=args.epochs).to_iter_dataset(
                     grain.ReadOptions(num_threads=t, prefetch_buffer_size=4)))
    record("in memory (numpy fancy indexing)",
           lambda r: memory_batches(pc, args.batch_size, args.epochs * 4, seed=r))
    del pc
  return rows, notes


def _machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  try:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    mem = float("nan")
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
  return (f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, load average {load:.1f} at the start "
          f"(machine shared with other jobs); Python {platform.python_version()}")


def _versions() -> str:
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  return ", ".join(f"{p} {md.version(p)}" for p in ("tensorflow-datasets", "array-record", "grain",
                                                        "numpy"))


def section_text(rows: list[Row], notes: list[str], args, machine: str) -> str:
  cmd = "python benchmarks/input_pipeline_benchmark.py " + " ".join(args.argv)
  lines = [f"## {SECTION}", "",
           f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/input_pipeline_benchmark.py` "
           f"(commit {common.git_commit()}).", "",
           f"* Machine: {machine}.",
           f"* Packages: {_versions()}.",
           f"* Command: `{cmd.strip()}`",
           f"* Data: sarcoma_phantom, {args.n_patients} patients, prepared with "
           "`prepare.DEFAULT_PREPROCESS` at each grid (2 channels: float32 image stored as raw "
           "bytes, uint8 mask zlib; ArrayRecord compresses each record itself); batch "
           f"{args.batch_size}, shuffled, {args.epochs} epochs (memory: {args.epochs * 4}); "
           "the first batch is a warm-up and not timed.",
           "* One sample = one patient (image `[D, H, W, 2]` float32 + mask + outcomes); MB/s counts "
           "the decoded image + mask bytes.",
           f"* Each reader is timed {args.repeats} times (different shuffle seeds); the table gives "
           "the median and the range, which is wide because other jobs share the 2 cores.", "",
           "| grid | reader | samples/s (median) | range | MB/s |", "|---|---|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r.grid}^3 | {r.method} | {r.samples_per_s:.0f} | {r.lo:.0f}-{r.hi:.0f} | "
                 f"{r.mb_per_s:.0f} |")
  derived = []
  for g in sorted({r.grid for r in rows}):
    at = {r.method: r for r in rows if r.grid == g}
    best = max(at.values(), key=lambda r: r.samples_per_s)
    derived.append(f"{g}^3: at the required 5x margin these readers feed a train step of at most "
                   + ", ".join(f"{r.samples_per_s / 5:.0f} samples/s ({r.method})"
                               for r in at.values()) + f"; fastest here: {best.method}.")
    base = at.get("grain_batches (MapDataset)")
    slower = [r.method for r in at.values() if "read threads" in r.method and base is not None
              and r.samples_per_s < base.samples_per_s]
    if slower:
      derived.append(f"{g}^3: {', '.join(slower)} read slower than plain grain_batches on this "
                     "machine: each batch is already one `ArrayRecordDataSource.__getitems__` call, "
                     "which reads the batch's records in parallel with its own thread pool, so "
                     "grain's threads only add contention on 2 shared cores.")
  lines += ["", "Notes:", ""] + [f"* {n}" for n in derived + notes]
  lines += ["", "The train-step side (pipeline samples/s >= 5x train-step samples/s at the configured "
            "grid) is added by the trainer's benchmark.", ""]
  return "\n".join(lines)



def write_section(path: pathlib.Path, text: str) -> None:
  """Replaces (or appends) the ``## Input pipeline`` section of RESULTS.md, leaving others alone."""
  common.write_section(path, SECTION, text)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--n-patients", type=int, default=40)
  p.add_argument("--grids", type=int, nargs="+", default=[32, 64])
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--epochs", type=int, default=5)
  p.add_argument("--repeats", type=int, default=3, help="timed runs per reader (median reported)")
  p.add_argument("--threads", type=int, nargs="*", default=[4],
                 help="grain read-thread counts to measure (none: skip)")
  p.add_argument("--workers", type=int, default=1, help="preprocessing processes when preparing")
  p.add_argument("--data-dir", type=pathlib.Path, default=None,
                 help="TFDS data folder (default $JAXSURV_CACHE/tfds; prepared data is reused)")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--write-results", action="store_true",
                 help="replace the 'Input pipeline' section of benchmarks/RESULTS.md")
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  args.argv = [a for a in argv if a != "--no-progress"]
  machine = _machine()
  print(machine, flush=True)
  rows, notes = run(args)
  for n in notes:
    print(n)
  if args.write_results:
    out = REPO / "benchmarks" / "RESULTS.md"
    write_section(out, section_text(rows, notes, args, machine))
    print(f"wrote section '{SECTION}' of {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
