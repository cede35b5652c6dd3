"""The ``sarcoma_phantom`` demo cohort: a fully synthetic sarcoma MRI cohort.

The patients, their 11 clinical variables, their T1 post-contrast (``t1c``)
and T2 fat-suppressed (``t2fs``) limb MRI and their overall survival (OS) and
distant-metastasis (DM) outcomes are all simulated from a known
proportional-hazards model. The true log-hazards are stored as the oracle
columns ``eta_os``/``eta_dm``, so a model's C-index can be compared with the
best achievable one. Part of the signal is visible only on T1c (necrotic
fraction), part only on T2-FS (peritumoural oedema), part only in the
clinical table (margin status, a noisy grade), and part in several
modalities (tumour volume, depth, heterogeneity).

* :data:`SARCOMA_CLINICAL_SPEC`: the clinical variables.
* :func:`draw_sarcoma_cohort`: latents, clinical table and outcomes (no
  images).
* :func:`render_sarcoma_volumes`: one patient's volumes.
* :func:`write_sarcoma_phantom`: the NIfTI files and ``manifest.csv``.

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
from jaxsurv.data.render import (OUTCOME_COLUMNS, PhantomVolumes, _RENDER_STREAM, _SARCOMA_TAG,
                                 _TABLE_STREAM, _acquire, _affine, _check_geometry, _check_n,
                                 _check_seed, _ellipsoid_radius, _grid, _patient_key,
                                 _patient_rng, _progress, _smooth_fields, _write_manifest,
                                 _write_patient)

# ---------------------------------------------------------------------------
# Clinical variable spec
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
  checks.check_duration(table["os_time"], "os_time")
  checks.check_duration(table["dm_time"], "dm_time")
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
