r"""Where Grad-CAM maps put their mass: tumour, periphery and phantom tissues, against chance.

The MMNN paper says of its Grad-CAM maps that the model "deemed pixels within
the tumor volume as most relevant". This module measures that claim on a
trained run instead of reading it off a few pictures.

For a map ``L >= 0`` on the model grid (``jaxsurv.gradcam``; ``[D, H, W]``)
and a region ``R`` (a boolean mask on the same grid),

  fraction(L, R) = sum_{v in R} L(v) / sum_v L(v)      (NaN when L is all zero)
  chance(R)      = |R| / (D * H * W)

``fraction`` is the "energy-based pointing game" of Wang et al. (Score-CAM,
CVPR Workshops 2020, localisation evaluation: the share of the map's energy
inside the object's box), here with the region itself instead of its box.
``chance`` is the fraction a map spread uniformly over the grid would put in
the region, so ``fraction / chance`` > 1 means the map concentrates on the
region and < 1 that it avoids it. Both depend on the map's normalisation only
through its shape, not its scale.

Regions:

* ``tumour``: the tumour mask on the grid (``PreparedCohort.masks``);
* ``tumour_periphery``: the tumour plus the shell around it up to
  ``periphery_mm`` (``periphery``; Euclidean distance between voxel centres
  in mm, ``scipy.ndimage.distance_transform_edt`` with the grid's spacing);
* ``sarcoma_phantom`` cohorts only: ``core`` (the necrotic core, visible on
  T1c only) and ``oedema`` (the peritumoural oedema halo, visible on T2-FS
  only). Only the tumour mask is written to disk, so these are re-rendered
  (``phantom_tissue_masks``): the patient's row is drawn again with the
  cohort's seed (``draw_sarcoma_cohort``; the written table is rounded to 6
  significant digits, the draw is exact), its tissue labels are rendered
  (``render_sarcoma_volumes``, deterministic in the row and the seed) on the
  written scan's grid and resampled onto the model grid exactly as
  ``jaxsurv.data.mri.preprocess_case`` resamples the tumour mask (the same
  crop box, isotropic stage, mask interpolation, then nearest neighbour).
  The re-rendered tumour label, resampled the same way, must equal the
  stored mask voxel for voxel, else an error is raised.

``localisation_summary`` runs a trained MMNN run (``jaxsurv.predict.load_run``)
over given patients of a prepared cohort, with both Grad-CAM signs
(``"increasing"``: the evidence that raises the log-hazard, today's maps;
``"decreasing"``: the evidence that lowers it; ``jaxsurv.gradcam``), and
summarises per sign, outcome and risk group (below / above the median risk
score of those patients, and all); ``markdown`` renders the summary.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from jaxsurv import gradcam
from jaxsurv.errors import UserError

PathLike = str | os.PathLike

REGIONS = ("tumour", "tumour_periphery")
PHANTOM_REGIONS = ("core", "oedema")
GROUPS = ("all", "low", "high")
# The phantom latent each phantom region should follow.
_LATENT_OF = {"core": "latent_necrosis", "oedema": "latent_oedema_mm"}
# Tissue codes of ``render_sarcoma_volumes`` (``jaxsurv.data.render.TISSUE_LABELS``).
_CORE_CODE, _OEDEMA_CODE = 6, 7
_PHANTOM = "sarcoma_phantom"
# Columns a re-drawn phantom row must reproduce (the written table is %.6g).
_LATENT_COLUMNS = ("latent_axis_a_mm", "latent_axis_b_mm", "latent_axis_c_mm",
                   "latent_necrosis", "latent_oedema_mm", "latent_heterogeneity",
                   "latent_corr_length_mm")


# ----------------------------------------------------------------------------
# Fractions of mass, chance, periphery.
# ----------------------------------------------------------------------------


def region_fractions(cam, regions: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Fraction of each map's mass inside each region.

  Args:
    cam: ``[batch, outcomes, D, H, W]`` non-negative maps (e.g.
      ``GradCAM.cam``).
    regions: ``{name: bool [batch, D, H, W]}`` masks on the same grid, one per
      patient.

  Returns:
    ``{name: float64 [batch, outcomes]}``: ``sum_{v in region} cam /
    sum_v cam``, in [0, 1]; NaN for an all-zero map (it has no mass to place).

  Raises:
    UserError: shapes that do not fit, or negative map values.
  """
  cam = np.asarray(cam, np.float64)
  if cam.ndim != 5:
    raise UserError(f"cam: expected [batch, outcomes, D, H, W], got shape {cam.shape}")
  if cam.size and float(cam.min()) < 0:
    raise UserError(f"cam: maps must be non-negative (Grad-CAM after its ReLU), minimum "
                    f"{float(cam.min()):.3g}")
  total = cam.sum(axis=(2, 3, 4))
  out = {}
  for name, region in regions.items():
    r = _region_array(region, name, (cam.shape[0],) + cam.shape[2:])
    inside = np.einsum("bkdhw,bdhw->bk", cam, r.astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
      out[name] = np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)
  return out


def chance_fractions(regions: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """The fraction of a uniform map's mass inside each region: region voxels / grid voxels.

  Args:
    regions: ``{name: bool [batch, D, H, W]}``.

  Returns:
    ``{name: float64 [batch]}`` in [0, 1].

  Raises:
    UserError: a region that is not ``[batch, D, H, W]``.
  """
  out = {}
  for name, region in regions.items():
    r = np.asarray(region)
    if r.ndim != 4:
      raise UserError(f"regions[{name!r}]: expected bool [batch, D, H, W], got shape {r.shape}")
    r = r.astype(bool)
    out[name] = r.reshape(r.shape[0], -1).mean(axis=1, dtype=np.float64)
  return out


def _region_array(region, name: str, shape: tuple[int, ...]) -> np.ndarray:
  r = np.asarray(region)
  if r.shape != shape:
    raise UserError(f"regions[{name!r}]: expected bool [batch, D, H, W] = {shape}, got shape "
                    f"{r.shape}")
  return r.astype(bool)


def periphery(mask, width_mm: float, spacing_mm: Sequence[float]) -> np.ndarray:
  """The shell around a tumour up to ``width_mm``: voxels outside it within that distance.

  Distances are Euclidean between voxel centres in mm
  (``scipy.ndimage.distance_transform_edt(~mask, sampling=spacing_mm)``):
  a voxel belongs to the shell when it is outside the mask and the nearest
  mask voxel's centre lies at most ``width_mm`` away. ``mask | periphery``
  is the region "tumour + periphery".

  Args:
    mask: ``[D, H, W]`` tumour mask (non-zero = tumour).
    width_mm: shell width (mm, >= 0; 0 gives an empty shell).
    spacing_mm: voxel size (mm) along ``(D, H, W)``, i.e. the ITK spacing
      reversed.

  Returns:
    bool ``[D, H, W]``, disjoint from the mask.

  Raises:
    UserError: a mask that is not 3-D or is empty, a negative width, or a
      spacing that is not 3 positive numbers.
  """
  m = np.asarray(mask) != 0
  if m.ndim != 3:
    raise UserError(f"mask: expected [D, H, W], got shape {m.shape}")
  sp = tuple(float(s) for s in np.ravel(spacing_mm))
  if len(sp) != 3 or not all(s > 0 and math.isfinite(s) for s in sp):
    raise UserError(f"spacing_mm: expected 3 positive mm (D, H, W), got {spacing_mm!r}")
  if not (width_mm >= 0 and math.isfinite(width_mm)):
    raise UserError(f"width_mm: must be >= 0 mm, got {width_mm!r}")
  if not m.any():
    raise UserError("mask: empty tumour mask, no periphery around it")
  import scipy.ndimage  # pylint: disable=import-outside-toplevel
  dist = scipy.ndimage.distance_transform_edt(~m, sampling=sp)
  return ~m & (dist <= width_mm)


# ----------------------------------------------------------------------------
# Phantom tissues on the model grid.
# ----------------------------------------------------------------------------


def _prepared_seed(prepared) -> int:
  """The generator seed a prepared demo ``sarcoma_phantom`` cohort was written with."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  meta = dict(tfds.builder_from_directory(os.fspath(prepared.dataset_dir)).info.metadata or {})
  if meta.get("cohort") != _PHANTOM or meta.get("kind") != "demo" or meta.get("seed") is None:
    raise UserError(f"{prepared.dataset_dir}: not a prepared demo {_PHANTOM!r} cohort (cohort "
                    f"{meta.get('cohort')!r}, kind {meta.get('kind')!r}); pass the seed it was "
                    "written with")
  return int(meta["seed"])


class _PhantomTissues:
  """Re-renders phantom tissue masks on a prepared cohort's grid (see the module docstring)."""

  def __init__(self, prepared, seed: int | None = None):
    from jaxsurv.data import sarcoma_phantom  # pylint: disable=import-outside-toplevel
    if prepared.preprocess is None or prepared.masks is None:
      raise UserError(f"cohort {prepared.name!r}: no images on a grid (tabular cohort)")
    self.prepared = prepared
    self.seed = _prepared_seed(prepared) if seed is None else int(seed)
    self.index = {str(p): i for i, p in enumerate(prepared.patient_ids)}
    table = prepared.table.reset_index(drop=True)
    missing = [c for c in ("patient_id", "depth", "site") + _LATENT_COLUMNS
               if c not in table.columns]
    if missing:
      raise UserError(f"cohort {prepared.name!r}: the table lacks the phantom columns {missing}; "
                      "is it a sarcoma_phantom cohort?")
    self.table = table
    self._draws = None
    self._sp = sarcoma_phantom

  @staticmethod
  def _key(pid: str) -> int:
    head, _, num = pid.rpartition("-")
    if head != "phantom" or not num.isdigit():
      raise UserError(f"patient {pid!r}: not a sarcoma phantom id ('phantom-<number>')")
    return int(num)

  def _drawn_row(self, pid: str, i: int) -> dict:
    key = self._key(pid)
    if self._draws is None or key >= len(self._draws):
      n = max(key + 1, max(self._key(str(p)) for p in self.prepared.patient_ids) + 1)
      self._draws = self._sp.draw_sarcoma_cohort(n, seed=self.seed)
    row = self._draws.iloc[key].to_dict()
    stored = self.table.iloc[i]
    drawn = np.array([row[c] for c in _LATENT_COLUMNS], np.float64)
    kept = stored[list(_LATENT_COLUMNS)].to_numpy(np.float64)
    if row["patient_id"] != pid or str(stored["depth"]) != row["depth"] or not np.allclose(
        drawn, kept, rtol=1e-5, atol=1e-9):
      raise UserError(f"patient {pid!r}: the cohort table's latent columns differ from the "
                      f"sarcoma phantom drawn with seed {self.seed}; was the cohort written "
                      "with another seed?")
    # The site only scales the acquisition, never the tissue labels.
    row["site"] = stored["site"]
    return row

  def masks(self, pid: str) -> dict[str, np.ndarray]:
    """``{"tumour", "core", "oedema"}`` bool ``[D, H, W]`` on the model grid of patient ``pid``."""
    from jaxsurv.data import mri  # pylint: disable=import-outside-toplevel
    if pid not in self.index:
      raise UserError(f"patient {pid!r}: not in cohort {self.prepared.name!r}")
    i = self.index[pid]
    geoms = self.prepared.case_geometry(i)
    if geoms is None:
      raise UserError(f"patient {pid!r}: has no image in cohort {self.prepared.name!r}")
    stored_grid, original = geoms
    row = self._drawn_row(pid, i)
    vol = self._sp.render_sarcoma_volumes(row, seed=self.seed, shape=original.size,
                                          spacing_mm=original.spacing)
    # NIfTI (RAS) affine as ITK reads it (LPS): x and y flipped.
    flip = np.diag([-1.0, -1.0, 1.0])
    rendered = mri.Geometry(tuple(original.size), tuple(flip @ vol.affine[:3, 3]),
                            tuple(float(s) for s in original.spacing),
                            tuple((flip @ vol.affine[:3, :3] / np.asarray(original.spacing))
                                  .ravel()))
    if mri.geometry_mismatch_mm(rendered, original) > 1e-3:
      raise UserError(f"patient {pid!r}: the re-rendered scan's grid (origin {rendered.origin}) "
                      f"is not the written one ({original.origin}); was the cohort written with "
                      f"another seed than {self.seed}?")
    labels = {"tumour": vol.mask > 0, "core": vol.tissue == _CORE_CODE,
              "oedema": vol.tissue == _OEDEMA_CODE}
    out, grid = _labels_on_grid(labels, original, self.prepared.preprocess, pid)
    stored = self.prepared.masks[i] > 0
    if mri.geometry_mismatch_mm(grid, stored_grid) > 1e-3 or not np.array_equal(
        out["tumour"], stored):
      raise UserError(f"patient {pid!r}: the re-rendered tumour resampled onto the model grid "
                      f"differs from the stored mask ({int(np.sum(out['tumour'] != stored))} of "
                      f"{stored.size} voxels; grid displaced by "
                      f"{mri.geometry_mismatch_mm(grid, stored_grid):.3g} mm): the phantom's "
                      "rendering or the preprocessing changed since the cohort was prepared")
    return out


def _labels_on_grid(labels: Mapping[str, np.ndarray], original, cfg, where: str):
  """Resamples ``[x, y, z]`` label masks onto the model grid as ``preprocess_case`` does the mask.

  The crop box comes from ``labels["tumour"]``; every label goes through the
  isotropic stage (``cfg.mask_interpolation``) and then nearest neighbour to
  the grid. Returns ``({name: bool [D, H, W]}, grid geometry)``.
  """
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import mri  # pylint: disable=import-outside-toplevel
  imgs = {k: original.apply_to(sitk.GetImageFromArray(
      np.ascontiguousarray(np.asarray(v, np.uint8).transpose(2, 1, 0)))) for k, v in labels.items()}
  # The crop box and grids of preprocess_case (steps 4-6 of jaxsurv.data.mri).
  # pylint: disable=protected-access
  mask_o = sitk.DICOMOrient(imgs["tumour"], cfg.orientation)
  frame = mri.Geometry.of(mask_o)
  centre, extent = mri._roi_box(mask_o, where, cfg)
  iso_size = np.maximum(1, np.ceil(extent / cfg.spacing_mm - 1e-6)).astype(int)
  iso_extent = iso_size * cfg.spacing_mm
  iso = mri._frame_geometry(frame, centre, iso_extent, iso_size)
  grid = mri._frame_geometry(frame, centre, iso_extent, cfg.grid[::-1])
  resample = mri._resample
  # pylint: enable=protected-access
  out = {}
  for k, img in imgs.items():
    if cfg.mask_interpolation == "nearest":
      fine = resample(img, iso, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    else:
      fine = sitk.Cast(resample(img, iso, sitk.sitkLinear, 0) >= 0.5, sitk.sitkUInt8)
    out[k] = sitk.GetArrayFromImage(resample(fine, grid, sitk.sitkNearestNeighbor, 0,
                                             sitk.sitkUInt8)) > 0
  return out, grid


def phantom_tissue_masks(prepared, patient_ids: Sequence[str], *,
                         seed: int | None = None) -> dict[str, np.ndarray]:
  """Necrotic core and oedema masks of ``sarcoma_phantom`` patients on the model grid.

  See the module docstring: each patient's row is drawn again
  (``draw_sarcoma_cohort`` with the cohort's seed), its tissue labels are
  rendered (``render_sarcoma_volumes``) on the written scan's grid
  (``PreparedCohort.case_geometry``) and resampled onto the model grid as
  the tumour mask was; the tumour label must reproduce the stored mask.

  Args:
    prepared: a ``PreparedCohort`` of the sarcoma phantom.
    patient_ids: patients (ids of ``prepared.patient_ids``).
    seed: the cohort's generator seed; None reads it from the prepared
      dataset's metadata (demo cohorts prepared by ``jaxsurv.data.prepare``).

  Returns:
    ``{"tumour", "core", "oedema"}``: bool ``[n, D, H, W]`` in
    ``patient_ids`` order (``tumour`` equals ``prepared.masks``).

  Raises:
    UserError: not a phantom cohort (or no seed recorded), an unknown
      patient or one without an image, a table or scan grid that the seed
      does not reproduce, or a re-rendered tumour that differs from the
      stored mask on the grid.
  """
  tissues = _PhantomTissues(prepared, seed)
  per = [tissues.masks(str(p)) for p in patient_ids]
  shape = (0,) + tuple(prepared.preprocess.grid)
  return {k: (np.stack([m[k] for m in per]) if per else np.zeros(shape, bool))
          for k in ("tumour", "core", "oedema")}


# ----------------------------------------------------------------------------
# Maps of a trained run.
# ----------------------------------------------------------------------------


def _grid_spacing(prepared, i: int, pid: str) -> tuple[float, float, float]:
  spacing = prepared.grid_spacing(i)
  if spacing is None:
    raise UserError(f"patient {pid!r}: has no image in cohort {prepared.name!r}")
  return spacing


def _cohort_clinical(run, table: pd.DataFrame) -> np.ndarray:
  """The clinical input of cohort patients as training built it (``predict.clinical_features``).

  Training encoded a level absent from its split as all zeros
  (``handle_unknown="ignore"``); ``load_run`` switches that to an error for
  new patients, so for the run's own cohort it is switched back.
  """
  from jaxsurv import predict  # pylint: disable=import-outside-toplevel
  if run.clinical is not None:
    clin = copy.copy(run.clinical)
    clin.handle_unknown = "ignore"
    run = dataclasses.replace(run, clinical=clin)
  try:
    return predict.clinical_features(run, table)
  except ValueError as e:
    raise UserError(f"clinical features of cohort patients: {e}") from e


def localisation_table(run, prepared, patient_ids: Sequence[str], *,
                       batch_size: int | None = None, periphery_mm: float = 10.0,
                       signs: Sequence[str] = gradcam.SIGNS,
                       layer: str = gradcam.LAST_DENSE_BLOCK, head: str = "mm",
                       seed: int | None = None) -> pd.DataFrame:
  """Per patient, sign and outcome: where the Grad-CAM map puts its mass.

  Args:
    run: a ``jaxsurv.predict.TrainedRun`` with an image branch.
    prepared: the ``PreparedCohort`` the run was trained on (or one prepared
      with the same settings: the fingerprints must match).
    patient_ids: patients to explain (ids of ``prepared.patient_ids``).
    batch_size: patients per forward pass (default the run's
      ``eval_batch_size``).
    periphery_mm: width (mm) of the shell of ``tumour_periphery``.
    signs: Grad-CAM signs (``jaxsurv.gradcam.SIGNS``).
    layer, head: as ``jaxsurv.gradcam.mmnn_grad_cam``.
    seed: sarcoma phantom only, its generator seed (None: from the prepared
      metadata, see ``phantom_tissue_masks``).

  Returns:
    DataFrame, one row per (patient, sign, outcome): ``patient_id``,
    ``sign``, ``outcome``, ``risk`` (the head's log-hazard), ``peak`` (the
    map's un-normalised maximum), ``all_zero``, and per region
    ``frac_<region>`` (NaN for an all-zero map) and ``chance_<region>``;
    for the phantom also ``latent_necrosis`` and ``latent_oedema_mm``.

  Raises:
    UserError: a run without an image branch, unknown or image-less
      patients, a cohort preprocessed otherwise than the run's training
      data, a bad batch size, sign, layer or head; phantom errors of
      ``phantom_tissue_masks``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jaxsurv import predict  # pylint: disable=import-outside-toplevel
  if not run.has_image:
    raise UserError(f"Grad-CAM needs an image branch; the run has modalities "
                    f"{list(run.modalities)}")
  signs = tuple(signs)
  bad = [s for s in signs if s not in gradcam.SIGNS]
  if bad or not signs:
    raise UserError(f"signs: expected some of {list(gradcam.SIGNS)}, got {list(signs)}")
  if prepared.images is None or prepared.masks is None:
    raise UserError(f"cohort {prepared.name!r} has no images")
  if prepared.fingerprint != run.fingerprint:
    raise UserError(f"cohort {prepared.name!r} was preprocessed with fingerprint "
                    f"{prepared.fingerprint}, the run {run.workdir} with {run.fingerprint}: its "
                    "images are not what the model saw in training")
  bs = int(batch_size or run.config.eval_batch_size)
  if bs < 1:
    raise UserError(f"batch_size: must be >= 1, got {batch_size!r}")
  ids = [str(p) for p in patient_ids]
  index = {str(p): i for i, p in enumerate(prepared.patient_ids)}
  unknown = [p for p in ids if p not in index]
  absent = [p for p in ids if p in index and not prepared.image_present[index[p]]]
  if unknown or absent or not ids:
    raise UserError(f"patient_ids: {len(unknown)} not in cohort {prepared.name!r} "
                    f"({unknown[:5]}), {len(absent)} without an image ({absent[:5]}); "
                    f"{len(ids)} given")
  rows = np.array([index[p] for p in ids], np.int64)
  table = prepared.table.reset_index(drop=True)
  clin = _cohort_clinical(run, table.iloc[rows])
  phantom = prepared.name == _PHANTOM
  tissues = _PhantomTissues(prepared, seed) if phantom else None
  regions_all = REGIONS + (PHANTOM_REGIONS if phantom else ())

  def maps(variables, image, clinical):
    return {s: gradcam.mmnn_grad_cam(run.model, variables, image, clinical, layer=layer,
                                     head=head, sign=s) for s in signs}

  cam_jit = jax.jit(maps)
  out = []
  for start in range(0, len(ids), bs):
    sel = rows[start:start + bs]
    bids = ids[start:start + bs]
    m = len(sel)
    image = predict.pad_batch(prepared.images[sel].astype(np.float32), bs)
    clinical = predict.pad_batch(clin[start:start + bs], bs)
    try:
      res = jax.device_get(cam_jit(run.variables, image, clinical))
    except ValueError as e:  # gradcam's errors for an unknown head or layer.
      raise UserError(f"Grad-CAM (layer {layer!r}, head {head!r}): {e}") from e
    tumour = prepared.masks[sel] > 0
    shells = np.stack([periphery(tumour[j], periphery_mm, _grid_spacing(prepared, sel[j], p))
                       for j, p in enumerate(bids)])
    regions = {"tumour": tumour, "tumour_periphery": tumour | shells}
    if tissues is not None:
      per = [tissues.masks(p) for p in bids]
      for r in PHANTOM_REGIONS:
        regions[r] = np.stack([t[r] for t in per])
    chance = chance_fractions(regions)
    for s in signs:
      cam = res[s]
      frac = region_fractions(np.asarray(cam.cam)[:m], regions)
      for j, p in enumerate(bids):
        for k, o in enumerate(run.outcomes):
          rec = {"patient_id": p, "sign": s, "outcome": o, "risk": float(cam.scores[j, k]),
                 "peak": float(cam.peak[j, k]), "all_zero": not float(cam.peak[j, k]) > 0}
          for r in regions_all:
            rec[f"frac_{r}"] = float(frac[r][j, k])
            rec[f"chance_{r}"] = float(chance[r][j])
          if phantom:
            for c in _LATENT_OF.values():
              rec[c] = float(table[c].iloc[sel[j]])
          out.append(rec)
  return pd.DataFrame(out)


# ----------------------------------------------------------------------------
# Summary.
# ----------------------------------------------------------------------------


def _num(x) -> float | None:
  """A JSON-safe float: None for NaN/inf or missing."""
  if x is None:
    return None
  x = float(x)
  return x if math.isfinite(x) else None


def _region_stats(frac: np.ndarray, chance: np.ndarray) -> dict:
  """Statistics of one region over the maps that have mass (finite fraction)."""
  ok = np.isfinite(frac)
  frac, chance = frac[ok], chance[ok]
  has = chance > 0
  ratio = frac[has] / chance[has]
  med = lambda v: _num(np.median(v)) if len(v) else None
  return {"n": int(ok.sum()), "n_empty_region": int((~has).sum()),
          "median": med(frac), "mean": _num(np.mean(frac)) if len(frac) else None,
          "median_chance": med(chance), "median_ratio": med(ratio),
          "share_above_chance": _num(np.mean(frac[has] > chance[has])) if has.any() else None}


def _spearman(x: np.ndarray, y: np.ndarray) -> dict:
  import scipy.stats  # pylint: disable=import-outside-toplevel
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return {"rho": None, "p": None, "n": int(len(x)),
            "note": "undefined: fewer than 3 maps with mass, or a constant variable"}
  res = scipy.stats.spearmanr(x, y)
  return {"rho": _num(res.statistic), "p": _num(res.pvalue), "n": int(len(x))}


def summarise(df: pd.DataFrame, *, phantom: bool) -> dict:
  """Aggregates a ``localisation_table`` per sign, outcome and risk group.

  Risk groups per outcome: ``low`` = risk below the median risk of the
  table's patients, ``high`` = above it (a patient exactly at the median is
  in neither), ``all``. Per group: ``n_maps``, ``n_all_zero`` and per region
  the statistics of the maps with mass (all-zero maps have none): ``n``,
  ``median`` and ``mean`` fraction, ``median_chance``, ``median_ratio``
  (median of fraction / chance) and ``share_above_chance``, both over the
  maps whose region is not empty on the grid (``n_empty_region`` others);
  for the phantom ``spearman``: Spearman's rho (``scipy.stats.spearmanr``,
  with its p-value and ``n``) of the core fraction with ``latent_necrosis``
  and of the oedema fraction with ``latent_oedema_mm`` (keys
  ``core_vs_latent_necrosis``, ``oedema_vs_latent_oedema_mm``), and the
  same for fraction / chance (``core_ratio_vs_latent_necrosis``,
  ``oedema_ratio_vs_latent_oedema_mm``, over the maps whose region is not
  empty). A larger core is a larger region, so even a uniform map's core
  fraction follows ``latent_necrosis``; the ratio removes that.

  Returns:
    ``{sign: {outcome: {"median_risk", "groups": {group: {...}}}}}``.
  """
  regions = REGIONS + (PHANTOM_REGIONS if phantom else ())
  out: dict = {}
  for s in dict.fromkeys(df["sign"]):
    out[s] = {}
    for o in dict.fromkeys(df["outcome"]):
      d = df[(df["sign"] == s) & (df["outcome"] == o)]
      risk = d["risk"].to_numpy(float)
      med = float(np.median(risk))
      groups = {}
      for g, sel in (("all", np.ones(len(d), bool)), ("low", risk < med), ("high", risk > med)):
        dg = d[sel]
        st: dict = {"n_maps": int(len(dg)), "n_all_zero": int(dg["all_zero"].sum())}
        for r in regions:
          st[r] = _region_stats(dg[f"frac_{r}"].to_numpy(float),
                                dg[f"chance_{r}"].to_numpy(float))
        if phantom:
          st["spearman"] = {}
          for r in PHANTOM_REGIONS:
            frac = dg[f"frac_{r}"].to_numpy(float)
            chance = dg[f"chance_{r}"].to_numpy(float)
            latent = dg[_LATENT_OF[r]].to_numpy(float)
            with np.errstate(invalid="ignore", divide="ignore"):
              lift = np.where(chance > 0, frac / np.where(chance > 0, chance, 1.0), np.nan)
            st["spearman"][f"{r}_vs_{_LATENT_OF[r]}"] = _spearman(frac, latent)
            st["spearman"][f"{r}_ratio_vs_{_LATENT_OF[r]}"] = _spearman(lift, latent)
        groups[g] = st
      out[s][o] = {"median_risk": _num(med), "groups": groups}
  return out


def localisation_summary(workdir, prepared, patient_ids: Sequence[str], *,
                         batch_size: int | None = None, periphery_mm: float = 10.0,
                         signs: Sequence[str] = ("increasing", "decreasing"),
                         layer: str = gradcam.LAST_DENSE_BLOCK, head: str = "mm",
                         seed: int | None = None) -> dict:
  """Where a trained MMNN run's Grad-CAM maps put their mass, against chance.

  Args:
    workdir: the finished run's folder (``jaxsurv.predict.load_run``), or an
      already loaded ``TrainedRun``.
    prepared: the ``PreparedCohort`` it was trained on.
    patient_ids: patients to explain (e.g. the run's test split).
    batch_size: patients per forward pass (default the run's
      ``eval_batch_size``).
    periphery_mm: width (mm) of the periphery shell around the tumour.
    signs: Grad-CAM signs, ``"increasing"`` (what raises the log-hazard)
      and/or ``"decreasing"`` (what lowers it).
    layer, head: as ``jaxsurv.gradcam.mmnn_grad_cam``.
    seed: sarcoma phantom only: the generator seed (None: from the prepared
      dataset's metadata).

  Returns:
    ``{"skipped": reason}`` for a run without an image branch; else
    ``{"run", "cohort", "n_patients", "outcomes", "signs", "layer", "head",
    "periphery_mm", "regions", "phantom", "results", "statement"}`` with
    ``results`` as ``summarise`` describes and ``statement`` the plain
    paragraph of ``markdown``. Undefined numbers are None (JSON-safe).

  Raises:
    RunLoadError: from ``load_run``. UserError: see ``localisation_table``.
  """
  from jaxsurv import predict  # pylint: disable=import-outside-toplevel
  run = workdir if isinstance(workdir, predict.TrainedRun) else predict.load_run(workdir)
  if not run.has_image:
    return {"skipped": f"the run {run.workdir} has no image branch (modalities "
                       f"{list(run.modalities)}): no Grad-CAM maps"}
  df = localisation_table(run, prepared, patient_ids, batch_size=batch_size,
                          periphery_mm=periphery_mm, signs=signs, layer=layer, head=head,
                          seed=seed)
  phantom = prepared.name == _PHANTOM
  summary = {"run": str(run.workdir), "cohort": str(prepared.name),
             "n_patients": int(df["patient_id"].nunique()), "outcomes": list(run.outcomes),
             "signs": list(dict.fromkeys(df["sign"])), "layer": layer, "head": head,
             "periphery_mm": float(periphery_mm),
             "regions": list(REGIONS + (PHANTOM_REGIONS if phantom else ())),
             "phantom": phantom, "results": summarise(df, phantom=phantom)}
  summary["statement"] = statement(summary)
  return summary


# ----------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------

_SIGN_WORDS = {"increasing": "risk-increasing", "decreasing": "risk-decreasing"}


def _f(x, nd: int = 3) -> str:
  return "n/a" if x is None else f"{x:.{nd}f}"


def _ratio(x) -> str:
  return "n/a" if x is None else f"{x:.2f}x"


def _share(x) -> str:
  return "n/a" if x is None else f"{100 * x:.0f}%"


# Median fraction / chance within [1 / _NEAR, _NEAR] reads "about chance".
_NEAR = 1.1


def _verdict(st: Mapping) -> str:
  r, share = st.get("median_ratio"), st.get("share_above_chance")
  if r is None:
    return "undefined (no map with mass, or an empty region)"
  if r >= _NEAR:
    word = f"{r:.2f} times chance"
  elif r <= 1 / _NEAR:
    word = f"below chance ({r:.2f} times)"
  else:
    word = f"about chance ({r:.2f} times)"
  return f"{word}, {_share(share)} of maps above chance"


def statement(summary: Mapping) -> str:
  """One plain paragraph: what the maps of the ``all`` group show, per sign and outcome.

  A region's median fraction / chance of at least 1.1 reads "X times
  chance", at most 1 / 1.1 "below chance", in between "about chance".
  """
  if "skipped" in summary:
    return f"Grad-CAM localisation skipped: {summary['skipped']}."
  parts = []
  p = summary["periphery_mm"]
  for s, per in summary["results"].items():
    for o, res in per.items():
      st = res["groups"]["all"]
      tum, tp = st["tumour"], st["tumour_periphery"]
      head = f"{o.upper()}, {_SIGN_WORDS.get(s, s)} maps"
      if st["n_all_zero"] == st["n_maps"]:
        parts.append(f"{head}: all {st['n_maps']} are all zero (no evidence of this sign).")
        continue
      text = (f"{head}: {st['n_all_zero']} of {st['n_maps']} "
              f"are all zero; the median map puts {_f(tum['median'])} of its mass in the tumour "
              f"(chance {_f(tum['median_chance'])}): {_verdict(tum)}; tumour + {p:g} mm "
              f"periphery {_f(tp['median'])} (chance {_f(tp['median_chance'])}): "
              f"{_verdict(tp)}")
      if summary.get("phantom"):
        for r in PHANTOM_REGIONS:
          sp = st["spearman"][f"{r}_vs_{_LATENT_OF[r]}"]
          sr = st["spearman"][f"{r}_ratio_vs_{_LATENT_OF[r]}"]
          text += (f"; {'necrotic core' if r == 'core' else 'oedema'} {_verdict(st[r])}, "
                   f"Spearman rho with {_LATENT_OF[r]} {_f(sp['rho'], 2)} (of fraction / chance "
                   f"{_f(sr['rho'], 2)})")
      parts.append(text + ".")
  parts.append("Fractions are of each map's own mass (all-zero maps have none and are left "
               "out); chance is the fraction of the grid the region covers, i.e. what a uniform "
               "map would put there.")
  return " ".join(parts)


def markdown(summary: Mapping) -> str:
  """Renders ``localisation_summary``'s result as compact Markdown tables plus ``statement``."""
  if "skipped" in summary:
    return f"Grad-CAM localisation: skipped ({summary['skipped']}).\n"
  p = summary["periphery_mm"]
  lines = [f"Grad-CAM localisation ({summary['head']} head, layer {summary['layer']}; "
           f"{summary['n_patients']} patients of {summary['cohort']}; low/high = below/above "
           "the median risk). Fraction of map mass: median (mean), chance, median x chance, "
           "share of maps above chance.", "",
           f"| sign | outcome | group | maps | all zero | tumour | chance | x chance | > chance "
           f"| tumour + {p:g} mm | chance | x chance | > chance |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for s, per in summary["results"].items():
    for o, res in per.items():
      for g in GROUPS:
        st = res["groups"][g]
        cells = [s, o, g, str(st["n_maps"]), str(st["n_all_zero"])]
        for r in REGIONS:
          t = st[r]
          cells += [f"{_f(t['median'])} ({_f(t['mean'])})", _f(t["median_chance"]),
                    _ratio(t["median_ratio"]), _share(t["share_above_chance"])]
        lines.append("| " + " | ".join(cells) + " |")
  if summary.get("phantom"):
    lines += ["", "Phantom tissues; rho: Spearman's rho of the fraction (and of fraction / "
              "chance) with the latent necrotic fraction / oedema width.", "",
              "| sign | outcome | group | core | chance | x chance | > chance | rho necrosis "
              "| oedema | chance | x chance | > chance | rho oedema mm |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, per in summary["results"].items():
      for o, res in per.items():
        for g in GROUPS:
          st = res["groups"][g]
          cells = [s, o, g]
          for r in PHANTOM_REGIONS:
            t = st[r]
            cells += [f"{_f(t['median'])} ({_f(t['mean'])})", _f(t["median_chance"]),
                      _ratio(t["median_ratio"]), _share(t["share_above_chance"]),
                      f"{_f(st['spearman'][f'{r}_vs_{_LATENT_OF[r]}']['rho'], 2)} "
                      f"({_f(st['spearman'][f'{r}_ratio_vs_{_LATENT_OF[r]}']['rho'], 2)})"]
          lines.append("| " + " | ".join(cells) + " |")
  lines += ["", summary.get("statement") or statement(summary), ""]
  return "\n".join(lines)
