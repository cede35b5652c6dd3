"""Read-back of prepared cohorts: in memory, as a random-access source, or as grain batches.

Later runs read the prepared files (``jaxsurv.data.tfds_build``) instead of
redoing the work:

* ``prepare_cohort(name_or_manifest, ...)`` prepares if needed and returns a
  ``PreparedCohort`` with every patient in memory (table + image arrays);
* ``load_prepared(dataset_dir)`` reads a prepared folder back;
* ``data_source(...)`` is the TFDS random-access source of a prepared folder;
* ``grain_batches(...)`` streams shuffled batches with grain for cohorts that
  do not fit in memory;
* ``list_prepared(...)`` and ``dataset_bytes(...)`` list the prepared
  versions and their size on disk.

Reading needs only the prepared folder (``tfds.builder_from_directory``),
not the builder class.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Sequence

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds

from jaxsurv.data import manifest as mf
from jaxsurv.data import mri
from jaxsurv.data.cohorts import spec_from_json
from jaxsurv.data.tfds_build import (DATASET_NAME, SPLIT, PathLike, _default_data_dir,
                                     _preprocess_from_json, _rebuild_table, prepare_dataset)


@dataclasses.dataclass
class PreparedCohort:
  """A prepared cohort in memory, one entry per patient in manifest order.

  Attributes:
    name: cohort name (known name or manifest stem).
    patient_ids: str ``[n]``.
    table: DataFrame ``[n, ...]``: ``patient_id``, the raw clinical columns,
      outcome columns (days; 1 = event), optional site/split and, for demo
      cohorts, the oracle/latent/render columns (never model inputs, see
      ``phantom.model_input_columns``); same dtypes as the manifest/table.
    images: float32 ``[n, D, H, W, C]`` or None (tabular cohort); zeros where
      ``image_present`` is False.
    masks: uint8 ``[n, D, H, W]`` tumour masks on the grid, or None.
    image_present: bool ``[n]`` (all False for a tabular cohort).
    spec: the cohort's ``CohortSpec``.
    preprocess: the ``PreprocessConfig`` used, or None.
    fingerprint: ``preprocess.fingerprint()``, or None.
    data_dir: TFDS data folder.
    dataset_dir: the prepared version folder (for ``grain_batches``).
    case_info: per patient, the preprocessing record (grid/original geometry,
      z-score statistics, source files) or None where the image is absent.
    reused: True if an existing prepared dataset was read (nothing recomputed).
  """
  name: str
  patient_ids: np.ndarray
  table: pd.DataFrame
  images: np.ndarray | None
  masks: np.ndarray | None
  image_present: np.ndarray
  spec: mf.CohortSpec
  preprocess: mri.PreprocessConfig | None
  fingerprint: str | None
  data_dir: pathlib.Path
  dataset_dir: pathlib.Path
  case_info: list = dataclasses.field(default_factory=list, repr=False)
  reused: bool = False

  def __len__(self) -> int:
    return len(self.patient_ids)

  def grid_spacing(self, i: int) -> tuple[float, float, float] | None:
    """Patient ``i``'s grid voxel size in mm, ``(D, H, W)`` order; None without a stored grid.

    From the stored grid geometry (ITK order ``(i, j, k)`` = ``(W, H, D)``,
    reversed here to the arrays' axis order).
    """
    info = self.case_info[i] if self.case_info else None
    geom = (info or {}).get("grid_geometry")
    if not geom or "spacing" not in geom:
      return None
    return tuple(float(v) for v in reversed(geom["spacing"]))

  def case_geometry(self, i: int) -> tuple[mri.Geometry, mri.Geometry] | None:
    """``(grid geometry, original first-channel geometry)`` of patient ``i``, or None if absent.

    Rebuilds what ``mri.PreprocessedCase.to_original_space`` needs to put a
    grid-space map (e.g. Grad-CAM) back on the original image.
    """
    info = self.case_info[i] if self.case_info else None
    if not info:
      return None
    def geom(d):
      return mri.Geometry(tuple(d["size"]), tuple(d["origin"]), tuple(d["spacing"]),
                          tuple(d["direction"]))
    return geom(info["grid_geometry"]), geom(info["original_geometry"])


def data_source(prepared_or_dir: PreparedCohort | PathLike):
  """The TFDS ``ArrayRecordDataSource`` of a prepared cohort (random access, ``len``).

  ``source[i]`` is a dict of numpy arrays / Python scalars; Text features are
  ``bytes``. Needs only the prepared folder (``tfds.builder_from_directory``).

  Raises:
    FileNotFoundError: the folder holds no prepared dataset.
  """
  d = prepared_or_dir.dataset_dir if isinstance(prepared_or_dir, PreparedCohort) else prepared_or_dir
  d = pathlib.Path(d)
  if not (d / "dataset_info.json").is_file():
    raise FileNotFoundError(f"no prepared dataset in {d} (dataset_info.json missing)")
  return tfds.builder_from_directory(os.fspath(d)).as_data_source(split=SPLIT)


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def load_prepared(dataset_dir: PathLike, *, images: bool = True, reused: bool = True,
                  chunk: int = 64) -> PreparedCohort:
  """Reads a prepared cohort folder fully into memory.

  Args:
    dataset_dir: the version folder returned by ``prepare_dataset``.
    images: also read the volumes and masks (False: table only, fast).
    reused: stored in ``PreparedCohort.reused``.
    chunk: records read per call.

  Returns:
    ``PreparedCohort`` in manifest order.

  Raises:
    FileNotFoundError: the folder holds no prepared dataset.
    ValueError: the folder was not written by this module (metadata missing).
  """
  dataset_dir = pathlib.Path(dataset_dir)
  src = data_source(dataset_dir)
  builder = tfds.builder_from_directory(os.fspath(dataset_dir))
  meta = dict(builder.info.metadata or {})
  if "table_schema" not in meta:
    raise ValueError(f"{dataset_dir}: not a jaxsurv prepared cohort (no table schema in metadata)")
  spec = spec_from_json(meta["spec"])
  cfg = _preprocess_from_json(meta["preprocess"]) if meta.get("preprocess") else None
  n = len(src)
  has_images = "image" in builder.info.features
  imgs = masks = None
  if has_images and images:
    shp = builder.info.features["image"].shape
    imgs = np.empty((n,) + tuple(shp), np.float32)
    masks = np.empty((n,) + tuple(shp[:3]), np.uint8)
  present = np.zeros(n, bool)
  ids = [None] * n
  rows = [None] * n
  case_info = [None] * n
  for start in range(0, n, chunk):
    recs = src.__getitems__(list(range(start, min(n, start + chunk))))
    for r in recs:
      i = int(r["index"])
      ids[i] = _text(r["patient_id"])
      rows[i] = json.loads(_text(r["row_json"]))
      if has_images:
        present[i] = bool(r["image_present"])
        cj = _text(r["case_json"])
        case_info[i] = json.loads(cj) if cj else None
        if imgs is not None:
          imgs[i] = r["image"]
          masks[i] = r["mask"]
  if any(x is None for x in ids):
    raise ValueError(f"{dataset_dir}: record indices do not cover 0..{n - 1}")
  table = _rebuild_table(rows, meta["table_schema"])
  return PreparedCohort(
      name=meta.get("cohort", builder.builder_config.name if builder.builder_config else "?"),
      patient_ids=np.asarray(ids, dtype=str), table=table, images=imgs, masks=masks,
      image_present=present, spec=spec, preprocess=cfg, fingerprint=meta.get("fingerprint"),
      data_dir=dataset_dir.parents[2], dataset_dir=dataset_dir, case_info=case_info, reused=reused)


def prepare_cohort(name_or_manifest: str | PathLike, *, spec: mf.CohortSpec | None = None,
                   preprocess: mri.PreprocessConfig | None = None, data_dir: PathLike | None = None,
                   n_patients: int | None = None, seed: int = 0, force: bool = False,
                   missing_images: str = "error", workers: int = 1, progress: bool = True,
                   images: bool = True) -> PreparedCohort:
  """Prepares a cohort if needed (``prepare_dataset``) and reads it into memory (``load_prepared``).

  Memory: ``n * D * H * W * C * 4`` bytes for the images (rotterdam_rendered,
  2982 patients at 64^3 x 2: 6.3 GB); use ``grain_batches`` to stream larger
  cohorts, or ``images=False`` for the table only.

  Args and raises: see ``prepare_dataset``; ``images`` as in ``load_prepared``.

  Returns:
    ``PreparedCohort``.
  """
  dataset_dir, reused = prepare_dataset(
      name_or_manifest, spec=spec, preprocess=preprocess, data_dir=data_dir, n_patients=n_patients,
      seed=seed, force=force, missing_images=missing_images, workers=workers, progress=progress)
  return load_prepared(dataset_dir, images=images, reused=reused)


class _Subset:
  """Random-access view of ``source`` restricted to ``indices`` (a patient-level split)."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    if self._indices.ndim != 1 or (len(self._indices) and (self._indices.min() < 0 or
                                                           self._indices.max() >= len(source))):
      raise ValueError(f"indices: expected 1-D positions in [0, {len(source)}), got "
                       f"shape {self._indices.shape}")

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]


class SelectFields:
  """grain map: a TFDS record -> dict of numpy arrays for batching (text features dropped).

  A plain importable callable (grain accepts any callable in ``map``; being
  importable lets grain's worker processes unpickle it).

  Scalars become 0-d arrays of fixed dtype (``index`` int64,
  ``image_present`` bool, ``*_time`` float32 days, ``*_event`` int32) so that
  ``batch`` stacks them into ``[batch]`` arrays; ``image`` stays float32
  ``[D, H, W, C]``, ``mask`` uint8 ``[D, H, W]``.
  """

  def __init__(self, fields: Sequence[str] | None = None):
    self.fields = None if fields is None else tuple(fields)

  def __call__(self, record):
    out = {}
    for k, v in record.items():
      if self.fields is not None and k not in self.fields:
        continue
      if isinstance(v, (bytes, str)):
        continue
      if k == "index":
        out[k] = np.int64(v)
      elif k == "image_present":
        out[k] = np.bool_(v)
      elif k.endswith("_time"):
        out[k] = np.float32(v)
      elif k.endswith("_event"):
        out[k] = np.int32(v)
      else:
        out[k] = np.asarray(v)
    return out


def grain_batches(prepared_or_source, batch_size: int, seed: int = 0, *, shuffle: bool = True,
                  drop_remainder: bool = True, num_epochs: int = 1,
                  indices: Sequence[int] | None = None,
                  fields: Sequence[str] | None = None) -> grain.MapDataset:
  """Shuffled batches of a prepared cohort read with grain (for cohorts too big for memory).

  ``grain.MapDataset.source(src)[subset].shuffle(seed).repeat(num_epochs)
  .map(SelectFields).batch(batch_size)``; each epoch gets its own permutation
  (grain reseeds per epoch). Iterate it directly, or call
  ``.to_iter_dataset(grain.ReadOptions(num_threads=...))`` for threaded
  prefetching.

  Args:
    prepared_or_source: ``PreparedCohort``, a prepared version folder, or a
      random-access source (``data_source(...)``).
    batch_size: patients per batch.
    seed: shuffle seed (0 <= seed < 2**32).
    shuffle: shuffle patients (False: manifest order).
    drop_remainder: drop the last partial batch.
    num_epochs: passes over the data.
    indices: positions (manifest rows) to read, e.g. a training split's rows;
      None = every patient.
    fields: feature names to keep (default: every non-text feature).

  Returns:
    ``grain.MapDataset`` of dicts: ``image`` float32 ``[B, D, H, W, C]``,
    ``mask`` uint8 ``[B, D, H, W]``, ``image_present`` bool ``[B]``,
    ``index`` int64 ``[B]`` (row of ``PreparedCohort.table``), ``<o>_time``
    float32 ``[B]`` and ``<o>_event`` int32 ``[B]``.

  Raises:
    ValueError: bad ``batch_size``, ``num_epochs`` or ``indices``.
  """
  import grain  # pylint: disable=import-outside-toplevel  # grain imports jax: only load it here.
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
    raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
  if isinstance(num_epochs, bool) or not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1:
    raise ValueError(f"num_epochs: expected a positive int, got {num_epochs!r}")
  if isinstance(prepared_or_source, (PreparedCohort, str, os.PathLike)):
    src = data_source(prepared_or_source)
  else:
    src = prepared_or_source
  if indices is not None:
    src = _Subset(src, indices)
  ds = grain.MapDataset.source(src)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  if num_epochs > 1:
    ds = ds.repeat(int(num_epochs))
  return ds.map(SelectFields(fields)).batch(int(batch_size), drop_remainder=drop_remainder)


def list_prepared(data_dir: PathLike | None = None) -> list[dict]:
  """Prepared datasets under ``data_dir`` (default ``cache_dir("tfds")``).

  Returns:
    One dict per version folder: ``config``, ``version``, ``dataset_dir``,
    ``n_patients``, ``bytes`` (size on disk).
  """
  root = _default_data_dir(data_dir) / DATASET_NAME
  out = []
  if not root.is_dir():
    return out
  for info_path in sorted(root.glob("*/*/dataset_info.json")):
    d = info_path.parent
    try:
      info = json.loads(info_path.read_text())
      n = sum(int(x) for s in info.get("splits", []) for x in s.get("shardLengths", []))
    except (OSError, ValueError):
      n = None
    out.append({"config": d.parent.name, "version": d.name, "dataset_dir": d, "n_patients": n,
                "bytes": dataset_bytes(d)})
  return out


def dataset_bytes(dataset_dir: PathLike) -> int:
  """Total size (bytes) of the files in a prepared version folder."""
  return sum(p.stat().st_size for p in pathlib.Path(dataset_dir).iterdir() if p.is_file())
