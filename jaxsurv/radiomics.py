"""Radiomics features of the prepared MRI: the MMNN paper's Table 3 radiomics baselines.

The MMNN paper (Methods, "Radiomics"; Table 3) extracted "a total of 100
radiomics features ... with PyRadiomics 3.0.1 for each T1 and T2 MRI" from
"the same set of preprocessed images" the networks see, and concatenated the
T1 and T2 features into "a total of 200 radiomics features for each patient".
PyRadiomics' default features of the original image are 107 per image: 14
shape (from the mask alone, so identical for both sequences), 18 first-order,
24 GLCM, 16 GLRLM, 16 GLSZM, 14 GLDM and 5 NGTDM. Here the shape features are
kept once and the 93 intensity and texture features per channel, which gives
the paper's 200:

* ``shape_<feature>`` (14; mm, mm^2, mm^3);
* ``<channel>_<class>_<feature>`` for every channel (e.g. ``t1c``, ``t2fs``)
  and class ``firstorder``, ``glcm``, ``glrlm``, ``glszm``, ``gldm``,
  ``ngtdm`` (93 per channel).

Features are computed with PyRadiomics (van Griethuysen et al., Cancer
Research 2017; the maintained ``pyradiomics-bhklab`` fork, import name
``radiomics``, since upstream 3.0.1 does not build on Python 3.11) on the
preprocessed grid of ``jaxsurv.data.prepared.PreparedCohort``: the
tumour-centred, per-channel z-scored volumes and their tumour masks, with each
patient's true grid voxel size in mm (from the stored grid geometry), so that
shape features are physical. ``SETTINGS`` records every extraction setting;
it is returned with the features and written next to the cached table.

* ``extract_patient(image, mask, spacing_mm, channels)``: one patient's 200
  features;
* ``cohort_features(prepared, channels)``: a DataFrame indexed by
  ``patient_id``, computed once per cohort (in parallel over patients) and
  cached as CSV + JSON under ``$JAXSURV_CACHE/radiomics``;
* ``feature_names(channels)``: the column names, in order.

**Patients without features.** At cohort level a patient whose image is
absent (``image_present`` False) gets a row of NaN and a reason in
``DataFrame.attrs["skipped"]`` (``{patient_id: reason}``), so that the caller
can impute or drop them knowingly; a present image with an empty or
one-voxel tumour mask, or one PyRadiomics rejects, is a ``UserError`` naming
the patient (every such patient of the cohort is listed in one error), never
a silent NaN.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import re
import time
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from jaxsurv.errors import UserError

PathLike = str | os.PathLike

# The PyRadiomics feature classes of the paper's 107 default features, in
# column order. Shape comes from the mask alone and is kept once.
FEATURE_CLASSES = ("shape", "firstorder", "glcm", "glrlm", "glszm", "gldm", "ngtdm")
TEXTURE_CLASSES = FEATURE_CLASSES[1:]

# Extraction settings (``RadiomicsFeatureExtractor(**SETTINGS)``), original
# image only. Why each:
#
# * ``binWidth`` 0.25: grey levels are discretised with a fixed bin width on
#   the z-scored intensities. The IBSI (Zwanenburg et al., Radiology 2020;
#   reference manual, section "Intensity discretisation") describes a fixed
#   bin size for intensities on a common scale and a fixed bin number for
#   arbitrary units. jaxsurv z-scores every channel over the tumour mask
#   (``jaxsurv.data.mri``, step 8), which puts every patient's tumour on one
#   scale (standard deviations of its own intensities), so a fixed width keeps
#   a bin's meaning (a quarter of a standard deviation) the same in every
#   patient while the number of bins follows the tumour's spread (about 24-40
#   bins for |z| <= 3-5, within PyRadiomics' recommended 30-130). A fixed bin
#   count would instead stretch the bins with each patient's extreme values.
# * ``normalize`` False: the images are z-scored already.
# * ``resampledPixelSpacing`` None: no resampling. The MMNN configs' grid is
#   isotropic (a cubic ``fov_mm`` on a cubic ``grid``: 160 mm / 24 = 6.67 mm
#   for ``configs/mmnn.py:local`` on sarcoma_phantom, 160 mm / 128 = 1.25 mm
#   at the paper's 128^3). Other settings (no ``fov_mm``, ``keep_aspect``
#   False, a non-cubic grid) give per-patient, possibly anisotropic voxels:
#   shape features still use the true mm, and texture neighbours are index
#   neighbours, as always in PyRadiomics without resampling.
# * ``force2D`` False: 3-D texture matrices (13 directions, distance 1).
# * ``label`` 1: the tumour mask's foreground value.
# * ``geometryTolerance`` None: image and mask are built here on one geometry,
#   so PyRadiomics' default tolerance never comes into play.
# * ``additionalInfo`` False: no ``diagnostics_*`` entries (image hashes etc.).
SETTINGS: dict[str, Any] = {
    "binWidth": 0.25,
    "normalize": False,
    "resampledPixelSpacing": None,
    "force2D": False,
    "label": 1,
    "distances": [1],
    "minimumROIDimensions": 2,
    "geometryTolerance": None,
    "preCrop": False,
    "additionalInfo": False,
}

# Bump when the cached table's layout or the way features are computed here
# changes, so that old cache files are ignored.
_CACHE_VERSION = 1

_SUM_AVERAGE_NOTE = "GLCM is symmetrical, therefore Sum Average"


class _DropSumAverageNote(logging.Filter):
  """Drops PyRadiomics' per-image note that GLCM Sum Average = 2 x Joint Average.

  The note is logged at WARNING for every image whose GLCM features include
  Sum Average (one of the 24 default GLCM features, kept for the paper's
  count); it says nothing about the patient.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_SUM_AVERAGE_NOTE)


def _radiomics():
  """Imports PyRadiomics with its logger at WARNING (its default is INFO)."""
  import radiomics  # pylint: disable=import-outside-toplevel
  from radiomics import featureextractor  # pylint: disable=import-outside-toplevel,unused-import
  logger = logging.getLogger("radiomics")
  if logger.level < logging.WARNING:
    logger.setLevel(logging.WARNING)
  glcm_logger = logging.getLogger("radiomics.glcm")
  if not any(isinstance(f, _DropSumAverageNote) for f in glcm_logger.filters):
    glcm_logger.addFilter(_DropSumAverageNote())
  return radiomics


def pyradiomics_version() -> str:
  """The installed PyRadiomics version (e.g. ``"v3.1.4"``)."""
  return str(_radiomics().__version__)


def _settings(settings: Mapping[str, Any] | None) -> dict[str, Any]:
  return dict(SETTINGS if settings is None else settings)


def class_feature_names(feature_class: str) -> tuple[str, ...]:
  """PyRadiomics' non-deprecated features of one class (the ones it enables by default), sorted.

  Raises:
    ValueError: unknown class.
  """
  classes = _radiomics().getFeatureClasses()
  if feature_class not in classes:
    raise ValueError(f"feature_class: {feature_class!r} not in {sorted(classes)}")
  return tuple(sorted(n for n, deprecated in classes[feature_class].getFeatureNames().items()
                      if not deprecated))


def feature_names(channels: Sequence[str]) -> list[str]:
  """Column names in order: ``shape_<f>`` (14), then ``<channel>_<class>_<f>`` (93 per channel).

  Raises:
    UserError: no channel, a repeated channel name, or a name with characters
      other than letters, digits, ``_`` and ``-`` (names prefix the columns).
  """
  channels = _check_channels(channels)
  names = [f"shape_{f}" for f in class_feature_names("shape")]
  for ch in channels:
    for cls in TEXTURE_CLASSES:
      names.extend(f"{ch}_{cls}_{f}" for f in class_feature_names(cls))
  return names


def _check_channels(channels: Sequence[str]) -> tuple[str, ...]:
  if isinstance(channels, str):
    channels = (channels,)
  channels = tuple(str(c) for c in channels)
  if not channels:
    raise UserError("channels: expected at least one channel name, got none")
  if len(set(channels)) != len(channels):
    raise UserError(f"channels: names must be unique, got {list(channels)}")
  bad = [c for c in channels if not re.fullmatch(r"[A-Za-z0-9_-]+", c)]
  if bad:
    raise UserError(f"channels: names must be letters, digits, '_' or '-' (they prefix feature "
                    f"columns), got {bad}")
  return channels


def _spacing(spacing_mm, who: str) -> tuple[float, float, float]:
  """``spacing_mm`` (scalar or ``(D, H, W)`` mm) as three positive floats in ``(D, H, W)`` order."""
  s = np.asarray(spacing_mm, np.float64)
  s = np.full(3, float(s)) if s.ndim == 0 else s
  if s.shape != (3,) or not np.all(np.isfinite(s)) or not np.all(s > 0):
    raise UserError(f"{who}: spacing_mm must be a positive scalar or 3 positive mm values "
                    f"(D, H, W), got {spacing_mm!r}")
  return tuple(float(v) for v in s)


def _sitk_image(array: np.ndarray, spacing_dhw: tuple[float, float, float]):
  """A ``sitk.Image`` of a ``[D, H, W]`` array: size ``(W, H, D)``, spacing ``(sW, sH, sD)`` mm."""
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  img = sitk.GetImageFromArray(array)  # Array [k, j, i] -> image (i, j, k) = (W, H, D).
  img.SetSpacing(tuple(reversed(spacing_dhw)))
  return img


def _extractor(settings: Mapping[str, Any], classes: Sequence[str]):
  from radiomics import featureextractor  # pylint: disable=import-outside-toplevel
  _radiomics()
  ext = featureextractor.RadiomicsFeatureExtractor(**dict(settings))
  ext.disableAllImageTypes()
  ext.enableImageTypeByName("Original")
  ext.disableAllFeatures()
  for cls in classes:
    ext.enableFeatureClassByName(cls)
  return ext


def extract_patient(image, mask, spacing_mm, channels: Sequence[str],
                    settings: Mapping[str, Any] | None = None, *,
                    patient_id: str | None = None) -> dict[str, float]:
  """The 200 radiomics features (two channels) of one preprocessed patient.

  PyRadiomics ``RadiomicsFeatureExtractor(**settings)`` on the original image
  only, classes ``FEATURE_CLASSES``; shape features from the first channel's
  run (they depend on the mask and spacing only). Intensities are used as
  given (z-scores for a prepared cohort) in float64.

  Args:
    image: float ``[D, H, W, C]`` preprocessed volume (or ``[D, H, W]`` for
      one channel); None for an absent image (an error).
    mask: ``[D, H, W]`` tumour mask; voxels > 0 are tumour.
    spacing_mm: voxel size in mm, a scalar (isotropic) or ``(D, H, W)`` in
      array-axis order (SimpleITK's ``(x, y, z)`` is ``(W, H, D)``).
    channels: ``C`` channel names, used as column prefixes (e.g.
      ``("t1c", "t2fs")``).
    settings: PyRadiomics settings; default ``SETTINGS``.
    patient_id: named in error messages.

  Returns:
    ``{name: float}`` in ``feature_names(channels)`` order: 14 shape features
    (mm, mm^2, mm^3) and 93 per channel (intensity units for first-order
    features, dimensionless or voxel counts for texture).

  Raises:
    UserError: an absent image, shapes that do not match, non-finite
      intensities, an empty or single-voxel mask, a mask PyRadiomics rejects
      (e.g. one voxel thick in two directions), or a feature PyRadiomics could
      not compute; the message names the patient.
  """
  who = f"patient {patient_id!r}" if patient_id is not None else "patient"
  channels = _check_channels(channels)
  if image is None:
    raise UserError(f"{who}: no image (image absent); radiomics features need the MRI")
  image = np.asarray(image)
  if image.ndim == 3:
    image = image[..., None]
  mask = np.asarray(mask)
  if image.ndim != 4 or image.shape[-1] != len(channels):
    raise UserError(f"{who}: image must be [D, H, W, C] with C = {len(channels)} channels "
                    f"{list(channels)}, got shape {image.shape}")
  if mask.shape != image.shape[:3]:
    raise UserError(f"{who}: mask shape {mask.shape} does not match the image's [D, H, W] "
                    f"{image.shape[:3]}")
  spacing = _spacing(spacing_mm, who)
  n_voxels = int(np.count_nonzero(mask))
  if n_voxels < 2:
    raise UserError(f"{who}: the tumour mask has {n_voxels} voxel(s); radiomics features need "
                    "a tumour of at least 2 voxels (is the mask empty?)")
  if not np.all(np.isfinite(image[mask > 0])):
    raise UserError(f"{who}: the image has non-finite values inside the tumour mask")
  settings = _settings(settings)
  label = int(settings.get("label", 1))
  mask_img = _sitk_image(np.where(mask > 0, label, 0).astype(np.uint8), spacing)
  out: dict[str, float] = {}
  for c, ch in enumerate(channels):
    classes = FEATURE_CLASSES if c == 0 else TEXTURE_CLASSES
    img = _sitk_image(np.ascontiguousarray(image[..., c], dtype=np.float64), spacing)
    try:
      result = _extractor(settings, classes).execute(img, mask_img)
    except ValueError as e:  # PyRadiomics' mask checks (checkMask) raise ValueError.
      raise UserError(f"{who}: PyRadiomics rejected the tumour mask ({n_voxels} voxels): "
                      f"{e}") from None
    for key, value in result.items():
      parts = key.split("_", 2)
      if len(parts) != 3 or parts[0] != "original":
        continue  # diagnostics_* (additionalInfo) entries.
      _, cls, feat = parts
      value = np.squeeze(np.asarray(value))
      if np.iscomplexobj(value):  # E.g. an axis length of a flat mask: sqrt of a negative.
        value = value.real if np.all(value.imag == 0) else np.nan
      out[f"shape_{feat}" if cls == "shape" else f"{ch}_{cls}_{feat}"] = float(value)
  names = feature_names(channels)
  missing = [n for n in names if n not in out]
  if missing:
    raise UserError(f"{who}: PyRadiomics returned no value for {missing[:5]} (settings "
                    f"{settings}); expected the default features of {list(FEATURE_CLASSES)}")
  bad = [n for n in names if not np.isfinite(out[n])]
  if bad:
    raise UserError(f"{who}: PyRadiomics could not compute {bad} ({n_voxels} tumour voxels)")
  return {n: out[n] for n in names}


# --------------------------------------------------------------------------
# Cohort level.


@dataclasses.dataclass(frozen=True)
class _Job:
  """One patient's extraction (arrays are views into the cohort's; copied only to processes)."""
  index: int
  patient_id: str
  image: np.ndarray
  mask: np.ndarray
  spacing: tuple[float, float, float]
  channels: tuple[str, ...]
  settings: dict


def _run_job(job: _Job) -> tuple[int, dict[str, float] | None, str | None]:
  """Worker: ``(index, features, None)`` or ``(index, None, error message)``."""
  try:
    return job.index, extract_patient(job.image, job.mask, job.spacing, job.channels,
                                      job.settings, patient_id=job.patient_id), None
  except UserError as e:
    return job.index, None, str(e)


def _grid_spacing(prepared, i: int) -> tuple[float, float, float]:
  """Patient ``i``'s grid voxel size (mm) in ``(D, H, W)`` order, from its stored grid geometry."""
  spacing = prepared.grid_spacing(i)
  if spacing is None:
    raise UserError(f"patient {str(prepared.patient_ids[i])!r}: the prepared cohort "
                    f"{prepared.name!r} stores no grid geometry for this patient; prepare it "
                    "again (jaxsurv.data.prepared.prepare_cohort(..., force=True))")
  return spacing


def _content_digest(prepared, spacings) -> str:
  """sha256 over patient ids, presence, spacings, masks and images (the cohort's exact inputs)."""
  h = hashlib.sha256()
  h.update(json.dumps([str(p) for p in prepared.patient_ids]).encode())
  h.update(np.ascontiguousarray(prepared.image_present, np.bool_).tobytes())
  h.update(json.dumps(spacings).encode())
  h.update(str(prepared.images.shape).encode())
  for i in range(len(prepared.patient_ids)):
    h.update(np.ascontiguousarray(prepared.masks[i], np.uint8).data)
    h.update(np.ascontiguousarray(prepared.images[i], np.float32).data)
  return h.hexdigest()


def _cache_root(cache_dir: PathLike | None) -> pathlib.Path:
  if cache_dir is None:
    from jaxsurv.data import fetch  # pylint: disable=import-outside-toplevel
    return fetch.cache_dir("radiomics")
  root = pathlib.Path(cache_dir).expanduser()
  root.mkdir(parents=True, exist_ok=True)
  return root


def _read_cache(csv_path: pathlib.Path, json_path: pathlib.Path, key: str,
                names: list[str], ids: list[str]) -> tuple[pd.DataFrame, dict] | None:
  """The cached table and sidecar if both exist and match ``key``, else None (then recomputed)."""
  if not (csv_path.is_file() and json_path.is_file()):
    return None
  try:
    meta = json.loads(json_path.read_text())
    if meta.get("key") != key or meta.get("patient_ids") != ids or meta.get("features") != names:
      return None
    df = pd.read_csv(csv_path, dtype={"patient_id": str}, float_precision="round_trip",
                     keep_default_na=False, na_values=[""])
  except (OSError, ValueError):
    return None
  if list(df.columns) != ["patient_id"] + names or df["patient_id"].tolist() != ids:
    return None
  df = df.set_index("patient_id")
  try:
    df = df.astype(np.float64)
  except (TypeError, ValueError):
    return None
  return df, meta


def cohort_features(prepared, channels: Sequence[str], *, cache_dir: PathLike | None = None,
                    settings: Mapping[str, Any] | None = None, workers: int | None = None,
                    executor: str = "thread", progress: bool = False,
                    unfeaturisable: str = "error") -> pd.DataFrame:
  """Radiomics features of every patient of a prepared cohort, computed once and cached.

  Each patient's features are ``extract_patient`` on its preprocessed volume
  and mask with its grid voxel size in mm (``case_info[i]["grid_geometry"]``,
  so shape features are physical even when the grid is per-patient).

  **Cache.** ``<cache_dir>/<cohort>-<key>.csv`` (``patient_id`` + one column
  per feature, full float precision) and ``.json`` (settings, feature
  classes and names, PyRadiomics version, preprocessing fingerprint, channel
  names, patient ids, skipped patients, extraction time). ``key`` hashes the
  preprocessing fingerprint, the settings, the channel names, the PyRadiomics
  version, a cache format version and a sha256 of the cohort's exact inputs
  (ids, presence, spacings, images, masks; about 9 s per call for 1,000
  patients at 128^3 x 2, hashed at 1.8 GB/s), so any change computes anew. Both
  files are written atomically (``jaxsurv.io``); a rerun reads them back
  without extracting. A stale or unreadable cache file is recomputed, never
  unpickled (CSV and JSON only).

  **Parallelism.** ``workers`` threads (default) or ``spawn`` processes
  extract patients side by side. Measured on this project's 2-core machine
  (shared with other jobs, so about 1.2 free cores): at the ``local`` 24^3
  grid, 64 sarcoma_phantom patients took 1.6 s with 2 threads, 1.7 s with 2
  warm processes and 2.5-3.0 s serially; at the paper's 128^3 grid, 8
  patients took 5.5 s with 2 threads, 5.4-6.4 s with 2 processes and
  5.5-6.0 s serially. Threads start at once and share the volumes, while
  each process first spends 2-3 s (8-10 s under a main module that imports
  JAX, which ``spawn`` re-imports) and receives copies. But PyRadiomics' C
  code holds the GIL: at 128^3 two threads used 5.4 s of CPU in 5.5 s of
  wall time, i.e. one core. So on a host with idle cores, a large cohort
  at 128^3 (about 1 s per patient) runs faster with
  ``executor="process"``.

  Args:
    prepared: ``jaxsurv.data.prepared.PreparedCohort`` with images.
    channels: names of the ``C`` image channels (``config.data.channels``).
    cache_dir: cache folder; default ``$JAXSURV_CACHE/radiomics``
      (``~/.cache/jaxsurv/radiomics``).
    settings: PyRadiomics settings; default ``SETTINGS``.
    workers: threads or processes; None = ``min(os.cpu_count(), patients)``;
      1 = in this thread.
    executor: ``"thread"`` or ``"process"`` (``spawn``; the caller's main
      module needs an ``if __name__ == "__main__":`` guard).
    progress: show a tqdm bar.
    unfeaturisable: what a present image that cannot be featurised (e.g. a
      tumour of 2 voxels on the grid, which PyRadiomics rejects) does:
      ``"error"`` (default) raises; ``"skip"`` gives that patient a NaN row
      with PyRadiomics' reason in ``attrs["skipped"]``, like an absent image
      (``jaxsurv.compare`` uses it and reports the count).

  Returns:
    float64 DataFrame ``[n_patients, len(feature_names(channels))]`` indexed
    by ``patient_id`` (str) in cohort order. Image-absent patients have NaN
    rows. ``attrs``: ``skipped`` (``{patient_id: reason}``), ``settings``,
    ``pyradiomics_version``, ``fingerprint``, ``cache_path`` (the CSV),
    ``from_cache`` (bool).

  Raises:
    UserError: a bad ``workers`` or ``executor``, the cohort has no images,
      the channel count differs from the images', a present image without a
      stored grid geometry, or some present images cannot be featurised
      (empty or one-voxel masks, ...): one error listing every such patient;
      nothing is cached then.
  """
  channels = _check_channels(channels)
  settings = _settings(settings)
  if unfeaturisable not in ("error", "skip"):
    raise UserError(f"unfeaturisable: expected 'error' or 'skip', got {unfeaturisable!r}")
  if executor not in ("thread", "process"):
    raise UserError(f"executor: expected 'thread' or 'process', got {executor!r}")
  if workers is not None and (isinstance(workers, bool)
                              or not isinstance(workers, (int, np.integer)) or workers < 1):
    raise UserError(f"workers: expected a positive int or None, got {workers!r}")
  if prepared.images is None or prepared.masks is None:
    raise UserError(f"cohort {prepared.name!r} has no images; radiomics features need MRI")
  n = len(prepared.patient_ids)
  if prepared.images.ndim != 5 or prepared.images.shape[-1] != len(channels):
    raise UserError(f"channels: cohort {prepared.name!r} has images of shape "
                    f"{tuple(prepared.images.shape)} [n, D, H, W, C]; got {len(channels)} channel "
                    f"names {list(channels)}")
  ids = [str(p) for p in prepared.patient_ids]
  present = np.asarray(prepared.image_present, bool)
  spacings = [_grid_spacing(prepared, i) if present[i] else None for i in range(n)]
  names = feature_names(channels)
  version = pyradiomics_version()
  key_payload = {"cache_version": _CACHE_VERSION, "fingerprint": prepared.fingerprint,
                 "settings": settings, "classes": list(FEATURE_CLASSES),
                 "channels": list(channels), "pyradiomics": version,
                 "content": _content_digest(prepared, spacings)}
  if unfeaturisable == "skip":  # Default keys stay those of the error policy.
    key_payload["unfeaturisable"] = "skip"
  key = hashlib.sha256(json.dumps(key_payload, sort_keys=True, default=str).encode()).hexdigest()
  root = _cache_root(cache_dir)
  stem = re.sub(r"[^A-Za-z0-9._-]", "_", str(prepared.name)) + f"-{key[:16]}"
  csv_path, json_path = root / f"{stem}.csv", root / f"{stem}.json"

  cached = _read_cache(csv_path, json_path, key, names, ids)
  if cached is not None:
    df, meta = cached
    return _with_attrs(df, meta.get("skipped", {}), settings, version, prepared.fingerprint,
                       csv_path, True)

  skipped = {ids[i]: "image absent" for i in range(n) if not present[i]}
  jobs = [_Job(i, ids[i], prepared.images[i], prepared.masks[i], spacings[i], channels, settings)
          for i in range(n) if present[i]]
  t0 = time.perf_counter()
  rows: dict[int, dict[str, float]] = {}
  errors: dict[str, str] = {}
  nw = _default_workers(len(jobs)) if workers is None else int(workers)
  bar = None
  if progress:
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(jobs), desc=f"radiomics {prepared.name}", unit="patient")
  try:
    _radiomics()  # Import and quieten PyRadiomics once, before the threads start.
    if nw == 1 or len(jobs) <= 1:
      _collect(map(_run_job, jobs), rows, errors, bar)
    elif executor == "thread":
      with concurrent.futures.ThreadPoolExecutor(min(nw, len(jobs))) as pool:
        _collect(pool.map(_run_job, jobs), rows, errors, bar)
    else:
      ctx = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(min(nw, len(jobs)), mp_context=ctx) as pool:
        _collect(pool.map(_run_job, jobs, chunksize=max(1, len(jobs) // (16 * nw))), rows,
                 errors, bar)
  finally:
    if bar is not None:
      bar.close()
  seconds = time.perf_counter() - t0
  if errors and unfeaturisable == "skip":
    skipped.update({ids[i]: msg for i, msg in errors.items()})
    errors = {}
  if errors:
    errors = list(errors.values())
    shown = "; ".join(errors[:10]) + (f"; and {len(errors) - 10} more" if len(errors) > 10 else "")
    raise UserError(f"radiomics: {len(errors)} patient(s) of cohort {prepared.name!r} could not be "
                    f"featurised: {shown}")

  values = np.full((n, len(names)), np.nan, np.float64)
  for i, feats in rows.items():
    values[i] = [feats[c] for c in names]
  df = pd.DataFrame(values, index=pd.Index(ids, name="patient_id", dtype=object), columns=names)
  meta = {"key": key, "cache_version": _CACHE_VERSION, "cohort": str(prepared.name),
          "fingerprint": prepared.fingerprint, "channels": list(channels), "settings": settings,
          "feature_classes": list(FEATURE_CLASSES), "pyradiomics_version": version,
          "n_patients": n, "n_features": len(names), "patient_ids": ids, "skipped": skipped,
          "grid_spacing_mm": spacings, "extraction_seconds": round(seconds, 3), "workers": nw,
          "executor": executor,
          "features": names}
  from jaxsurv import io  # pylint: disable=import-outside-toplevel
  io.write_csv_atomic(df.reset_index(), csv_path)
  io.write_json_atomic(meta, json_path)  # Last: a complete sidecar marks a complete cache.
  return _with_attrs(df, skipped, settings, version, prepared.fingerprint, csv_path, False)


def _collect(results, rows, errors, bar) -> None:
  for i, feats, err in results:
    if err is None:
      rows[i] = feats
    else:
      errors[i] = err
    if bar is not None:
      bar.update(1)


def _with_attrs(df, skipped, settings, version, fingerprint, path, from_cache) -> pd.DataFrame:
  df.attrs.update(skipped=dict(skipped), settings=dict(settings), pyradiomics_version=version,
                  fingerprint=fingerprint, cache_path=str(path), from_cache=bool(from_cache))
  return df


def _default_workers(n_jobs: int) -> int:
  """Workers for ``n_jobs`` patients: every core, at most one per patient."""
  return max(1, min(os.cpu_count() or 1, n_jobs))
