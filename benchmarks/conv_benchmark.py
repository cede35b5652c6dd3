"""One 3D convolution, forward and forward + gradients: jaxsurv's Conv3D implementations vs torch.

Times ``jaxsurv.models.conv.Conv3D`` (no bias, "SAME" padding, ``--stride``)
on an input ``[batch, grid, grid, grid, in]`` for each ``--impls`` entry
(``"native"``: XLA's 3D convolution; ``"slices"``, ``"cols"``, ``"dot"``,
``"auto"``: see ``jaxsurv/models/conv.py``) and each ``--cpu-convs`` library
of XLA's CPU 2D convolutions (``"xla"``: XLA's own choice, YNNPACK for more
than 16 channels; ``"eigen"``: ``jaxsurv.models.conv.cpu_compiler_options``),
as two jitted programs:

* forward: ``y = conv(x, kernel)``;
* forward + gradients: ``d/d(x, kernel) sum(tanh(y) * g)`` (the ``tanh``
  keeps the forward in the program, as in a network).

The jaxsurv programs are timed interleaved (each rep runs every program once),
so a slow spell of a shared machine falls on all of them; every program's
outputs and gradients are checked against ``"native"``. Torch
(``torch.nn.functional.conv3d``, NCDHW, ``torch.set_num_threads`` = the
usable cores, eager) runs the same two computations in its own process, so
neither framework's idle worker threads compete with the other.

Default shape: the DenseNet-121 dense-layer 3^3 convolution of block 1 at a
32^3 input (batch 2, 8^3 voxels, 128 -> 32 channels).

Commands::

  python benchmarks/conv_benchmark.py                   # block 1 of DenseNet-121 at 32^3
  python benchmarks/conv_benchmark.py --grid 24 --batch 32 --in 8 --out 4   # local config
  python benchmarks/conv_benchmark.py --grid 32 --in 2 --out 64 --kernel 7 --stride 2  # stem
  python benchmarks/conv_benchmark.py --gemm            # and its im2col product alone
  python benchmarks/conv_benchmark.py --write-results   # replace its RESULTS.md section

Extras: torch (``pip install -r benchmarks/requirements.txt``); without it
the torch column is left empty.
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

SECTION = "Conv3D implementations, one convolution (CPU)"
RESULT_TAG = common.RESULT_TAG


def _times_ms(fns: dict, args: tuple, reps: int, block) -> dict:
  """Median and 25th percentile (ms) of each ``fns`` entry, run interleaved."""
  return {name: common.summary_ms(v)
          for name, v in common.interleaved_s(fns, reps, args, block).items()}


def jax_rows(a) -> list[dict]:
  """Times every jaxsurv implementation; one row per implementation."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxsurv.models.conv import Conv3D, cpu_compiler_options

  shape = (a.batch, a.grid, a.grid, a.grid, a.in_channels)
  x = jax.random.normal(jax.random.key(0), shape)
  kernel = 0.05 * jax.random.normal(jax.random.key(1), (a.kernel,) * 3 + (a.in_channels, a.out))
  variants = [(impl if lib == "xla" else f"{impl}, {lib}", impl, lib)
              for impl in a.impls for lib in a.cpu_convs]
  names = [name for name, _, _ in variants]
  fns, outs = {}, {}
  for name, impl, lib in variants:
    conv = Conv3D(a.out, (a.kernel,) * 3, strides=(a.stride,) * 3, use_bias=False, impl=impl)

    def fwd(x, k, conv=conv):
      return conv.apply({"params": {"kernel": k}}, x)

    g = jax.random.normal(jax.random.key(2), jax.eval_shape(fwd, x, kernel).shape)

    def grads(x, k, fwd=fwd, g=g):
      return jax.grad(lambda x, k: jnp.sum(jnp.tanh(fwd(x, k)) * g), (0, 1))(x, k)

    opts = cpu_compiler_options(lib) or None
    fns[f"{name} fwd"] = jax.jit(fwd, compiler_options=opts)
    fns[f"{name} grads"] = jax.jit(grads, compiler_options=opts)
    outs[name] = (fns[f"{name} fwd"](x, kernel), *fns[f"{name} grads"](x, kernel))
  ref = outs.get("native", outs[names[0]])
  gemm = getattr(a, "gemm", False)
  if gemm:
    fns.update(_gemm_fns(a, jax, jnp))
  times = _times_ms(fns, (x, kernel), a.reps, jax.block_until_ready)
  rows = []
  for name in names:
    err = max(float(jnp.max(jnp.abs(u - v)) / (jnp.max(jnp.abs(v)) + 1e-30))
              for u, v in zip(outs[name], ref))
    if not np.isfinite(err) or err > 1e-4:
      raise AssertionError(f"{name}: relative difference {err:.2e} from the reference")
    rows.append({"impl": name, "fwd": times[f"{name} fwd"], "grads": times[f"{name} grads"],
                 "max_rel_diff": err})
  if gemm:
    rows.append({"impl": f"{GEMM} {_gemm_shape(a)}", "fwd": times[f"{GEMM} fwd"],
                 "grads": times[f"{GEMM} grads"]})
  return rows


GEMM = "im2col product alone"


def _gemm_shape(a) -> tuple[int, int, int]:
  """``(M, K, N)`` of the convolution as one matrix product over im2col columns:
  output voxels x (kernel taps * input channels) x output channels."""
  n_out = (a.grid + 2 * (a.kernel // 2) - a.kernel) // a.stride + 1
  return a.batch * n_out ** 3, a.kernel ** 3 * a.in_channels, a.out


def _gemm_fns(a, jax, jnp) -> dict:
  """The convolution's im2col product on ready-made columns, forward and
  forward + gradients, ignoring the (x, kernel) arguments: what XLA's matrix
  product reaches at the convolution's shape, without building the columns."""
  m, k, n = _gemm_shape(a)
  cols = jax.random.normal(jax.random.key(3), (m, k))
  w = 0.05 * jax.random.normal(jax.random.key(4), (k, n))
  g = jax.random.normal(jax.random.key(5), (m, n))
  fwd = jax.jit(lambda c, w: c @ w)
  grads = jax.jit(jax.grad(lambda c, w: jnp.sum(jnp.tanh(c @ w) * g), (0, 1)))
  return {f"{GEMM} fwd": lambda *_: fwd(cols, w), f"{GEMM} grads": lambda *_: grads(cols, w)}


def torch_worker(a) -> dict:
  """The same two computations with torch's conv3d (run in its own process)."""
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  torch.manual_seed(0)
  x = torch.randn(a.batch, a.in_channels, a.grid, a.grid, a.grid, requires_grad=True)
  w = 0.05 * torch.randn(a.out, a.in_channels, a.kernel, a.kernel, a.kernel)
  w.requires_grad_(True)
  pad = a.kernel // 2
  n_out = (a.grid + 2 * pad - a.kernel) // a.stride + 1
  g = torch.randn(a.batch, a.out, n_out, n_out, n_out)

  def fwd():
    with torch.no_grad():
      return torch.nn.functional.conv3d(x, w, stride=a.stride, padding=pad)

  def grads():
    y = torch.nn.functional.conv3d(x, w, stride=a.stride, padding=pad)
    return torch.autograd.grad((torch.tanh(y) * g).sum(), (x, w))

  fns = {"fwd": fwd, "grads": grads}
  if a.gemm:
    m, k, n = _gemm_shape(a)
    cols = torch.randn(m, k, requires_grad=True)
    wm = (0.05 * torch.randn(k, n)).requires_grad_(True)
    gm = torch.randn(m, n)

    def gemm_fwd():
      with torch.no_grad():
        return cols @ wm

    def gemm_grads():
      return torch.autograd.grad((torch.tanh(cols @ wm) * gm).sum(), (cols, wm))

    fns.update({"gemm fwd": gemm_fwd, "gemm grads": gemm_grads})
  times = _times_ms(fns, (), a.reps, lambda _: None)
  rows = [{"impl": f"torch {torch.__version__}", "fwd": times["fwd"], "grads": times["grads"],
           "threads": torch.get_num_threads()}]
  if a.gemm:
    rows.append({"impl": f"torch {GEMM} {_gemm_shape(a)}", "fwd": times["gemm fwd"],
                 "grads": times["gemm grads"]})
  return rows


def _torch_rows(argv: list[str]) -> list[dict]:
  rows, why = common.run_worker(__file__, [*argv, "--worker"], tail_lines=1)
  if why:
    print(f"torch worker {why}", file=sys.stderr)
  return rows or []


def table(rows: list[dict]) -> str:
  lines = ["| implementation | forward ms, median (p25) | forward + gradients ms, median (p25) | "
           "max relative difference from native |", "|---|---:|---:|---:|"]
  for r in rows:
    cell = lambda d: f"{d['median_ms']:.2f} ({d['p25_ms']:.2f})"
    diff = f"{r['max_rel_diff']:.1e}" if "max_rel_diff" in r else "–"
    lines.append(f"| {r['impl']} | {cell(r['fwd'])} | {cell(r['grads'])} | {diff} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--grid", type=int, default=8, help="voxels per side of the input")
  p.add_argument("--in", dest="in_channels", type=int, default=128)
  p.add_argument("--out", type=int, default=32)
  p.add_argument("--kernel", type=int, default=3, help="odd kernel side (voxels)")
  p.add_argument("--stride", type=int, default=1)
  p.add_argument("--impls", nargs="+", default=["native", "slices", "cols", "auto"],
                 choices=["native", "slices", "cols", "dot", "auto"])
  p.add_argument("--cpu-convs", nargs="+", default=["xla", "eigen"], choices=["xla", "eigen"],
                 help="library of XLA's CPU 2D convolutions, per implementation")
  p.add_argument("--reps", type=int, default=60)
  p.add_argument("--gemm", action="store_true",
                 help="also time the convolution's im2col matrix product alone "
                      "([out voxels, taps * in] x [taps * in, out], columns ready-made)")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--write-results", action="store_true")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  argv = sys.argv[1:] if argv is None else list(argv)
  a = p.parse_args(argv)
  if a.kernel % 2 != 1 or min(a.batch, a.grid, a.in_channels, a.out, a.reps, a.stride) < 1:
    p.error("--kernel must be odd and the sizes, --stride and --reps positive")
  if a.worker:
    print(RESULT_TAG + json.dumps(torch_worker(a)), flush=True)
    return 0
  load0 = os.getloadavg()
  rows = jax_rows(a)
  if not a.no_torch:
    rows += _torch_rows([s for s in argv if s != "--write-results"])
  load1 = os.getloadavg()
  import jax
  command = "python benchmarks/conv_benchmark.py " + " ".join(argv)
  text = "\n".join([
      f"## {SECTION}", "",
      f"Measured {time.strftime('%Y-%m-%d')}: `{command}`; {common.cpu_model()}, "
      f"{len(os.sched_getaffinity(0))} cores, jax {jax.__version__} ({jax.default_backend()}); "
      f"load average {load0[0]:.2f} -> {load1[0]:.2f}.", "",
      f"Input [{a.batch}, {a.grid}, {a.grid}, {a.grid}, {a.in_channels}], {a.kernel}^3 kernel "
      f"-> {a.out} channels, \"SAME\", stride {a.stride}. jaxsurv programs interleaved, "
      f"{a.reps} reps each (\", eigen\": every convolution on Eigen, else XLA's own choice of "
      "YNNPACK or Eigen); torch eager NCDHW in its own process. Gradients: of "
      "sum(tanh(y) * g) with respect to the input and the kernel (the forward included)."
      + (f" \"{GEMM} (M, K, N)\": the convolution as one [M, K] x [K, N] matrix product "
         "on ready-made random columns (no im2col), gradients with respect to both factors; "
         "a bound for any im2col formulation." if a.gemm else ""), "",
      table(rows), ""])
  print(text)
  if a.write_results:
    common.write_section(HERE / "RESULTS.md", SECTION, text)
    print(f"wrote the '{SECTION}' section of {HERE / 'RESULTS.md'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
