"""Shared pytest setup: a persistent JAX compilation cache and a tiny MMNN config.

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


def tiny_mmnn_config(**overrides):
  """The MMNN ``local`` config shrunk for tests: 32 phantom patients at 16^3.

  ``overrides``: flattened config keys, e.g. ``{"num_epochs": 1}``.
  """
  from configs import mmnn  # pylint: disable=import-outside-toplevel
  c = mmnn.get_config("local,cohort=sarcoma_phantom,n_patients=32")
  c.data.preprocess.grid = (16, 16, 16)
  c.data.preprocess.spacing_mm = 4.0
  c.model.image.update(dict(init_features=4, growth_rate=2, block_config=(1, 1), bn_size=2))
  c.model.clinical.hidden_sizes = (8,)
  c.batch_size = 8
  c.eval_batch_size = 8
  c.num_epochs = 3
  c.blend.every_epochs = 1
  c.eval.bootstrap_resamples = 20
  c.progress_bar = False
  c.update_from_flattened_dict(overrides)
  return c
