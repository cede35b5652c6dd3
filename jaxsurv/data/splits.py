"""Patient-level, seed-deterministic, stratified train/val/test and K-fold splits.

Every split here is made over *patients* (unique ``patient_id``), never over
rows, slides or images, so no patient can appear in two parts (the HEALNet
authors' code, konst-int-i/healnet, splits per slide, which lets one patient
land in train and test).
Splits depend only on the set of patients, their stratification values and
the seed: the table is sorted by ``patient_id`` first, so row order does not
matter.

Stratification combines the event indicator (default ``os_event``) with any
extra columns. Numeric columns with more than ``n_bins`` distinct values are
cut into ``n_bins`` quantile bins; other columns are used level by level;
missing values form their own level. Strata too small for scikit-learn's
stratified splitters are merged hierarchically: a rare stratum first drops
its last factor (so it keeps the event status as long as possible), pooled
rare rows that are still rare drop the next one, and a final leftover pool is
merged into the largest stratum.

Splits are stored as JSON lists of patient ids (:func:`save_splits`,
:func:`load_splits`), so a run can be reproduced or audited without the code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from jaxsurv.data.clinical import level_key, listing

_FORMAT = "jaxsurv.splits/v1"
PARTS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Split:
  """One patient-level partition into train / val / test.

  Attributes:
    train, val, test: sorted tuples of patient ids (str); pairwise disjoint.
    meta: JSON-compatible description (seed, fractions, stratify, fold, ...).

  Raises:
    ValueError: if a patient id is repeated within a part or appears in two
      parts (the message names the ids).
  """
  train: tuple[str, ...]
  val: tuple[str, ...] = ()
  test: tuple[str, ...] = ()
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for part in PARTS:
      ids = tuple(sorted(str(i) for i in getattr(self, part)))
      object.__setattr__(self, part, ids)
      dup = sorted({i for i, n in pd.Series(ids).value_counts().items() if n > 1})
      if dup:
        raise ValueError(f"Split.{part}: duplicate patient ids {listing(dup)}")
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
      both = sorted(set(getattr(self, a)) & set(getattr(self, b)))
      if both:
        raise ValueError(f"Split: patient ids in both {a} and {b}: {listing(both)}")
    object.__setattr__(self, "meta", dict(self.meta))

  def sizes(self) -> dict[str, int]:
    """Number of patients per part."""
    return {p: len(getattr(self, p)) for p in PARTS}

  def indices(self, df: pd.DataFrame, *, id_column: str = "patient_id") -> dict[str, np.ndarray]:
    """Row positions of each part in ``df``.

    Returns:
      ``{"train": int64 [n_train], "val": [n_val], "test": [n_test]}``,
      ascending positions (``df.iloc`` indexers).

    Raises:
      ValueError: duplicate/missing ids in ``df`` or split ids absent from
        ``df`` (the message names them).
    """
    ids = check_patient_ids(df, id_column=id_column)
    pos = {pid: i for i, pid in enumerate(ids)}
    out = {}
    for p in PARTS:
      absent = [i for i in getattr(self, p) if i not in pos]
      if absent:
        raise ValueError(f"Split.{p}: patient ids absent from the table: {listing(absent)}")
      out[p] = np.sort(np.array([pos[i] for i in getattr(self, p)], dtype=np.int64))
    return out


def check_patient_ids(df: pd.DataFrame, *, id_column: str = "patient_id") -> np.ndarray:
  """Returns the patient ids as ``str`` ``[n_rows]`` after checking them.

  Raises:
    ValueError: ``id_column`` absent, missing ids (rows named), or duplicate
      ids (the ids named).
  """
  if id_column not in df.columns:
    raise ValueError(f"table has no patient id column {id_column!r}; columns: "
                     f"{listing(map(str, df.columns), 30)}")
  raw = df[id_column]
  if raw.isna().any():
    rows = np.flatnonzero(raw.isna().to_numpy())
    raise ValueError(f"{id_column}: missing patient ids at rows {listing(rows.tolist())}")
  ids = raw.astype(str).to_numpy()
  dup = pd.Series(ids)
  dup = sorted(set(dup[dup.duplicated()]))
  if dup:
    raise ValueError(f"{id_column}: duplicate patient ids {listing(dup)}; splits are made "
                     "per patient, so the table must have one row per patient")
  return ids


def _factor(series: pd.Series, n_bins: int) -> np.ndarray:
  """One stratification factor as strings: quantile bin or level."""
  if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
    values = series.astype("float64")
    if values.nunique(dropna=True) > n_bins:
      bins = pd.qcut(values, n_bins, labels=False, duplicates="drop")
      return np.array(["missing" if pd.isna(b) else f"q{int(b)}" for b in bins], dtype=object)
  return np.array(["missing" if (k := level_key(v)) is None else k
                   for v in series.astype(object).tolist()], dtype=object)


def _check_stratify_columns(df: pd.DataFrame, stratify: Sequence[str]) -> None:
  """Raises ValueError naming the absent stratify columns and the available ones."""
  missing = [c for c in stratify if c not in df.columns]
  if missing:
    raise ValueError(f"stratify columns absent from the table: {missing}; available: "
                     f"{listing(map(str, df.columns), 30)}")


def stratification_labels(df: pd.DataFrame, stratify: Sequence[str], *, n_bins: int = 4,
                          min_count: int = 2) -> np.ndarray:
  """Combined stratum label per row, with rare strata merged.

  Args:
    df: table ``[n, ...]``.
    stratify: columns, most important first (e.g. ``("os_event", "age")``).
    n_bins: quantile bins for numeric columns with more than ``n_bins``
      distinct values.
    min_count: every returned stratum has at least this many rows (if the
      table has that many).

  Returns:
    ``object`` array ``[n]`` of stratum labels such as ``"os_event=1|age=q2"``.

  Raises:
    ValueError: stratify columns absent from ``df`` (lists missing and
      available) or ``n_bins < 1``.
  """
  stratify = [stratify] if isinstance(stratify, str) else list(stratify)
  _check_stratify_columns(df, stratify)
  if n_bins < 1:
    raise ValueError(f"n_bins must be >= 1, got {n_bins}")
  n = len(df)
  factors = [np.array([f"{c}={v}" for v in _factor(df[c], n_bins)], dtype=object)
             for c in stratify]
  # depth[i]: how many leading factors row i still uses; coarsened when rare.
  depth = np.full(n, len(factors), dtype=np.int64)

  def labels():
    out = []
    for i in range(n):
      out.append("|".join(f[i] for f in factors[:depth[i]]) or "pooled")
    return np.array(out, dtype=object)

  for _ in range(len(factors)):
    lab = labels()
    counts = pd.Series(lab).value_counts()
    rare = np.array([counts[l] < min_count for l in lab]) & (depth > 0)
    if not rare.any():
      break
    depth[rare] -= 1
  lab = labels()
  counts = pd.Series(lab).value_counts()
  small = [l for l, c in counts.items() if c < min_count]
  if small and len(counts) > 1:
    largest = counts.index[0]
    lab = np.array([largest if l in small else l for l in lab], dtype=object)
  return lab


def _check_fractions(fractions) -> tuple[float, float, float]:
  fr = tuple(float(f) for f in fractions)
  if len(fr) != 3 or any((not math.isfinite(f)) or f < 0 for f in fr) or fr[0] <= 0:
    raise ValueError(f"fractions must be (train > 0, val >= 0, test >= 0), got {fractions}")
  if abs(sum(fr) - 1.0) > 1e-6:
    raise ValueError(f"fractions must sum to 1, got {fractions} (sum {sum(fr)})")
  return fr


def _stratified_holdout(ids: np.ndarray, df: pd.DataFrame, n_out: int, stratify, n_bins: int,
                        seed: int, what: str):
  """Splits ``ids`` into (kept, held-out) with ``n_out`` held out, stratified."""
  n = len(ids)
  if n_out == 0:
    return ids, ids[:0]
  if n_out >= n:
    raise ValueError(f"{what}: {n_out} of {n} patients requested; too few patients")
  smallest = min(n_out, n - n_out)
  # A stratified split needs each stratum in both parts and no more strata
  # than patients in the smaller part: strata of >= n/smallest rows ensure it.
  min_count = max(2, math.ceil(n / smallest))
  labels = stratification_labels(df, stratify, n_bins=n_bins, min_count=min_count) \
      if stratify else None
  if labels is not None and len(set(labels)) < 2:
    labels = None  # One stratum: plain shuffled split.
  kept, out = train_test_split(ids, test_size=n_out, stratify=labels, random_state=seed,
                               shuffle=True)
  return np.asarray(kept), np.asarray(out)


def stratified_kfold(df: pd.DataFrame, n_folds: int, stratify: Sequence[str], *, seed: int,
                     n_bins: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
  """Stratified K-fold assignment of the rows of ``df``, deterministic from ``seed``.

  Strata are :func:`stratification_labels` with ``min_count=n_folds`` (rare
  strata merged until each can reach every fold); no ``stratify`` columns, or
  a single stratum, gives a plain shuffled K-fold. The folds are those of
  ``sklearn.model_selection.StratifiedKFold(n_splits=n_folds, shuffle=True,
  random_state=seed)``. They depend on the row order, so callers sort the
  patients first (:func:`kfold_with_holdout` and
  ``jaxsurv.data.multimodal.cv_folds`` sort by patient id).

  Args:
    df: one row per patient ``[n, ...]`` with the ``stratify`` columns.
    n_folds: number of folds K (2 <= K <= n).
    stratify: columns, most important first; ``()`` for no stratification.
    seed: integer seed.
    n_bins: quantile bins for continuous stratification columns.

  Returns:
    ``K`` pairs ``(other_rows, fold_rows)`` of int row positions; the
    ``fold_rows`` are disjoint and cover every row.

  Raises:
    ValueError: stratify columns absent from ``df`` (see
      :func:`stratification_labels`).
  """
  n = len(df)
  labels = (stratification_labels(df, stratify, n_bins=n_bins, min_count=int(n_folds))
            if stratify else np.zeros(n))
  if len(set(labels)) < 2:
    labels = np.zeros(n)
  skf = StratifiedKFold(n_splits=int(n_folds), shuffle=True, random_state=seed)
  return list(skf.split(np.zeros(n), labels))


def _prepare(df: pd.DataFrame, id_column: str, stratify) -> tuple[pd.DataFrame, np.ndarray, list]:
  stratify = [stratify] if isinstance(stratify, str) else list(stratify or ())
  ids = check_patient_ids(df, id_column=id_column)
  _check_stratify_columns(df, stratify)
  empty = [c for c in stratify if df[c].isna().all()]
  if empty and len(df):
    # E.g. the default os_event on a cohort without OS (gbsg, breast_cancer):
    # stratifying on it would silently stratify on nothing.
    raise ValueError(f"stratify columns with no observed value: {empty}; choose columns "
                     "the cohort has (e.g. 'dm_event' where OS is absent)")
  order = np.argsort(ids, kind="stable")
  # Sorting by id makes the split independent of the table's row order.
  return df.iloc[order].reset_index(drop=True), ids[order], stratify


def train_val_test_split(df: pd.DataFrame, *, fractions=(0.7, 0.15, 0.15),
                         stratify: Sequence[str] = ("os_event",), seed: int,
                         n_bins: int = 4, id_column: str = "patient_id") -> Split:
  """Patient-level stratified train/val/test split, deterministic from ``seed``.

  The test part is drawn first, then val from the rest (two stratified
  ``sklearn.model_selection.train_test_split`` calls). Sizes are
  ``round(n * fraction)`` for test and val; train takes the rest.

  Args:
    df: one row per patient ``[n, ...]`` with ``id_column`` and the
      ``stratify`` columns.
    fractions: ``(train, val, test)``, non-negative, summing to 1.
    stratify: columns to stratify on (event indicator first); ``()`` for an
      unstratified shuffled split.
    seed: integer seed; the same seed and patients give the same split.
    n_bins: quantile bins for continuous stratification columns.
    id_column: patient id column.

  Returns:
    :class:`Split` with sorted id tuples and ``meta``.

  Raises:
    ValueError: duplicate or missing patient ids (named), absent or
      entirely missing stratify columns (listed; e.g. the default
      ``os_event`` on gbsg), bad fractions, or too few patients for a part.
  """
  fr = _check_fractions(fractions)
  data, ids, stratify = _prepare(df, id_column, stratify)
  n = len(ids)
  n_test, n_val = round(n * fr[2]), round(n * fr[1])
  for part, k, f in (("test", n_test, fr[2]), ("val", n_val, fr[1])):
    if f > 0 and k == 0:
      raise ValueError(f"{part} fraction {f} of {n} patients rounds to 0 patients")
  if n - n_test - n_val < 1:
    raise ValueError(f"no training patients left from {n} (val {n_val}, test {n_test})")
  rest, test = _stratified_holdout(ids, data, n_test, stratify, n_bins, seed, "test split")
  rest_df = data.iloc[np.flatnonzero(np.isin(ids, rest))].reset_index(drop=True)
  rest_ids = rest_df[id_column].astype(str).to_numpy()
  train, val = _stratified_holdout(rest_ids, rest_df, n_val, stratify, n_bins, seed,
                                   "validation split")
  meta = {"method": "train_val_test_split", "seed": int(seed), "fractions": list(fr),
          "stratify": list(stratify), "n_bins": int(n_bins)}
  return Split(tuple(train), tuple(val), tuple(test), meta)


def kfold_with_holdout(df: pd.DataFrame, *, n_folds: int = 5, test_fraction: float = 0.15,
                       stratify: Sequence[str] = ("os_event",), seed: int, n_bins: int = 4,
                       id_column: str = "patient_id") -> list[Split]:
  """Held-out test set plus stratified K-fold CV on the remaining patients.

  The test set (``round(n * test_fraction)`` patients) is drawn first and is
  the same in every fold; the rest is split by :func:`stratified_kfold`
  (``sklearn.model_selection.StratifiedKFold(shuffle=True, random_state=seed)``).

  Args:
    df: one row per patient ``[n, ...]``.
    n_folds: number of CV folds K (>= 2).
    test_fraction: fraction of patients held out for the final test, in
      ``[0, 1)``.
    stratify, seed, n_bins, id_column: as in :func:`train_val_test_split`.

  Returns:
    ``K`` :class:`Split` objects: fold ``k`` has ``val`` = fold k, ``train`` =
    the other folds, ``test`` = the shared held-out set. The val parts are
    disjoint and together cover every non-test patient.

  Raises:
    ValueError: as :func:`train_val_test_split`, or ``n_folds < 2``, or fewer
      non-test patients than folds.
  """
  if int(n_folds) != n_folds or n_folds < 2:
    raise ValueError(f"n_folds must be an integer >= 2, got {n_folds}")
  if not (0 <= test_fraction < 1):
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  data, ids, stratify = _prepare(df, id_column, stratify)
  n = len(ids)
  n_test = round(n * test_fraction)
  if test_fraction > 0 and n_test == 0:
    raise ValueError(f"test_fraction {test_fraction} of {n} patients rounds to 0 patients")
  rest, test = _stratified_holdout(ids, data, n_test, stratify, n_bins, seed, "test split")
  if len(rest) < n_folds:
    raise ValueError(f"{len(rest)} non-test patients cannot form {n_folds} folds")
  rest_df = data.iloc[np.flatnonzero(np.isin(ids, rest))].reset_index(drop=True)
  rest_ids = rest_df[id_column].astype(str).to_numpy()
  folds = []
  for k, (tr, va) in enumerate(stratified_kfold(rest_df, n_folds, stratify, seed=seed,
                                                n_bins=n_bins)):
    meta = {"method": "kfold_with_holdout", "seed": int(seed), "fold": k,
            "n_folds": int(n_folds), "test_fraction": float(test_fraction),
            "stratify": list(stratify), "n_bins": int(n_bins)}
    folds.append(Split(tuple(rest_ids[tr]), tuple(rest_ids[va]), tuple(test), meta))
  return folds


def splits_from_column(df: pd.DataFrame, *, column: str = "split",
                       id_column: str = "patient_id") -> Split:
  """Uses a manifest's own ``split`` column (values train / val / test).

  Values are matched case-insensitively after stripping whitespace.

  Raises:
    ValueError: absent column, duplicate/missing ids, or values other than
      train/val/test (the message names the patients and values), or no
      train patient.
  """
  ids = check_patient_ids(df, id_column=id_column)
  if column not in df.columns:
    raise ValueError(f"table has no split column {column!r}")
  raw = df[column]
  values = np.array(["" if pd.isna(v) else str(v).strip().lower() for v in raw], dtype=object)
  bad = ~np.isin(values, PARTS)
  if bad.any():
    pairs = ", ".join(f"{p!r}: {v!r}" for p, v in list(zip(ids[bad], raw[bad].tolist()))[:10])
    raise ValueError(f"{column}: values must be one of {list(PARTS)}; got {pairs}"
                     f" ({int(bad.sum())} patients)")
  parts = {p: tuple(ids[values == p]) for p in PARTS}
  if not parts["train"]:
    raise ValueError(f"{column}: no patient is marked 'train'")
  return Split(parts["train"], parts["val"], parts["test"],
               {"method": "splits_from_column", "column": column})


def save_splits(splits: Split | Sequence[Split], path: str | os.PathLike) -> pathlib.Path:
  """Writes one split or a list of folds as JSON (patient ids per part).

  The file holds ``{"format", "kind": "single"|"folds", "splits": [{"train":
  [...], "val": [...], "test": [...], "meta": {...}}, ...]}``.

  Raises:
    ValueError: if ``splits`` is not a Split or a non-empty list of them, or
      ``meta`` is not JSON-compatible.
  """
  single = isinstance(splits, Split)
  items = [splits] if single else list(splits)
  if not items or not all(isinstance(s, Split) for s in items):
    raise ValueError("save_splits: expected a Split or a non-empty list of Split")
  doc = {"format": _FORMAT, "kind": "single" if single else "folds",
         "splits": [{**{p: list(getattr(s, p)) for p in PARTS}, "meta": dict(s.meta)}
                    for s in items]}
  try:
    text = json.dumps(doc, indent=1)
  except TypeError as e:
    raise ValueError(f"save_splits: meta is not JSON-compatible: {e}") from e
  path = pathlib.Path(path)
  from jaxsurv import distributed  # pylint: disable=import-outside-toplevel
  if not distributed.is_primary():  # Process 0 writes in a multi-process run.
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, path)
  return path


def load_splits(path: str | os.PathLike) -> Split | list[Split]:
  """Reads :func:`save_splits` output: a :class:`Split` or a list of folds.

  Raises:
    ValueError: not a jaxsurv splits file, or parts that overlap (named ids).
    FileNotFoundError: if ``path`` does not exist.
  """
  path = pathlib.Path(path)
  doc = json.loads(path.read_text())
  if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
    raise ValueError(f"{path}: not a jaxsurv splits file (expected format {_FORMAT!r})")
  items = [Split(tuple(s["train"]), tuple(s.get("val", ())), tuple(s.get("test", ())),
                 s.get("meta", {})) for s in doc["splits"]]
  return items[0] if doc["kind"] == "single" else items
