"""The ``rotterdam_rendered`` demo cohort: real Rotterdam patients with rendered images.

Pairs **real patients with rendered images**: the 2982 real Rotterdam
breast-cancer patients (R ``survival::rotterdam``) with their real
covariates and their real recurrence and death outcomes. Each patient gets a
breast-like 2-channel volume rendered from that patient's own recorded
tumour size band and grade; size and grade are then removed from the
clinical columns, so the image carries real prognostic information that only
the image has. The images are synthetic; the outcomes are real.

* :data:`ROTTERDAM_CLINICAL_SPEC`: the clinical columns written to the
  manifest.
* :func:`render_rotterdam_volumes`: one patient's volume from a size band
  and grade.
* :func:`write_rotterdam_rendered`: the NIfTI files and ``manifest.csv``
  (optionally for a stratified subset of the patients).

The manifest layout and the rendering helpers are shared with the other demo
cohort (``jaxsurv.data.render``).
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.special

from jaxsurv import checks
from jaxsurv.data.render import (OUTCOME_COLUMNS, PhantomVolumes, _RENDER_STREAM, _ROTTERDAM_TAG,
                                 _acquire, _affine, _check_geometry, _check_n, _check_seed,
                                 _ellipsoid_radius, _grid, _patient_key, _patient_rng, _progress,
                                 _smooth_fields, _write_manifest, _write_patient)

# ---------------------------------------------------------------------------
# Clinical variable spec
# ---------------------------------------------------------------------------

# Rotterdam clinical columns written to the manifest (size and grade are NOT
# among them: the image carries them).
ROTTERDAM_CLINICAL_SPEC: Mapping[str, Mapping] = {
    "year": dict(kind="numeric", unit="calendar year of surgery"),
    "age": dict(kind="numeric", unit="years"),
    "meno": dict(kind="categorical", levels=(0, 1),
                 description="0 premenopausal, 1 postmenopausal"),
    "nodes": dict(kind="numeric", unit="count of positive lymph nodes"),
    "pgr": dict(kind="numeric", unit="fmol/l", description="progesterone receptors"),
    "er": dict(kind="numeric", unit="fmol/l", description="oestrogen receptors"),
    "hormon": dict(kind="categorical", levels=(0, 1), description="hormonal therapy"),
    "chemo": dict(kind="categorical", levels=(0, 1), description="chemotherapy"),
}


# ---------------------------------------------------------------------------
# Rotterdam rendered: real patients, images rendered from size band and grade
# ---------------------------------------------------------------------------

ROTTERDAM_SHAPE = (48, 48, 16)
ROTTERDAM_SPACING_MM = (2.0, 2.0, 6.0)
_ROTTERDAM_MIN_FOV = (60.0, 60.0, 60.0)
_SIZE_BANDS = ("<=20", "20-50", ">50")

# Breast intensities (T1 post-contrast fat-suppressed, T2-FS), relative scale.
_BREAST_LUT = np.zeros((12, 2), np.float32)
_BREAST_LUT[1] = (0.18, 0.15)    # fat: suppressed on both
_BREAST_LUT[2] = (0.35, 0.30)    # pectoralis muscle
_BREAST_LUT[5] = (1.00, 0.55)    # enhancing carcinoma
_BREAST_LUT[6] = (0.25, 0.95)    # necrosis: no enhancement, fluid-bright
_BREAST_LUT[8] = (0.40, 0.45)    # fibroglandular tissue (mild background enhancement)
_BREAST_LUT[9] = (0.04, 0.05)    # chest wall / lung behind the pectoralis
_BREAST_LUT[10] = (0.50, 0.50)   # skin
_BREAST_LUT[11] = (0.10, 1.00)   # simple cyst: dark on T1c, bright on T2
_BREAST_OEDEMA_T2 = 0.35


def _rotterdam_diameter(rng: np.random.Generator, band: str) -> float:
  """Longest tumour diameter (mm) drawn within a recorded rotterdam size band.

  ``<=20``: 6-20 mm (skewed towards the upper end, where most pT1 tumours
  are); ``20-50``: 20-50 mm skewed towards 20-35; ``>50``: 50-80 mm skewed
  towards 50-60.
  """
  u = rng.beta([2.5, 1.3, 1.2], [1.5, 2.5, 3.0])
  if band == "<=20":
    return float(6.0 + 14.0 * u[0])
  if band == "20-50":
    return float(20.0 + 30.0 * u[1])
  if band == ">50":
    return float(50.0 + 30.0 * u[2])
  raise ValueError(f"size band {band!r} not in {_SIZE_BANDS}")


def render_rotterdam_volumes(patient_id: str, size_band: str, grade: int, *,
                             seed: int = 0,
                             shape: Sequence[int] = ROTTERDAM_SHAPE,
                             spacing_mm: Sequence[float] = ROTTERDAM_SPACING_MM,
                             ) -> tuple[PhantomVolumes, float]:
  """Renders a breast-like 2-channel volume from a recorded size band and grade.

  Anatomy (mm, a crop around the tumour): fat and fibroglandular tissue (a
  thresholded Gaussian random field with a random density), a pectoralis
  band and dark chest wall behind it, skin and air in front, sometimes a
  simple cyst (bright on T2-FS, dark on T1c) as a distractor. The tumour is a
  deformed ellipsoid whose longest diameter is drawn within the size band
  (:func:`_rotterdam_diameter`). Grade is rendered as texture: grade 3
  tumours have stronger heterogeneity, a more irregular margin, a necrotic
  core (rim enhancement) in 70% and a T2-FS oedema halo in 50%; grade 2
  tumours are more homogeneous with smoother margins (necrosis and oedema
  in 15%). These appearance rules are rendering choices, loosely following
  breast-MRI findings, not measured relations.

  Args:
    patient_id: the patient's id; with ``seed`` it fixes every draw.
    size_band: ``"<=20"``, ``"20-50"`` or ``">50"`` (mm).
    grade: 2 or 3.
    seed: non-negative int.
    shape: ``[x, y, z]`` voxels.
    spacing_mm: ``[x, y, z]`` voxel size in mm.

  Returns:
    (:class:`PhantomVolumes`, longest diameter drawn in mm).

  Raises:
    ValueError: for an unknown size band or grade, or a field of view below
      60 mm along any axis.
  """
  seed = _check_seed(seed)
  shape, spacing = _check_geometry(shape, spacing_mm, _ROTTERDAM_MIN_FOV)
  if size_band not in _SIZE_BANDS:
    raise ValueError(f"patient {patient_id!r}: size band {size_band!r} not in {_SIZE_BANDS}")
  if grade not in (2, 3):
    raise ValueError(f"patient {patient_id!r}: grade {grade!r} not in (2, 3)")
  rng = _patient_rng(seed, _ROTTERDAM_TAG, _patient_key(patient_id), _RENDER_STREAM)
  fov = np.asarray(shape) * spacing
  grids = _grid(shape, spacing)
  x, y, z = grids
  g3 = grade == 3

  diameter = _rotterdam_diameter(rng, size_band)
  u = rng.uniform(size=16)
  # Grade-dependent appearance (all uniforms drawn above, whatever the grade).
  het = (0.15 + 0.15 * u[0]) if g3 else (0.04 + 0.08 * u[0])
  deform = (0.15 + 0.15 * u[1]) if g3 else (0.05 + 0.10 * u[1])
  necrosis = (0.10 + 0.35 * u[3]) if (u[2] < (0.7 if g3 else 0.15)) else 0.0
  oedema_mm = (2.0 + 4.0 * u[5]) if (u[4] < (0.5 if g3 else 0.15)) else 0.0
  semi = diameter / 2 * np.array([1.0, 0.7 + 0.3 * u[6], 0.7 + 0.3 * u[7]])
  semi = semi[np.argsort(rng.uniform(size=3))]   # which axis is the long one
  theta = 2 * np.pi * u[8]
  r_mean = float(np.cbrt(np.prod(semi)))
  fields = _smooth_fields(rng, shape, spacing,
                          ((0.3 if g3 else 0.5) * r_mean, 2.5 + 2.5 * u[9], 6.0, 3.0))
  f_deform, f_het, f_fgt, f_oed = fields

  t_c = (np.array([u[10], u[11], u[12]]) - 0.5) * 0.15 * fov
  dx, dy, dz = (g - np.float32(c) for g, c in zip(grids, t_c))
  rho = _ellipsoid_radius(dx, dy, dz, semi, theta) / (1 + deform * np.tanh(f_deform))
  tumour = rho < 1.0
  if not tumour.any():
    # A tiny tumour between voxel centres: keep at least its central voxel.
    idx = tuple(int(np.argmin(np.abs(g.reshape(-1) - c))) for g, c in zip(grids, t_c))
    tumour[idx] = True
  core = tumour & (rho * (1 + 0.1 * f_het) < np.cbrt(necrosis))   # empty if necrosis == 0
  r_c = np.sqrt(dx * dx + dy * dy + dz * dz)
  dist_out = r_c * (1 - 1 / np.maximum(rho, 1.0))

  # Breast crop: y is anterior. Chest wall behind, skin in front, both placed
  # relative to the tumour so that the tumour sits inside the breast.
  semi_y = float(diameter / 2 * (1 + deform))
  y_pect = t_c[1] - semi_y - 3.0 - 17.0 * u[13]             # front of pectoralis
  pect_thick = 8.0 + 7.0 * u[14]
  curv = 0.004 + 0.006 * u[15]                               # skin curvature, 1/mm
  y_skin = t_c[1] + semi_y + 8.0 + 20.0 * u[13] - curv * ((x - t_c[0]) ** 2 + z ** 2)
  density = 0.15 + 0.45 * rng.uniform()                      # fibroglandular fraction
  has_cyst = rng.uniform() < 0.2
  cyst_c = (rng.uniform(size=3) - 0.5) * 0.7 * fov
  cyst_r = 2.0 + 4.0 * rng.uniform()

  tissue = np.full(shape, 1, np.uint8)
  tissue[f_fgt > scipy.special.ndtri(1 - density)] = 8
  tissue[np.broadcast_to(y < y_pect, shape)] = 2
  tissue[np.broadcast_to(y < y_pect - pect_thick, shape)] = 9
  tissue[np.broadcast_to(y > y_skin - 2.0, shape)] = 10
  tissue[np.broadcast_to(y > y_skin, shape)] = 0
  breast = (tissue == 1) | (tissue == 8)
  if has_cyst:
    cyst = (x - cyst_c[0]) ** 2 + (y - cyst_c[1]) ** 2 + (z - cyst_c[2]) ** 2 < cyst_r ** 2
    tissue[cyst & breast & (dist_out > 3.0)] = 11
  tissue[tumour] = 5
  tissue[core] = 6

  clean = _BREAST_LUT[tissue].transpose(3, 0, 1, 2).copy()
  clean *= np.where(tumour, np.maximum(1 + het * f_het, 0.1), np.float32(1))
  if oedema_mm > 0:
    halo = np.clip(1 - dist_out / np.float32(oedema_mm), 0, 1) * (0.8 + 0.2 * np.tanh(f_oed))
    halo = np.where(breast & ~tumour, halo, np.float32(0))
    clean[1] += np.float32(_BREAST_OEDEMA_T2) * halo
    tissue[halo > 0.25] = 7
  gain = np.exp(rng.normal(0.0, 0.1, size=2))
  img = _acquire(rng, clean, grids, fov, bias_amplitude=0.10, noise_sd=0.025, gain=gain)
  affine = _affine(shape, spacing, (0.0, 0.0, 0.0))
  return PhantomVolumes(img[0], img[1], tumour.astype(np.uint8), tissue, affine), diameter


def _stratified_subset(table: pd.DataFrame, n: int, seed: int) -> np.ndarray:
  """Row positions of a deterministic subset stratified by size, grade, death.

  Each stratum gets its share by largest remainders; within a stratum the
  patients are taken in a seeded random order. Returned in table order.
  """
  strata = (table["size"].astype(str) + "|" + table["grade"].astype(str) + "|"
            + table["os_event"].astype(str)).to_numpy()
  names, inverse, counts = np.unique(strata, return_inverse=True, return_counts=True)
  quota = counts * n / len(table)
  take = np.floor(quota).astype(int)
  short = n - take.sum()
  order = np.lexsort((names, -(quota - take)))   # largest remainder, ties by name
  take[order[:short]] += 1
  rng = np.random.default_rng([seed, _ROTTERDAM_TAG, 99])
  chosen = []
  for s in range(len(names)):
    members = np.flatnonzero(inverse == s)
    chosen.append(rng.permutation(members)[:take[s]])
  return np.sort(np.concatenate(chosen))


def _load_rotterdam() -> pd.DataFrame:
  from jaxsurv.data import public  # pylint: disable=import-outside-toplevel
  return public.load_cohort_table("rotterdam")


def write_rotterdam_rendered(out_dir, *, seed: int = 0, n_patients: int | None = None,
                             shape: Sequence[int] = ROTTERDAM_SHAPE,
                             spacing_mm: Sequence[float] = ROTTERDAM_SPACING_MM,
                             table: pd.DataFrame | None = None,
                             progress: bool = False) -> pathlib.Path:
  """Writes real Rotterdam patients with volumes rendered from size and grade.

  **The images are synthetic; the patients, covariates and outcomes are
  real** (R ``survival::rotterdam`` via
  ``jaxsurv.data.public.load_cohort_table("rotterdam")``). Each patient's
  volume is rendered by :func:`render_rotterdam_volumes` from that patient's
  recorded size band and grade. ``size`` and ``grade`` are not among the
  clinical columns, so the image carries real prognostic information only it
  has; they stay in the manifest as ``render_size``/``render_grade`` (plus
  the drawn ``render_diameter_mm``) for reference only: never model inputs.

  Outcomes: ``os_time``/``os_event`` = death (``dtime``/``death``),
  ``dm_time``/``dm_event`` = recurrence (``rtime``/``recur``), in days.
  Default volumes: 48 x 48 x 16 voxels of 2.0 x 2.0 x 6.0 mm.

  Args:
    out_dir: output folder (created); volumes go to ``out_dir/images/``.
    seed: non-negative int; a patient's volume depends only on
      ``(seed, patient_id)``, so subsets give identical files.
    n_patients: ``None`` for all 2982 patients, or a smaller positive number
      for a deterministic subset stratified by size band, grade and death.
    shape: ``[x, y, z]`` voxels.
    spacing_mm: ``[x, y, z]`` voxel size in mm.
    table: the rotterdam table to use instead of loading it (same columns as
      ``load_cohort_table("rotterdam")``); mainly for tests.
    progress: show a tqdm progress bar.

  Returns:
    Path of ``out_dir/manifest.csv`` with ``patient_id, t1c, t2fs, mask``,
    the clinical columns of :data:`ROTTERDAM_CLINICAL_SPEC`, the four
    outcome columns and ``render_size, render_grade, render_diameter_mm``.

  Raises:
    ValueError: for a bad ``seed``/``n_patients`` (or more patients than the
      table has), a table lacking a column, or bad geometry.
  """
  seed = _check_seed(seed)
  shape, spacing = _check_geometry(shape, spacing_mm, _ROTTERDAM_MIN_FOV)
  table = _load_rotterdam() if table is None else table
  needed = ["patient_id", "size", "grade", *ROTTERDAM_CLINICAL_SPEC, *OUTCOME_COLUMNS]
  missing = [c for c in needed if c not in table.columns]
  if missing:
    raise ValueError(f"table: rotterdam table lacks columns {missing}")
  table = table.reset_index(drop=True)
  if n_patients is not None:
    n = _check_n(n_patients)
    if n > len(table):
      raise ValueError(f"n_patients: {n} requested but the rotterdam table has {len(table)}")
    table = table.iloc[_stratified_subset(table, n, seed)].reset_index(drop=True)
  checks.check_duration(table["os_time"], "os_time")
  checks.check_duration(table["dm_time"], "dm_time")
  checks.check_event(table["os_event"], "os_event")
  checks.check_event(table["dm_event"], "dm_event")

  out_dir = pathlib.Path(out_dir)
  images = out_dir / "images"
  images.mkdir(parents=True, exist_ok=True)
  paths, diameters = [], []
  rows = zip(table["patient_id"], table["size"], table["grade"])
  for pid, band, grade in _progress(rows, len(table), progress, "rotterdam rendered"):
    vol, diam = render_rotterdam_volumes(str(pid), str(band), int(grade), seed=seed,
                                         shape=shape, spacing_mm=spacing)
    paths.append(_write_patient(vol, images, str(pid)))
    diameters.append(round(diam, 2))
  manifest = pd.concat(
      [table[["patient_id"]], pd.DataFrame(paths, columns=["t1c", "t2fs", "mask"]),
       table[list(ROTTERDAM_CLINICAL_SPEC) + list(OUTCOME_COLUMNS)]], axis=1)
  manifest["render_size"] = table["size"].astype(str).to_numpy()
  manifest["render_grade"] = table["grade"].astype(np.int64).to_numpy()
  manifest["render_diameter_mm"] = diameters
  return _write_manifest(manifest, out_dir)
