"""Multi-process data parallelism: one global batch on 1, 2 and 4 processes.

For each process count P this starts P processes of itself on 127.0.0.1
(``jax.distributed`` through ``jaxsurv.distributed.initialize``), each with
one device (a CPU device here; one GPU each on a GPU host, with
``--platform=gpu``), builds the shared trainer's jitted step for the model
(``--model``: the MMNN ``local`` config, a small 3D DenseNet on 2 x 24^3
volumes + clinical MLP with Cox heads, or the HEALNet released config) and times it on the
same global batch (``--batch``, default 32: 32 / P rows per process):
``--warmup`` untimed steps, then ``--steps`` timed ones, each ended by
``jax.block_until_ready``; the median is reported.

The communication share is ``1 - t_local / t_P``, where ``t_local`` is the
step of one process on its ``batch / P`` rows alone (P = 1, a global batch
of ``batch / P``): the same arithmetic per process without the
cross-process gradient all-reduce and the global Cox risk set. On a machine
with fewer cores than processes the processes also compete for cores, and
that shows up in the share too (the machine and its load are printed).

  python benchmarks/multiprocess_benchmark.py                    # P = 1, 2, 4 (~6 min, 2 cores)
  python benchmarks/multiprocess_benchmark.py --processes 1 2 --model healnet
  python benchmarks/multiprocess_benchmark.py --platform gpu --processes 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
import common  # pylint: disable=wrong-import-position


def _trainer_and_part(model: str, batch: int):
  from jaxsurv.trainer import loop
  rng = np.random.default_rng(0)
  n = 2 * batch
  if model == "mmnn":
    from configs import mmnn as mmnn_configs
    from jaxsurv import train as train_lib
    c = mmnn_configs.get_config("local")
    c.batch_size = c.eval_batch_size = batch
    grid = tuple(c.data.preprocess.grid)
    arrays = {"inputs": {"image": rng.normal(size=(n, *grid, 2)).astype(np.float32),
                         "clinical": rng.normal(size=(n, 11)).astype(np.float32)},
              "presence": {},
              "duration": rng.integers(1, 2000, size=(n, 2)).astype(np.float32),
              "event": (rng.random((n, 2)) < 0.3).astype(np.int32),
              "outcome_mask": np.ones((n, 2), bool)}
    trainer = train_lib.make_trainer(c)
    args = np.array([1 / 3, 1 / 3, 1 / 3], np.float32)
  else:
    from configs import healnet as healnet_configs
    from jaxsurv import fusion_train as ft
    c = healnet_configs.get_config("released")
    c.batch_size = c.eval_batch_size = batch
    widths = {"clinical": 20, "rna": 200}
    arrays = {"inputs": {m: rng.normal(size=(n, f)).astype(np.float32)
                         for m, f in widths.items()},
              "presence": {m: np.ones(n, bool) for m in widths},
              "bin_index": rng.integers(0, 4, n).astype(np.int32),
              "event": (rng.random(n) < 0.1).astype(np.int32),
              "duration": (1 + rng.exponential(1000, n)).astype(np.float32)}
    trainer = ft.FusionTrainer(c, tuple((m, "tabular") for m in widths)).trainer
    args = np.array([0.01, 0.0125, 0.0167, 0.025], np.float32)
  return trainer, loop.Part(arrays), args


def worker(model, n, pid, port, batch, warmup, steps, platform_name) -> dict:
  import jax
  if platform_name == "cpu":
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 1)
  jax.config.update("jax_enable_compilation_cache", False)
  from jaxsurv import distributed
  if n > 1:
    distributed.initialize("on", f"127.0.0.1:{port}", n, pid, timeout=120,
                           heartbeat_timeout=60,
                           **({"local_device_ids": [pid]} if platform_name == "gpu" else {}))
  import jax.numpy as jnp
  trainer, part, args = _trainer_and_part(model, batch)
  state = trainer.init_state(jax.random.key(0), part)
  batches = [trainer.batch(part, np.arange(i * batch, (i + 1) * batch) % len(part), batch)
             for i in range(2)]
  rng, lr, args = jax.random.key(1), jnp.float32(1e-3), jnp.asarray(args)
  t0 = time.perf_counter()
  state, meas = trainer.train_step(state, batches[0], rng, lr, args)
  jax.block_until_ready(meas)
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(warmup + steps):
    s0 = time.perf_counter()
    state, meas = trainer.train_step(state, batches[i % 2], rng, lr, args)
    jax.block_until_ready((state, meas))
    if i >= warmup:
      times.append(time.perf_counter() - s0)
  return {"processes": n, "batch": batch, "model": model, "step_ms": 1e3 * statistics.median(times),
          "step_ms_min": 1e3 * min(times), "compile_s": compile_s,
          "loss": float(meas["loss"]), "device": jax.devices()[0].device_kind}


def _spawn(args, n: int, batch: int) -> dict:
  from jaxsurv import distributed
  port = distributed.free_port() if n > 1 else 0
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(n), str(pid), str(port),
                             "--model", args.model, "--batch", str(batch), "--warmup",
                             str(args.warmup), "--steps", str(args.steps), "--platform",
                             args.platform], env=env, stdout=subprocess.PIPE, text=True)
           for pid in range(n)]
  try:
    outs = [p.communicate(timeout=1800)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  rows = []
  for p, out in zip(procs, outs):
    if p.returncode != 0:
      raise RuntimeError(f"a benchmark process failed (exit {p.returncode})")
    rows += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
  # The step ends when the slowest process ends it.
  return max(rows, key=lambda r: r["step_ms"])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--worker", nargs=3, type=int, metavar=("N", "PID", "PORT"))
  parser.add_argument("--model", choices=("mmnn", "healnet"), default="mmnn")
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
  args = parser.parse_args(argv)
  if args.worker:
    n, pid, port = args.worker
    print("RESULT " + json.dumps(worker(args.model, n, pid, port, args.batch, args.warmup,
                                        args.steps, args.platform)), flush=True)
    return 0
  rows = []
  for n in args.processes:
    if args.batch % n:
      raise SystemExit(f"--batch {args.batch} does not split over {n} processes")
    many = _spawn(args, n, args.batch)
    local = many if n == 1 else _spawn(args, 1, args.batch // n)
    many["local_step_ms"] = local["step_ms"]
    many["communication_share"] = 1.0 - local["step_ms"] / many["step_ms"]
    rows.append(many)
    print("ROW " + json.dumps(many), flush=True)
  print(f"\nMachine: {common.cpu_model()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.1f}; Python {platform.python_version()}; model {args.model}, "
        f"global batch {args.batch}")
  print("| processes | rows per process | step ms (median) | one process on its rows alone, ms | "
        "communication share | samples/s | compile s |")
  print("|---:|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['processes']} | {r['batch'] // r['processes']} | {r['step_ms']:.1f} | "
          f"{r['local_step_ms']:.1f} | {r['communication_share']:.2f} | "
          f"{r['batch'] / r['step_ms'] * 1e3:.0f} | {r['compile_s']:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
