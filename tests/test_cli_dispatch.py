"""Every jaxsurv command line (jaxsurv.cli.run) runs CPU programs in the calling
thread unless --cpu_async_dispatch: the setting reaches JAX before its CPU
client exists, and a compiled program has finished when its call returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, subprocess_xla_flags

# A command whose main runs a program of ~0.1-1 s (repeated 512^2 matmuls) and
# reports whether its result was ready the moment the call returned.
_SCRIPT = r'''
import json, sys
from jaxsurv import cli

def main(argv):
  import jax, jax.numpy as jnp
  f = jax.jit(lambda x: jax.lax.fori_loop(0, 200, lambda i, y: jnp.tanh(y @ x), x))
  x = jnp.full((512, 512), 0.01, jnp.float32)
  f(x).block_until_ready()  # Compiled and run once.
  y = f(x)
  ready = y.is_ready()
  y.block_until_ready()
  print("RESULT", json.dumps({"flag": jax.config.values["jax_cpu_enable_async_dispatch"],
                              "ready_on_return": ready, "backend": jax.default_backend()}),
        flush=True)

cli.run(main, argv=["prog", "--nocompilation_cache"] + sys.argv[1:])
'''


def _run(*flags: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": subprocess_xla_flags(), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, *flags], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.split("RESULT", 1)[1])


@pytest.mark.parametrize("flags, asynchronous", [((), False), (("--cpu_async_dispatch",), True)])
def test_commands_run_cpu_programs_inline_unless_asked(flags, asynchronous):
  out = _run(*flags)
  assert out["backend"] == "cpu"
  assert out["flag"] is asynchronous
  if not asynchronous:
    # Inline: the call returned after the program ran. (Asynchronous dispatch
    # usually returns first, but that is JAX's scheduling, not asserted here.)
    assert out["ready_on_return"] is True
