"""MMNN train-step benchmark: jaxsurv's jitted step vs a PyTorch reference, same machine.

For each setting (config x grid x batch x augmentation x dtype) this measures

* jaxsurv: the shared trainer's step (``jaxsurv.trainer.step.train_step``)
  from ``jaxsurv.train.make_trainer``, exactly as every MMNN run builds it
  (``jax.jit`` with ``donate_argnums=(0,)``, the batch sharded over a
  ``("data",)`` mesh with ``NamedSharding``, the state replicated). Trace+lower and compile are timed
  separately (``jit(...).lower(...)``, ``.compile()``), the persistent
  compilation cache is off (unless ``--compile-cache DIR``), then the
  compiled step runs ``--warmup`` untimed and ``--steps`` timed steps, each
  ended by ``jax.block_until_ready``, on 3 device-resident random batches
  taken in turn (normal images and clinical values, exponential durations
  in days, ~40% events);
* the PyTorch reference (``benchmarks/torch_reference.py``): the same
  network, loss, blending, augmentation and optimiser (SGD + Nesterov for the
  paper config, AdamW for ``local``, gradient accumulation as configured),
  eager mode, NCDHW layout unless ``--torch-channels-last``, timed the same
  way (``torch.cuda.synchronize`` on GPU), ``torch.set_num_threads`` equal to
  the cores the measurement may use (``--cores``, set by CPU affinity, from
  which XLA also sizes its thread pool);

and reports compile time, median step time, samples/s, peak memory (GPU:
``memory_stats()['peak_bytes_in_use']`` / ``torch.cuda.max_memory_allocated``;
CPU: the process's peak RSS, plus XLA's temp buffer size from
``compiled.memory_analysis()``), the device kind, a parameters string and
the jaxsurv/torch step-time ratio (> 1: jaxsurv slower). Every measurement
runs in its own subprocess, so peak memory belongs to one setting and one
framework. Parameter counts of the two implementations are checked equal.

It also measures the in-memory input rate at the local config (numpy fancy
indexing of a ``[n, 24, 24, 24, 2]`` float32 cohort by random batch indices
plus ``jax.device_put`` with the data sharding, as ``Trainer.batch`` does)
and compares it, and the "Input pipeline" section of RESULTS.md, with the
local train step's samples/s (the pipeline should deliver >= 5x).

Settings: ``--config local`` (configs/mmnn.py:local, 24^3, tiny DenseNet,
batch 32) and ``--config paper`` (DenseNet-121; default 32^3 batch 2 on CPU,
128^3 and the configured batch 8 on GPU), each with and without augmentation.

Commands::

  # CPU, all defaults: ~13 CPU-minutes, mostly the two cold DenseNet-121
  # compiles (1-2 min each on idle cores; 23-26 min wall at load average 7-10):
  python benchmarks/train_step_benchmark.py
  # DenseNet-121 on a noisy shared VM: 3 alternating jaxsurv/torch rounds
  # of 11 timed steps each, pooled (one cold compile):
  python benchmarks/train_step_benchmark.py --config paper --rounds 3 --steps 11
  # The CPU 2D convolutions on Eigen and on YNNPACK (config.xla_cpu_convolutions
  # "eigen" / "xla"; the "conv" column), one jaxsurv row each:
  python benchmarks/train_step_benchmark.py --config paper --augment off --cpu-convs eigen xla
  # RESULTS.md: also on 1 core (steadier on a shared machine; twice as long):
  python benchmarks/train_step_benchmark.py --cores 2 1 --write-results
  # GPU host (jax 0.11 / Python 3.12 work unchanged): smoke test first,
  python benchmarks/train_step_benchmark.py --device-check
  # then the paper model at full size, fp32 and bf16:
  python benchmarks/train_step_benchmark.py --config paper --grid 128 --batch 8 \\
      --dtype float32 bfloat16 --warmup 10 --steps 50

Output: one JSON line per setting (prefixed ``RESULT``) and a Markdown table.
``--write-results`` replaces the "Train step" section of
``benchmarks/RESULTS.md`` and leaves the other sections alone.
Extras: ``pip install -r benchmarks/requirements.txt`` (PyTorch).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import pathlib
import platform
import re
import resource
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)
import common  # pylint: disable=wrong-import-position

SECTION = "Train step"
N_CLINICAL = 11  # MMNN's clinical input width (standardised, imputed variables).
RESULT_TAG = common.RESULT_TAG


# ----------------------------------------------------------------------------
# Shared helpers (no jax/torch import: the parent process never touches a device).
# ----------------------------------------------------------------------------


def _peak_rss_mib() -> float:
  """Peak resident set size of this process in MiB (Linux ``ru_maxrss`` is KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_model() -> str:
  return common.cpu_model()


def _stats(times: list[float]) -> dict:
  return {"step_s_median": statistics.median(times), "step_s_min": min(times),
          "step_s_max": max(times), "timed_steps": len(times), "step_s": list(times)}


def pool_rounds(results: list[dict]) -> dict:
  """One worker's results from several rounds as one: the first round's fields
  (compile time, memory: the cold round) with the step statistics of all
  rounds' timed steps pooled, and each round's median in ``round_medians_s``.
  A round that failed makes the whole result that round's error."""
  for r in results:
    if "error" in r:
      return r
  out = dict(results[0])
  times = [t for r in results for t in r["step_s"]]
  out.update(_stats(times), rounds=len(results),
             round_medians_s=[r["step_s_median"] for r in results])
  out["samples_per_s"] = out["spec"]["batch"] / out["step_s_median"]
  return out


def _random_batch_np(seed: int, batch: int, grid: int, n_outcomes: int = 2) -> dict:
  """One synthetic batch: normal images/clinical, realistic survival outcomes.

  ``image [batch, grid, grid, grid, 2]`` float32 (z-scored MRI-like),
  ``clinical [batch, 11]``, ``duration [batch, outcomes]`` days
  (exponential, mean 5 years, at least 1 day), ``event`` ~ Bernoulli(0.4)
  (at least one event per outcome, so the Cox loss is never trivially 0).
  """
  rng = np.random.default_rng(seed)
  event = (rng.random((batch, n_outcomes)) < 0.4).astype(np.int32)
  event[0] = 1
  return {
      "image": rng.standard_normal((batch, grid, grid, grid, 2), dtype=np.float32),
      "clinical": rng.standard_normal((batch, N_CLINICAL), dtype=np.float32),
      "duration": (1.0 + rng.exponential(5 * 365.25, (batch, n_outcomes))).astype(np.float32),
      "event": event,
      "outcome_mask": np.ones((batch, n_outcomes), bool),
      "mask": np.ones((batch,), bool),
  }


def _load_config(name: str, grid: int | None, batch: int | None, augment: bool, dtype: str,
                 conv_impl: str | None = None, cpu_convs: str | None = None):
  """configs/mmnn.py (``local`` or the paper default) with benchmark overrides."""
  from configs import mmnn
  config = mmnn.get_config("local" if name == "local" else None)
  if grid is not None:
    config.data.preprocess.grid = (grid, grid, grid)
  if batch is not None:
    config.batch_size = batch
  config.augment.enabled = augment
  config.dtype = dtype
  if conv_impl is not None:
    config.model.image.conv_impl = conv_impl
  if cpu_convs is not None:
    config.xla_cpu_convolutions = cpu_convs
  return config


def _param_string(config) -> str:
  im, cl = config.model.image, config.model.clinical
  return (f"DenseNet3D(stem={im.get('stem_kernel', 7)}^3, init={im.init_features}, "
          f"growth={im.growth_rate}, "
          f"blocks={tuple(im.block_config)}, bn_size={im.bn_size}, drop={im.dropout_rate}) + "
          f"ClinicalMLP({N_CLINICAL}->{'-'.join(map(str, cl.hidden_sizes))}->{cl.features}), "
          f"concat, 3 heads x {len(config.data.outcomes)} outcomes; "
          f"{config.optimizer.name}, accum {config.grad_accum_steps}")


# ----------------------------------------------------------------------------
# Workers (each runs in its own process).
# ----------------------------------------------------------------------------


def _pin_cores(spec: dict) -> int:
  """Restricts this process to its first ``spec["cores"]`` CPUs (before jax/torch start).

  XLA sizes its CPU thread pool from the CPUs the process may use, and
  torch gets the same number of threads, so both frameworks run on the same
  cores. Unless ``spec["malloc"] == "default"`` it also applies
  ``jaxsurv.malloc.reuse_freed_memory`` (as a jaxsurv command does), before the
  frameworks start. Returns the number of usable CPUs.
  """
  from jaxsurv import malloc
  malloc.reuse_freed_memory({malloc.ENV: spec.get("malloc", "reuse")})
  allowed = sorted(os.sched_getaffinity(0))
  cores = spec.get("cores") or len(allowed)
  if cores < len(allowed):
    os.sched_setaffinity(0, set(allowed[:cores]))
  return len(os.sched_getaffinity(0))


def _jax_setup(spec: dict):
  _pin_cores(spec)
  import jax
  from jaxsurv import cli
  # As a jaxsurv command runs it (--cpu_async_dispatch: "async").
  cli.setup_cpu_dispatch(spec.get("cpu_dispatch", "sync") == "async")
  if spec.get("compile_cache"):
    jax.config.update("jax_compilation_cache_dir", spec["compile_cache"])
  else:
    try:  # Time real compilation, never a persistent-cache hit.
      jax.config.update("jax_enable_compilation_cache", False)
    except (AttributeError, KeyError, ValueError):
      pass
  return jax


def _resolve_defaults(spec: dict, backend: str) -> dict:
  """Fills grid/batch left as None: the config's own, or 32^3 batch 2 for paper on CPU."""
  spec = dict(spec)
  if spec["config"] == "paper" and backend == "cpu":
    spec["grid"] = spec["grid"] or 32
    spec["batch"] = spec["batch"] or 2
  config = _load_config(spec["config"], spec["grid"], spec["batch"], spec["augment"],
                        spec["dtype"], spec.get("conv_impl"), spec.get("cpu_convs"))
  spec["grid"] = config.data.preprocess.grid[0]
  spec["batch"] = config.batch_size
  spec["cpu_convs"] = config.get("xla_cpu_convolutions", "xla")
  return spec


def _timed_steps(run, spec: dict, what: str) -> tuple[list[float], float]:
  """Times ``spec["steps"]`` calls of ``run(i)`` (after the warm-up steps).

  Returns:
    ``(seconds per step, last loss)``.

  Raises:
    FloatingPointError: the last loss is not finite.
  """
  times = []
  for i in range(spec["steps"]):
    s = time.perf_counter()
    meas = run(spec["warmup"] + i)
    times.append(time.perf_counter() - s)
  loss = float(meas["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"{what} gave a non-finite loss {loss} for {spec}")
  return times, loss


def jax_worker(spec: dict) -> dict:
  """Compiles and times jaxsurv's train step for one setting."""
  jax = _jax_setup(spec)
  import jax.numpy as jnp
  from jaxsurv import train
  from jaxsurv.trainer import loop

  spec = _resolve_defaults(spec, jax.default_backend())
  config = _load_config(spec["config"], spec["grid"], spec["batch"], spec["augment"],
                        spec["dtype"], spec.get("conv_impl"), spec.get("cpu_convs"))
  n_dev = len(jax.devices())
  if config.batch_size % n_dev:
    raise ValueError(f"batch {config.batch_size} must be divisible by the {n_dev} devices")

  # The shared trainer, built as every MMNN run builds it (jaxsurv.train.make_trainer).
  trainer = train.make_trainer(config)
  heads = trainer.task.heads
  g = spec["grid"]
  host = [_random_batch_np(s, config.batch_size, g) for s in range(3)]
  host = [loop.Part({"inputs": {"image": h.pop("image"), "clinical": h.pop("clinical")},
                     "presence": {}, **h}) for h in host]
  rng_init, rng_loop = jax.random.split(jax.random.key(config.seed))
  state = trainer.init_state(rng_init, host[0])
  n_params = int(sum(x.size for x in jax.tree.leaves(state.params)))
  batches = [trainer.batch(h, np.arange(config.batch_size), config.batch_size) for h in host]
  weights = jnp.full((len(heads),), 1.0 / len(heads), jnp.float32)
  lr = jnp.float32(config.optimizer.lr)
  jitted = trainer.train_step
  jax.block_until_ready((state, batches))

  t0 = time.perf_counter()
  lowered = jitted.lower(state, batches[0], rng_loop, lr, weights)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  mem = compiled.memory_analysis()

  def run(i):
    nonlocal state
    state, meas = compiled(state, batches[i % 3], rng_loop, lr, weights)
    jax.block_until_ready((state, meas))
    return meas

  for i in range(spec["warmup"]):
    run(i)
  times, loss = _timed_steps(run, spec, "jaxsurv train step")

  dev = jax.devices()[0]
  out = {"framework": "jaxsurv", "spec": spec, "backend": jax.default_backend(),
         "cores": len(os.sched_getaffinity(0)),
         "device_kind": dev.device_kind, "n_devices": n_dev, "n_params": n_params,
         "params": _param_string(config), "lower_s": t1 - t0, "compile_s": t2 - t1,
         **_stats(times), "last_loss": loss, "peak_rss_mib": _peak_rss_mib(),
         "jax_version": jax.__version__}
  out["samples_per_s"] = config.batch_size / out["step_s_median"]
  if mem is not None:
    out["xla_temp_mib"] = mem.temp_size_in_bytes / 2**20
    out["xla_argument_mib"] = mem.argument_size_in_bytes / 2**20
  stats = [d.memory_stats() for d in jax.local_devices()]
  if all(s and "peak_bytes_in_use" in s for s in stats):
    out["peak_device_mib"] = max(s["peak_bytes_in_use"] for s in stats) / 2**20
  return out


def reference_mmnn(ref, config):
  """``torch_reference.MMNN`` (module ``ref``) with the widths of an MMNN ``config``."""
  im, clin = config.model.image, config.model.clinical
  return ref.MMNN(
      N_CLINICAL, n_outcomes=len(config.data.outcomes), in_channels=2,
      image_kwargs=dict(init_features=im.init_features, growth_rate=im.growth_rate,
                        block_config=tuple(im.block_config), bn_size=im.bn_size,
                        dropout_rate=im.dropout_rate, features=im.features,
                        head_dropout_rate=im.head_dropout_rate,
                        stem_kernel=im.get("stem_kernel", 7)),
      clinical_kwargs=dict(hidden_sizes=tuple(clin.hidden_sizes), features=clin.features,
                           dropout_rate=clin.dropout_rate))


def to_torch_batch(b: dict, device, channels_last: bool) -> dict:
  """A ``_random_batch_np`` batch as torch tensors on ``device`` (image NCDHW, or
  ``channels_last_3d`` memory)."""
  import torch
  image = torch.from_numpy(b["image"]).permute(0, 4, 1, 2, 3).contiguous(
      memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
  return {"image": image.to(device), "clinical": torch.from_numpy(b["clinical"]).to(device),
          "duration": torch.from_numpy(b["duration"]).to(device),
          "event": torch.from_numpy(b["event"]).float().to(device)}


def torch_worker(spec: dict) -> dict:
  """Times the PyTorch reference step for one setting (grid/batch already resolved)."""
  cores = _pin_cores(spec)
  import torch
  import torch_reference as ref

  config = _load_config(spec["config"], spec["grid"], spec["batch"], spec["augment"],
                        spec["dtype"], spec.get("conv_impl"), spec.get("cpu_convs"))
  torch.manual_seed(config.seed)
  torch.set_num_threads(cores)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  cl = spec.get("torch_channels_last", False)
  model = reference_mmnn(ref, config).to(device)
  if cl:
    model = model.to(memory_format=torch.channels_last_3d)
  o = config.optimizer
  opt = ref.make_optimizer(model, o.name, o.lr, o.weight_decay, o.get("momentum", 0.9),
                           o.get("nesterov", True))
  heads = ("mm", "image", "clinical")
  aug = config.augment
  step = ref.TrainStep(
      model, opt, heads=heads, blend_weights=torch.full((3,), 1.0 / 3, device=device),
      augment=(dict(flip_prob=aug.flip_prob, max_rotation_deg=aug.max_rotation_deg,
                    zoom_range=tuple(aug.zoom_range)) if aug.enabled else None),
      grad_accum_steps=config.grad_accum_steps,
      autocast_dtype=torch.bfloat16 if spec["dtype"] == "bfloat16" else None,
      channels_last=cl)

  batches = [to_torch_batch(_random_batch_np(s, config.batch_size, spec["grid"]), device, cl)
             for s in range(3)]
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()

  def run(i):
    meas = step(batches[i % 3])
    sync()
    return meas

  t0 = time.perf_counter()
  run(0)  # First step: allocations, oneDNN/cuDNN algorithm selection.
  first_s = time.perf_counter() - t0
  for i in range(1, spec["warmup"]):
    run(i)
  times, loss = _timed_steps(run, spec, "torch reference step")
  out = {"framework": "torch", "spec": spec, "device": device.type,
         "device_kind": (torch.cuda.get_device_name(device) if device.type == "cuda"
                         else _cpu_model()),
         "n_params": ref.count_params(model), "first_step_s": first_s, **_stats(times),
         "last_loss": loss, "peak_rss_mib": _peak_rss_mib(), "torch_version": torch.__version__,
         "threads": torch.get_num_threads(),
         "layout": "NDHWC (channels_last_3d)" if cl else "NCDHW (contiguous)"}
  out["samples_per_s"] = config.batch_size / out["step_s_median"]
  if device.type == "cuda":
    out["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
  return out


def pipeline_worker(spec: dict) -> dict:
  """In-memory gather + device_put rate at the local grid (as ``Trainer.batch``)."""
  jax = _jax_setup(spec)
  from jax.sharding import NamedSharding, PartitionSpec as P
  n, grid, batch = spec["n_patients"], spec["grid"], spec["batch"]
  cohort = _random_batch_np(123, n, grid)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  data_sh = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(0)

  def one():
    idx = rng.choice(n, batch, replace=False)
    b = {k: v[idx] for k, v in cohort.items()}
    jax.block_until_ready(jax.device_put(b, data_sh))

  for _ in range(3):
    one()
  times = []
  for _ in range(spec["batches"]):
    s = time.perf_counter()
    one()
    times.append(time.perf_counter() - s)
  med = statistics.median(times)
  return {"framework": "pipeline", "spec": spec, "batch_s_median": med,
          "samples_per_s": batch / med, "samples_per_s_mean": batch * len(times) / sum(times),
          "mb_per_s": cohort["image"][:batch].nbytes / med / 1e6,
          "device_kind": jax.devices()[0].device_kind}


WORKERS = {"jax": jax_worker, "torch": torch_worker, "pipeline": pipeline_worker}


def _run_worker(kind: str, spec: dict, timeout: float) -> dict:
  """Runs one worker in a fresh process; returns its result or ``{"error": ...}``."""
  result, why = common.run_worker(__file__, ["--worker", kind, "--spec", json.dumps(spec)],
                                  timeout)
  return {"error": f"{kind} worker {why}"} if why else result


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def _fmt(x, spec=".2f", scale=1.0):
  return "–" if x is None else format(x * scale, spec)


def _dispatch_label(row: dict) -> str:
  """", async dispatch" for a row run with JAX's worker-thread dispatch, else ""
  (jaxsurv's default, inline)."""
  return ", async dispatch" if row.get("cpu_dispatch") == "async" else ""


def _conv_label(row: dict) -> str:
  """The "conv" column: DenseNet3D conv_impl, the CPU convolution library, then
  the CPU dispatch (``_dispatch_label``)."""
  library = (row.get("jaxsurv") or {}).get("spec", {}).get("cpu_convs")
  return (row.get("conv_impl", "native") + (f", {library}" if library else "")
          + _dispatch_label(row))


def markdown_table(rows: list[dict]) -> str:
  """One row per setting; step times as "median (min)" in ms."""
  lines = ["| config | grid | batch | augment | dtype | cores | conv | jaxsurv trace+lower s | jaxsurv compile s | "
           "jaxsurv step ms, median (min) | jaxsurv samples/s | jaxsurv peak MiB | XLA temp MiB | "
           "torch step ms, median (min) | torch samples/s | torch peak MiB | "
           "jaxsurv/torch step time, median (min) |",
           "|---|---:|---:|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    j, t = r.get("jaxsurv") or {}, r.get("torch") or {}
    mem_j = j.get("peak_device_mib", j.get("peak_rss_mib"))
    mem_t = t.get("peak_device_mib", t.get("peak_rss_mib"))
    step = lambda d: (f"{_fmt(d.get('step_s_median'), '.0f', 1e3)} "
                      f"({_fmt(d.get('step_s_min'), '.0f', 1e3)})")
    lines.append(
        f"| {r['config']} | {r['grid']}^3 | {r['batch']} | {'on' if r['augment'] else 'off'} | "
        f"{r['dtype']} | {r.get('cores', '–')} | {_conv_label(r)} | "
        f"{_fmt(j.get('lower_s'), '.1f')} | {_fmt(j.get('compile_s'), '.1f')} | "
        f"{step(j)} | {_fmt(j.get('samples_per_s'), '.2f')} | "
        f"{_fmt(mem_j, '.0f')} | {_fmt(j.get('xla_temp_mib'), '.0f')} | "
        f"{step(t)} | {_fmt(t.get('samples_per_s'), '.2f')} | "
        f"{_fmt(mem_t, '.0f')} | {_fmt(r.get('ratio_jax_over_torch'), '.2f')} "
        f"({_fmt(r.get('ratio_min_jax_over_torch'), '.2f')}) |")
  return "\n".join(lines)


def _input_pipeline_rows(results_md: pathlib.Path) -> list[tuple[str, str, float]]:
  """(grid, reader, samples/s median) rows of the "Input pipeline" table, if present."""
  if not results_md.is_file():
    return []
  m = re.search(r"^## Input pipeline\n(.*?)(?=^## |\Z)", results_md.read_text(), re.S | re.M)
  if not m:
    return []
  rows = []
  for line in m.group(1).splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) >= 3 and re.fullmatch(r"\d+\^3", cells[0]):
      try:
        rows.append((cells[0], cells[1], float(cells[2])))
      except ValueError:
        pass
  return rows


def pipeline_notes(rows: list[dict], pipe: dict | None, results_md: pathlib.Path) -> list[str]:
  """The >= 5x margin check of input rate over the local train step's samples/s.

  Compares with the in-memory rate measured here and with the "Input
  pipeline" section's readers at the smallest grid there that is at least
  the local grid (a larger volume reads slower, so the check is conservative).
  """
  local = [r for r in rows
           if r["config"] == "local" and (r.get("jaxsurv") or {}).get("samples_per_s")]
  if not local:
    return []
  section = _input_pipeline_rows(results_md)
  grids = sorted({int(g.split("^")[0]) for g, _, _ in section})
  at = [g for g in grids if g >= local[0]["grid"]]
  section = [row for row in section if at and row[0] == f"{at[0]}^3"]
  notes = []
  for r in local:
    rate = r["jaxsurv"]["samples_per_s"]
    parts = []
    if pipe and "samples_per_s" in pipe:
      ratio = pipe["samples_per_s"] / rate
      parts.append(f"in-memory gather + `device_put` at {pipe['spec']['grid']}^3 (measured here) "
                   f"{pipe['samples_per_s']:.0f} samples/s = {ratio:.0f}x "
                   f"({'>= 5x' if ratio >= 5 else '**< 5x**'})")
    for grid, reader, sps in section:
      ratio = sps / rate
      parts.append(f"{reader} at {grid} (Input pipeline section) {sps:.0f} samples/s = "
                   f"{ratio:.1f}x ({'>= 5x' if ratio >= 5 else '**< 5x**'})")
    notes.append(f"Train step at local {r['grid']}^3 batch {r['batch']}, {r.get('cores')} "
                 f"core(s), augmentation "
                 f"{'on (as configured)' if r['augment'] else 'off'}, {r['dtype']}"
                 f"{_dispatch_label(r)}: "
                 f"**{rate:.1f} samples/s**; " + "; ".join(parts) + ".")
  return notes


def write_section(path: pathlib.Path, text: str) -> None:
  """Replaces (or appends) the ``## Train step`` section of RESULTS.md, leaving others alone."""
  common.write_section(path, SECTION, text)



def section_text(rows, pipe, notes, meta) -> str:
  dk = sorted({(r.get("jaxsurv") or {}).get("device_kind", "?") for r in rows})
  jv = next(((r.get("jaxsurv") or {}).get("jax_version") for r in rows if r.get("jaxsurv")), "?")
  tv = next(((r.get("torch") or {}).get("torch_version") for r in rows if r.get("torch")), "?")
  layout = next(((r.get("torch") or {}).get("layout") for r in rows if r.get("torch")), "?")
  la0, la1 = meta["loadavg_start"], meta["loadavg_end"]
  # The benchmark itself keeps about one thread runnable, so only a load above
  # the core count means other jobs competed for the cores.
  noisy = max(la0[0], la1[0]) > meta["cores"]
  lines = [
      f"## {SECTION}", "",
      f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/train_step_benchmark.py` "
      f"(commit {common.git_commit()}).", "",
      f"* Machine: {meta['cpu']}, {meta['cores']} cores; JAX devices: {', '.join(dk)}; "
      f"Python {platform.python_version()}.",
      f"* Packages: jax/jaxlib {jv}, torch {tv} (eager, {layout}, "
      "`torch.set_num_threads` = the row's cores).",
      "* Cores: each measurement runs in its own process pinned (CPU affinity) to the row's "
      "number of cores; XLA sizes its CPU thread pool from them.",
      f"* Allocator: glibc malloc `{meta.get('malloc', 'reuse')}` in both frameworks' "
      "processes (`reuse`: `jaxsurv.malloc.reuse_freed_memory`, as jaxsurv commands set it; "
      "`default`: glibc's own settings, as JAXSURV_MALLOC=default).",
      "* CPU dispatch: jaxsurv's CPU programs run in the calling thread "
      "(`jax_cpu_enable_async_dispatch` off, as jaxsurv commands run them; rows whose conv "
      "column says \"async dispatch\": JAX's default worker thread, a command's "
      "`--cpu_async_dispatch`).",
      f"* Command: `{meta['command']}`",
      "* Load average (1, 5, 15 min): start " + ", ".join(f"{x:.2f}" for x in la0)
      + "; end " + ", ".join(f"{x:.2f}" for x in la1) + "."
      + (" **The machine is shared with other jobs and was loaded: CPU timings are noisy "
         "(probably inflated, up to ~2x).** With more runnable threads than cores, "
         "multi-threaded steps (torch's OpenMP regions in particular) can stall at every "
         "thread barrier, so medians on several cores swing widely between runs; the 1-core rows "
         "and the minima are the steadier comparison." if noisy else ""),
      "* jaxsurv: the shared trainer's step (`jaxsurv.train.make_trainer`; `donate_argnums=(0,)`, "
      "batch `NamedSharding` over a `(\"data\",)` mesh, replicated state); persistent "
      "compilation cache off, so compile times are cold. Torch: "
      "`benchmarks/torch_reference.py`, the same network (parameter counts checked equal), "
      "Breslow Cox loss via sort + `logcumsumexp`, the same optimiser (AdamW for local, "
      "SGD + Nesterov for paper) and gradient accumulation, augmentation via `affine_grid` + "
      "`grid_sample`.",
      f"* Timing: {meta['timing']}; inputs rotate among 3 device-resident random batches "
      "(normal images/clinical, exponential durations in days, ~40% events). Step time is "
      "the median; samples/s = batch / median. Peak RSS is the whole process (includes "
      "compilation for jaxsurv); XLA temp = `compiled.memory_analysis().temp_size_in_bytes`.",
      "* Ratio = jaxsurv step time / torch step time (> 1: jaxsurv slower), of the medians "
      "and, in brackets, of the minima (the minimum is the less load-sensitive estimate on a "
      "shared machine). Peak MiB: device peak on GPU, process peak RSS on CPU.", "",
      markdown_table(rows), "",
      "Parameters:", ""]
  seen = set()
  for r in rows:
    j = r.get("jaxsurv") or {}
    key = (r["config"], j.get("params"))
    if j and key not in seen:
      seen.add(key)
      lines.append(f"* {r['config']}: {j['params']}; {j['n_params']:,} parameters "
                   f"(torch {(r.get('torch') or {}).get('n_params', '–'):,}).")
  errors = [f"* {r['config']} {r['grid']}^3 aug={r['augment']}: {k}: {r[k]['error']}"
            for r in rows for k in ("jaxsurv", "torch") if (r.get(k) or {}).get("error")]
  if errors:
    lines += ["", "Errors:", ""] + errors
  lines += ["", "Input rate vs train step (the pipeline should deliver >= 5x the step's "
            "samples/s):", ""]
  if pipe and "samples_per_s" in pipe:
    lines.append(f"* In-memory gather (numpy fancy indexing of a [{pipe['spec']['n_patients']}, "
                 f"{pipe['spec']['grid']}, {pipe['spec']['grid']}, {pipe['spec']['grid']}, 2] "
                 f"float32 cohort by random indices, batch {pipe['spec']['batch']}, + "
                 f"`jax.device_put` with the data sharding): {pipe['samples_per_s']:.0f} "
                 f"samples/s (median of {pipe['spec']['batches']} batches, "
                 f"{pipe['mb_per_s']:.0f} MB/s of image).")
  lines += [f"* {n}" for n in notes]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", nargs="+", choices=["local", "paper"], default=["local", "paper"])
  p.add_argument("--grid", type=int, default=None,
                 help="cubic grid (default: local 24; paper 32 on CPU, 128 on GPU)")
  p.add_argument("--batch", type=int, default=None,
                 help="global batch (default: local 32; paper 2 on CPU, 8 on GPU)")
  p.add_argument("--augment", choices=["on", "off", "both"], default="both")
  p.add_argument("--dtype", nargs="+", choices=["float32", "bfloat16"], default=["float32"])
  p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2)")
  p.add_argument("--steps", type=int, default=None, help="timed steps (default local 15, paper 7)")
  p.add_argument("--rounds", type=int, default=1,
                 help="alternate the jaxsurv and torch processes this many times per setting "
                      "(jax, torch, jax, torch, ...; --steps timed steps each) and pool the step "
                      "times, so a slow spell of a shared machine falls on both; later jaxsurv "
                      "rounds load the first round's compiled step from a temporary "
                      "compilation cache (compile time: the first, cold round)")
  p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--cores", type=int, nargs="+", default=[len(os.sched_getaffinity(0))],
                 help="CPU cores per measurement (affinity; torch threads = cores, XLA sizes its "
                      "pool from them); several values repeat every setting (default: all)")
  p.add_argument("--torch-channels-last", action="store_true")
  p.add_argument("--conv-impl", nargs="+", choices=["auto", "native", "slices"],
                 default=["auto"], help="jaxsurv's 3^3 convolutions (DenseNet3D conv_impl); "
                 "several: one jaxsurv row each against the same torch run")
  p.add_argument("--cpu-convs", nargs="+", choices=["config", "xla", "eigen"],
                 default=["config"], help="library of the CPU 2D convolutions "
                 "(config.xla_cpu_convolutions; 'config': the config's own); several: one "
                 "jaxsurv row each against the same torch run")
  p.add_argument("--cpu-dispatch", nargs="+", choices=["sync", "async"], default=["sync"],
                 help="jaxsurv's CPU programs run in the calling thread ('sync', as jaxsurv "
                 "commands run them) or on JAX's worker thread ('async', JAX's default, a "
                 "command's --cpu_async_dispatch); several: one jaxsurv row each against the "
                 "same torch run")
  p.add_argument("--malloc", choices=["default", "reuse"], default="reuse",
                 help="glibc malloc settings in both frameworks' worker processes: 'reuse' "
                 "(jaxsurv.malloc, as jaxsurv commands set it), or glibc's defaults (as "
                 "JAXSURV_MALLOC=default)")
  p.add_argument("--pipeline-patients", type=int, default=512)
  p.add_argument("--pipeline-batches", type=int, default=100)
  p.add_argument("--compile-cache", default=None, help="use this persistent compilation cache")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per worker process")
  p.add_argument("--device-check", action="store_true",
                 help="quick smoke run (local config, 1+2 steps) to check a new host, e.g. GPU")
  p.add_argument("--write-results", action="store_true",
                 help="replace the 'Train step' section of benchmarks/RESULTS.md")
  p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.rounds < 1:
    p.error(f"--rounds must be at least 1, got {args.rounds}")

  if args.worker:
    result = WORKERS[args.worker](json.loads(args.spec))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0

  if args.device_check:
    args.config, args.augment, args.warmup, args.steps = ["local"], "on", 1, 2
    args.pipeline_batches = 10
  meta = {"malloc": args.malloc, "cpu": _cpu_model(), "cores": os.cpu_count(),
          "loadavg_start": os.getloadavg(),
          "command": "python benchmarks/train_step_benchmark.py "
                     + " ".join(sys.argv[1:] if argv is None else argv)}
  print(f"load average at start: {meta['loadavg_start']}", flush=True)
  augs = {"on": [True], "off": [False], "both": [False, True]}[args.augment]
  defaults = {"local": (2, 15), "paper": (2, 7)}
  timing = []
  pipe = None
  if "local" in args.config:
    pipe = _run_worker("pipeline", {"n_patients": args.pipeline_patients, "grid": 24,
                                    "batch": 32, "batches": args.pipeline_batches,
                                    "compile_cache": args.compile_cache}, args.timeout)
    print(RESULT_TAG + json.dumps(pipe), flush=True)
  rows = []
  tmp_cache = tempfile.TemporaryDirectory(prefix="jaxsurv_bench_cache_")
  for name in args.config:
    warmup = args.warmup if args.warmup is not None else defaults[name][0]
    steps = args.steps if args.steps is not None else defaults[name][1]
    timing.append(f"{name}: {warmup} warm-up + {steps} timed steps")
    for cores in args.cores:
      for dtype in args.dtype:
        for aug in augs:
          t = None  # One torch run per setting, shared by the conv_impl/cpu_convs/dispatch rows.
          for impl, convs, dispatch in itertools.product(args.conv_impl, args.cpu_convs,
                                                         args.cpu_dispatch):
            spec = {"config": name, "grid": args.grid, "batch": args.batch, "augment": aug,
                    "dtype": dtype, "warmup": warmup, "steps": steps, "cores": cores,
                    "compile_cache": args.compile_cache,
                    "torch_channels_last": args.torch_channels_last, "conv_impl": impl,
                    "cpu_convs": None if convs == "config" else convs,
                    "malloc": args.malloc, "cpu_dispatch": dispatch}
            if args.rounds > 1:  # Interleaved rounds, pooled (see --rounds).
              spec["compile_cache"] = args.compile_cache or tempfile.mkdtemp(dir=tmp_cache.name)
              js, ts = [], []
              for _ in range(args.rounds):
                js.append(_run_worker("jax", spec, args.timeout))
                if "error" in js[-1] or args.no_torch:
                  continue
                ts.append(_run_worker("torch", js[-1]["spec"], args.timeout))
              j = pool_rounds(js)
              if ts:
                t = pool_rounds(ts)
            else:
              j = _run_worker("jax", spec, args.timeout)
            resolved = j.get("spec", spec)
            row = {"config": name, "grid": resolved["grid"], "batch": resolved["batch"],
                   "augment": aug, "dtype": dtype, "cores": j.get("cores", cores),
                   "conv_impl": impl, "cpu_dispatch": dispatch, "jaxsurv": j}
            if not args.no_torch and "error" not in j:
              if t is None:
                t = _run_worker("torch", resolved, args.timeout)
              row["torch"] = t
              if "step_s_median" in t:
                row["ratio_jax_over_torch"] = j["step_s_median"] / t["step_s_median"]
                row["ratio_min_jax_over_torch"] = j["step_s_min"] / t["step_s_min"]
                if t["n_params"] != j["n_params"]:
                  row["param_mismatch"] = f"jaxsurv {j['n_params']} vs torch {t['n_params']}"
            rows.append(row)
            print(RESULT_TAG + json.dumps(row), flush=True)
  tmp_cache.cleanup()
  meta["loadavg_end"] = os.getloadavg()
  meta["timing"] = "; ".join(timing)
  if args.rounds > 1:
    meta["timing"] += (f"; {args.rounds} rounds per setting, jaxsurv and torch processes "
                       "alternating, step times pooled (later jaxsurv rounds load the compiled "
                       "step from the first round's compilation cache; compile time from the "
                       "first, cold round)")
  print(f"load average at end: {meta['loadavg_end']}", flush=True)
  print()
  print(markdown_table(rows))
  results_md = HERE / "RESULTS.md"
  notes = pipeline_notes(rows, pipe, results_md)
  print("\n".join(notes))
  failed = [r for r in rows if "error" in r["jaxsurv"] or "error" in (r.get("torch") or {})
            or "param_mismatch" in r]
  for r in failed:
    print(f"FAILED/MISMATCH: {json.dumps(r)[:2000]}", file=sys.stderr)
  if args.write_results and not args.device_check:
    write_section(results_md, section_text(rows, pipe, notes, meta))
    print(f"wrote the '{SECTION}' section of {results_md}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
