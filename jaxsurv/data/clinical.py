"""Clinical/tabular covariates -> a float32 feature matrix, fitted on train only.

:class:`ClinicalPreprocessor` learns every statistic (means, standard
deviations, category levels, which columns have missing values) from the
training fold alone and then applies the same fixed transform to validation,
test and future patients. This avoids defects of the released MMNN code
(DigITs-AIML/MMNN_STS, ``data/utils.py``: label encoding in order of
appearance, unscaled continuous features, NaNs surviving an unassigned
``fillna``) and the full-cohort statistics of the released HEALNet code
(konst-int-i/healnet, ``healnet/etl/loaders.py``).

Transform, per configured column:

* numeric: ``(x - mean_train) / sd_train`` (population sd, ``ddof=0``, as in
  scikit-learn's ``StandardScaler``; a column constant in train gets
  ``sd = 1`` so it maps to 0). Missing values are imputed with the train
  mean (0 after standardising). If the column had missing values in train,
  an indicator column ``<col>__missing`` (1 = was missing) is appended.
* categorical: one-hot over the levels seen in train (sorted; pandas
  ``Categorical`` columns keep their category order). If train had missing
  values the explicit level ``__missing__`` gets its own column. A level not
  seen in train raises ``ValueError`` naming the patient, column and level,
  or maps to all zeros with ``handle_unknown="ignore"``.

Levels are compared by a canonical string: ``2``, ``2.0`` and ``"2"`` are the
same level, so a table re-read from CSV still matches a fitted transform.
The fitted state round-trips through a JSON-compatible dict
(:meth:`ClinicalPreprocessor.to_dict` / :meth:`ClinicalPreprocessor.from_dict`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np
import pandas as pd

_FORMAT = "jaxsurv.ClinicalPreprocessor/v1"
MISSING_LEVEL = "__missing__"
_MAX_LISTED = 10


def level_key(value: Any) -> str | None:
  """Canonical string of a categorical value; ``None`` for missing.

  Integral numbers print without a decimal point (``2.0`` -> ``"2"``), bools
  as ``"True"``/``"False"``, everything else with ``str``.
  """
  if value is None or value is pd.NA or value is pd.NaT:
    return None
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, numbers.Real):
    f = float(value)
    if math.isnan(f):
      return None
    if f.is_integer() and math.isfinite(f):
      return str(int(f))
    return repr(f)
  return str(value)


def _sort_levels(levels):
  """Numeric-looking levels in numeric order, then the rest alphabetically."""
  def key(s):
    try:
      return (0, float(s), s)
    except ValueError:
      return (1, 0.0, s)
  return sorted(levels, key=key)


def listing(items, limit=_MAX_LISTED) -> str:
  """``[a, b, ... (n in all)]``: at most ``limit`` items, for error messages."""
  items = list(items)
  shown = ", ".join(repr(i) for i in items[:limit])
  more = f", ... ({len(items)} in all)" if len(items) > limit else ""
  return f"[{shown}{more}]"


class ClinicalPreprocessor:
  """Standardise numerics, one-hot categoricals, impute and flag missing values.

  Example::

    pre = ClinicalPreprocessor(numeric=["age", "nodes"], categorical=["size"])
    x_train = pre.fit_transform(train_df)      # float32 [n_train, n_features]
    x_test = pre.transform(test_df)            # same columns, train statistics
    state = pre.to_dict()                      # JSON-compatible
    same = ClinicalPreprocessor.from_dict(state)

  Args:
    numeric: names of numeric columns (any real dtype or bool; NaN = missing).
    categorical: names of categorical columns (any dtype; NaN/None = missing).
    handle_unknown: ``"error"`` (default) raises on a categorical level not
      seen in training; ``"ignore"`` encodes it as all zeros.
    id_column: column naming patients in error messages; when the table lacks
      it, the row index labels are used instead.

  Raises:
    ValueError: on an empty configuration, a column named twice, or an
      unknown ``handle_unknown``.
  """

  def __init__(self, numeric: Sequence[str] = (), categorical: Sequence[str] = (), *,
               handle_unknown: str = "error", id_column: str = "patient_id"):
    if isinstance(numeric, str) or isinstance(categorical, str):
      raise ValueError("numeric and categorical must be lists of column names, not a string")
    self.numeric = [str(c) for c in numeric]
    self.categorical = [str(c) for c in categorical]
    if not self.numeric and not self.categorical:
      raise ValueError("ClinicalPreprocessor: no numeric or categorical columns configured")
    dup = sorted({c for c in self.numeric + self.categorical
                  if (self.numeric + self.categorical).count(c) > 1})
    if dup:
      raise ValueError(f"ClinicalPreprocessor: columns configured more than once: {dup}")
    if handle_unknown not in ("error", "ignore"):
      raise ValueError(f"handle_unknown must be 'error' or 'ignore', got {handle_unknown!r}")
    self.handle_unknown = handle_unknown
    self.id_column = id_column
    self._stats: dict[str, dict[str, Any]] | None = None
    self._levels: dict[str, dict[str, Any]] | None = None

  # -- helpers ---------------------------------------------------------------

  @property
  def fitted(self) -> bool:
    return self._stats is not None

  def _check_fitted(self):
    if not self.fitted:
      raise ValueError("ClinicalPreprocessor is not fitted: call fit(train_df) first")

  def _check_columns(self, df: pd.DataFrame, where: str) -> None:
    if not isinstance(df, pd.DataFrame):
      raise ValueError(f"{where}: expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in self.numeric + self.categorical if c not in df.columns]
    if missing:
      raise ValueError(f"{where}: configured columns absent from the table: {missing}; "
                       f"available columns: {listing(map(str, df.columns), 50)}")

  def _ids(self, df: pd.DataFrame) -> np.ndarray:
    if self.id_column in df.columns:
      return df[self.id_column].astype(str).to_numpy()
    return np.asarray([str(i) for i in df.index])

  def _numeric_values(self, df: pd.DataFrame, col: str, where: str) -> np.ndarray:
    """Column as float64 with NaN for missing; rejects text and infinities."""
    raw = df[col]
    if raw.dtype == bool or pd.api.types.is_bool_dtype(raw.dtype):
      raw = raw.astype("float64")
    values = pd.to_numeric(raw, errors="coerce").astype("float64").to_numpy()
    bad_text = np.isnan(values) & raw.notna().to_numpy()
    if bad_text.any():
      ids = self._ids(df)[bad_text]
      texts = raw[bad_text].astype(str).tolist()
      raise ValueError(f"{where}: numeric column {col!r} holds non-numeric values "
                       f"{listing(texts)} for patients {listing(ids)}")
    inf = np.isinf(values)
    if inf.any():
      raise ValueError(f"{where}: numeric column {col!r} holds infinite values for "
                       f"patients {listing(self._ids(df)[inf])}")
    return values

  @staticmethod
  def _level_keys(series: pd.Series) -> list[str | None]:
    return [level_key(v) for v in series.astype(object).tolist()]

  # -- fit / transform ---------------------------------------------------------

  def fit(self, df: pd.DataFrame) -> "ClinicalPreprocessor":
    """Learns means, sds, levels and missingness from the training table only.

    Args:
      df: training table ``[n_train, ...]`` holding the configured columns.

    Returns:
      ``self``.

    Raises:
      ValueError: missing configured columns (lists them and the available
        ones), an empty table, non-numeric text or infinities in a numeric
        column (naming column and patients), or a column with no observed
        value in training.
    """
    where = "ClinicalPreprocessor.fit"
    self._check_columns(df, where)
    if len(df) == 0:
      raise ValueError(f"{where}: the training table has no rows")
    stats = {}
    for col in self.numeric:
      v = self._numeric_values(df, col, where)
      observed = v[~np.isnan(v)]
      if observed.size == 0:
        raise ValueError(f"{where}: numeric column {col!r} has no observed value in training")
      mean = float(observed.mean())
      sd = float(observed.std())
      # A constant column carries no information; sd = 1 keeps it finite (0).
      scale = sd if sd > 0 and math.isfinite(sd) else 1.0
      stats[col] = {"mean": mean, "scale": scale,
                    "missing_indicator": bool(np.isnan(v).any())}
    levels = {}
    for col in self.categorical:
      keys = self._level_keys(df[col])
      seen = {k for k in keys if k is not None}
      if MISSING_LEVEL in seen:
        raise ValueError(f"{where}: categorical column {col!r} uses the reserved level "
                         f"{MISSING_LEVEL!r}")
      if not seen:
        raise ValueError(f"{where}: categorical column {col!r} has no observed value in training")
      if isinstance(df[col].dtype, pd.CategoricalDtype):
        # Keep the declared category order (e.g. ordered grades), observed only.
        order = [level_key(c) for c in df[col].cat.categories]
        ordered = [k for k in order if k in seen]
        ordered += _sort_levels(seen - set(ordered))
      else:
        ordered = _sort_levels(seen)
      levels[col] = {"levels": ordered, "missing_level": any(k is None for k in keys)}
    self._stats, self._levels = stats, levels
    return self

  @property
  def feature_names(self) -> list[str]:
    """Names of the output columns, in order (``n_features`` of them).

    Numeric ``<col>``, then ``<col>__missing`` indicators where fitted, then
    one-hot ``<col>=<level>`` (and ``<col>=__missing__``).

    Raises:
      ValueError: if not fitted.
    """
    self._check_fitted()
    names = list(self.numeric)
    names += [f"{c}__missing" for c in self.numeric if self._stats[c]["missing_indicator"]]
    for c in self.categorical:
      spec = self._levels[c]
      names += [f"{c}={lv}" for lv in spec["levels"]]
      if spec["missing_level"]:
        names.append(f"{c}={MISSING_LEVEL}")
    return names

  @property
  def n_features(self) -> int:
    return len(self.feature_names)

  def transform(self, df: pd.DataFrame) -> np.ndarray:
    """Applies the fitted transform.

    Args:
      df: table ``[n_patients, ...]`` with the configured columns (extra
        columns are ignored).

    Returns:
      float32 array ``[n_patients, n_features]`` ordered as
      :attr:`feature_names`; never NaN.

    Raises:
      ValueError: if not fitted; configured columns absent; text or
        infinities in a numeric column; with ``handle_unknown="error"``, a
        categorical level (or a missing value, when train had none) not seen
        in training -- the message names the patients, the column and the
        level.
    """
    where = "ClinicalPreprocessor.transform"
    self._check_fitted()
    self._check_columns(df, where)
    n = len(df)
    blocks, indicators = [], []
    for col in self.numeric:
      st = self._stats[col]
      v = self._numeric_values(df, col, where)
      miss = np.isnan(v)
      z = (np.where(miss, st["mean"], v) - st["mean"]) / st["scale"]
      blocks.append(z[:, None])
      if st["missing_indicator"]:
        indicators.append(miss.astype(np.float64)[:, None])
    blocks += indicators
    for col in self.categorical:
      spec = self._levels[col]
      cols = list(spec["levels"]) + ([MISSING_LEVEL] if spec["missing_level"] else [])
      pos = {lv: i for i, lv in enumerate(cols)}
      keys = [MISSING_LEVEL if k is None else k for k in self._level_keys(df[col])]
      idx = np.array([pos.get(k, -1) for k in keys], dtype=np.int64)
      unknown = idx < 0
      if unknown.any() and self.handle_unknown == "error":
        ids = self._ids(df)[unknown]
        bad = [keys[i] for i in np.flatnonzero(unknown)]
        pairs = ", ".join(f"patient {p!r}: level {lv!r}"
                          for p, lv in list(zip(ids, bad))[:_MAX_LISTED])
        more = f" ... ({len(ids)} patients in all)" if len(ids) > _MAX_LISTED else ""
        raise ValueError(
            f"{where}: categorical column {col!r} has levels not seen in training: "
            f"{pairs}{more}; training levels: {cols}. Pass handle_unknown='ignore' "
            "to encode unseen levels as all zeros.")
      onehot = np.zeros((n, len(cols)), dtype=np.float64)
      rows = np.flatnonzero(~unknown)
      onehot[rows, idx[~unknown]] = 1.0
      blocks.append(onehot)
    out = np.concatenate(blocks, axis=1) if blocks else np.zeros((n, 0))
    return out.astype(np.float32)

  def fit_transform(self, df: pd.DataFrame) -> np.ndarray:
    """``fit(df)`` then ``transform(df)``; float32 ``[n_patients, n_features]``."""
    return self.fit(df).transform(df)

  # -- serialisation -----------------------------------------------------------

  def to_dict(self) -> dict[str, Any]:
    """JSON-compatible state (configuration and, if fitted, all statistics).

    Floats are stored as Python floats, which ``json`` writes with full
    precision, so ``from_dict(json.loads(json.dumps(d)))`` reproduces the
    transform bit for bit.
    """
    d = {"format": _FORMAT, "numeric": list(self.numeric),
         "categorical": list(self.categorical), "handle_unknown": self.handle_unknown,
         "id_column": self.id_column, "fitted": self.fitted}
    if self.fitted:
      d["numeric_stats"] = {c: dict(s) for c, s in self._stats.items()}
      d["categories"] = {c: {"levels": list(s["levels"]), "missing_level": s["missing_level"]}
                         for c, s in self._levels.items()}
      d["feature_names"] = self.feature_names
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ClinicalPreprocessor":
    """Rebuilds a preprocessor from :meth:`to_dict` output.

    Raises:
      ValueError: unknown format, or statistics inconsistent with the
        configured columns.
    """
    if not isinstance(d, dict) or d.get("format") != _FORMAT:
      raise ValueError(f"ClinicalPreprocessor.from_dict: expected format {_FORMAT!r}, got "
                       f"{d.get('format') if isinstance(d, dict) else type(d).__name__!r}")
    pre = cls(d["numeric"], d["categorical"], handle_unknown=d["handle_unknown"],
              id_column=d["id_column"])
    if not d.get("fitted"):
      return pre
    stats, cats = d["numeric_stats"], d["categories"]
    if set(stats) != set(pre.numeric) or set(cats) != set(pre.categorical):
      raise ValueError("ClinicalPreprocessor.from_dict: statistics do not match the "
                       f"configured columns (numeric {pre.numeric}, categorical "
                       f"{pre.categorical})")
    pre._stats = {c: {"mean": float(s["mean"]), "scale": float(s["scale"]),
                      "missing_indicator": bool(s["missing_indicator"])}
                  for c, s in stats.items()}
    pre._levels = {c: {"levels": [str(v) for v in s["levels"]],
                       "missing_level": bool(s["missing_level"])} for c, s in cats.items()}
    if "feature_names" in d and list(d["feature_names"]) != pre.feature_names:
      raise ValueError("ClinicalPreprocessor.from_dict: feature_names do not match the "
                       "statistics (corrupt state)")
    return pre

  def __repr__(self) -> str:
    state = f"{self.n_features} features" if self.fitted else "not fitted"
    return (f"ClinicalPreprocessor(numeric={self.numeric}, categorical={self.categorical}, "
            f"handle_unknown={self.handle_unknown!r}; {state})")
