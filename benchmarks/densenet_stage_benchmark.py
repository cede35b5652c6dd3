"""DenseNet encoder, forward + gradients by depth: jaxsurv vs torch, to find where a step's time goes.

Times the image encoder alone (no clinical branch, loss heads or optimiser)
for several ``--prefixes`` of the block configuration: ``6`` is the stem,
block 1 (6 dense layers) and the final norm; ``6,12`` adds transition 1 and
block 2; and so on up to DenseNet-121's ``6,12,24,16``. The difference
between successive rows is the cost of what the longer prefix adds, so the
rows show which part of the network makes one framework slower than the
other (``--prefixes 1 2 4 6``: block 1 layer by layer).

One measurement is ``d/d(params) sum(tanh(embedding))`` with batch
statistics (train mode, dropout off) on a ``[batch, grid, grid, grid, 2]``
input:

* jaxsurv: ``jaxsurv.models.densenet3d.DenseNet3D`` (``conv_impl="auto"``),
  one jitted program per prefix, compiled with
  ``jaxsurv.models.conv.cpu_compiler_options(--cpu-convs)``; the programs are
  timed interleaved in this process;
* torch: ``benchmarks/torch_reference.py``'s ``DenseNet3D`` (eager, NCDHW,
  ``torch.set_num_threads`` = the usable cores) in its own process, so
  neither framework's idle worker threads compete with the other.

With ``--rounds`` > 1 the two alternate (jaxsurv, torch, jaxsurv, ...) and
each row pools its rounds' times, so a slow spell of a shared machine falls
on both.

Commands::

  python benchmarks/densenet_stage_benchmark.py                  # DenseNet-121, 32^3, batch 2
  python benchmarks/densenet_stage_benchmark.py --prefixes 1 2 4 6   # block 1 by layer
  python benchmarks/densenet_stage_benchmark.py --write-results  # replace its RESULTS.md section

Extras: torch (``pip install -r benchmarks/requirements.txt``); without it
the torch columns are left empty.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)
import common  # pylint: disable=wrong-import-position

SECTION = "DenseNet encoder by depth (CPU)"
RESULT_TAG = common.RESULT_TAG
DEFAULT_PREFIXES = ("6", "6,12", "6,12,24", "6,12,24,16")


def parse_prefix(text: str) -> tuple[int, ...]:
  """``"6,12"`` -> ``(6, 12)``.

  Raises:
    ValueError: not comma-separated positive integers.
  """
  try:
    blocks = tuple(int(v) for v in text.split(","))
  except ValueError:
    blocks = ()
  if not blocks or min(blocks) < 1:
    raise ValueError(f"a prefix is comma-separated positive layer counts, got {text!r}")
  return blocks


def _input(batch: int, grid: int):
  import numpy as np
  return np.random.default_rng(0).standard_normal((batch, grid, grid, grid, 2), np.float32)


def jax_programs(prefixes, grid: int, batch: int, cpu_convs: str = "xla",
                 model_kwargs: dict | None = None) -> dict:
  """One compiled ``() -> gradients`` callable per prefix (jaxsurv's DenseNet3D).

  Raises:
    FloatingPointError: a gradient is not finite.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxsurv.models.conv import cpu_compiler_options
  from jaxsurv.models.densenet3d import DenseNet3D

  x = jnp.asarray(_input(batch, grid))
  opts = cpu_compiler_options(cpu_convs) or None
  fns = {}
  for blocks in prefixes:
    model = DenseNet3D(block_config=blocks, dropout_rate=0.0, head_dropout_rate=0.0,
                       **(model_kwargs or {}))
    variables = model.init(jax.random.key(0), x, train=False)

    def loss(params, batch_stats, x, model=model):
      (emb, _), _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
      return jnp.sum(jnp.tanh(emb))

    grad = jax.jit(jax.grad(loss), compiler_options=opts)
    args = (variables["params"], variables["batch_stats"], x)
    g = grad(*args)
    if not all(bool(np.isfinite(v).all()) for v in jax.tree.leaves(g)):
      raise FloatingPointError(f"non-finite jaxsurv gradient for blocks {blocks}")
    fns[blocks] = lambda grad=grad, args=args: jax.block_until_ready(grad(*args))
  return fns


def torch_programs(prefixes, grid: int, batch: int, model_kwargs: dict | None = None) -> dict:
  """The same computations with torch_reference.DenseNet3D (eager)."""
  import torch
  import torch_reference as ref

  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  x = torch.from_numpy(_input(batch, grid)).permute(0, 4, 1, 2, 3).contiguous()
  fns = {}
  for blocks in prefixes:
    model = ref.DenseNet3D(block_config=blocks, dropout_rate=0.0, head_dropout_rate=0.0,
                           **(model_kwargs or {}))
    model.train()

    def run(model=model):
      model.zero_grad(set_to_none=True)
      torch.tanh(model(x)).sum().backward()

    fns[blocks] = run
  return fns


def pooled_rows(prefixes, jax_rounds: list[dict], torch_rounds: list[dict]) -> list[dict]:
  """Per prefix: the pooled median and 25th percentile (ms) of each framework's
  rounds, the ratio, and the increment over the previous prefix."""
  rows, prev = [], None
  for blocks in prefixes:
    row = {"blocks": blocks}
    for name, rounds in (("jaxsurv", jax_rounds), ("torch", torch_rounds)):
      times = [t for r in rounds for t in r[blocks]]
      if times:
        row[name] = common.summary_ms(times)
        if prev is not None and name in prev:
          row[name]["increment_ms"] = row[name]["median_ms"] - prev[name]["median_ms"]
    if "jaxsurv" in row and "torch" in row:
      row["ratio"] = row["jaxsurv"]["median_ms"] / row["torch"]["median_ms"]
      inc = row["torch"].get("increment_ms")
      if inc is not None and inc > 0:
        row["increment_ratio"] = row["jaxsurv"]["increment_ms"] / inc
    rows.append(row)
    prev = row
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| blocks | jaxsurv ms, median (p25) | torch ms, median (p25) | jaxsurv/torch | "
           "jaxsurv increment ms | torch increment ms | increment jaxsurv/torch |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    cell = lambda n: (f"{r[n]['median_ms']:.1f} ({r[n]['p25_ms']:.1f})" if n in r else "–")
    inc = lambda n: (f"{r[n]['increment_ms']:+.1f}" if "increment_ms" in r.get(n, {}) else "–")
    ratio = lambda k: f"{r[k]:.2f}" if k in r else "–"
    lines.append(f"| {','.join(map(str, r['blocks']))} | {cell('jaxsurv')} | {cell('torch')} | "
                 f"{ratio('ratio')} | {inc('jaxsurv')} | {inc('torch')} | "
                 f"{ratio('increment_ratio')} |")
  return "\n".join(lines)


def _torch_round(argv: list[str]) -> dict | None:
  result, why = common.run_worker(__file__, [*argv, "--worker"], tail_lines=1)
  if why:
    print(f"torch worker {why}", file=sys.stderr)
    return None
  return {parse_prefix(k): v for k, v in result.items()}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--grid", type=int, default=32, help="voxels per side of the input")
  p.add_argument("--prefixes", nargs="+", default=list(DEFAULT_PREFIXES),
                 help="block configurations, e.g. 6 6,12 (layers per dense block)")
  p.add_argument("--cpu-convs", default="eigen", choices=["xla", "eigen"],
                 help="library of XLA's CPU 2D convolutions (the paper config's: eigen)")
  p.add_argument("--reps", type=int, default=15, help="timed calls per prefix and round")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--write-results", action="store_true")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  argv = sys.argv[1:] if argv is None else list(argv)
  a = p.parse_args(argv)
  try:
    prefixes = [parse_prefix(s) for s in a.prefixes]
  except ValueError as e:
    p.error(str(e))
  if min(a.batch, a.grid, a.reps, a.rounds) < 1:
    p.error("--batch, --grid, --reps and --rounds must be positive")
  if a.worker:
    times = common.interleaved_s(torch_programs(prefixes, a.grid, a.batch), a.reps)
    print(RESULT_TAG + json.dumps({",".join(map(str, k)): v for k, v in times.items()}),
          flush=True)
    return 0
  load0 = os.getloadavg()
  jax_fns = jax_programs(prefixes, a.grid, a.batch, a.cpu_convs)
  worker_argv = [s for s in argv if s != "--write-results"]
  jax_rounds, torch_rounds = [], []
  for _ in range(a.rounds):
    jax_rounds.append(common.interleaved_s(jax_fns, a.reps))
    if not a.no_torch:
      t = _torch_round(worker_argv)
      if t:
        torch_rounds.append(t)
  load1 = os.getloadavg()
  rows = pooled_rows(prefixes, jax_rounds, torch_rounds)
  import jax
  command = "python benchmarks/densenet_stage_benchmark.py " + " ".join(argv)
  text = "\n".join([
      f"## {SECTION}", "",
      f"Measured {time.strftime('%Y-%m-%d')}: `{command}`; {common.cpu_model()}, "
      f"{len(os.sched_getaffinity(0))} cores, jax {jax.__version__} ({jax.default_backend()}); "
      f"load average {load0[0]:.2f} -> {load1[0]:.2f}.", "",
      f"DenseNet image encoder (init 64, growth 32, bn_size 4; the block configuration in the "
      f"first column) on [{a.batch}, {a.grid}, {a.grid}, {a.grid}, 2]: gradients of "
      "sum(tanh(embedding)) with respect to the parameters, train mode, dropout off. "
      f"jaxsurv `conv_impl=\"auto\"`, `xla_cpu_convolutions=\"{a.cpu_convs}\"`, programs "
      f"interleaved; torch eager NCDHW in its own process; {a.rounds} rounds of {a.reps} "
      "calls alternating, pooled. An increment is the row's median minus the previous row's: "
      "the cost of the blocks (and transition) the row adds.", "",
      table(rows), ""])
  print(text)
  if a.write_results:
    common.write_section(HERE / "RESULTS.md", SECTION, text)
    print(f"wrote the '{SECTION}' section of {HERE / 'RESULTS.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
