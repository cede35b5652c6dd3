"""glibc malloc settings that let XLA:CPU reuse its per-step temporary buffer.

XLA:CPU allocates a compiled program's temporary buffer
(``compiled.memory_analysis().temp_size_in_bytes``: 91 MiB for the
DenseNet-121 train step at a 32^3 input and batch 2) at every execution and
frees it at the end. glibc's malloc serves a block that large with a fresh
``mmap`` (its mmap threshold is at most 32 MiB) and returns it with
``munmap``, so each step faults the whole buffer in again: about 23,000 minor
page faults and 50-70 ms of kernel time per step on 2 cores
(``benchmarks/RESULTS.md``, "Train step").

:func:`reuse_freed_memory` sets, with ``mallopt`` (glibc's mallopt(3)):

* ``M_MMAP_MAX`` = 0: no block is served by a mapping of its own; the main
  heap grows instead;
* ``M_TRIM_THRESHOLD`` = 2^31 - 1 bytes: freed memory at the top of the heap
  is kept for reuse (up to 2 GiB) instead of being returned to the system.

This helps the thread that owns the main heap: the main thread. A JAX
worker thread allocates from a thread arena, whose heaps are at most 64 MiB,
so glibc still maps a larger block for it. jaxsurv commands therefore also
run CPU programs in the calling thread (``jaxsurv.cli.setup_cpu_dispatch``).
Together they took the DenseNet-121 step on 2 Intel Xeon cores from 137-165
ms (per-round medians; about 23,300 faults per step) to 111-117 ms (under
200 faults), whether the program was compiled in the process or loaded from
the compilation cache; inline dispatch with glibc's own settings was as fast
only with a cached program (154 ms in the round that compiled in the
process). The ``local`` step, which has no buffer that large, was unchanged
(``benchmarks/RESULTS.md``, "Train step").
An earlier version also set ``M_ARENA_MAX`` = 1 (every thread on the main
heap); that made XLA's multi-threaded compile slower (DenseNet-121 45 ->
66 s) and the step compiled in the same process twice as slow (241 ms), so
it is gone.

The cost: the process keeps freed memory at the top of its heap (its
resident size stays near its peak). :func:`jaxsurv.cli.run` (every jaxsurv
command line) calls :func:`reuse_freed_memory` before JAX starts its
threads unless ``JAXSURV_MALLOC=default`` (glibc's own settings). Importing
jaxsurv never calls it, so code that reuses jaxsurv's losses keeps its
allocator as it was.
"""

from __future__ import annotations

import ctypes
import os
import sys

from jaxsurv.errors import UserError

ENV = "JAXSURV_MALLOC"
CHOICES = ("reuse", "default")

# mallopt(3) parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int.


def _glibc():
  """The process's C library if it is glibc (has ``gnu_get_libc_version``), else None."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement
  except (OSError, AttributeError):
    return None
  return libc


def reuse_freed_memory(environ=None) -> str:
  """Applies the module docstring's malloc settings unless ``$JAXSURV_MALLOC`` is "default".

  The settings are process-wide and apply to later allocations: call it
  before JAX starts (its compiler and programs allocate from then on).

  Args:
    environ: the environment to read (default ``os.environ``).

  Returns:
    ``"reuse"`` when applied; otherwise ``"default"`` and why (the variable,
    not Linux with glibc, or ``mallopt`` refused).

  Raises:
    UserError: ``$JAXSURV_MALLOC`` is set to something else than "reuse" or
      "default" (unset or empty: "reuse").
  """
  environ = os.environ if environ is None else environ
  choice = environ.get(ENV, "reuse").strip().lower() or "reuse"
  if choice not in CHOICES:
    raise UserError(f"{ENV} must be one of {CHOICES} (or unset: reuse), got {environ[ENV]!r}")
  if choice == "default":
    return f"default ({ENV}=default)"
  libc = _glibc()
  if libc is None:
    return "default (not Linux with glibc)"
  for param, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
    if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
      return f"default (mallopt({param}, {value}) refused)"
  return "reuse"
