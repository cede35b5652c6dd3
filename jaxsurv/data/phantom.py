"""Demo cohorts: a synthetic sarcoma MRI phantom and rendered Rotterdam volumes.

**What these cohorts are.** jaxsurv ships two demo cohorts, written as real
NIfTI files plus a ``manifest.csv`` so that they go through exactly the path a
user's own cohort takes (manifest -> NIfTI loading -> preprocessing -> model).
*All images in both cohorts are rendered, not scanned*: no package ships
3D MRI with survival outcomes (none of the Python, Debian or npm packages
searched has any), so the volumes are drawn by the code below.

* ``sarcoma_phantom`` (:func:`write_sarcoma_phantom`) is **fully synthetic**:
  the patients, their 11 clinical variables, their T1 post-contrast (``t1c``)
  and T2 fat-suppressed (``t2fs``) limb MRI and their overall survival (OS)
  and distant-metastasis (DM) outcomes are all simulated from a known
  proportional-hazards model. The true log-hazards are stored as the oracle
  columns ``eta_os``/``eta_dm``, so a model's C-index can be compared with the
  best achievable one. Part of the signal is visible only on T1c (necrotic
  fraction), part only on T2-FS (peritumoural oedema), part only in the
  clinical table (margin status, a noisy grade), and part in several
  modalities (tumour volume, depth, heterogeneity).
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

Volumes are stored as ``[x, y, z]`` arrays (NIfTI ``i, j, k`` order; ``z`` is
the thick-slice axis), ``int16`` intensities in arbitrary scanner units and a
``uint8`` tumour mask, with an affine whose diagonal is the voxel spacing in
mm. Every random draw uses ``np.random.default_rng`` seeded by
``(seed, cohort, patient)``, so a subset of patients gets byte-identical
files and the same outcomes as in the full cohort.
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import zlib
from typing import Mapping, NamedTuple, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import scipy.fft
import scipy.ndimage
import scipy.special

from jaxsurv import validation

MANIFEST_NAME = "manifest.csv"
IMAGE_COLUMNS = ("t1c", "t2fs")
MASK_COLUMN = "mask"
OUTCOME_COLUMNS = ("os_time", "os_event", "dm_time", "dm_event")
ORACLE_COLUMNS = ("eta_os", "eta_dm")
# Generator variables of the sarcoma phantom: the truth behind the images and
# the hazard. Never model inputs.
LATENT_PREFIX = "latent_"
# Rotterdam's recorded size band and grade, and the diameter drawn from them:
# kept for reference (they are what the image shows), never model inputs.
REFERENCE_COLUMNS = ("render_size", "render_grade", "render_diameter_mm")

# Tissue codes of the label map returned with every rendered patient.
TISSUE_LABELS = {
    0: "air/background", 1: "fat", 2: "muscle", 3: "cortical bone",
    4: "fatty marrow", 5: "viable tumour", 6: "necrotic core", 7: "oedema",
    8: "fibroglandular tissue", 9: "chest wall", 10: "skin", 11: "cyst",
}

# ---------------------------------------------------------------------------
# Clinical variable specs
# ---------------------------------------------------------------------------

# The 11 clinical variables of the sarcoma phantom. They follow the "larger
# clinical model" of the MMNN paper (Table 1 and Methods: sex, age, location,
# histotype, grade, size, depth, neoadjuvant chemo, metastasis at presentation,
# RT timing, plus volume), except that the paper's tumour volume is replaced by
# margin status (Table 1), which carries the clinical-only signal here; tumour
# size is already a (noisy) copy of the tumour extent. Prevalences follow the
# paper's Table 1/2 where it reports them.
SARCOMA_CLINICAL_SPEC: Mapping[str, Mapping] = {
    "age": dict(kind="numeric", unit="years",
                description="age at diagnosis, ~N(56, 17) clipped to [18, 91]; "
                            "raises OS hazard"),
    "sex": dict(kind="categorical", levels=("F", "M"),
                description="42% F; no effect on outcome"),
    "location": dict(kind="categorical",
                     levels=("lower_extremity", "upper_extremity", "axial"),
                     description="68/18/14%; small effect; not rendered (every "
                                 "phantom is a limb/trunk-wall cylinder)"),
    "histotype": dict(kind="categorical",
                      levels=("UPS", "myxofibrosarcoma", "myxoid_liposarcoma",
                              "synovial_sarcoma", "other_liposarcoma",
                              "leiomyosarcoma", "other"),
                      description="histologic subtype (paper Table 2 grouped); "
                                  "shifts grade and hazard"),
    "grade": dict(kind="numeric", unit="FNCLCC grade 1-3 (ordinal)",
                  description="a noisy reading of the latent aggressiveness, "
                              "which drives both hazards"),
    "size_cm": dict(kind="numeric", unit="cm",
                    description="longest tumour diameter, a noisy copy (~12% "
                                "log-normal error) of the rendered tumour's"),
    "depth": dict(kind="categorical", levels=("superficial", "deep"),
                  description="relative to the fascia; ~88% deep; also visible "
                              "in the image"),
    "neoadjuvant_chemo": dict(kind="categorical", levels=(0, 1),
                              description="given more often to large high-grade "
                                          "tumours; slightly protective"),
    "mets_at_presentation": dict(kind="categorical", levels=(0, 1),
                                 description="~7%; strong effect on both hazards"),
    "rt_type": dict(kind="categorical", levels=("pre_op", "post_op"),
                    description="radiotherapy timing, 46/54%; no effect"),
    "margin": dict(kind="categorical", levels=("R0", "R1", "R2"),
                   description="surgical margin, 88/10/2%; clinical-only "
                               "signal (not visible in the image)"),
}

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
  categorical (with their levels). Oracle, latent and render-reference
  columns are not in it, so nothing built from the spec feeds them to a
  model.

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
  return manifest.CohortSpec(
      channels=IMAGE_COLUMNS, mask=MASK_COLUMN, numeric=numeric, categorical=categorical,
      outcomes=("os", "dm"),
      categorical_levels={k: tuple(str(v) for v in spec[k]["levels"]) for k in categorical})


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------

# Distinct tags keep the two cohorts' random streams apart for equal seeds.
_SARCOMA_TAG = 1
_ROTTERDAM_TAG = 2
# Per patient: stream 0 = table (latents, clinical, outcomes), 1 = rendering.
_TABLE_STREAM = 0
_RENDER_STREAM = 1


def _patient_rng(seed: int, tag: int, key: int, stream: int) -> np.random.Generator:
  """A generator that depends only on (seed, cohort tag, patient key, stream)."""
  return np.random.default_rng([seed, tag, key, stream])


def _patient_key(patient_id: str) -> int:
  """A stable non-negative integer key for a patient id (CRC-32 of its text)."""
  return zlib.crc32(str(patient_id).encode("utf-8"))


def _check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
  return int(seed)


def _check_n(n, name: str = "n_patients") -> int:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
    raise ValueError(f"{name}: expected a positive int, got {n!r}")
  return int(n)


def _check_geometry(shape, spacing_mm, min_fov_mm) -> tuple[tuple[int, ...], np.ndarray]:
  """Validates a volume shape and voxel spacing against a minimum field of view."""
  try:
    shape = tuple(int(s) for s in shape)
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError) as e:
    raise ValueError(f"shape/spacing_mm: expected 3 numbers each: {e}") from e
  if len(shape) != 3 or min(shape) < 4:
    raise ValueError(f"shape: expected 3 ints >= 4 ([x, y, z] voxels), got {shape}")
  if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
    raise ValueError(f"spacing_mm: expected 3 positive finite mm values, got {spacing_mm}")
  fov = np.asarray(shape) * spacing
  if np.any(fov < np.asarray(min_fov_mm)):
    raise ValueError(
        f"shape x spacing_mm gives a field of view of {fov.round(1).tolist()} mm; "
        f"the anatomy is drawn in mm and needs at least {list(min_fov_mm)} mm "
        "(use fewer, larger voxels for a smaller array)")
  return shape, spacing


def _grid(shape, spacing):
  """Voxel-centre coordinates in mm, centred on the volume, as broadcastable axes."""
  return tuple(
      ((np.arange(n, dtype=np.float32) - (n - 1) / 2) * s).reshape(
          [-1 if a == i else 1 for a in range(3)])
      for i, (n, s) in enumerate(zip(shape, spacing)))


def _smooth_fields(rng, shape, spacing, widths_mm) -> np.ndarray:
  """Unit-variance Gaussian random fields with Gaussian kernels of given widths.

  Equivalent to filtering white noise with a Gaussian kernel of standard
  deviation ``width`` mm (per field): the half-spectrum is drawn as complex
  white noise times the kernel's transfer function ``exp(-2 pi^2 w^2 f^2)``
  and transformed back. Only frequencies where the transfer function exceeds
  1e-3 are drawn, which makes smooth fields cheap. Widths are physical (mm),
  so the texture does not depend on the anisotropic voxel spacing. The
  fields are periodic over the volume, which is harmless here. Each field
  draws from its own child generator (``rng.spawn``), so a field's width does
  not shift the random numbers of the others.

  Returns:
    ``[len(widths_mm), x, y, z]`` float32, each field zero-mean, unit-variance.
  """
  fx = np.fft.fftfreq(shape[0], d=spacing[0]).astype(np.float32).reshape(-1, 1, 1)
  fy = np.fft.fftfreq(shape[1], d=spacing[1]).astype(np.float32).reshape(1, -1, 1)
  fz = np.fft.rfftfreq(shape[2], d=spacing[2]).astype(np.float32).reshape(1, 1, -1)
  f2 = fx * fx + fy * fy + fz * fz
  spec = np.zeros((len(widths_mm),) + f2.shape, np.complex64)
  for i, (w, child) in enumerate(zip(widths_mm, rng.spawn(len(widths_mm)))):
    filt = np.exp(np.float32(-2.0 * np.pi ** 2 * w * w) * f2)
    filt[0, 0, 0] = 0.0                      # zero mean
    keep = filt > 1e-3
    m = int(keep.sum())
    noise = child.standard_normal((2, m), dtype=np.float32)
    spec[i][keep] = (noise[0] + 1j * noise[1]) * filt[keep]
  out = scipy.fft.irfftn(spec, s=shape, axes=(1, 2, 3)).astype(np.float32, copy=False)
  out /= out.std(axis=(1, 2, 3), keepdims=True) + np.float32(1e-12)
  return out


def _bias_field(rng, grids, fov, amplitude: float) -> np.ndarray:
  """A smooth multiplicative coil-sensitivity field, exp(quadratic polynomial).

  ``amplitude`` is the standard deviation of each coefficient on coordinates
  normalised to [-1, 1]; 0.1 gives roughly +-20% across the field of view.
  The polynomial has no in-plane x slice cross terms, so the field is the
  product of an in-plane and a through-slice factor (cheap to evaluate).
  Returns a broadcastable ``[x, y, z]`` float32 array.
  """
  x, y, z = (g / np.float32(f / 2) for g, f in zip(grids, fov))
  c = rng.normal(0.0, amplitude, size=7).astype(np.float32)
  log_xy = c[0] * x + c[1] * y + c[3] * x * x + c[4] * y * y + c[5] * x * y
  log_z = c[2] * z + c[6] * z * z
  return np.exp(log_xy - log_xy.mean()) * np.exp(log_z - log_z.mean())


def _acquire(rng, clean: np.ndarray, grids, fov, *, bias_amplitude: float,
             noise_sd: float, gain) -> np.ndarray:
  """Simulates acquisition of a noiseless 2-channel image ``[2, x, y, z]``.

  Order: partial-volume blur (a Gaussian point-spread function of about one
  voxel FWHM along each axis, so wider in mm along the thick-slice axis), a
  smooth multiplicative bias field per channel, a per-channel gain (site /
  scanner scaling), then Rician noise (magnitude of a complex signal with
  Gaussian noise of standard deviation ``noise_sd`` x gain in each of the
  real and imaginary parts). Returns int16 ``[2, x, y, z]`` in units of
  1/1000 of the nominal fat T1 intensity.
  """
  out = np.empty(clean.shape, np.int16)
  for ch in range(clean.shape[0]):
    # sigma 0.42 voxel (FWHM ~1 voxel); truncate 2.5 keeps a 3-tap kernel, the
    # next tap would weigh < 1e-5.
    img = scipy.ndimage.gaussian_filter(clean[ch], sigma=0.42, mode="nearest", truncate=2.5)
    img = img * _bias_field(rng, grids, fov, bias_amplitude) * np.float32(gain[ch])
    sd = np.float32(noise_sd * gain[ch])
    re = img + sd * rng.standard_normal(img.shape, dtype=np.float32)
    im = sd * rng.standard_normal(img.shape, dtype=np.float32)
    mag = np.sqrt(re * re + im * im)
    out[ch] = np.clip(np.rint(mag * 1000.0), 0, np.iinfo(np.int16).max).astype(np.int16)
  return out


def _ellipsoid_radius(dx, dy, dz, axes, theta):
  """Normalised ellipsoid radius (1 on the surface) for an in-plane rotation."""
  ct, st = np.float32(np.cos(theta)), np.float32(np.sin(theta))
  u = dx * ct + dy * st
  v = -dx * st + dy * ct
  a, b, c = (np.float32(s) for s in axes)
  return np.sqrt((u / a) ** 2 + (v / b) ** 2 + (dz / c) ** 2)


class PhantomVolumes(NamedTuple):
  """One rendered patient, all arrays ``[x, y, z]`` (NIfTI i, j, k order).

  Attributes:
    t1c: int16 T1 post-contrast intensities (arbitrary units).
    t2fs: int16 T2 fat-suppressed intensities (arbitrary units).
    mask: uint8 tumour mask (1 = tumour, including its necrotic core; oedema
      excluded), drawn on the voxel grid before partial-volume blur.
    tissue: uint8 tissue label map (codes in :data:`TISSUE_LABELS`); for tests
      and inspection, not written to disk.
    affine: float64 ``[4, 4]`` voxel-to-world (mm) affine; its diagonal is the
      voxel spacing.
  """
  t1c: np.ndarray
  t2fs: np.ndarray
  mask: np.ndarray
  tissue: np.ndarray
  affine: np.ndarray


def _affine(shape, spacing, origin_shift) -> np.ndarray:
  aff = np.diag(list(spacing) + [1.0])
  centre = (np.asarray(shape) - 1) / 2 * spacing
  aff[:3, 3] = -centre + np.asarray(origin_shift)
  return aff


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: pathlib.Path) -> None:
  img = nib.Nifti1Image(array, affine)
  img.header.set_xyzt_units("mm")
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  nib.save(img, str(path))


def _safe_name(patient_id: str) -> str:
  keep = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(patient_id))
  if not keep or keep.startswith("."):
    keep = "p" + keep
  return keep


def _write_patient(vol: PhantomVolumes, images_dir: pathlib.Path, patient_id: str):
  """Writes the three NIfTI files; returns their paths relative to the manifest."""
  stem = _safe_name(patient_id)
  rel = {}
  for col, arr in (("t1c", vol.t1c), ("t2fs", vol.t2fs), ("mask", vol.mask)):
    name = f"{stem}_{col}.nii.gz"
    _save_nifti(arr, vol.affine, images_dir / name)
    rel[col] = f"{images_dir.name}/{name}"
  return rel


def _write_manifest(table: pd.DataFrame, out_dir: pathlib.Path) -> pathlib.Path:
  """Writes ``manifest.csv`` atomically (so a manifest implies complete files)."""
  path = out_dir / MANIFEST_NAME
  fd, tmp = tempfile.mkstemp(prefix=".manifest.", suffix=".csv", dir=out_dir)
  os.close(fd)
  try:
    table.to_csv(tmp, index=False, float_format="%.6g")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _progress(iterable, total: int, enabled: bool, desc: str):
  if not enabled:
    return iterable
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(iterable, total=total, desc=desc)


# ---------------------------------------------------------------------------
# Sarcoma phantom: latent variables, clinical table and outcomes
# ---------------------------------------------------------------------------

_HISTOTYPES = SARCOMA_CLINICAL_SPEC["histotype"]["levels"]
_HISTOTYPE_P = np.array([0.305, 0.221, 0.116, 0.123, 0.077, 0.028, 0.130])
# Shift of the grade score per histotype: myxoid liposarcoma is mostly low
# grade, UPS mostly high grade (paper Table 1 footnote).
_HISTOTYPE_GRADE_SHIFT = np.array([0.6, 0.2, -1.6, 0.3, -0.6, 0.2, 0.0])
# Histotype log-hazard offsets (OS, DM): synovial sarcoma metastasises more,
# myxoid liposarcoma less.
_HISTOTYPE_OS = np.array([0.15, -0.05, -0.35, 0.10, -0.20, 0.20, 0.0])
_HISTOTYPE_DM = np.array([0.15, -0.10, -0.45, 0.35, -0.30, 0.25, 0.0])
# Grade score cut points giving ~10% / 30% / 60% FNCLCC grade 1 / 2 / 3.
_GRADE_CUTS = (-1.55, -0.15)
_LOCATIONS = SARCOMA_CLINICAL_SPEC["location"]["levels"]
_LOCATION_P = np.array([0.676, 0.185, 0.139])
_LOCATION_OS = np.array([0.0, -0.05, 0.20])
_MARGINS = SARCOMA_CLINICAL_SPEC["margin"]["levels"]
_MARGIN_P = np.array([0.88, 0.10, 0.02])
_SITES = ("S1", "S2", "S3")
_SITE_P = {1: np.array([1.0]), 2: np.array([0.6, 0.4]), 3: np.array([0.45, 0.35, 0.20])}
# Per-site acquisition (gain per channel T1c/T2-FS, Rician noise sd relative to
# fat T1, bias-field coefficient sd): a scanner-level domain shift for
# federated and site-held-out experiments.
_SITE_ACQ = (
    dict(gain=(1.00, 1.00), noise=0.025, bias=0.08),
    dict(gain=(1.35, 0.75), noise=0.035, bias=0.12),
    dict(gain=(0.80, 1.30), noise=0.020, bias=0.16),
)

# Tumour volume (cm^3): log-normal, median 150 (deep) / 50 (superficial),
# clipped to [5, 600]; MMNN Table 1 reports a median of 284 cm^3 (IQR 82-694);
# the upper tail is cut so the tumour fits the default field of view.
_LOGV_MEDIAN_DEEP = np.log(150.0)
_LOGV_MEDIAN_SUPERFICIAL = np.log(50.0)
_LOGV_SD = 0.9
_V_RANGE = (5.0, 600.0)

# Standardisation constants of the hazard terms (population mean and sd of
# each latent under this generator, measured on 40k draws) so that each
# coefficient below is a log-hazard ratio per standard deviation.
_Z = dict(logv=(4.860, 0.928), nec=(0.344, 0.233), oed=(1.378, 0.933),
          het=(0.1753, 0.0722), age=(56.1, 16.6))

# Log-hazard coefficients per standard deviation (or per level for binary and
# ordinal terms). T1c-only: necrosis; T2-only: oedema; clinical-only: margin,
# aggressiveness (read through the noisy grade), age, metastasis at
# presentation, histotype, location; shared: volume, heterogeneity, depth.
# OS leans on age, necrosis, margin and metastasis at presentation; DM on
# oedema, heterogeneity, aggressiveness and histotype, so the two heads of a
# multi-task model see related but distinct signals.
_BETA_OS = dict(logv=0.40, nec=0.50, oed=0.30, het=0.15, deep=0.20, margin=0.55,
                aggr=0.35, age=0.45, mets=1.20, chemo=-0.15)
_BETA_DM = dict(logv=0.50, nec=0.25, oed=0.55, het=0.35, deep=0.35, margin=0.25,
                aggr=0.60, age=0.00, mets=0.80, chemo=-0.10)
# Shared log-normal frailty sd (common to OS and DM; not in eta).
_FRAILTY_SD = 0.5
# Weibull baselines h0(t) = lam * k * t^(k-1), t in years. DM hazard falls with
# time (most metastases appear in the first 2-3 years); OS hazard rises.
# lam calibrated (20k draws, then checked on 40k others: 29.8% / 24.8%) to
# ~30% OS and ~25% DM events under the censoring below.
_WEIBULL_OS = dict(lam=0.03845, k=1.10)
_WEIBULL_DM = dict(lam=0.05360, k=0.85)
# Administrative censoring uniform over 2-8 years of follow-up, plus random
# loss to follow-up at 4% per year.
_ADMIN_YEARS = (2.0, 8.0)
_DROPOUT_PER_YEAR = 0.04
_DAYS_PER_YEAR = 365.25


def _draw_sarcoma_patient(rng: np.random.Generator, n_sites: int) -> dict:
  """Draws one phantom patient's latents, clinical variables and outcomes.

  Every random number is drawn unconditionally and in a fixed order, so a
  patient's draws do not depend on branch outcomes or on ``n_sites`` beyond
  the site label itself.
  """
  u = rng.uniform(size=12)
  g = rng.standard_normal(size=12)
  # Demographics and tumour class.
  sex = "F" if u[0] < 0.42 else "M"
  age = float(np.clip(np.rint(56.0 + 17.0 * g[0]), 18, 91))
  location = _LOCATIONS[int(np.searchsorted(np.cumsum(_LOCATION_P), u[1] * _LOCATION_P.sum()))]
  h = int(np.searchsorted(np.cumsum(_HISTOTYPE_P), u[2] * _HISTOTYPE_P.sum()))
  deep = bool(u[3] < 0.88)
  # Latent aggressiveness, read clinically through a noisy grade.
  aggr = float(g[1])
  grade_score = aggr + _HISTOTYPE_GRADE_SHIFT[h] + 0.6 * g[2]
  grade = 1 + int(grade_score > _GRADE_CUTS[0]) + int(grade_score > _GRADE_CUTS[1])
  # Tumour extent: log-normal volume, ellipsoid elongated along the limb.
  logv_med = _LOGV_MEDIAN_DEEP if deep else _LOGV_MEDIAN_SUPERFICIAL
  volume = float(np.clip(np.exp(logv_med + _LOGV_SD * g[3]), *_V_RANGE))
  elong = 1.0 + 0.5 * u[4]                  # long (z) axis / mean in-plane axis
  aspect = 0.8 + 0.4 * u[5]                 # in-plane axis ratio
  r_mm = (3.0 * volume * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0)
  # Semi-axes a, b (in-plane) and c (z) with a * b * c = r^3.
  a = r_mm * elong ** (-1.0 / 3.0) * np.sqrt(aspect)
  b = r_mm * elong ** (-1.0 / 3.0) / np.sqrt(aspect)
  c = r_mm * elong ** (2.0 / 3.0)
  longest_mm = 2.0 * max(a, b, c)
  size_cm = float(np.round(longest_mm / 10.0 * np.exp(0.12 * g[4]), 1))
  # Image latents. Necrotic fraction: logit-normal, higher in aggressive
  # tumours (median ~0.3, as the paper's pathology necrosis).
  necrosis = float(np.clip(scipy.special.expit(-0.85 + 0.6 * aggr + 1.25 * g[5]), 0.0, 0.8))
  # Oedema halo width (mm): none in 25%, else log-normal, median 5 mm.
  oedema_mm = 0.0 if u[6] < 0.25 else float(np.clip(np.exp(np.log(5.0) + 0.7 * g[6]), 0.5, 30.0))
  heterogeneity = 0.05 + 0.25 * u[7]        # sd of the multiplicative texture
  corr_len_mm = 3.0 + 9.0 * u[8]            # kernel width of the texture field
  # Treatment and presentation.
  mets = int(u[9] < 0.07)
  margin_level = int(np.searchsorted(np.cumsum(_MARGIN_P), u[10] * _MARGIN_P.sum()))
  z_logv = (np.log(volume) - _Z["logv"][0]) / _Z["logv"][1]
  chemo_logit = -0.9 + 0.8 * z_logv + 0.7 * (grade == 3) - 0.7 * (not deep)
  chemo = int(u[11] < scipy.special.expit(chemo_logit))
  rt_type = "pre_op" if g[7] < -0.1 else "post_op"   # ~46% pre-op
  site = _SITES[int(np.searchsorted(np.cumsum(_SITE_P[n_sites]), scipy.special.ndtr(g[8])))]
  loc_idx = _LOCATIONS.index(location)

  # Linear predictors (log-hazard ratios; frailty excluded).
  terms = dict(
      logv=z_logv,
      nec=(necrosis - _Z["nec"][0]) / _Z["nec"][1],
      oed=(np.log1p(oedema_mm) - _Z["oed"][0]) / _Z["oed"][1],
      het=(heterogeneity - _Z["het"][0]) / _Z["het"][1],
      deep=float(deep), margin=float(margin_level), aggr=aggr,
      age=(age - _Z["age"][0]) / _Z["age"][1], mets=float(mets), chemo=float(chemo))
  eta_os = sum(_BETA_OS[k] * v for k, v in terms.items()) + _HISTOTYPE_OS[h] + _LOCATION_OS[loc_idx]
  eta_dm = sum(_BETA_DM[k] * v for k, v in terms.items()) + _HISTOTYPE_DM[h]

  # Event times by inversion of the Weibull survival function, with a shared
  # frailty; censoring by end of study or loss to follow-up.
  ev = rng.standard_exponential(size=3)
  frailty = _FRAILTY_SD * g[9]
  t_os = (ev[0] / (_WEIBULL_OS["lam"] * np.exp(eta_os + frailty))) ** (1 / _WEIBULL_OS["k"])
  t_dm = (ev[1] / (_WEIBULL_DM["lam"] * np.exp(eta_dm + frailty))) ** (1 / _WEIBULL_DM["k"])
  admin = _ADMIN_YEARS[0] + (_ADMIN_YEARS[1] - _ADMIN_YEARS[0]) * scipy.special.ndtr(g[10])
  cens = min(admin, ev[2] / _DROPOUT_PER_YEAR)
  days = lambda t: float(max(1.0, np.rint(t * _DAYS_PER_YEAR)))
  os_event = int(t_os <= cens)
  os_time = days(min(t_os, cens))
  # A metastasis is only observed while the patient is alive and followed up.
  dm_event = int(t_dm <= min(t_os, cens))
  dm_time = min(days(min(t_dm, t_os, cens)), os_time)

  return {
      "age": age, "sex": sex, "location": location, "histotype": _HISTOTYPES[h],
      "grade": grade, "size_cm": size_cm, "depth": "deep" if deep else "superficial",
      "neoadjuvant_chemo": chemo, "mets_at_presentation": mets, "rt_type": rt_type,
      "margin": _MARGINS[margin_level],
      "os_time": os_time, "os_event": os_event, "dm_time": dm_time, "dm_event": dm_event,
      "site": site,
      "eta_os": float(eta_os), "eta_dm": float(eta_dm),
      "latent_volume_cm3": volume, "latent_axis_a_mm": float(a),
      "latent_axis_b_mm": float(b), "latent_axis_c_mm": float(c),
      "latent_necrosis": necrosis, "latent_oedema_mm": oedema_mm,
      "latent_heterogeneity": float(heterogeneity), "latent_corr_length_mm": float(corr_len_mm),
      "latent_aggressiveness": aggr, "latent_frailty": float(frailty),
  }


def draw_sarcoma_cohort(n_patients: int = 300, *, seed: int = 0,
                        n_sites: int = 3) -> pd.DataFrame:
  """Draws the sarcoma phantom's table (no images): latents, clinical, outcomes.

  This is the first half of :func:`write_sarcoma_phantom`; it is cheap, so
  event rates and oracle concordance can be checked on large cohorts.

  Hazard model (all terms documented at the module constants): for endpoint
  ``e`` in {OS, DM}, ``h_e(t) = lam_e k_e t^(k_e - 1) exp(eta_e + z)`` with a
  Weibull baseline (t in years), ``eta_e`` a linear predictor over
  standardised latents and clinical variables, and ``z ~ N(0, 0.5^2)`` a
  frailty shared by both endpoints (not included in ``eta``). Censoring is
  the earlier of administrative end of study (uniform 2-8 years) and loss to
  follow-up (4%/year); DM is additionally censored at death. Expected event
  fractions: ~30% OS and ~25% DM.

  Args:
    n_patients: number of patients; patient ``i`` is ``phantom-{i:04d}`` and
      its draws depend only on ``(seed, i)``, so the first ``m`` rows of a
      larger cohort equal an ``m``-patient cohort.
    seed: non-negative int.
    n_sites: number of acquisition sites, 1 to 3 (site labels ``S1``-``S3``).

  Returns:
    DataFrame ``[n_patients, ...]`` with ``patient_id``, the 11 clinical
    columns of :data:`SARCOMA_CLINICAL_SPEC`, ``os_time``, ``os_event``,
    ``dm_time``, ``dm_event`` (days, int events), ``site``, the oracle
    ``eta_os``/``eta_dm`` and the ``latent_*`` generator variables.

  Raises:
    ValueError: for a bad ``n_patients``, ``seed`` or ``n_sites``.
  """
  n = _check_n(n_patients)
  seed = _check_seed(seed)
  if n_sites not in _SITE_P:
    raise ValueError(f"n_sites: expected 1, 2 or 3, got {n_sites!r}")
  rows = []
  for i in range(n):
    row = {"patient_id": f"phantom-{i:04d}"}
    row.update(_draw_sarcoma_patient(_patient_rng(seed, _SARCOMA_TAG, i, _TABLE_STREAM), n_sites))
    rows.append(row)
  table = pd.DataFrame(rows)
  validation.check_duration(table["os_time"], "os_time")
  validation.check_duration(table["dm_time"], "dm_time")
  for col in ("os_event", "dm_event", "grade", "neoadjuvant_chemo", "mets_at_presentation"):
    table[col] = table[col].astype(np.int64)
  return table


# ---------------------------------------------------------------------------
# Sarcoma phantom: rendering
# ---------------------------------------------------------------------------

# Nominal intensities (T1c, T2-FS) per tissue code, relative to fat on T1.
# Necrosis is as bright as viable tumour on T2-FS (both fluid-rich), so the
# necrotic fraction is readable from T1c only (non-enhancing core); oedema
# only adds T2-FS signal (below), so it is visible on T2-FS only.
_SARCOMA_LUT = np.zeros((12, 2), np.float32)
_SARCOMA_LUT[1] = (1.00, 0.12)   # fat: T1 bright, suppressed on T2-FS
_SARCOMA_LUT[2] = (0.45, 0.30)   # muscle: intermediate
_SARCOMA_LUT[3] = (0.05, 0.04)   # cortical bone: dark
_SARCOMA_LUT[4] = (0.90, 0.10)   # fatty marrow: like fat
_SARCOMA_LUT[5] = (0.85, 0.75)   # viable tumour: enhancing rim, T2 bright
_SARCOMA_LUT[6] = (0.22, 0.75)   # necrotic core: T1c dark, T2 bright
_OEDEMA_T2 = 0.40                # added to T2-FS, scaled by the halo profile

SARCOMA_SHAPE = (64, 64, 24)
SARCOMA_SPACING_MM = (3.0, 3.0, 6.5)
_SARCOMA_MIN_FOV = (120.0, 120.0, 60.0)


def render_sarcoma_volumes(patient: Mapping, *, seed: int = 0,
                           shape: Sequence[int] = SARCOMA_SHAPE,
                           spacing_mm: Sequence[float] = SARCOMA_SPACING_MM,
                           ) -> PhantomVolumes:
  """Renders one sarcoma phantom patient from a :func:`draw_sarcoma_cohort` row.

  Anatomy (mm): a limb cylinder along ``z`` with a subcutaneous fat ring (T1
  bright, suppressed on T2-FS), a muscle compartment (intermediate on both)
  and a bone (dark cortical ring around fatty marrow). The tumour is a
  deformed ellipsoid with the row's semi-axes, elongated along the limb, deep
  (inside the muscle, the bone pushed aside) or superficial (in the
  subcutaneous fat, bulging the skin): an enhancing viable rim, a necrotic
  core whose volume fraction is ``latent_necrosis``, multiplicative texture
  from a Gaussian random field of sd ``latent_heterogeneity`` and kernel width
  ``latent_corr_length_mm``, and a peritumoural oedema halo of width
  ``latent_oedema_mm`` that raises T2-FS only. Acquisition: partial-volume
  blur, bias field, per-site gain and Rician noise (see ``_acquire``).

  Args:
    patient: a row (mapping) of :func:`draw_sarcoma_cohort` with
      ``patient_id``, ``depth``, ``site`` and the ``latent_*`` columns.
    seed: the cohort seed (non-negative int); the rendering stream depends on
      ``(seed, patient number)`` only.
    shape: ``[x, y, z]`` voxels.
    spacing_mm: ``[x, y, z]`` voxel size in mm (``z`` is the slice axis).

  Returns:
    :class:`PhantomVolumes` with ``[x, y, z]`` arrays.

  Raises:
    ValueError: if the field of view is below 120 x 120 x 60 mm, or the row
      lacks a column or has an unknown ``site``/``patient_id``.
  """
  seed = _check_seed(seed)
  shape, spacing = _check_geometry(shape, spacing_mm, _SARCOMA_MIN_FOV)
  try:
    pid = str(patient["patient_id"])
    key = int(pid.rsplit("-", 1)[1]) if pid.startswith("phantom-") else _patient_key(pid)
    site = _SITES.index(patient["site"])
    deep = patient["depth"] == "deep"
    axes = np.array([patient["latent_axis_a_mm"], patient["latent_axis_b_mm"],
                     patient["latent_axis_c_mm"]], np.float64)
    necrosis = float(patient["latent_necrosis"])
    oedema_mm = float(patient["latent_oedema_mm"])
    het = float(patient["latent_heterogeneity"])
    corr_len = float(patient["latent_corr_length_mm"])
  except (KeyError, ValueError, IndexError) as e:
    raise ValueError(f"patient {patient.get('patient_id', '?')!r}: cannot render "
                     f"sarcoma phantom from this row: {e!r}") from e
  rng = _patient_rng(seed, _SARCOMA_TAG, key, _RENDER_STREAM)
  fov = np.asarray(shape) * spacing
  grids = _grid(shape, spacing)
  x, y, z = grids

  # All random numbers first, in a fixed order, so the rendering stream is the
  # same whatever the latent values (a patient rendered with a different
  # oedema width differs only where the oedema is).
  u = rng.uniform(size=12)
  r_mean = float(np.cbrt(np.prod(axes)))
  fields = _smooth_fields(rng, shape, spacing,
                          (0.45 * r_mean, corr_len, 6.0, 4.0))
  f_deform, f_het, f_tex, f_oed = fields

  # Limb geometry: muscle radius large enough to hold tumour and bone apart.
  deform = 0.12                                  # boundary deformation amplitude
  a_max = float(max(axes[0], axes[1])) * (1 + deform)
  r_bone = 11.0 + 4.0 * u[0]
  cortex = 3.0 + 2.0 * u[1]
  fat = 6.0 + 12.0 * u[2]
  r_muscle = 45.0 + 20.0 * u[3]
  if deep:
    r_muscle = max(r_muscle, a_max + 2 * r_bone + 12.0)
  else:
    r_muscle = max(r_muscle, 2 * r_bone + 15.0)
  centre = np.array([(u[4] - 0.5) * 0.1 * fov[0], (u[5] - 0.5) * 0.1 * fov[1]])
  taper = 1.0 + 0.08 * (2 * u[6] - 1) * z / (fov[2] / 2)   # limb narrows along z
  phi = 2 * np.pi * u[7]
  direction = np.array([np.cos(phi), np.sin(phi)])
  if deep:
    d_t = (0.3 + 0.7 * u[8]) * max(r_muscle - a_max - 4.0, 0.0)
    # Bone on the opposite side, far enough from the tumour not to touch it.
    d_b_min = max(a_max + r_bone + 6.0 - d_t, 0.0)
    d_b_max = max(r_muscle - r_bone - 4.0, d_b_min)
    d_b = d_b_min + 0.5 * u[9] * (d_b_max - d_b_min)
    bone_dir = -direction
    theta = phi + np.pi * u[10]
    t_xy = centre + d_t * direction
  else:
    # Superficial: the tumour sits on the fascia, one semi-axis radial.
    theta = phi + (np.pi / 2 if u[10] < 0.5 else 0.0)
    radial_semi = axes[1] if u[10] < 0.5 else axes[0]
    t_xy = centre + (r_muscle + radial_semi + 1.0) * direction
    d_b = u[9] * (r_muscle - r_bone - 6.0)
    bone_dir = np.array([np.cos(phi + 2.5), np.sin(phi + 2.5)])
  t_z = (u[11] - 0.5) * 0.1 * fov[2]
  b_xy = centre + d_b * bone_dir

  # Tumour: normalised radius with a smooth boundary deformation.
  dx, dy, dz = x - np.float32(t_xy[0]), y - np.float32(t_xy[1]), z - np.float32(t_z)
  # tanh bounds the deformation to +-deform of the radius (no tentacles).
  rho = _ellipsoid_radius(dx, dy, dz, axes, theta) / (1 + deform * np.tanh(f_deform))
  tumour = rho < 1.0
  # Necrotic core: the inner part whose volume fraction is ~necrosis (volume
  # scales with the cube of the normalised radius), slightly irregular.
  core = tumour & (rho * (1 + 0.08 * f_tex) < np.cbrt(necrosis))
  # Distance outside the tumour surface along the ray from its centre (mm).
  r_c = np.sqrt(dx * dx + dy * dy + dz * dz)
  dist_out = r_c * (1 - 1 / np.maximum(rho, 1.0))

  # Anatomy labels.
  r_limb = np.hypot(x - np.float32(centre[0]), y - np.float32(centre[1]))
  r_b = np.hypot(x - np.float32(b_xy[0]), y - np.float32(b_xy[1]))
  limb = r_limb < (r_muscle + fat) * taper
  if not deep:
    limb = limb | (dist_out < 4.0)              # skin bulging over the tumour
  tissue = np.zeros(shape, np.uint8)
  tissue[limb] = 1
  tissue[np.broadcast_to(r_limb < r_muscle * taper, shape)] = 2
  tissue[np.broadcast_to(r_b < r_bone, shape)] = 3
  tissue[np.broadcast_to(r_b < r_bone - cortex, shape)] = 4
  soft = (tissue == 1) | (tissue == 2)
  tissue[tumour] = 5
  tissue[core] = 6

  clean = _SARCOMA_LUT[tissue].transpose(3, 0, 1, 2).copy()   # [2, x, y, z]
  texture = 1 + 0.04 * f_tex
  clean *= np.where(soft, texture, np.float32(1))
  clean *= np.where(tumour, np.maximum(1 + het * f_het, 0.1), np.float32(1))
  if oedema_mm > 0:
    halo = np.clip(1 - dist_out / np.float32(oedema_mm), 0, 1) * (0.8 + 0.2 * np.tanh(f_oed))
    halo = np.where(soft & ~tumour, halo, np.float32(0))
    clean[1] += np.float32(_OEDEMA_T2) * halo
    tissue[halo > 0.25] = 7
  acq = _SITE_ACQ[site]
  img = _acquire(rng, clean, grids, fov, bias_amplitude=acq["bias"], noise_sd=acq["noise"],
                 gain=acq["gain"])
  affine = _affine(shape, spacing, (centre[0], centre[1], 0.0))
  return PhantomVolumes(img[0], img[1], tumour.astype(np.uint8), tissue, affine)


def write_sarcoma_phantom(out_dir, *, n_patients: int = 300, seed: int = 0,
                          shape: Sequence[int] = SARCOMA_SHAPE,
                          spacing_mm: Sequence[float] = SARCOMA_SPACING_MM,
                          n_sites: int = 3, progress: bool = False) -> pathlib.Path:
  """Writes the synthetic sarcoma cohort: NIfTI volumes plus ``manifest.csv``.

  Everything in this cohort is synthetic (patients, images and outcomes); see
  the module docstring. Tables come from :func:`draw_sarcoma_cohort`, images
  from :func:`render_sarcoma_volumes`. Default volumes are 64 x 64 x 24 voxels
  of 3.0 x 3.0 x 6.5 mm (a 192 x 192 x 156 mm field of view: coarse in-plane
  for speed, with realistic thick slices).

  Args:
    out_dir: output folder (created); volumes go to ``out_dir/images/``.
      Existing files of the same names are overwritten.
    n_patients: cohort size (default 300).
    seed: non-negative int; the same seed gives byte-identical files.
    shape: ``[x, y, z]`` voxels.
    spacing_mm: ``[x, y, z]`` voxel size in mm, written into each affine.
    n_sites: 1-3 acquisition sites with different intensity scaling, noise
      and bias (column ``site``).
    progress: show a tqdm progress bar.

  Returns:
    Path of ``out_dir/manifest.csv``: ``patient_id, t1c, t2fs, mask``, the 11
    clinical columns, the outcomes (days), ``site``, then the oracle
    ``eta_os, eta_dm`` and ``latent_*`` columns (never model inputs).

  Raises:
    ValueError: for bad arguments (see :func:`draw_sarcoma_cohort` and
      :func:`render_sarcoma_volumes`).
  """
  shape, spacing = _check_geometry(shape, spacing_mm, _SARCOMA_MIN_FOV)
  table = draw_sarcoma_cohort(n_patients, seed=seed, n_sites=n_sites)
  out_dir = pathlib.Path(out_dir)
  images = out_dir / "images"
  images.mkdir(parents=True, exist_ok=True)
  paths = []
  records = table.to_dict("records")
  for row in _progress(records, len(records), progress, "sarcoma phantom"):
    vol = render_sarcoma_volumes(row, seed=seed, shape=shape, spacing_mm=spacing)
    paths.append(_write_patient(vol, images, row["patient_id"]))
  files = pd.DataFrame(paths, columns=["t1c", "t2fs", "mask"])
  clinical = list(SARCOMA_CLINICAL_SPEC)
  rest = [c for c in table.columns if c not in clinical + ["patient_id", *OUTCOME_COLUMNS]]
  manifest = pd.concat(
      [table[["patient_id"]], files, table[clinical + list(OUTCOME_COLUMNS) + rest]], axis=1)
  return _write_manifest(manifest, out_dir)


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
  validation.check_duration(table["os_time"], "os_time")
  validation.check_duration(table["dm_time"], "dm_time")
  validation.check_event(table["os_event"], "os_event")
  validation.check_event(table["dm_event"], "dm_event")

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
