"""glibc malloc settings that let XLA:CPU reuse its per-step temporary buffer.

XLA:CPU allocates a compiled program's temporary buffer
(``compiled.memory_analysis().temp_size_in_bytes``: 91 MiB for the
DenseNet-121 train step at a 32^3 input and batch 2) at every execution and
frees it at the end. glibc's malloc serves a block that large with a fresh
``mmap`` (its mmap threshold is at most 32 MiB, and a thread's arena heap at
most 64 MiB) and returns it with ``munmap``, so each step faults the whole
buffer in again: about 23,000 minor page faults and 50 ms of kernel time per
step on 2 cores (``benchmarks/RESULTS.md``, "Train step").

:func:`reuse_freed_memory` sets, with ``mallopt`` (glibc's mallopt(3)):

* ``M_ARENA_MAX`` = 1: every thread allocates from the main heap, which
  grows without a size cap (a thread arena's heap would fall back to
  ``mmap`` for a large block);
* ``M_MMAP_MAX`` = 0: no block is served by ``mmap``;
* ``M_TRIM_THRESHOLD`` = 2^31 - 1 bytes: freed memory at the top of the heap
  is kept for reuse (up to 2 GiB) instead of being returned to the system.

The cost: the process keeps freed memory (its resident size stays near its
peak), and threads share one arena, which made XLA's (multi-threaded) cold
compile about 2x slower (DenseNet-121 54 -> 100 s, ``local`` 8 -> 14 s) and
the ``local`` step, which has no buffer above the threshold, no faster. So
it is opt-in: with ``JAXSURV_MALLOC=reuse`` :func:`jaxsurv.cli.run` (every
jaxsurv command line) calls it before JAX starts its threads; unset or
``default`` keeps glibc's own settings. Importing jaxsurv never calls it, so
code that reuses jaxsurv's losses keeps its allocator as it was.
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
M_ARENA_MAX = -8
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
  """Applies the module docstring's malloc settings when ``$JAXSURV_MALLOC`` is "reuse".

  Call it before any thread other than the main one allocates (before JAX
  creates its CPU client): a thread that already has its own arena keeps it.

  Args:
    environ: the environment to read (default ``os.environ``).

  Returns:
    ``"reuse"`` when applied; otherwise ``"default"`` and why (the variable,
    not Linux with glibc, or ``mallopt`` refused).

  Raises:
    UserError: ``$JAXSURV_MALLOC`` is set to something else than "reuse" or
      "default".
  """
  environ = os.environ if environ is None else environ
  choice = environ.get(ENV, "default").strip().lower() or "default"
  if choice not in CHOICES:
    raise UserError(f"{ENV} must be one of {CHOICES} (or unset: default), got {environ[ENV]!r}")
  if choice == "default":
    return f"default ({ENV} unset or default)"
  libc = _glibc()
  if libc is None:
    return "default (not Linux with glibc)"
  for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0),
                       (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
    if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
      return f"default (mallopt({param}, {value}) refused)"
  return "reuse"
