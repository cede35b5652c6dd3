"""Demo cohorts: a synthetic sarcoma MRI phantom and rendered Rotterdam volumes.

**What these cohorts are.** jaxsurv ships two demo cohorts, written as real
NIfTI files plus a ``manifest.csv`` so that they go through exactly the path a
user's own cohort takes (manifest -> NIfTI loading -> preprocessing -> model).
*All images in both cohorts are rendered, not scanned*: no package ships
3D MRI with survival outcomes (none of the Python, Debian or npm packages
searched has any), so the volumes are drawn by the modules listed below.

* ``sarcoma_phantom`` (:func:`write_sarcoma_phantom`) is **fully synthetic**:
  patients, clinical variables, T1c / T2-FS limb MRI and OS / DM outcomes
  simulated from a known proportional-hazards model, with the true
  log-hazards as oracle columns ``eta_os``/``eta_dm`` (details in
  ``jaxsurv.data.sarcoma_phantom``).
* ``rotterdam_rendered`` (:func:`write_rotterdam_rendered`) pairs **real
  patients with rendered images**: the 2982 real Rotterdam breast-cancer
  patients (R ``survival::rotterdam``) with their real covariates and their
  real recurrence and death outcomes. Each patient gets a breast-like
  2-channel volume rendered from that patient's own recorded tumour size band
  and grade; size and grade are then removed from the clinical columns, so the
  image carries real prognostic information that only the image has. The
  images are synthetic; the outcomes are real.

Manifest format (shared with the rest of the data layer): one row per patient
with ``patient_id``; ``t1c``, ``t2fs``, ``mask`` (paths of ``.nii.gz`` files,
relative to the manifest's folder); the clinical columns listed in
:data:`SARCOMA_CLINICAL_SPEC` / :data:`ROTTERDAM_CLINICAL_SPEC`; the outcomes
``os_time``, ``os_event``, ``dm_time``, ``dm_event`` (days; event 1, censored
0); optionally ``site``. Columns named in :data:`NON_MODEL_COLUMNS` (the
oracle ``eta_*``, the ``latent_*`` generator variables and the ``render_*``
reference columns) are for evaluation and inspection only and must never be
fed to a model; :func:`model_input_columns` returns the columns that may be.

Where the code lives (every name stays importable from here):

* ``jaxsurv.data.render``: the manifest layout constants, the per-patient
  random streams, the rendering helpers shared by both cohorts
  (:class:`PhantomVolumes`, :data:`TISSUE_LABELS`) and the file writers.
* ``jaxsurv.data.sarcoma_phantom``: the sarcoma phantom
  (:data:`SARCOMA_CLINICAL_SPEC`, :func:`draw_sarcoma_cohort`,
  :func:`render_sarcoma_volumes`, :func:`write_sarcoma_phantom`).
* ``jaxsurv.data.rotterdam_rendered``: the Rotterdam cohort
  (:data:`ROTTERDAM_CLINICAL_SPEC`, :func:`render_rotterdam_volumes`,
  :func:`write_rotterdam_rendered`).
* This module: the registry of both cohorts (:data:`CLINICAL_SPECS`,
  :func:`model_input_columns`, :func:`cohort_spec`,
  :func:`is_non_model_column`).
"""

from __future__ import annotations

from typing import Mapping

from jaxsurv.data.render import (IMAGE_COLUMNS, LATENT_PREFIX, MANIFEST_NAME, MASK_COLUMN,
                                 ORACLE_COLUMNS, OUTCOME_COLUMNS, REFERENCE_COLUMNS, TISSUE_LABELS,
                                 PhantomVolumes)
from jaxsurv.data.rotterdam_rendered import (ROTTERDAM_CLINICAL_SPEC, ROTTERDAM_SHAPE,
                                             ROTTERDAM_SPACING_MM, render_rotterdam_volumes,
                                             write_rotterdam_rendered)
from jaxsurv.data.sarcoma_phantom import (SARCOMA_CLINICAL_SPEC, SARCOMA_SHAPE,
                                          SARCOMA_SPACING_MM, draw_sarcoma_cohort,
                                          render_sarcoma_volumes, write_sarcoma_phantom)

# ---------------------------------------------------------------------------
# The demo cohorts and their model inputs
# ---------------------------------------------------------------------------

CLINICAL_SPECS: Mapping[str, Mapping[str, Mapping]] = {
    "sarcoma_phantom": SARCOMA_CLINICAL_SPEC,
    "rotterdam_rendered": ROTTERDAM_CLINICAL_SPEC,
}


def is_non_model_column(name: str) -> bool:
  """True for oracle, latent and render-reference columns (never model inputs)."""
  return (name in ORACLE_COLUMNS or name in REFERENCE_COLUMNS
          or name.startswith(LATENT_PREFIX))


NON_MODEL_COLUMNS = ORACLE_COLUMNS + REFERENCE_COLUMNS  # plus every latent_* column


def model_input_columns(cohort: str) -> tuple[str, ...]:
  """The clinical columns a model may use for a demo cohort.

  Args:
    cohort: ``"sarcoma_phantom"`` or ``"rotterdam_rendered"``.

  Returns:
    Column names, in manifest order.

  Raises:
    ValueError: for an unknown cohort name.
  """
  if cohort not in CLINICAL_SPECS:
    raise ValueError(f"cohort: unknown demo cohort {cohort!r}; "
                     f"expected one of {sorted(CLINICAL_SPECS)}")
  return tuple(CLINICAL_SPECS[cohort])


def cohort_spec(cohort: str):
  """The ``jaxsurv.data.manifest.CohortSpec`` of a demo cohort's manifest.

  Channels ``("t1c", "t2fs")``, mask ``"mask"``, outcomes ``("os", "dm")``,
  and the clinical columns of the cohort's spec dict split into numeric and
  categorical (with their levels, where listed). Oracle, latent and
  render-reference columns are not in it, so nothing built from the spec
  feeds them to a model. This is the one definition of a demo cohort's
  spec: ``jaxsurv.data.cohorts.cohort_spec`` returns it for demo names.

  Args:
    cohort: ``"sarcoma_phantom"`` or ``"rotterdam_rendered"``.

  Raises:
    ValueError: for an unknown cohort name.
  """
  from jaxsurv.data import manifest  # pylint: disable=import-outside-toplevel
  spec = CLINICAL_SPECS[cohort] if cohort in CLINICAL_SPECS else None
  if spec is None:
    model_input_columns(cohort)  # raises the ValueError naming the cohorts
  numeric = tuple(k for k, v in spec.items() if v["kind"] == "numeric")
  categorical = tuple(k for k, v in spec.items() if v["kind"] == "categorical")
  # Levels as listed; ``CohortSpec`` normalises them (``manifest._level``).
  levels = {k: tuple(spec[k]["levels"]) for k in categorical if "levels" in spec[k]}
  return manifest.CohortSpec(
      channels=IMAGE_COLUMNS, mask=MASK_COLUMN, numeric=numeric, categorical=categorical,
      outcomes=("os", "dm"), categorical_levels=levels)
