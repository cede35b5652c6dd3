"""One-shot GPU benchmark: jaxsurv's MMNN step against MONAI's DenseNet121 and the torch reference.

What it measures, per setting (batch x dtype x rematerialisation) at 2 x 128^3:

* ``jaxsurv``: the shared trainer's jitted MMNN train step, built as every MMNN
  run builds it (``jaxsurv.train.make_trainer`` on ``configs/mmnn.py``, the
  paper's DenseNet-121 by default; ``--model local`` for the tiny CPU
  network), ``dtype`` as ``config.dtype`` (bf16: bfloat16 activations,
  float32 parameters) and ``model.image.remat``. Every setting is traced and
  lowered first, then all are compiled at once on a thread pool (XLA's
  compiler releases the GIL), then each runs ``--warmup`` untimed and
  ``--steps`` timed steps. Memory: the executable's device footprint from
  XLA's buffer assignment (``compiled.memory_analysis()``: arguments +
  outputs + temporaries - donated aliases);
* ``monai``: ``monai.networks.nets.DenseNet121(spatial_dims=3,
  in_channels=2, out_channels=12, dropout_prob=0.2)`` as the image branch of
  the same MMNN (clinical MLP, concatenation, three log-hazard heads), the
  same Breslow Cox loss, blend weights, optimiser (SGD + Nesterov) and
  gradient accumulation as ``benchmarks/torch_reference.py``, in
  ``channels_last_3d`` with AMP (``torch.autocast`` bfloat16) in the bf16
  rows, ``torch.backends.cudnn.benchmark = True``;
* ``torch``: ``benchmarks/torch_reference.py`` (the same network as jaxsurv's,
  parameter counts checked equal), NCDHW, AMP in the bf16 rows.

Rematerialisation in the torch rows is ``torch.utils.checkpoint`` around each
dense layer (``use_reentrant=False``). Peak memory of the torch rows is
``torch.cuda.max_memory_allocated`` (reset per setting). Samples/s = batch /
median step time. A setting that runs out of memory is reported as such;
the largest batch that ran is listed per framework, dtype and remat. Each
framework runs in its own process (so one never holds the other's memory),
jaxsurv first; settings left when the ``--budget`` (seconds, whole run) is
spent are reported as skipped. A framework that is not installed is
reported as such, and the others still run.

Commands::

  # a GPU host, fresh checkout: installs the CUDA jax, torch and MONAI, runs
  # everything and writes the "One-shot GPU benchmark" section of RESULTS.md:
  bash benchmarks/gpu_benchmark.sh
  # a GPU host with no network whose Python has the CUDA jax and torch: the
  # missing packages travel as wheels in .whl (gpu_benchmark.sh says how to
  # download them), installed without an index:
  bash benchmarks/gpu_benchmark.sh --wheels .whl
  # CPU smoke test at tiny shapes (what tests/test_gpu_benchmark.py runs):
  python benchmarks/gpu_benchmark.py --model local --grid 16 --batches 2 \\
      --dtypes float32 --remat off on --warmup 1 --steps 1 --results /tmp/R.md

Targets (H100/H200, issue "train step"): >= 1,000 samples/s in bf16 and
>= 1.5x MONAI's samples/s at the same batch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import itertools
import json
import os
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
  if _p not in sys.path:
    sys.path.insert(0, _p)
import common  # pylint: disable=wrong-import-position
import train_step_benchmark as tsb  # pylint: disable=wrong-import-position

SECTION = "One-shot GPU benchmark"
RESULT_TAG = common.RESULT_TAG
FRAMEWORKS = ("jaxsurv", "monai", "torch")
HEADS = ("mm", "image", "clinical")


def _config(model: str, grid: int, batch: int, dtype: str, remat: bool):
  """configs/mmnn.py (paper default, or ``local``) at this setting, augmentation off."""
  from configs import mmnn
  config = mmnn.get_config("local" if model == "local" else None)
  config.data.preprocess.grid = (grid, grid, grid)
  config.batch_size = batch
  config.augment.enabled = False
  config.dtype = dtype
  config.model.image.remat = remat
  return config


def _settings(spec: dict) -> list[dict]:
  """bf16 before fp32 and remat off before on (the targets first), batches ascending."""
  out = []
  for dtype, remat, batch in itertools.product(spec["dtypes"], spec["remat"], spec["batches"]):
    out.append({"batch": batch, "dtype": dtype, "remat": remat})
  return out


def _is_oom(err: BaseException) -> bool:
  text = f"{type(err).__name__} {err}".lower()
  return "out of memory" in text or "resource_exhausted" in text or "outofmemory" in text


def _row(framework: str, setting: dict, **fields) -> dict:
  return {"framework": framework, **setting, **fields}


def _timed(run, warmup: int, steps: int) -> dict:
  """``warmup`` untimed then ``steps`` timed calls of ``run(i) -> {"loss": ...}``
  (``train_step_benchmark._timed_steps``: FloatingPointError on a non-finite loss)."""
  for i in range(warmup):
    run(i)
  times, loss = tsb._timed_steps(run, {"warmup": warmup, "steps": steps}, "train step")  # pylint: disable=protected-access
  return {"step_ms_median": 1e3 * float(np.median(times)), "step_ms_min": 1e3 * min(times),
          "last_loss": loss}


# ----------------------------------------------------------------------------
# jaxsurv worker.
# ----------------------------------------------------------------------------


def jaxsurv_worker(spec: dict) -> list[dict]:
  """Traces every setting, compiles them concurrently, then times each in turn."""
  # Let the largest settings use the whole device (jax preallocates 75% by default).
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  import jax
  import jax.numpy as jnp
  if spec.get("compile_cache"):
    jax.config.update("jax_compilation_cache_dir", spec["compile_cache"])
  else:
    jax.config.update("jax_enable_compilation_cache", False)  # Cold compile times.
  from jaxsurv import train
  from jaxsurv.trainer import loop

  deadline = spec["deadline"]
  dev = jax.devices()[0]
  info = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
          "n_devices": len(jax.devices()), "version": f"jax {jax.__version__}"}
  rows, pending = [], []
  host_batches, device_batches, states = {}, {}, {}
  r_init, r_step = jax.random.split(jax.random.key(0))
  for setting in _settings(spec):
    config = _config(spec["model"], spec["grid"], setting["batch"], setting["dtype"],
                     setting["remat"])
    trainer = train.make_trainer(config)
    b = setting["batch"]
    if b not in host_batches:
      host_batches[b] = []
      for s in range(3):
        h = tsb._random_batch_np(s, b, spec["grid"])  # pylint: disable=protected-access
        host_batches[b].append(loop.Part({"inputs": {"image": h.pop("image"),
                                                     "clinical": h.pop("clinical")},
                                          "presence": {}, **h}))
    try:
      if b not in device_batches:
        device_batches[b] = [trainer.batch(h, np.arange(b), b) for h in host_batches[b]]
      key = setting["remat"]
      if key not in states:  # Parameters do not depend on the batch or the dtype.
        states[key] = trainer.init_state(r_init, host_batches[b][0])
      weights = jnp.full((len(trainer.task.heads),), 1.0 / len(trainer.task.heads), jnp.float32)
      lr = jnp.float32(config.optimizer.lr)
      t0 = time.perf_counter()
      lowered = trainer.train_step.lower(states[key], device_batches[b][0], r_step, lr, weights)
      pending.append((setting, lowered, key, weights, lr, time.perf_counter() - t0))
    except Exception as err:  # pylint: disable=broad-except
      if not _is_oom(err):
        raise
      rows.append(_row("jaxsurv", setting, error="out of memory (inputs)", **info))
  n_params = int(sum(x.size for x in jax.tree.leaves(next(iter(states.values())).params))) \
      if states else None

  compiled = {}

  def compile_one(i):
    t = time.perf_counter()
    try:
      return i, pending[i][1].compile(), time.perf_counter() - t, None
    except Exception as err:  # pylint: disable=broad-except
      return i, None, time.perf_counter() - t, err

  threads = max(1, min(len(pending), spec.get("compile_threads") or os.cpu_count() or 1))
  t_all = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for i, exe, secs, err in pool.map(compile_one, range(len(pending))):
      compiled[i] = (exe, secs, err)
  compile_wall = time.perf_counter() - t_all

  for i, (setting, _, key, weights, lr, lower_s) in enumerate(pending):
    exe, compile_s, err = compiled[i]
    fields = dict(info, n_params=n_params, lower_s=lower_s, compile_s=compile_s,
                  compile_threads=threads, compile_wall_s=compile_wall)
    if err is not None:
      rows.append(_row("jaxsurv", setting, error=("out of memory (compile)" if _is_oom(err)
                                                  else f"{type(err).__name__}: {err}"[:300]),
                       **fields))
      continue
    if time.time() > deadline:
      rows.append(_row("jaxsurv", setting, error="skipped: time budget spent", **fields))
      continue
    mem = exe.memory_analysis()
    if mem is not None:
      fields["memory_mib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                              + mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**20
      fields["memory_kind"] = "XLA buffer assignment"
    state = jax.tree.map(jnp.copy, states[key])
    batches = device_batches[setting["batch"]]

    def run(j):
      nonlocal state
      state, meas = exe(state, batches[j % 3], r_step, lr, weights)
      return jax.block_until_ready(meas)

    try:
      fields.update(_timed(run, spec["warmup"], spec["steps"]))
      fields["samples_per_s"] = setting["batch"] / (fields["step_ms_median"] / 1e3)
    except Exception as err:  # pylint: disable=broad-except
      if not _is_oom(err):
        raise
      fields["error"] = "out of memory"
    del state
    rows.append(_row("jaxsurv", setting, **fields))
  stats = dev.memory_stats() or {}
  for r in rows:
    if "peak_bytes_in_use" in stats:
      r["process_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
  return rows


# ----------------------------------------------------------------------------
# torch workers (MONAI and the reference).
# ----------------------------------------------------------------------------


def _checkpoint_layers(model, layer_cls) -> int:
  """Wraps every ``layer_cls`` module's forward in ``torch.utils.checkpoint``."""
  from torch.utils import checkpoint
  n = 0
  for m in model.modules():
    if isinstance(m, layer_cls):
      m.forward = functools.partial(checkpoint.checkpoint, m.forward, use_reentrant=False)
      n += 1
  return n


def torch_worker(spec: dict) -> list[dict]:
  """Times ``spec["framework"]`` ("monai" or "torch") at every setting, in turn."""
  import torch
  import torch_reference as ref
  framework = spec["framework"]
  if framework == "monai":
    from monai.networks.nets import densenet as monai_densenet
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  cl = framework == "monai"  # MONAI in channels_last_3d; the reference in NCDHW.
  info = {"backend": device.type, "version": f"torch {torch.__version__}",
          "device_kind": (torch.cuda.get_device_name(device) if device.type == "cuda"
                          else common.cpu_model()),
          "layout": "channels_last_3d" if cl else "NCDHW"}
  if framework == "monai":
    import monai
    info["version"] += f", monai {monai.__version__}"
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  rows = []
  for setting in _settings(spec):
    if time.time() > spec["deadline"]:
      rows.append(_row(framework, setting, error="skipped: time budget spent", **info))
      continue
    config = _config(spec["model"], spec["grid"], setting["batch"], setting["dtype"],
                     setting["remat"])
    im = config.model.image
    torch.manual_seed(config.seed)
    model = tsb.reference_mmnn(ref, config)
    layer_cls = ref.DenseLayer
    if framework == "monai":
      # MONAI's own DenseNet (stem 7^3 always), same widths as the config's.
      model.image_encoder = monai_densenet.DenseNet(
          spatial_dims=3, in_channels=2, out_channels=im.features,
          init_features=im.init_features, growth_rate=im.growth_rate,
          block_config=tuple(im.block_config), bn_size=im.bn_size,
          dropout_prob=im.dropout_rate)
      layer_cls = monai_densenet._DenseLayer  # pylint: disable=protected-access
    if setting["remat"]:
      _checkpoint_layers(model, layer_cls)
    model = model.to(device)
    if cl:
      model = model.to(memory_format=torch.channels_last_3d)
    o = config.optimizer
    opt = ref.make_optimizer(model, o.name, o.lr, o.weight_decay, o.get("momentum", 0.9),
                             o.get("nesterov", True))
    step = ref.TrainStep(model, opt, heads=HEADS,
                         blend_weights=torch.full((3,), 1.0 / 3, device=device), augment=None,
                         grad_accum_steps=config.grad_accum_steps,
                         autocast_dtype=torch.bfloat16 if setting["dtype"] == "bfloat16" else None,
                         channels_last=cl)
    fields = dict(info, n_params=ref.count_params(model))
    try:
      batches = [tsb.to_torch_batch(tsb._random_batch_np(s, setting["batch"], spec["grid"]),  # pylint: disable=protected-access
                                    device, cl) for s in range(3)]
      if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

      def run(j):
        meas = step(batches[j % 3])
        sync()
        return meas

      fields.update(_timed(run, max(spec["warmup"], 1), spec["steps"]))
      fields["samples_per_s"] = setting["batch"] / (fields["step_ms_median"] / 1e3)
      if device.type == "cuda":
        fields["memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        fields["memory_kind"] = "torch.cuda.max_memory_allocated"
    except Exception as err:  # pylint: disable=broad-except
      if not _is_oom(err):
        raise
      fields["error"] = "out of memory"
    rows.append(_row(framework, setting, **fields))
    del model, opt, step
    batches = None
    if device.type == "cuda":
      torch.cuda.empty_cache()
  return rows


WORKERS = {"jaxsurv": jaxsurv_worker, "monai": torch_worker, "torch": torch_worker}
IMPORTS = {"jaxsurv": ("jax",), "monai": ("torch", "monai"), "torch": ("torch",)}


def _missing(framework: str) -> str | None:
  import importlib.util
  lacking = [m for m in IMPORTS[framework] if importlib.util.find_spec(m) is None]
  return ", ".join(lacking) + " not installed" if lacking else None


def _run_worker(framework: str, spec: dict) -> list[dict]:
  """One framework in a fresh process; its rows, or one error row per setting."""
  missing = _missing(framework)
  if missing:
    return [_row(framework, s, error=f"skipped: {missing}") for s in _settings(spec)]
  spec = dict(spec, framework=framework)
  timeout = max(30.0, spec["deadline"] - time.time() + 120.0)
  rows, why = common.run_worker(__file__, ["--worker", framework, "--spec", json.dumps(spec)],
                                timeout, tail_lines=8)
  if why:
    return [_row(framework, s, error=f"worker {why}"[:600]) for s in _settings(spec)]
  return rows


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def _f(x, fmt=".1f"):
  return "–" if x is None else format(x, fmt)


def _key(r):
  return (r["batch"], r["dtype"], r["remat"])


def markdown_table(rows: list[dict]) -> str:
  monai = {_key(r): r.get("samples_per_s") for r in rows if r["framework"] == "monai"}
  lines = ["| framework | batch | dtype | remat | samples/s | step ms, median (min) | "
           "compile s | peak device MiB | jaxsurv / MONAI samples/s | note |",
           "|---|---:|---|---|---:|---:|---:|---:|---:|---|"]
  for r in sorted(rows, key=lambda r: (FRAMEWORKS.index(r["framework"]), r["dtype"],
                                       r["remat"], r["batch"])):
    ratio = None
    if r["framework"] == "jaxsurv" and r.get("samples_per_s") and monai.get(_key(r)):
      ratio = r["samples_per_s"] / monai[_key(r)]
    step = (f"{r['step_ms_median']:.1f} ({r['step_ms_min']:.1f})" if "step_ms_median" in r
            else "–")
    lines.append(f"| {r['framework']} | {r['batch']} | {r['dtype']} | "
                 f"{'on' if r['remat'] else 'off'} | {_f(r.get('samples_per_s'))} | {step} | "
                 f"{_f(r.get('compile_s'))} | {_f(r.get('memory_mib'), '.0f')} | "
                 f"{_f(ratio, '.2f')} | {r.get('error', '')} |")
  return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
  """Largest batch that ran, the best bf16 rate and the ratio against MONAI."""
  out = []
  groups = {}
  for r in rows:
    groups.setdefault((r["framework"], r["dtype"], r["remat"]), []).append(r)
  for (fw, dtype, remat), rs in sorted(groups.items()):
    ran = [r["batch"] for r in rs if "samples_per_s" in r]
    oom = [r["batch"] for r in rs if "out of memory" in r.get("error", "")]
    if ran or oom:
      biggest = max(ran) if ran else None
      more = "" if oom else " (the largest tried; none ran out of memory)"
      out.append(f"* Largest batch that ran, {fw} {dtype} remat {'on' if remat else 'off'}: "
                 f"{biggest}{more}" + (f"; out of memory at {min(oom)}" if oom else "") + ".")
  jx = [r for r in rows if r["framework"] == "jaxsurv" and r["dtype"] == "bfloat16"
        and "samples_per_s" in r]
  if jx:
    best = max(jx, key=lambda r: r["samples_per_s"])
    out.append(f"* jaxsurv bf16, best: {best['samples_per_s']:.0f} samples/s at batch "
               f"{best['batch']}, remat {'on' if best['remat'] else 'off'} (target >= 1,000).")
  monai = {_key(r): r["samples_per_s"] for r in rows
           if r["framework"] == "monai" and "samples_per_s" in r}
  ratios = [(r["samples_per_s"] / monai[_key(r)], r) for r in rows
            if r["framework"] == "jaxsurv" and "samples_per_s" in r and _key(r) in monai]
  if ratios:
    lo, hi = min(ratios, key=lambda t: t[0]), max(ratios, key=lambda t: t[0])
    out.append(f"* jaxsurv / MONAI samples/s at the same batch, dtype and remat: "
               f"{lo[0]:.2f} to {hi[0]:.2f} over {len(ratios)} settings (target >= 1.5).")
  return out


def section_text(rows: list[dict], meta: dict) -> str:
  kinds = sorted({f"{r['framework']}: {r['device_kind']} ({r.get('version', '')})"
                  for r in rows if r.get("device_kind")})
  params = sorted({f"{r['framework']} {r['n_params']:,}" for r in rows if r.get("n_params")})
  lines = [f"## {SECTION}", "",
           f"Measured {meta['date']} by `benchmarks/gpu_benchmark.py` (commit {meta['commit']}), "
           f"{meta['wall_s']:.0f} s in all.", "",
           f"* Command: `{meta['command']}`",
           "* Devices: " + "; ".join(kinds) + ".",
           f"* Model: `configs/mmnn.py{':local' if meta['model'] == 'local' else ''}` at "
           f"2 x {meta['grid']}^3, augmentation off, the configured optimiser and gradient "
           f"accumulation; trainable parameters: {', '.join(params)}.",
           f"* Timing: {meta['warmup']} warm-up + {meta['steps']} timed steps per setting on 3 "
           "device-resident random batches; samples/s = batch / median step. jaxsurv: all "
           "settings compiled at once on a thread pool (compile s is each one's wall time "
           "under that load); peak memory = XLA's buffer assignment. torch rows: "
           "`max_memory_allocated`; MONAI in channels_last_3d, the reference in NCDHW; bf16 "
           "rows = `torch.autocast` (AMP). Remat in torch = `torch.utils.checkpoint` per dense "
           "layer.", "", markdown_table(rows), ""]
  lines += summary(rows)
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--model", choices=["paper", "local"], default="paper")
  p.add_argument("--grid", type=int, default=128)
  p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
  p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"],
                 default=["bfloat16", "float32"])
  p.add_argument("--remat", nargs="+", choices=["off", "on"], default=["off", "on"])
  p.add_argument("--frameworks", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--budget", type=float, default=450.0,
                 help="seconds for the whole run; settings left after it are skipped")
  p.add_argument("--compile-threads", type=int, default=None)
  p.add_argument("--compile-cache", default=None, help="use this persistent compilation cache")
  p.add_argument("--results", default=None,
                 help="write the section here (default benchmarks/RESULTS.md, and only when "
                      "jaxsurv ran on a GPU)")
  p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
  p.add_argument("--spec", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.worker:
    rows = WORKERS[args.worker](json.loads(args.spec))
    print(RESULT_TAG + json.dumps(rows), flush=True)
    return 0

  if min(args.batches) < 1 or args.steps < 1 or args.warmup < 0:
    p.error("batches and steps must be >= 1, warmup >= 0")
  t0 = time.time()
  spec = {"model": args.model, "grid": args.grid, "batches": sorted(set(args.batches)),
          "dtypes": sorted(set(args.dtypes)), "remat": sorted({r == "on" for r in args.remat}),
          "warmup": args.warmup, "steps": args.steps, "compile_threads": args.compile_threads,
          "compile_cache": args.compile_cache}
  shares = {"jaxsurv": 0.55, "monai": 0.25, "torch": 0.2}
  total = sum(shares[f] for f in args.frameworks)
  rows, spent = [], 0.0
  for fw in FRAMEWORKS:
    if fw not in args.frameworks:
      continue
    spent += shares[fw] / total
    spec["deadline"] = t0 + args.budget * spent
    got = _run_worker(fw, spec)
    for r in got:
      print(RESULT_TAG + json.dumps(r), flush=True)
    rows += got
  meta = {"date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0,
          "command": "python benchmarks/gpu_benchmark.py " + " ".join(
              sys.argv[1:] if argv is None else argv),
          "model": args.model, "grid": args.grid, "warmup": args.warmup, "steps": args.steps,
          "commit": common.git_commit()}
  text = section_text(rows, meta)
  print(text)
  on_gpu = any(r["framework"] == "jaxsurv" and r.get("backend") == "gpu" for r in rows)
  target = pathlib.Path(args.results) if args.results else (HERE / "RESULTS.md" if on_gpu
                                                            else None)
  if target is not None:
    common.write_section(target, SECTION, text)
    print(f"wrote the '{SECTION}' section of {target}")
  else:
    print("not written: jaxsurv did not run on a GPU (pass --results PATH to write anyway)")
  errors = [r for r in rows if r.get("error") and not r["error"].startswith(("skipped",
                                                                            "out of memory"))]
  for r in errors:
    print(f"FAILED: {json.dumps(r)[:1000]}", file=sys.stderr)
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
