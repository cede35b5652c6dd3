"""Shared pytest setup: a persistent JAX compilation cache and float64 helpers.

The cache lives under ``$JAXSURV_CACHE/jax_compilation_cache`` (default
``~/.cache/jaxsurv``) so repeated runs of the suite skip recompiling the same
jitted functions.
"""

import os
import pathlib

import jax

_CACHE = pathlib.Path(os.environ.get("JAXSURV_CACHE", "~/.cache/jaxsurv")).expanduser()
jax.config.update("jax_compilation_cache_dir", str(_CACHE / "jax_compilation_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = pathlib.Path(__file__).resolve().parents[1]
