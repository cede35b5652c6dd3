"""The cohort registry: which cohorts exist by name, their specs, default preprocessing and demo files.

**Cohorts.** ``sarcoma_phantom`` and ``rotterdam_rendered`` are the demo image
cohorts of ``jaxsurv.data.phantom``: their NIfTI files and manifest are
written on first use into ``cache_dir("cohorts", name, "seed<S>-n<N>")``,
deterministically from the seed. ``rotterdam``, ``gbsg``, ``tcga_brca`` and
``breast_cancer`` are the tabular cohorts of ``jaxsurv.data.public``. Any
other argument is a path to a user manifest CSV (``jaxsurv.data.manifest``
format) and needs a ``CohortSpec``.

This module holds:

* the names: ``DEMO_COHORTS``, ``TABULAR_COHORTS``, ``KNOWN_COHORTS`` and the
  demo cohorts' default sizes (``DEMO_DEFAULT_N``);
* their default preprocessing (``DEFAULT_PREPROCESS``,
  ``ROTTERDAM_RENDERED_PREPROCESS``, ``default_preprocess``);
* their ``CohortSpec`` (``cohort_spec``) and the JSON form of a spec
  (``spec_to_json``, ``spec_from_json``);
* the demo cohorts' files (``demo_manifest``) and the listing of every known
  cohort (``describe_known_cohorts``).

Preparing a cohort as a TFDS dataset is ``jaxsurv.data.tfds_build``; reading
it back is ``jaxsurv.data.prepared``.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping

from jaxsurv.data import fetch
from jaxsurv.data import manifest as mf
from jaxsurv.data import mri
from jaxsurv.data import phantom
from jaxsurv.data import public

DEMO_COHORTS = ("sarcoma_phantom", "rotterdam_rendered")
TABULAR_COHORTS = tuple(public.COHORTS)
KNOWN_COHORTS = DEMO_COHORTS + TABULAR_COHORTS
# Patients written by default (None = every rotterdam patient, 2982).
DEMO_DEFAULT_N = {"sarcoma_phantom": 300, "rotterdam_rendered": None}
_DEMO_DESCRIPTIONS = {
    "sarcoma_phantom": "synthetic sarcoma MRI phantom (T1c, T2-FS, mask; 11 clinical; OS + DM; "
                       "oracle eta): everything simulated",
    "rotterdam_rendered": "real Rotterdam patients and outcomes with rendered breast volumes "
                          "(size band and grade shown only in the image)",
}

# Default preprocessing of image cohorts (MMNN-like tumour-centred crop): the
# mask's bounding box plus a 10 mm margin, resampled at 1 mm and resized to
# 64^3 with one scale for all axes. This normalises tumour size away; where
# size must stay visible use a fixed field of view (``fov_mm``).
DEFAULT_PREPROCESS = mri.PreprocessConfig(grid=(64, 64, 64), spacing_mm=1.0, margin_mm=10.0,
                                          keep_aspect=True)
# rotterdam_rendered: the rendered tumour's diameter (6-80 mm, from the real
# size band) is the image's prognostic signal, so a fixed 96 mm box (the
# rendered volume's whole field of view, 48 x 2 mm and 16 x 6 mm) keeps size
# visible; 1.5 mm x 64 = 96 mm, so no anti-aliasing blur is needed.
ROTTERDAM_RENDERED_PREPROCESS = mri.PreprocessConfig(grid=(64, 64, 64), spacing_mm=1.5,
                                                     fov_mm=96.0)


def default_preprocess(name: str) -> mri.PreprocessConfig | None:
  """The default ``PreprocessConfig`` for a known cohort (None for tabular cohorts).

  ``rotterdam_rendered`` uses ``ROTTERDAM_RENDERED_PREPROCESS`` (fixed
  96 mm field of view so that tumour size stays visible); other image
  cohorts use ``DEFAULT_PREPROCESS``.
  """
  if name in TABULAR_COHORTS:
    return None
  if name == "rotterdam_rendered":
    return ROTTERDAM_RENDERED_PREPROCESS
  return DEFAULT_PREPROCESS


def cohort_spec(name: str) -> mf.CohortSpec:
  """The ``CohortSpec`` of a known cohort.

  Demo cohorts: ``phantom.cohort_spec(name)``: channels ``("t1c", "t2fs")``,
  mask ``"mask"``, the clinical columns of ``phantom.CLINICAL_SPECS[name]``
  (categorical levels checked), outcomes ``("os", "dm")``. Tabular cohorts: no
  images, the covariates of ``public.COHORTS[name]`` and its available
  endpoints (e.g. gbsg: ``("dm",)``).

  Raises:
    ValueError: for an unknown name.
  """
  if name in phantom.CLINICAL_SPECS:
    return phantom.cohort_spec(name)
  if name in public.COHORTS:
    info = public.COHORTS[name]
    return mf.CohortSpec(channels=(), mask=None, numeric=info.numeric, categorical=info.categorical,
                         outcomes=info.outcomes)
  raise ValueError(f"cohort: unknown cohort {name!r}; known: {list(KNOWN_COHORTS)} "
                   "(or pass a manifest CSV path with a spec)")


def spec_to_json(spec: mf.CohortSpec) -> dict:
  """A JSON-ready dict of a ``CohortSpec`` (``spec_from_json`` inverts it)."""
  d = dataclasses.asdict(spec)
  d["categorical_levels"] = {k: list(v) for k, v in spec.categorical_levels.items()}
  return d


def spec_from_json(d: Mapping[str, Any]) -> mf.CohortSpec:
  """Builds a ``CohortSpec`` from a dict (e.g. a JSON spec file).

  Keys are ``CohortSpec``'s field names: ``channels``, ``mask``, ``numeric``,
  ``categorical``, ``outcomes``, ``categorical_levels``, ``geometry_tol_mm``,
  ``require_same_grid``, ``id_column``, ``site_column``, ``split_column``;
  missing keys take ``CohortSpec``'s defaults.

  Raises:
    ValueError: unknown keys (listed) or invalid values (from ``CohortSpec``).
  """
  fields = {f.name for f in dataclasses.fields(mf.CohortSpec)}
  unknown = sorted(set(d) - fields)
  if unknown:
    raise ValueError(f"cohort spec: unknown keys {unknown}; allowed: {sorted(fields)}")
  return mf.CohortSpec(**dict(d))


def demo_manifest(name: str, n_patients: int | None = None, seed: int = 0, *,
                  progress: bool = False) -> pathlib.Path:
  """Writes (once) a demo cohort's NIfTI files and manifest; returns the manifest path.

  The manifest is written last and atomically by ``phantom``, so its presence
  means the cohort is complete.
  """
  folder = fetch.cache_dir("cohorts", name, f"seed{seed}-n{n_patients or 'all'}")
  path = folder / phantom.MANIFEST_NAME
  if path.is_file():
    return path
  if name == "sarcoma_phantom":
    return phantom.write_sarcoma_phantom(folder, n_patients=n_patients, seed=seed, progress=progress)
  return phantom.write_rotterdam_rendered(folder, n_patients=n_patients, seed=seed, progress=progress)


def describe_known_cohorts() -> list[tuple[str, str, str]]:
  """``(name, kind, description)`` of each known cohort, for ``python -m jaxsurv.data list``."""
  out = []
  for name in DEMO_COHORTS:
    n = DEMO_DEFAULT_N[name]
    out.append((name, "image (demo)", f"{_DEMO_DESCRIPTIONS[name]}; default "
                f"{n or public.COHORTS['rotterdam'].n_patients} patients"))
  for name in TABULAR_COHORTS:
    info = public.COHORTS[name]
    out.append((name, "tabular", f"{info.description}; {info.n_patients} patients; endpoints "
                f"{', '.join(info.endpoints)}"))
  return out
