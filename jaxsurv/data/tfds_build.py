"""TFDS building: a validated, preprocessed cohort written once as a versioned TFDS dataset.

A cohort is validated, preprocessed (``jaxsurv.data.mri.preprocess_case``) and
written once as a TensorFlow Datasets (TFDS) dataset in ArrayRecord format
(``file_format="array_record"``; TensorFlow is not needed to write or read it,
see "TFDS for Jax and PyTorch", https://www.tensorflow.org/datasets/tfless_tfds).
This module holds the builder (``JaxsurvCohort`` and its ``CohortConfig``),
the preprocessing plan and its workers, the stored table and metadata
format, and ``prepare_dataset``, which prepares a cohort unless that exact
version exists and returns the dataset's folder. The cohort names, specs and
default preprocessing are ``jaxsurv.data.cohorts``; reading a prepared
dataset back is ``jaxsurv.data.prepared``.

**Versions.** One TFDS builder, ``jaxsurv_cohort``, holds every cohort as a
builder config whose name encodes what determines the data:

* demo cohorts: ``<name>-seed<S>-n<N>-<D>x<H>x<W>-fp<fingerprint>``;
* user manifests: ``<manifest stem>-<content hash>-<D>x<H>x<W>-fp<fingerprint>``
  (the hash covers the CSV bytes, the spec and each image file's path, size
  and modification time, so an edited manifest or a replaced image prepares a
  new version);
* tabular cohorts: ``<name>-tab-<content hash of the table>``.

``<fingerprint>`` is ``PreprocessConfig.fingerprint()``, which hashes every
preprocessing setting and the pipeline version, so a changed setting prepares
a new dataset side by side instead of reusing a stale one. The folder is
``<data_dir>/jaxsurv_cohort/<config name>/<VERSION>/`` (default ``data_dir``:
``cache_dir("tfds")``); ``VERSION`` changes when the stored features change.
A folder that holds a complete dataset (TFDS writes ``dataset_info.json``
last) is reused as is; ``force=True`` deletes and rewrites it.

**Stored features** (one example per patient, split ``"patients"``, in
manifest order):

* ``patient_id`` (Text), ``index`` (int64, manifest row);
* ``row_json`` (Text): the manifest's non-path columns of that row (clinical
  raw values, outcomes, site/split, oracle columns of the demo cohorts) as
  JSON; with the column dtypes kept in the dataset metadata the table is
  rebuilt exactly (``pandas.testing.assert_frame_equal`` holds);
* ``<o>_time`` (float32, days) and ``<o>_event`` (int32, 1 = event, 0 =
  censored) for each outcome ``o`` of the spec, for fast batching. TFDS
  stores floats as float32, so exact durations come from the table;
* image cohorts only: ``image`` float32 ``[D, H, W, C]`` (raw bytes) and
  ``mask`` uint8 ``[D, H, W]`` (zlib), ``image_present`` (bool) and
  ``case_json`` (Text: grid and original geometry, z-score statistics and
  source files, for mapping grid-space maps back with ``to_original_space``).

**Missing images.** A patient whose image cells are empty in the manifest is
kept with ``image_present=False`` and an all-zero volume and mask, never
dropped. A path that is given but points to no file is a validation error by
default (usually a typo or an unmounted disk); with
``missing_images="absent"`` such patients are kept as image-absent instead.

**Validation first.** ``manifest.validate_cohort(...).raise_if_errors()`` runs
before anything is preprocessed, so a bad cohort stops at once with every
problem listed (patient, column, file). A case whose preprocessing fails
stops preparation with ``PreprocessingError`` naming the patient; nothing is
left behind: TFDS writes the version folder under a temporary name and renames
it at the end (deleting the temporary folder on failure), and the empty
folders TFDS created on the way (config folder, ``downloads``) are removed.
A manifest with a header but no patient rows is a ``jaxsurv.errors.UserError``
raised before anything is written.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import pathlib
import re
import shutil
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils
import tqdm

from jaxsurv.data import fetch
from jaxsurv.data import manifest as mf
from jaxsurv.data import mri
from jaxsurv.data import public
from jaxsurv.data.cohorts import (DEFAULT_PREPROCESS, DEMO_COHORTS, DEMO_DEFAULT_N, KNOWN_COHORTS,
                                  TABULAR_COHORTS, cohort_spec, default_preprocess, demo_manifest,
                                  spec_to_json)
from jaxsurv.errors import UserError

PathLike = str | os.PathLike

log = logging.getLogger(__name__)

DATASET_NAME = "jaxsurv_cohort"
SPLIT = "patients"
# ``all`` is reserved by TFDS (it means "every split"); the one split is
# called "patients" and ``split="all"`` also reads it.

# Stored tensors (lossless either way). Masks: zlib (a uint8 mask shrinks
# ~50x and inflates fast). Images: raw bytes, because z-scored float32 volumes
# barely compress (measured on sarcoma_phantom at 64^3: 1816 of 2048 KiB)
# while inflating them took ~half of the read time (benchmarks/RESULTS.md,
# "Input pipeline").
_IMAGE_ENCODING = "bytes"
_MASK_ENCODING = "zlib"
_FORMAT_VERSION = "1.0.0"


class _QuietTfdsConfigNotes(logging.Filter):
  """Drops two absl notes that every prepared cohort triggers by design.

  Each cohort is a dynamic builder config ("Using custom data
  configuration ...") and is checked for existence before it is written
  ("Variant folder ... has no dataset_info.json"); neither is a problem.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("Using custom data configuration")
                or (msg.startswith("Variant folder") and "has no dataset_info.json" in msg))


logging.getLogger("absl").addFilter(_QuietTfdsConfigNotes())


class PreprocessingError(RuntimeError):
  """Preprocessing one patient's images failed; the message names the patient and the cause."""


def _preprocess_to_json(cfg: mri.PreprocessConfig) -> dict:
  return json.loads(json.dumps(dataclasses.asdict(cfg), default=list))


def _preprocess_from_json(d: Mapping[str, Any]) -> mri.PreprocessConfig:
  return mri.PreprocessConfig(**dict(d))


# --------------------------------------------------------------------------
# Table <-> JSON rows (exact round trip of values and dtypes).


def _json_value(v):
  """A cell as a JSON value; NaN/inf stay floats (Python's json writes NaN/Infinity)."""
  if v is None or v is pd.NA or v is pd.NaT:
    return None
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  if isinstance(v, (float, np.floating)):
    return float(v)
  if isinstance(v, str):
    return v
  if isinstance(v, (pd.Timestamp, np.datetime64)):
    return str(pd.Timestamp(v).isoformat())
  return str(v)


def _table_schema(table: pd.DataFrame) -> dict:
  """Column order and dtypes (categories and order of categoricals) of a table."""
  cols = []
  for c in table.columns:
    dt = table[c].dtype
    entry = {"name": str(c), "dtype": str(dt)}
    if isinstance(dt, pd.CategoricalDtype):
      entry["categories"] = [_json_value(x) for x in dt.categories]
      entry["ordered"] = bool(dt.ordered)
    cols.append(entry)
  return {"columns": cols}


def _rebuild_table(rows: Sequence[Mapping[str, Any]], schema: Mapping[str, Any]) -> pd.DataFrame:
  """Inverse of ``_table_schema`` + ``_json_value``: the table with its original dtypes."""
  names = [c["name"] for c in schema["columns"]]
  data = {}
  for c in schema["columns"]:
    values = [r.get(c["name"]) for r in rows]
    dtype = c["dtype"]
    if dtype == "category":
      data[c["name"]] = pd.Categorical(values, categories=c["categories"], ordered=c["ordered"])
    elif dtype == "object":
      data[c["name"]] = pd.Series([np.nan if v is None else v for v in values], dtype=object)
    else:
      data[c["name"]] = pd.Series(values).astype(dtype)
  return pd.DataFrame(data, columns=names)


def _table_digest(table: pd.DataFrame) -> str:
  h = hashlib.sha256(json.dumps(_table_schema(table), sort_keys=True).encode())
  h.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
  return h.hexdigest()[:12]


# --------------------------------------------------------------------------
# TFDS builder.


@dataclasses.dataclass(kw_only=True)
class CohortConfig(tfds.core.BuilderConfig):
  """Builder config of one prepared cohort (the config ``name`` versions the data).

  Attributes:
    cohort: cohort name (known name or manifest stem).
    grid: ``(D, H, W)`` voxels of the stored volumes; None for tabular cohorts.
    n_channels: image channels ``C``; 0 for tabular cohorts.
    outcomes: outcome names with typed ``<o>_time``/``<o>_event`` features.
  """
  cohort: str = ""
  grid: tuple[int, int, int] | None = None
  n_channels: int = 0
  outcomes: tuple[str, ...] = ()

  @property
  def has_images(self) -> bool:
    return self.n_channels > 0


@dataclasses.dataclass
class _Plan:
  """What ``_generate_examples`` needs; set by ``prepare_dataset`` just before preparing."""
  table: pd.DataFrame  # Non-path columns, one row per patient (manifest order).
  spec: mf.CohortSpec
  preprocess: mri.PreprocessConfig | None
  image_paths: list | None  # Per patient: (channel paths, mask path) or None (absent).
  metadata: dict
  workers: int = 1
  progress: bool = True


class JaxsurvCohort(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of one jaxsurv cohort (see the module docstring for the features).

  Construct it through ``prepare_dataset``/``prepare_cohort``: the config is
  built from the cohort, spec and preprocessing settings, and the cohort's
  rows are handed over in ``_plan``. Reading needs only the prepared folder
  (``tfds.builder_from_directory``), not this class.
  """

  VERSION = tfds.core.Version(_FORMAT_VERSION)
  RELEASE_NOTES = {_FORMAT_VERSION: "patient_id, index, row_json, outcomes; image cohorts: "
                                    "image, mask, image_present, case_json."}
  BUILDER_CONFIG_CLASS = CohortConfig

  def __init__(self, *, plan: _Plan | None = None, **kwargs):
    self._plan = plan
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg: CohortConfig = self.builder_config
    feats: dict[str, Any] = {
        "patient_id": tfds.features.Text(),
        "index": tfds.features.Scalar(dtype=np.int64),
        "row_json": tfds.features.Text(),
    }
    for o in cfg.outcomes:
      feats[f"{o}_time"] = tfds.features.Scalar(dtype=np.float32, doc=f"{o} duration (days)")
      feats[f"{o}_event"] = tfds.features.Scalar(dtype=np.int32, doc=f"{o} event (1 = event)")
    if cfg.has_images:
      d, h, w = cfg.grid
      feats["image"] = tfds.features.Tensor(shape=(d, h, w, cfg.n_channels), dtype=np.float32,
                                            encoding=_IMAGE_ENCODING)
      feats["mask"] = tfds.features.Tensor(shape=(d, h, w), dtype=np.uint8,
                                           encoding=_MASK_ENCODING)
      feats["image_present"] = tfds.features.Scalar(dtype=np.bool_)
      feats["case_json"] = tfds.features.Text()
    return tfds.core.DatasetInfo(
        builder=self, description=f"jaxsurv cohort {cfg.cohort!r} ({cfg.name})",
        features=tfds.features.FeaturesDict(feats), metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)  # Keep manifest order on disk.

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    if self._plan is None:
      raise RuntimeError("JaxsurvCohort: prepare through jaxsurv.data.prepare.prepare_dataset "
                         "(the builder needs the validated cohort)")
    self.info.metadata.update(self._plan.metadata)
    return {SPLIT: self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict]]:
    plan = self._plan
    cfg: CohortConfig = self.builder_config
    table = plan.table
    ids = table[plan.spec.id_column].astype(str).tolist()
    rows = table.to_dict("records")
    cases = _iter_cases(plan, ids) if cfg.has_images else iter(())
    bar = tqdm.tqdm(total=len(rows), desc=f"preparing {cfg.cohort}", unit="patient",
                    disable=not plan.progress)
    with bar:
      for i, (pid, row) in enumerate(zip(ids, rows)):
        ex = {"patient_id": pid, "index": i,
              "row_json": json.dumps({k: _json_value(v) for k, v in row.items()})}
        for o in cfg.outcomes:
          ex[f"{o}_time"] = np.float32(row[f"{o}_time"])
          ex[f"{o}_event"] = np.int32(row[f"{o}_event"])
        if cfg.has_images:
          j, volume, mask, case_json = next(cases)
          assert j == i, (j, i)  # _iter_cases keeps order.
          ex.update(image=volume, mask=mask, image_present=case_json != "", case_json=case_json)
        bar.update(1)
        yield i, ex


def _geometry_json(g: mri.Geometry) -> dict:
  return dataclasses.asdict(g)


def _preprocess_one(args) -> tuple:
  """Worker: ``(i, pid, paths, mask_path, cfg)`` -> ``(i, volume, mask, case_json, error)``.

  Errors come back as text (not raised): some exception types (e.g.
  ``mri.ImageFileError``) cannot be pickled back from a worker process.
  """
  i, pid, paths, mask_path, cfg = args
  try:
    case = mri.preprocess_case(paths, mask_path, cfg)
  except Exception as e:  # pylint: disable=broad-except
    return i, None, None, "", f"{type(e).__name__}: {e}"
  info = {"grid_geometry": _geometry_json(case.grid_geometry),
          "original_geometry": _geometry_json(case.original_geometry),
          "channel_mean": case.channel_mean, "channel_std": case.channel_std,
          "image_paths": list(case.image_paths), "mask_path": case.mask_path,
          "fingerprint": case.fingerprint}
  return i, case.volume, case.mask, json.dumps(info), None


def _iter_cases(plan: _Plan, ids: Sequence[str]) -> Iterator[tuple]:
  """Yields ``(i, volume, mask, case_json)`` in patient order; zeros for absent images.

  With ``plan.workers > 1`` cases run in a spawn-context process pool with at
  most ``2 * workers`` cases in flight (bounded memory); spawn, not fork,
  because the parent may hold JAX/TFDS threads.

  Raises:
    PreprocessingError: naming the first patient whose preprocessing failed.
  """
  cfg = plan.preprocess
  n_ch = len(plan.spec.channels)
  zeros = (np.zeros(tuple(cfg.grid) + (n_ch,), np.float32), np.zeros(tuple(cfg.grid), np.uint8))
  jobs = [(i, ids[i], list(p[0]), p[1], cfg) for i, p in enumerate(plan.image_paths)
          if p is not None]

  def results():
    if plan.workers <= 1 or len(jobs) <= 1:
      yield from map(_preprocess_one, jobs)
      return
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(plan.workers, mp_context=ctx) as pool:
      pending = collections.deque()
      it = iter(jobs)
      for job in it:
        pending.append(pool.submit(_preprocess_one, job))
        if len(pending) >= 2 * plan.workers:
          break
      while pending:
        yield pending.popleft().result()
        job = next(it, None)
        if job is not None:
          pending.append(pool.submit(_preprocess_one, job))

  done = results()
  for i in range(len(ids)):
    if plan.image_paths[i] is None:
      yield i, zeros[0], zeros[1], ""
      continue
    j, volume, mask, case_json, err = next(done)
    if err is not None:
      raise PreprocessingError(f"patient {ids[j]!r} (row {j}): preprocessing failed: {err}")
    yield j, volume, mask, case_json


# --------------------------------------------------------------------------
# Preparing.


def _default_data_dir(data_dir) -> pathlib.Path:
  return pathlib.Path(data_dir) if data_dir is not None else fetch.cache_dir("tfds")


def _grid_tag(cfg: mri.PreprocessConfig) -> str:
  return "x".join(str(g) for g in cfg.grid)


def _slug(text: str) -> str:
  """A config-name-safe version of a file stem (TFDS config names: letters, digits, _ and -)."""
  s = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
  return s or "cohort"


def _manifest_digest(path: pathlib.Path, df: pd.DataFrame, spec: mf.CohortSpec) -> str:
  """Hash of a manifest's bytes, its spec and each referenced file's (path, size, mtime)."""
  h = hashlib.sha256(path.read_bytes())
  h.update(json.dumps(spec_to_json(spec), sort_keys=True).encode())
  for col in spec.path_columns:
    if col not in df.columns:
      continue
    for p in df[col]:
      if p is None:
        h.update(b"<none>")
        continue
      try:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}".encode())
      except OSError:
        h.update(f"{p}|<missing>".encode())
  return h.hexdigest()[:12]


@dataclasses.dataclass
class _Resolved:
  """A cohort argument resolved to a config name and a way to load its rows."""
  cohort: str
  kind: str  # "demo", "tabular" or "manifest".
  spec: mf.CohortSpec
  preprocess: mri.PreprocessConfig | None
  config_name: str
  source: str
  load: Any  # () -> (DataFrame of the manifest/table, manifest source for messages).


def _resolve(name_or_manifest, spec, preprocess, n_patients, seed, progress) -> _Resolved:
  arg = os.fspath(name_or_manifest)
  if arg in KNOWN_COHORTS:
    if spec is not None:
      raise ValueError(f"spec: cohort {arg!r} has a built-in spec; pass spec only with a manifest "
                       "path")
    spec = cohort_spec(arg)
  if arg in DEMO_COHORTS:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
      raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
    if n_patients is None:
      n_patients = DEMO_DEFAULT_N[arg]
    if n_patients is not None and (isinstance(n_patients, bool) or int(n_patients) != n_patients
                                   or n_patients < 1):
      raise ValueError(f"n_patients: expected a positive int or None, got {n_patients!r}")
    n = None if n_patients is None else int(n_patients)
    preprocess = preprocess or default_preprocess(arg)
    name = (f"{arg}-seed{int(seed)}-n{n or 'all'}-{_grid_tag(preprocess)}"
            f"-fp{preprocess.fingerprint()}")

    def load():
      path = demo_manifest(arg, n, int(seed), progress=progress)
      return mf.read_manifest(path, spec), str(path)
    return _Resolved(arg, "demo", spec, preprocess, name, f"jaxsurv.data.phantom ({arg}, seed "
                     f"{int(seed)}, {n or 'all'} patients)", load)

  if n_patients is not None:
    raise ValueError(f"n_patients: only demo cohorts {list(DEMO_COHORTS)} can be subset, got "
                     f"n_patients={n_patients!r} for {arg!r}")
  if arg in TABULAR_COHORTS:
    if preprocess is not None:
      raise ValueError(f"preprocess: cohort {arg!r} has no images")
    table = public.load_cohort_table(arg)
    name = f"{arg}-tab-{_table_digest(table)}"
    return _Resolved(arg, "tabular", spec, None, name, f"jaxsurv.data.public ({arg}: "
                     f"{public.COHORTS[arg].source})", lambda: (table, arg))

  path = pathlib.Path(arg).expanduser()
  if path.suffix.lower() != ".csv" and not path.is_file():
    raise ValueError(f"cohort: {arg!r} is neither a known cohort {list(KNOWN_COHORTS)} nor a "
                     "manifest CSV file")
  if spec is None:
    raise ValueError(f"spec: a CohortSpec is needed for the manifest {arg}")
  df = mf.read_manifest(path, spec)  # FileNotFoundError if absent.
  if df.empty:
    # Checked here, before any folder exists: TFDS would fail at the end
    # ("No examples were yielded") after creating the dataset's folders.
    raise UserError(f"cohort manifest {path}: no patient rows (only a header); a manifest "
                    "needs one row per patient")
  digest = _manifest_digest(path, df, spec)
  if spec.channels:
    preprocess = preprocess or DEFAULT_PREPROCESS
    name = f"{_slug(path.stem)}-{digest}-{_grid_tag(preprocess)}-fp{preprocess.fingerprint()}"
  else:
    if preprocess is not None:
      raise ValueError(f"preprocess: the spec of {arg} declares no image channels")
    name = f"{_slug(path.stem)}-tab-{digest}"
  return _Resolved(_slug(path.stem), "manifest", spec, preprocess, name, str(path.resolve()),
                   lambda: (df, str(path)))


def _validate(df: pd.DataFrame, spec: mf.CohortSpec, missing_images: str, source: str):
  """Validates the cohort; returns the report (raises ``CohortValidationError`` on problems)."""
  report = mf.validate_cohort(df, spec)
  if missing_images == "absent":
    absent = [p for p in report.problems if p.kind == "missing_file" and p.column in spec.path_columns]
    report = dataclasses.replace(report, problems=tuple(p for p in report.problems if p not in absent),
                                 warnings=report.warnings + tuple(absent))
  if report.source == "DataFrame":
    report = dataclasses.replace(report, source=source)
  report.raise_if_errors()
  for w in report.warnings:
    log.warning("%s: %s", source, w)
  return report


def prepare_dataset(name_or_manifest: str | PathLike, *, spec: mf.CohortSpec | None = None,
                    preprocess: mri.PreprocessConfig | None = None, data_dir: PathLike | None = None,
                    n_patients: int | None = None, seed: int = 0, force: bool = False,
                    missing_images: str = "error", workers: int = 1,
                    progress: bool = True) -> tuple[pathlib.Path, bool]:
  """Prepares a cohort as a TFDS dataset unless that exact version exists.

  Args:
    name_or_manifest: a known cohort (``KNOWN_COHORTS``) or a manifest CSV path.
    spec: the manifest's ``CohortSpec`` (manifest paths only; known cohorts
      have theirs, see ``cohort_spec``).
    preprocess: image preprocessing; None = ``default_preprocess(name)`` for
      demo cohorts, ``DEFAULT_PREPROCESS`` for image manifests. Must be None
      for cohorts without images.
    data_dir: TFDS data folder; default ``cache_dir("tfds")``.
    n_patients: demo cohorts only: patients to generate (default 300 for
      sarcoma_phantom, all 2982 for rotterdam_rendered).
    seed: demo cohorts only: generator seed (non-negative int).
    force: delete an existing prepared version and prepare it again.
    missing_images: ``"error"`` (default): an image path that points to no
      file is a validation error; ``"absent"``: such patients are kept with
      ``image_present=False`` (logged as warnings).
    workers: preprocessing processes (1 = in this process).
    progress: show tqdm progress bars.

  Returns:
    ``(dataset_dir, reused)``: the version folder
    ``<data_dir>/jaxsurv_cohort/<config>/<version>`` and whether an existing
    dataset was reused (nothing preprocessed).

  Raises:
    ValueError: unknown cohort, bad arguments, or spec/preprocess given where
      they do not apply.
    jaxsurv.errors.UserError: the manifest has a header but no patient rows
      (raised before anything is written; a ValueError subclass).
    FileNotFoundError: the manifest does not exist.
    jaxsurv.data.manifest.CohortValidationError: the cohort failed validation
      (every problem listed; raised before any preprocessing).
    PreprocessingError: a patient's preprocessing failed (patient named).
  """
  if missing_images not in ("error", "absent"):
    raise ValueError(f"missing_images: expected 'error' or 'absent', got {missing_images!r}")
  if isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
    raise ValueError(f"workers: expected a positive int, got {workers!r}")
  res = _resolve(name_or_manifest, spec, preprocess, n_patients, seed, progress)
  config = CohortConfig(
      name=res.config_name, version=_FORMAT_VERSION, description=res.source, cohort=res.cohort,
      grid=tuple(res.preprocess.grid) if res.preprocess else None,
      n_channels=len(res.spec.channels), outcomes=tuple(res.spec.outcomes))
  data_dir = _default_data_dir(data_dir)
  builder = JaxsurvCohort(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  dataset_dir = pathlib.Path(builder.data_dir)
  if force and dataset_dir.exists():
    shutil.rmtree(dataset_dir)
  if builder.is_prepared() and not force:
    return dataset_dir, True
  if dataset_dir.exists():
    # An incomplete folder (e.g. an interrupted write by an older TFDS): start over.
    shutil.rmtree(dataset_dir)

  df, source = res.load()
  _validate(df, res.spec, missing_images, source)
  spec = res.spec
  if spec.channels:
    if spec.mask is None:
      raise ValueError(f"spec: image cohort {res.cohort!r} needs a mask column (preprocessing "
                       "crops around the tumour mask)")
    present = mf.modality_presence(df, spec, check_files=True)["image"]
    paths = [(tuple(df[c].iloc[i] for c in spec.channels), df[spec.mask].iloc[i])
             if present[i] else None for i in range(len(df))]
  else:
    paths = None
  table = df.drop(columns=[c for c in spec.path_columns if c in df.columns]).reset_index(drop=True)
  metadata = {
      "jaxsurv_format": _FORMAT_VERSION, "cohort": res.cohort, "kind": res.kind,
      "source": res.source, "spec": spec_to_json(spec),
      "preprocess": _preprocess_to_json(res.preprocess) if res.preprocess else None,
      "fingerprint": res.preprocess.fingerprint() if res.preprocess else None,
      "table_schema": _table_schema(table), "n_patients": len(table),
      "seed": int(seed) if res.kind == "demo" else None,
  }
  builder._plan = _Plan(table=table, spec=spec, preprocess=res.preprocess, image_paths=paths,  # pylint: disable=protected-access
                        metadata=metadata, workers=int(workers), progress=progress)
  was_active = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)  # One bar (ours, with a total) instead of TFDS's three.
  downloads = data_dir / "downloads"
  # Folders TFDS may create on the way; those that are new and still empty
  # after a failure are removed (rmdir only: never anything with content).
  created = [d for d in (dataset_dir.parent, dataset_dir.parent.parent, downloads / "extracted",
                         downloads, data_dir) if not d.exists()]
  try:
    builder.download_and_prepare(download_dir=os.fspath(downloads))
  except BaseException:
    # TFDS has already deleted its temporary version folder (``incomplete_dir``).
    for d in created:
      try:
        d.rmdir()
      except OSError:
        pass
    raise
  finally:
    tfds.display_progress_bar(was_active)
  return dataset_dir, False

