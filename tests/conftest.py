"""Shared pytest setup: a persistent JAX compilation cache and a tiny MMNN config.

The cache lives under ``$JAXSURV_CACHE/jax_compilation_cache`` (default
``~/.cache/jaxsurv``) so repeated runs of the suite skip recompiling the same
jitted functions. The suite runs in two pytest-xdist worker processes
(``-n 2 --dist loadfile`` in ``pytest.ini``; ``-n 0`` runs it in one
process); they, and the processes the tests start, share the cache. JAX
writes an entry in place, so a process may meet one another is still
writing: its zlib stream is then truncated, JAX warns and compiles anew (a
cache miss, never a wrong program).

At the suite's tiny shapes compiling costs far more than running, so the
tests (and the processes they start, which inherit the environment) compile
with XLA's backend optimisation level 0 (``--xla_backend_optimization_level=0``
appended to ``XLA_FLAGS``, unless ``XLA_FLAGS`` already sets a level): less
LLVM optimisation of the generated code, the same HLO, the same results
within the tests' float32 tolerances. On 2 cores with a cold cache this took
the Grad-CAM test from 20 s to 9 s and the sharded-step test from 28 s to
21 s. Benchmarks and real runs never see it.
"""

import os
import pathlib

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=wrong-import-position

_CACHE = pathlib.Path(os.environ.get("JAXSURV_CACHE", "~/.cache/jaxsurv")).expanduser()
jax.config.update("jax_compilation_cache_dir", str(_CACHE / "jax_compilation_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO = pathlib.Path(__file__).resolve().parents[1]


def subprocess_pythonpath() -> str:
  """``PYTHONPATH`` for a process a test starts: the repository first, then this
  process's ``PYTHONPATH`` (packages installed with ``pip --target`` stay importable)."""
  return os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                        if p])


def subprocess_xla_flags(*extra: str) -> str:
  """``XLA_FLAGS`` for a process a test starts: the suite's optimisation level
  (above) and ``extra`` (e.g. ``--xla_force_host_platform_device_count=4``),
  no other flag of this process."""
  level = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if f.startswith("--xla_backend_optimization_level")]
  return " ".join(level + list(extra))


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


def tiny_site(name, n, seed, *, events=True, dim=None, drop=None):
  """A synthetic ``jaxsurv.data.sites.Site`` of ``n`` patients (half train,
  a quarter val, a quarter test), columns age, size_band, grade; ``dim``:
  bags of 4 tiles; ``drop``: a column left out."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import pandas as pd  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import sites as sites_lib  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3))
  t = rng.exponential(1000 * np.exp(-0.7 * x[:, 0]))
  e = (rng.uniform(size=n) < 0.7).astype(int) if events else np.zeros(n, int)
  table = pd.DataFrame({"patient_id": [f"{name}-{i}" for i in range(n)], "duration": t,
                        "event": e, "age": x[:, 0], "size_band": x[:, 1], "grade": x[:, 2]})
  split = np.array(["train"] * n, object)
  split[-(n // 4):] = "test"
  split[-(n // 2):-(n // 4)] = "val"
  table.insert(1, "split", split)
  if drop:
    table = table.drop(columns=[drop])
  bags = None
  if dim:
    bags = (rng.normal(size=(n, 4, dim)).astype(np.float32), np.ones((n, 4), bool))
  return sites_lib.Site(name, table, bags)
