"""Cohort manifests: one CSV row per patient, validated before anything runs.

A manifest has a ``patient_id`` column; one image path per channel (MMNN:
``t1c``, ``t2fs``) and a tumour-mask path (``mask``); clinical columns declared
in ``CohortSpec`` as numeric or categorical; outcomes ``<o>_time`` (days) and
``<o>_event`` (1 = event, 0 = censored) for each outcome ``o`` (e.g. ``os``,
``dm``); optional ``site`` and ``split``. Relative paths resolve against the
manifest's folder.

Missing values are allowed, never dropped silently: an empty image cell or
clinical value becomes ``False`` in ``modality_presence``. A path that is given
but points nowhere, or to a broken file, is an error.

``validate_cohort`` checks the whole cohort and reports every problem at once
(patient, column, file, message), so a bad cohort is fixed in one pass:
missing or unreadable files, corrupt NIfTI/NRRD (truncation included),
channel or mask grids that differ in size or by more than ``geometry_tol_mm``
millimetres, empty masks, NaN/negative/non-numeric times, events outside
{0, 1}, duplicate or missing ids, non-numeric clinical values and (given the
training levels) unknown categorical levels at inference.

Image checks read headers only (SimpleITK ``ReadImageInformation``) plus an
O(1) integrity screen (gzip trailer length / file size, see
``jaxsurv.data.mri.check_image_file``); the mask's voxels are read because
"empty mask" needs them (masks are small and compress well). ``check_images=
"full"`` decompresses every image as well (catches corruption in the middle of
a file; costs one decompression per image).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk

from jaxsurv.data import mri

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class CohortSpec:
  """What a cohort manifest holds.

  Attributes:
    channels: image path columns, first = reference channel (mask drawn on it),
      e.g. ``("t1c", "t2fs")``; ``()`` for a cohort without images.
    mask: tumour-mask path column, or None.
    numeric: numeric clinical columns (NaN allowed = missing).
    categorical: categorical clinical columns (read as strings; empty = missing).
    outcomes: outcome names; ``"os"`` means columns ``os_time`` (days, >= 0)
      and ``os_event`` (0/1).
    categorical_levels: known levels per categorical column (e.g. from the
      training cohort); values outside them are errors. Columns not listed are
      not checked.
    geometry_tol_mm: channels and mask share physical space if the corner
      voxels of their grids are at most this far apart (mm).
    require_same_grid: channels must share the first channel's grid (size +
      geometry within tolerance). If False, other channels may have any grid
      (they are resampled in preprocessing) but must cover the tumour. The
      mask must always lie on the first channel's grid.
    id_column, site_column, split_column: column names.
  """
  channels: tuple[str, ...] = ("t1c", "t2fs")
  mask: str | None = "mask"
  numeric: tuple[str, ...] = ()
  categorical: tuple[str, ...] = ()
  outcomes: tuple[str, ...] = ("os", "dm")
  categorical_levels: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  geometry_tol_mm: float = 0.5
  require_same_grid: bool = True
  id_column: str = "patient_id"
  site_column: str = "site"
  split_column: str = "split"

  def __post_init__(self):
    for name in ("channels", "numeric", "categorical", "outcomes"):
      value = getattr(self, name)
      object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
    levels = {str(k): tuple(_level(v) for v in vs) for k, vs in dict(self.categorical_levels).items()}
    unknown = sorted(set(levels) - set(self.categorical))
    if unknown:
      raise ValueError(f"CohortSpec.categorical_levels: columns {unknown} are not declared categorical")
    object.__setattr__(self, "categorical_levels", levels)
    cols = self.path_columns + self.numeric + self.categorical + self.outcome_columns
    dup = sorted({c for c in cols if cols.count(c) > 1})
    if dup:
      raise ValueError(f"CohortSpec: columns declared twice: {dup}")
    if not self.geometry_tol_mm >= 0:
      raise ValueError(f"CohortSpec.geometry_tol_mm: must be >= 0 mm, got {self.geometry_tol_mm!r}")

  @property
  def path_columns(self) -> tuple[str, ...]:
    return self.channels + ((self.mask,) if self.mask else ())

  @property
  def outcome_columns(self) -> tuple[str, ...]:
    return tuple(c for o in self.outcomes for c in (f"{o}_time", f"{o}_event"))

  @property
  def clinical(self) -> tuple[str, ...]:
    return self.numeric + self.categorical


def _level(v) -> str:
  """Categorical levels compare as strings; 1.0 and 1 are the same level."""
  if isinstance(v, (float, np.floating)) and float(v).is_integer():
    return str(int(v))
  return str(v).strip()


def _missing(v) -> bool:
  if v is None or v is pd.NA:
    return True
  if isinstance(v, (float, np.floating)) and math.isnan(v):
    return True
  return isinstance(v, str) and v.strip() == ""


def _resolve(value, base: pathlib.Path):
  if _missing(value):
    return None
  p = os.path.expanduser(str(value).strip())
  if not os.path.isabs(p):
    p = os.path.join(base, p)
  return os.path.normpath(p)


def read_manifest(path: PathLike, spec: CohortSpec) -> pd.DataFrame:
  """Reads a cohort manifest CSV, resolving image/mask paths to absolute paths.

  Ids, path and categorical columns are read as strings (leading zeros kept);
  other columns as pandas parses them. Nothing is validated or dropped here:
  call ``validate_cohort`` next.

  Args:
    path: CSV file; relative image paths resolve against its folder.
    spec: the cohort's columns.

  Returns:
    DataFrame, one row per patient, in file order; empty path cells are None.

  Raises:
    FileNotFoundError: if the manifest does not exist.
    ValueError: if the file cannot be parsed as CSV.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"cohort manifest not found: {path}")
  str_cols = (spec.id_column, spec.site_column, spec.split_column) + spec.path_columns + spec.categorical
  try:
    df = pd.read_csv(path, dtype={c: str for c in str_cols}, skipinitialspace=True)
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise ValueError(f"cohort manifest {path}: not a readable CSV ({e})") from e
  df.columns = [str(c).strip() for c in df.columns]
  base = path.resolve().parent
  for col in spec.path_columns:
    if col in df.columns:
      df[col] = pd.Series([_resolve(v, base) for v in df[col]], index=df.index, dtype=object)
  df.attrs["manifest_path"] = str(path.resolve())
  return df


@dataclasses.dataclass(frozen=True)
class Problem:
  """One validation finding. ``kind`` is a stable code, e.g. ``"missing_file"``."""
  kind: str
  message: str
  patient_id: str | None = None
  column: str | None = None
  file: str | None = None
  row: int | None = None

  def __str__(self) -> str:
    where = []
    if self.patient_id is not None:
      where.append(f"patient {self.patient_id!r}")
    if self.row is not None:
      where.append(f"row {self.row}")
    if self.column is not None:
      where.append(f"column {self.column!r}")
    if self.file is not None:
      where.append(f"file {self.file}")
    return f"[{self.kind}] " + (", ".join(where) + ": " if where else "") + self.message


class CohortValidationError(ValueError):
  """A cohort failed validation; ``.problems`` holds every problem, the message lists them all."""

  def __init__(self, problems: Sequence[Problem], source: str = "cohort"):
    self.problems = tuple(problems)
    self.source = source
    lines = "\n".join(f"  {i + 1}. {p}" for i, p in enumerate(self.problems))
    super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")

  def __reduce__(self):  # Picklable, so errors survive worker processes.
    return (type(self), (self.problems, self.source))


@dataclasses.dataclass(frozen=True)
class ValidationReport:
  """Result of ``validate_cohort``.

  Attributes:
    problems: errors, in order: table-level, then by row and column.
    warnings: findings that do not stop a run (e.g. a partial image set,
      which makes the image modality missing for that patient).
    n_patients: rows checked.
    image_check: "none", "header" or "full".
    source: manifest path or "DataFrame".
  """
  problems: tuple[Problem, ...]
  warnings: tuple[Problem, ...]
  n_patients: int
  image_check: str
  source: str = "DataFrame"

  @property
  def ok(self) -> bool:
    return not self.problems

  def kinds(self) -> list[str]:
    """Problem kinds, in report order."""
    return [p.kind for p in self.problems]

  def raise_if_errors(self) -> None:
    """Raises ``CohortValidationError`` listing every problem, if there is any."""
    if self.problems:
      raise CohortValidationError(self.problems, self.source)

  def __str__(self) -> str:
    head = (f"{self.source}: {self.n_patients} patients, {len(self.problems)} problem(s), "
            f"{len(self.warnings)} warning(s), image check {self.image_check}")
    return "\n".join([head] + [f"  {p}" for p in self.problems] +
                     [f"  warning {p}" for p in self.warnings])


def _pid(df: pd.DataFrame, spec: CohortSpec, i: int) -> str | None:
  if spec.id_column not in df.columns:
    return None
  v = df[spec.id_column].iloc[i]
  return None if _missing(v) else str(v)


def _fmt(v) -> str:
  """repr of a cell value without numpy's type wrapper (``-5.0``, not ``np.float64(-5.0)``)."""
  return repr(v.item() if isinstance(v, np.generic) else v)


def _as_number(v) -> float | None:
  """float(v), or None if v is not a number (strings like 'abc', '12 days')."""
  if isinstance(v, (bool, np.bool_)):
    return float(v)
  try:
    return float(v)
  except (TypeError, ValueError):
    return None


def _image_mode(check_images) -> str:
  if check_images is False or check_images is None:
    return "none"
  if check_images is True or check_images == "header":
    return "header"
  if check_images == "full":
    return "full"
  raise ValueError(f"check_images: expected True/False, 'header' or 'full', got {check_images!r}")


def validate_cohort(df_or_path: pd.DataFrame | PathLike, spec: CohortSpec, *,
                    require_outcomes: bool = True, check_images: bool | str = True) -> ValidationReport:
  """Checks a whole cohort and collects every problem (never stops at the first).

  Args:
    df_or_path: a manifest CSV path (read with ``read_manifest``) or a DataFrame
      (relative paths in it resolve against the working directory).
    spec: the cohort's columns and tolerances.
    require_outcomes: outcome columns must exist and be valid (training,
      evaluation); False at inference, where outcome columns are ignored.
    check_images: True or "header": headers + O(1) integrity screen of each
      image, full read of masks (cost: one header read per image, one mask
      decompression per patient); "full": also decompress every image; False:
      only check that the files exist.

  Returns:
    ``ValidationReport``; call ``.raise_if_errors()`` to stop on problems.

  Problem kinds: missing_column, missing_id, duplicate_id, missing_file,
  unreadable_file, corrupt_file, not_3d_scalar, shape_mismatch,
  affine_mismatch, not_covering, empty_mask, missing_mask, missing_time,
  bad_time, negative_time, missing_event, bad_event, non_numeric,
  unknown_level.

  Raises:
    FileNotFoundError / ValueError: only if the manifest itself cannot be read
      or ``check_images`` is not a known mode; everything about the cohort's
      content is reported, not raised.
  """
  mode = _image_mode(check_images)
  if isinstance(df_or_path, pd.DataFrame):
    df = df_or_path.reset_index(drop=True)
    source = df.attrs.get("manifest_path", "DataFrame")
  else:
    df = read_manifest(df_or_path, spec)
    source = str(df_or_path)
  problems: list[Problem] = []
  warnings: list[Problem] = []
  n = len(df)

  # Table level: declared columns must exist.
  required = [spec.id_column] + list(spec.path_columns) + list(spec.clinical)
  if require_outcomes:
    required += list(spec.outcome_columns)
  for col in required:
    if col not in df.columns:
      problems.append(Problem("missing_column", f"declared column {col!r} is not in the manifest "
                              f"(columns: {list(df.columns)})", column=col))
  cols = set(df.columns)

  # Ids: present and unique.
  if spec.id_column in cols:
    ids = df[spec.id_column]
    for i in range(n):
      if _missing(ids.iloc[i]):
        problems.append(Problem("missing_id", "empty patient id", column=spec.id_column, row=i))
    present = ids[~ids.map(_missing)].astype(str).str.strip()
    for pid, rows in present.groupby(present).groups.items():
      if len(rows) > 1:
        problems.append(Problem("duplicate_id", f"patient id appears {len(rows)} times, rows "
                                f"{list(rows)}", patient_id=pid, column=spec.id_column))

  for i in range(n):
    pid = _pid(df, spec, i)
    row = df.iloc[i]
    where = dict(patient_id=pid, row=i)

    # Outcomes.
    if require_outcomes:
      for o in spec.outcomes:
        tc, ec = f"{o}_time", f"{o}_event"
        if tc in cols:
          v = row[tc]
          t = _as_number(v)
          if _missing(v) or (t is not None and math.isnan(t)):
            problems.append(Problem("missing_time", f"{tc} is missing (NaN); durations are needed "
                                    "for every patient", column=tc, **where))
          elif t is None or math.isinf(t):
            problems.append(Problem("bad_time", f"{tc} = {_fmt(v)} is not a finite number of days",
                                    column=tc, **where))
          elif t < 0:
            problems.append(Problem("negative_time", f"{tc} = {_fmt(v)} is negative", column=tc, **where))
        if ec in cols:
          v = row[ec]
          e = _as_number(v)
          if _missing(v) or (e is not None and math.isnan(e)):
            problems.append(Problem("missing_event", f"{ec} is missing (NaN)", column=ec, **where))
          elif e not in (0.0, 1.0):
            problems.append(Problem("bad_event", f"{ec} = {_fmt(v)} is outside {{0, 1}} (1 = event, "
                                    "0 = censored)", column=ec, **where))

    # Clinical values: missing is allowed (modality presence), wrong type is not.
    for c in spec.numeric:
      if c in cols and not _missing(row[c]):
        x = _as_number(row[c])
        if x is None or math.isinf(x):
          problems.append(Problem("non_numeric", f"{c} = {_fmt(row[c])} is not a finite number",
                                  column=c, **where))
    for c, levels in spec.categorical_levels.items():
      if c in cols and not _missing(row[c]) and _level(row[c]) not in levels:
        problems.append(Problem("unknown_level", f"{c} = {_level(row[c])!r} is not a known level "
                                f"{list(levels)}", column=c, **where))

    # Images.
    if spec.path_columns and all(c in cols for c in spec.path_columns):
      _check_row_images(row, spec, mode, where, problems, warnings)

  return ValidationReport(tuple(problems), tuple(warnings), n, mode, source)


def _check_row_images(row, spec: CohortSpec, mode: str, where: dict, problems: list,
                      warnings: list) -> None:
  """Checks one patient's channel and mask files; appends findings."""
  given = {c: row[c] for c in spec.path_columns if not _missing(row[c])}
  chans = [c for c in spec.channels if c in given]
  if not given:
    return  # No image for this patient: allowed (modality presence False).
  if spec.channels and len(chans) < len(spec.channels):
    absent = [c for c in spec.channels if c not in given]
    warnings.append(Problem("partial_image", f"channels {absent} are empty while {chans} are given: "
                            "the image modality counts as missing for this patient", **where))
  if spec.mask and spec.mask not in given and chans:
    problems.append(Problem("missing_mask", f"images are given ({chans}) but the mask cell is "
                            "empty; preprocessing crops to the mask", column=spec.mask, **where))

  infos: dict[str, mri.ImageInfo] = {}
  for col, path in given.items():
    path = str(path)
    if not os.path.isfile(path):
      problems.append(Problem("missing_file", "file not found", column=col, file=path, **where))
      continue
    if mode == "none":
      continue
    try:
      info = mri.read_image_info(path)
    except mri.ImageFileError as e:
      problems.append(Problem("unreadable_file", str(e).removeprefix(path + ": "), column=col,
                              file=path, **where))
      continue
    if info.dimension != 3 or info.components != 1:
      problems.append(Problem("not_3d_scalar", f"expected a 3-D scalar volume, got {info.dimension}-D "
                              f"with {info.components} component(s)", column=col, file=path, **where))
      continue
    try:
      mri.check_image_file(path, full=(mode == "full"), info=info)
    except mri.ImageFileError as e:
      problems.append(Problem("corrupt_file", str(e).removeprefix(path + ": "), column=col,
                              file=path, **where))
      continue
    infos[col] = info
  if mode == "none":
    return

  # Geometry against the reference (first) channel.
  ref_col = spec.channels[0] if spec.channels and spec.channels[0] in infos else None
  mask_arr = None
  if spec.mask and spec.mask in infos:
    try:
      mask_img = sitk.ReadImage(infos[spec.mask].path)
      mask_arr = sitk.GetArrayViewFromImage(mask_img)
      if not np.any(mask_arr):
        problems.append(Problem("empty_mask", "tumour mask has no non-zero voxel", column=spec.mask,
                                file=infos[spec.mask].path, **where))
        mask_arr = None
    except RuntimeError as e:
      problems.append(Problem("corrupt_file", f"mask voxels unreadable ({mri._sitk_reason(e)})",
                              column=spec.mask, file=infos[spec.mask].path, **where))
  if ref_col is None:
    return
  ref = infos[ref_col].geometry
  for col, info in infos.items():
    if col == ref_col:
      continue
    is_mask = col == spec.mask
    if is_mask or spec.require_same_grid:
      g = info.geometry
      what = "mask" if is_mask else "channel"
      if tuple(g.size) != tuple(ref.size):
        problems.append(Problem("shape_mismatch", f"{what} grid size {g.size} (i, j, k) differs from "
                                f"{ref_col!r} {ref.size} ({infos[ref_col].path})", column=col,
                                file=info.path, **where))
        continue
      d = mri.geometry_mismatch_mm(ref, g)
      if d > spec.geometry_tol_mm:
        problems.append(Problem("affine_mismatch", f"{what} grid is displaced by up to {d:.3g} mm from "
                                f"{ref_col!r} ({infos[ref_col].path}); tolerance "
                                f"{spec.geometry_tol_mm} mm (origin {g.origin} vs {ref.origin}, "
                                f"spacing {g.spacing} vs {ref.spacing})", column=col,
                                file=info.path, **where))
    elif mask_arr is not None and spec.mask in infos:
      outside = _tumour_outside(mask_arr, infos[spec.mask].geometry, info.geometry)
      if outside:
        problems.append(Problem("not_covering", f"{outside} tumour voxels lie outside this channel's "
                                "field of view", column=col, file=info.path, **where))


def _tumour_outside(mask_arr: np.ndarray, mask_geom: mri.Geometry, geom: mri.Geometry) -> int:
  """Number of tumour voxels whose centres fall outside ``geom``'s field of view."""
  kji = np.argwhere(mask_arr)
  pts = mask_geom.index_to_physical(kji[:, ::-1])
  idx = ((pts - np.asarray(geom.origin)) @ geom.matrix) / np.asarray(geom.spacing)
  size = np.asarray(geom.size)
  return int(np.any((idx < -0.5) | (idx > size - 0.5), axis=1).sum())


def modality_presence(df: pd.DataFrame, spec: CohortSpec, *,
                      check_files: bool = True) -> dict[str, np.ndarray]:
  """Per-patient modality-presence masks.

  Args:
    df: manifest (``read_manifest`` output), ``n`` rows.
    spec: the cohort's columns.
    check_files: an image also needs its files to exist (not just non-empty cells).

  Returns:
    ``{"image": bool[n], <clinical column>: bool[n], ...}``. ``image`` is True
    when every channel path (and the mask path, if declared) is given (and
    exists); a clinical column is True where its value is present (numeric:
    a finite number; categorical: a non-empty string). Keys follow
    ``spec.numeric + spec.categorical``; no ``image`` key if the spec has no
    channels.

  Raises:
    KeyError: if a declared column is absent from ``df``.
    ValueError: if a clinical column is named "image".
  """
  out: dict[str, np.ndarray] = {}
  n = len(df)
  if spec.channels:
    img = np.ones(n, bool)
    for c in spec.path_columns:
      col = df[c]
      ok = np.array([not _missing(v) and (not check_files or os.path.isfile(str(v))) for v in col],
                    dtype=bool)
      img &= ok
    out["image"] = img
  for c in spec.clinical:
    if c == "image":
      raise ValueError("modality_presence: clinical column 'image' clashes with the image modality key")
    col = df[c]
    if c in spec.numeric:
      vals = [_as_number(v) for v in col]
      out[c] = np.array([x is not None and math.isfinite(x) for x in vals], dtype=bool)
    else:
      out[c] = np.array([not _missing(v) for v in col], dtype=bool)
  return out


def write_manifest(rows: Iterable[Mapping[str, Any]], path: PathLike) -> pathlib.Path:
  """Writes rows (dicts) as a manifest CSV; a small convenience for cohort builders.

  Paths are written as given (use paths relative to ``path``'s folder to keep
  a cohort relocatable). The file is written to a temporary name and renamed.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  pd.DataFrame(list(rows)).to_csv(tmp, index=False)
  os.replace(tmp, path)  # atomic: a manifest on disk is always complete
  return path
