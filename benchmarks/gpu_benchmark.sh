#!/usr/bin/env bash
# One-shot GPU benchmark: jaxsurv's MMNN step against MONAI's DenseNet121 and the torch
# reference at 2 x 128^3, batches 8/16/32/64, bf16 and fp32, remat on and off
# (benchmarks/gpu_benchmark.py says what each row measures).
#
#   bash benchmarks/gpu_benchmark.sh                 # on a fresh checkout on a GPU host
#   bash benchmarks/gpu_benchmark.sh --no-install -- --budget 300   # flags after -- go to
#                                                    # benchmarks/gpu_benchmark.py
#
# 1. Unless the Python in $PYTHON (default python3) already has jax on a GPU, torch with
#    CUDA and MONAI (or --no-install is given), it makes .venv-gpu and installs
#    requirements.txt, the CUDA 12 build of the jax version pinned there, torch and MONAI.
#    If that install fails (no package index reachable), it says so and goes on with the
#    Python it has: a framework that is missing is reported as skipped.
# 2. It runs the benchmark within its time budget (default 450 s of measuring; the install
#    comes on top) and, when jaxsurv ran on a GPU, writes the "One-shot GPU benchmark"
#    section of benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
install=1
extra=()
while (($#)); do
  case "$1" in
    --no-install) install=0; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_benchmark.sh: unknown argument '$1' (flags for the benchmark go after --)" >&2
       exit 2 ;;
  esac
done

ready() {  # jax on a GPU, torch with CUDA, MONAI: exit status 0.
  "$1" - <<'PYEOF'
import importlib.util
import sys
try:
  import jax
  ok = jax.default_backend() == "gpu" and importlib.util.find_spec("monai") is not None
  if ok:
    import torch
    ok = torch.cuda.is_available()
except Exception:  # pylint: disable=broad-except
  ok = False
sys.exit(0 if ok else 1)
PYEOF
}

if ((install)) && ! ready "$PY" 2>/dev/null; then
  jax_version=$(sed -n 's/^jax==\([0-9][0-9.]*\).*/\1/p' requirements.txt)
  echo "gpu_benchmark.sh: installing jax[cuda12]==${jax_version}, torch and MONAI into .venv-gpu"
  if "$PY" -m venv .venv-gpu \
      && .venv-gpu/bin/python -m pip install -q -r requirements.txt \
           "jax[cuda12]==${jax_version}" torch monai; then
    PY=.venv-gpu/bin/python
  else
    echo "gpu_benchmark.sh: the install failed; running with $PY as it is" >&2
  fi
fi
exec "$PY" benchmarks/gpu_benchmark.py "${extra[@]}"
