"""jaxsurv.malloc: after reuse_freed_memory, a large block freed and allocated
again on the main thread (as XLA:CPU's per-step temporary buffer when jaxsurv
runs CPU programs inline) is not faulted in again, while a worker thread's
still is; every command line applies it through jaxsurv.cli.run unless
JAXSURV_MALLOC=default."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from jaxsurv import malloc
from jaxsurv.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]

# Allocates, touches and frees a 95 MB block 4 times on the main thread or on
# a worker thread (where XLA runs programs under asynchronous dispatch) and
# prints the minor page faults of the last 3 rounds. "cli": inside a
# jaxsurv.cli.run command.
_SCRIPT = r'''
import ctypes, resource, sys, threading
from jaxsurv import cli, malloc
SIZE = 95_000_000
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]

def rounds(out):
  for i in range(4):
    if i == 1:
      start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(SIZE)
    libc.memset(p, 1, SIZE)
    libc.free(p)
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)

def measure():
  out = []
  if sys.argv[2] == "main":
    rounds(out)
  else:
    t = threading.Thread(target=rounds, args=(out,))
    t.start(); t.join()
  print("FAULTS", out[0], flush=True)

if sys.argv[1] == "direct":
  print("STATUS", malloc.reuse_freed_memory(), flush=True)
  measure()
else:
  cli.run(lambda argv: measure(), argv=["prog"])
'''


def _faults(mode: str, env_value: str | None, thread: str = "main") -> int:
  env = {k: v for k, v in os.environ.items() if k != malloc.ENV}
  if env_value is not None:
    env[malloc.ENV] = env_value
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode, thread], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=120, check=True)
  return int(proc.stdout.split("FAULTS")[1].split()[0])


needs_glibc = pytest.mark.skipif(malloc._glibc() is None, reason="needs Linux with glibc")


@needs_glibc
def test_a_freed_large_block_is_reused_without_page_faults():
  pages = 3 * 95_000_000 // 4096  # 69,580 pages touched in the 3 measured rounds.
  assert _faults("direct", "default") > 0.9 * pages  # glibc: mmap/munmap every round.
  assert _faults("direct", "reuse") < 0.01 * pages
  assert _faults("direct", None) < 0.01 * pages  # Unset: reuse.
  # A thread arena maps a block larger than its heap whatever M_MMAP_MAX says
  # (why jaxsurv commands also run CPU programs inline, jaxsurv.cli).
  assert _faults("direct", "reuse", thread="worker") > 0.9 * pages


@needs_glibc
def test_every_command_line_applies_it_unless_told_not_to():
  pages = 3 * 95_000_000 // 4096
  assert _faults("cli", None) < 0.01 * pages
  assert _faults("cli", "default") > 0.9 * pages


def test_the_variable_is_checked():
  assert malloc.reuse_freed_memory({malloc.ENV: "default"}).startswith("default")
  with pytest.raises(UserError, match="JAXSURV_MALLOC must be one of"):
    malloc.reuse_freed_memory({malloc.ENV: "jemalloc"})
