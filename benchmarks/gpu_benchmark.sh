#!/usr/bin/env bash
# One-shot GPU benchmark: jaxsurv's MMNN step against MONAI's DenseNet121 and the torch
# reference at 2 x 128^3, batches 8/16/32/64, bf16 and fp32, remat on and off
# (benchmarks/gpu_benchmark.py says what each row measures).
#
#   bash benchmarks/gpu_benchmark.sh                 # on a fresh checkout on a GPU host
#   bash benchmarks/gpu_benchmark.sh --wheels .whl   # offline GPU host: wheels carried in
#   bash benchmarks/gpu_benchmark.sh --check         # only say what is missing
#   bash benchmarks/gpu_benchmark.sh --no-install -- --budget 300   # flags after -- go to
#                                                    # benchmarks/gpu_benchmark.py
#
# What the benchmark needs: jax on a GPU, torch with CUDA, MONAI, and the packages that
# jaxsurv's training path imports (flax, optax, orbax-checkpoint, chex, ml-collections,
# numpy, scipy, scikit-learn, pandas, nibabel, SimpleITK).
#
# 1. --wheels DIR installs every wheel in DIR, without dependencies and without any
#    package index (DIR relative to the current folder), into a private folder put first on
#    PYTHONPATH
#    (${TMPDIR:-/tmp}/jaxsurv-gpu-site). That is for a GPU host with no network whose
#    Python already has jax on the GPU and torch with CUDA. Make DIR on a machine that
#    has a package index, for the host's Python version (3.12 below):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#        --implementation cp --platform manylinux_2_28_x86_64 \
#        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#        ml-collections==1.1.0 nibabel==5.4.2 SimpleITK==2.5.7 monai==1.6.1
#    (the versions of requirements.txt; `--check` on the host lists what it lacks).
# 2. Unless --no-install is given, what is still missing is installed from a package
#    index: when jax already runs on the GPU and torch has CUDA, only the missing packages,
#    into .venv-gpu layered on the host Python's packages (its CUDA jax and torch are kept,
#    also when that Python is itself a virtual environment); otherwise .venv-gpu gets requirements.txt, the CUDA 12 build of the jax
#    version pinned there, torch and MONAI. pip gives up after one retry, so an offline
#    host loses seconds, not minutes; then the script says what is missing and goes on
#    with the Python it has (a framework that cannot run is reported as skipped).
# 3. It runs the benchmark within its time budget (default 450 s of measuring; the install
#    comes on top) and, when jaxsurv ran on a GPU, writes the "One-shot GPU benchmark"
#    section of benchmarks/RESULTS.md.
set -euo pipefail
start_dir=$PWD
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
MONAI_VERSION=1.6.1
install=1
check_only=0
wheels=""
extra=()
while (($#)); do
  case "$1" in
    --no-install) install=0; shift ;;
    --check) check_only=1; shift ;;
    --wheels)
      if (($# < 2)); then echo "gpu_benchmark.sh: --wheels needs a folder" >&2; exit 2; fi
      wheels="$2"; [[ "$wheels" = /* ]] || wheels="$start_dir/$wheels"; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_benchmark.sh: unknown argument '$1' (flags for the benchmark go after --)" >&2
       exit 2 ;;
  esac
done

# Prints the pip requirement of each missing package, one a line ("jax-gpu" / "torch-cuda"
# when jax has no GPU / torch has no CUDA, unless JAXSURV_GPU_BENCHMARK_ON_CPU=1: the CPU
# tests); exit status 0 when nothing is missing.
missing() {
  "$1" - "$MONAI_VERSION" "${JAXSURV_GPU_BENCHMARK_ON_CPU:-0}" <<'PYEOF'
import importlib.util
import pathlib
import re
import sys

pins = {}
for line in pathlib.Path("requirements.txt").read_text().splitlines():
  m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line)
  if m:
    pins[m.group(1).lower()] = m.group(2)
modules = {  # import name: distribution name
    "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
    "chex": "chex", "ml_collections": "ml-collections", "absl": "absl-py",
    "numpy": "numpy", "scipy": "scipy", "sklearn": "scikit-learn", "pandas": "pandas",
    "nibabel": "nibabel", "SimpleITK": "SimpleITK", "monai": "monai"}
on_cpu = sys.argv[2] == "1"
out = []
try:
  import jax
  if jax.default_backend() != "gpu" and not on_cpu:
    out.append("jax-gpu")
except Exception:  # pylint: disable=broad-except
  out.append("jax-gpu")
if importlib.util.find_spec("torch") is None:
  out.append("torch")
else:
  try:
    import torch
    if not torch.cuda.is_available() and not on_cpu:
      out.append("torch-cuda")
  except Exception:  # pylint: disable=broad-except
    out.append("torch-cuda")
for mod, dist in modules.items():
  try:
    found = importlib.util.find_spec(mod) is not None
  except ModuleNotFoundError:  # a parent package is missing
    found = False
  if not found:
    version = sys.argv[1] if dist == "monai" else pins.get(dist.lower())
    out.append(f"{dist}=={version}" if version else dist)
print("\n".join(out))
sys.exit(1 if out else 0)
PYEOF
}

# .venv-gpu on top of $PY's packages: --system-site-packages reaches only the base
# interpreter's, so a .pth file adds $PY's own site-packages (a virtual environment's too).
overlay_venv() {
  "$PY" -m venv --system-site-packages .venv-gpu || return 1
  local sp
  sp=$(.venv-gpu/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    || return 1
  "$PY" -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' \
    > "$sp/_jaxsurv_host_site.pth"
}

if [[ -n "$wheels" ]]; then
  shopt -s nullglob
  whl=("$wheels"/*.whl)
  shopt -u nullglob
  if ((${#whl[@]} == 0)); then
    echo "gpu_benchmark.sh: --wheels '$wheels': no .whl files there" >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/jaxsurv-gpu-site"
  echo "gpu_benchmark.sh: installing ${#whl[@]} wheels from $wheels into $site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${whl[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ((check_only)); then
  if lacking=$(missing "$PY" 2>/dev/null); then
    echo "gpu_benchmark.sh: $PY has everything the benchmark needs"
    exit 0
  fi
  echo "gpu_benchmark.sh: $PY lacks:"
  echo "$lacking" | sed 's/^/  /'
  exit 1
fi

pip_net=(--retries 1 --timeout 15)
if ((install)) && ! lacking=$(missing "$PY" 2>/dev/null); then
  if ! grep -qx -e jax-gpu -e torch-cuda <<<"$lacking"; then
    mapfile -t pkgs <<<"$lacking"
    echo "gpu_benchmark.sh: keeping $PY's jax and torch; installing ${pkgs[*]} into" \
         ".venv-gpu, on top of $PY's packages"
    if overlay_venv && .venv-gpu/bin/python -m pip install -q "${pip_net[@]}" "${pkgs[@]}"; then
      PY=.venv-gpu/bin/python
    else
      echo "gpu_benchmark.sh: the install failed; running with $PY as it is" >&2
    fi
  else
    jax_version=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' requirements.txt)
    echo "gpu_benchmark.sh: installing requirements.txt, jax[cuda12]==${jax_version}," \
         "torch and monai==${MONAI_VERSION} into .venv-gpu"
    if "$PY" -m venv .venv-gpu \
        && .venv-gpu/bin/python -m pip install -q "${pip_net[@]}" -r requirements.txt \
             "jax[cuda12]==${jax_version}" torch "monai==${MONAI_VERSION}"; then
      PY=.venv-gpu/bin/python
    else
      echo "gpu_benchmark.sh: the install failed; running with $PY as it is" >&2
    fi
  fi
fi
if ! lacking=$(missing "$PY" 2>/dev/null); then
  echo "gpu_benchmark.sh: going on without: $(tr '\n' ' ' <<<"$lacking")" >&2
fi
exec "$PY" benchmarks/gpu_benchmark.py "${extra[@]}"
