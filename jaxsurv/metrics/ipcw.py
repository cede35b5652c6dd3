"""Metrics with inverse-probability-of-censoring weights (IPCW): Uno's C, AUC(t), Brier score, IBS.

The weights come from the Kaplan-Meier estimate of the censoring survival
function G on the *training* set (scikit-survival's
``CensoringDistributionEstimator``, ``_censoring_km``), checked where
scikit-survival would fail or return infinite weights (``_censoring_survival``).

* ``concordance_index_ipcw``: Uno's C, with jaxsurv's O(n log n) pair counts
  (``jaxsurv.metrics.concordance``) and scikit-survival's weights.
* ``cumulative_dynamic_auc``, ``brier_score``, ``integrated_brier_score``:
  thin, validated wrappers around scikit-survival (a well-kept reference
  implementation; no reason to re-derive them).

scikit-survival is imported lazily (only by the functions that wrap it), so
the JAX core works where scikit-survival is not installed.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from jaxsurv import checks
from jaxsurv.metrics.concordance import (ConcordanceCounts, _check_1d, _check_tol, _no_pairs,
                                         _per_patient, _validated)


def _surv(event: np.ndarray, duration: np.ndarray):
  from sksurv.util import Surv  # Lazy: scikit-survival is optional for the JAX core.
  return Surv.from_arrays(event=event.astype(bool), time=duration)


def _censoring_km(train_duration, train_event):
  """Validated training arrays and sksurv's Kaplan-Meier censoring estimator fitted on them."""
  from sksurv.nonparametric import CensoringDistributionEstimator
  td, te = checks.check_survival(train_duration, train_event,
                                     names=("train_duration", "train_event"))
  _check_1d((td, te), ("train_duration", "train_event"))
  if not te.any():
    raise ValueError("train_event: all training patients are censored; the censoring "
                     "distribution (and scikit-survival) needs at least one event")
  cens = CensoringDistributionEstimator().fit(_surv(te, td))
  return td, te, cens


def _rows_of(idx: np.ndarray, n: int) -> str:
  """``rows [..] (k rows)`` for integer row numbers ``idx`` out of n."""
  m = np.zeros(n, bool)
  m[idx] = True
  return checks._rows(m)


def _censoring_survival(cens, times: np.ndarray, rows: np.ndarray, n: int, what: str,
                        hint: str, allow_zero: bool = False) -> np.ndarray:
  """G(t) from the fitted censoring KM, with clear errors where scikit-survival fails.

  Args:
    cens: fitted ``CensoringDistributionEstimator``.
    times: ``[k]`` query times.
    rows: ``[k]`` row numbers of the queries in the argument ``what`` (length n).
    n: length of ``what`` (for messages).
    what: the argument the rows belong to (for messages).
    hint: how to fix it (for messages).
    allow_zero: accept G(t) = 0 (the Brier score gives such rows weight 0).
  """
  last = cens.unique_time_[-1]
  if cens.prob_[-1] > 0:
    beyond = times > last
    if beyond.any():
      raise ValueError(
          f"{what}: times after the last training duration {last:g} at "
          f"{_rows_of(rows[beyond], n)}; the censoring distribution is unknown there, "
          f"so the allowed times are <= {last:g}. {hint}")
  g = cens.predict_proba(times)
  zero = g == 0
  if zero.any() and not allow_zero:
    raise ValueError(
        f"{what}: the censoring survival function G(t), estimated on the training set, "
        f"is 0 at the times of {_rows_of(rows[zero], n)}, so their inverse-probability "
        f"weights are infinite. {hint}")
  return g


def concordance_index_ipcw(train_duration, train_event, duration, event, risk, *,
                           tau: Optional[float] = None,
                           tied_tol: float = 1e-8) -> ConcordanceCounts:
  """Uno's inverse-probability-of-censoring weighted concordance index.

  C_tau = sum_{i,j} w_i comparable_ij (concordant_ij + tied_ij / 2) /
  sum_{i,j} w_i comparable_ij, with w_i = 1 / G(T_i)^2 for events with T_i <
  tau (0 otherwise), where G is the Kaplan-Meier estimate of the censoring
  survival function on the *training* set. Pair rules as in Harrell's C.
  Agrees with ``sksurv.metrics.concordance_index_ipcw`` (to ~1e-15; tested to
  1e-6); the pair counting is jaxsurv's O(n log n) core instead of sksurv's
  O(n_events * n) loop, and G comes from sksurv's
  ``CensoringDistributionEstimator``. The returned counts are the unweighted
  Harrell counts over all events, as in sksurv.

  Args:
    train_duration: ``[n_train]`` training times (e.g. days), used only for G.
    train_event: ``[n_train]`` training event indicator.
    duration: ``[n]`` test times.
    event: ``[n]`` test event indicator.
    risk: ``[n]`` test risk scores (higher = earlier event).
    tau: truncation time; only events before tau carry weight. Needed when
      test events occur after the last training time (G is unknown there).
    tied_tol: absolute tolerance for tied risks.

  Returns:
    ``ConcordanceCounts(cindex, concordant, discordant, tied_risk, tied_time)``.

  Raises:
    ValueError: invalid arrays (named, with rows); test events before tau
      after the last training time (the message gives the allowed range) or at
      times where G = 0; no training event; see also ``concordance_counts``.
    NoComparablePairsError: if the weighted denominator is 0 (e.g. tau below
      every event time).

  Source: Uno et al., Stat. Med. 30(10):1105-1117 (2011), eq. for C_tau;
  ``sksurv.metrics.concordance_index_ipcw`` (scikit-survival 0.28).
  """
  tol = _check_tol(tied_tol)
  _, _, cens = _censoring_km(train_duration, train_event)
  d, e, r = _validated(duration, event, risk)
  if tau is not None:
    tau = float(tau)
    if not math.isfinite(tau):
      raise ValueError(f"tau: must be finite, got {tau}")
  weighted = e & (d < tau) if tau is not None else e
  rows = np.flatnonzero(weighted)
  hint = ("Pass tau <= the last training duration (events at or after tau are "
          "ignored) or use training data with longer follow-up.")
  w = np.zeros(d.shape[0])
  if rows.size:
    g = _censoring_survival(cens, d[rows], rows, d.shape[0], "duration", hint)
    w[rows] = 1.0 / np.square(g)
  counts = _per_patient(d, e, r, tol)
  conc, tied, comparable, tied_time = counts.sum(axis=1)
  numerator = float(np.sum(w * (counts[0] + 0.5 * counts[1])))
  denominator = float(np.sum(w * counts[2]))
  if denominator == 0:
    raise _no_pairs("Uno's C" + (f" (tau={tau:g})" if tau is not None else ""))
  return ConcordanceCounts(numerator / denominator, int(conc), int(comparable - conc - tied),
                           int(tied), int(tied_time))


def _check_times(times, d: np.ndarray, name: str = "times") -> np.ndarray:
  """Evaluation times: 1-D, finite, strictly increasing, inside [min(d), max(d))."""
  t = checks.as_float_array(np.atleast_1d(times), name)
  if t.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array, got shape {t.shape}")
  if t.size > 1 and np.any(np.diff(t) <= 0):
    raise ValueError(f"{name}: must be strictly increasing (column k of the predictions "
                     f"belongs to times[k]); got {t}")
  lo, hi = d.min(), d.max()
  bad = (t < lo) | (t >= hi)
  if bad.any():
    raise ValueError(f"{name}: {t[bad]} outside the test follow-up range; allowed times "
                     f"are in [{lo:g}, {hi:g}) (min duration inclusive, max duration exclusive)")
  return t


def _check_predictions(pred, n: int, n_times: int, name: str, allow_1d: bool) -> np.ndarray:
  p = checks.as_float_array(pred, name)
  if p.ndim == 1 and allow_1d:
    if p.shape[0] != n:
      raise ValueError(f"{name}: expected {n} rows, got shape {p.shape}")
    return p
  if p.ndim == 1 and n_times == 1 and p.shape[0] == n:
    return p.reshape(n, 1)
  if p.shape != (n, n_times):
    raise ValueError(f"{name}: expected shape ({n}, {n_times}) = (patients, times)"
                     f"{' or (' + str(n) + ',)' if allow_1d else ''}, got {p.shape}")
  return p


def cumulative_dynamic_auc(train_duration, train_event, duration, event, risk, times, *,
                           tied_tol: float = 1e-8):
  """Cumulative/dynamic time-dependent AUC with IPCW, via scikit-survival.

  AUC(t) = P(risk_i > risk_j | T_i <= t, event_i, T_j > t): cases are events
  up to t (weighted 1 / G(T_i), G the training censoring KM), controls are
  patients still at risk after t. Wraps ``sksurv.metrics.cumulative_dynamic_auc``
  after validation; the results are sksurv's.

  Args:
    train_duration: ``[n_train]`` training times (only for G).
    train_event: ``[n_train]`` training event indicator.
    duration: ``[n]`` test times; event: ``[n]`` test event indicator.
    risk: ``[n]`` risk scores, or ``[n, len(times)]`` time-dependent scores
      (e.g. cumulative hazards), higher = earlier event. Not survival
      probabilities (pass ``1 - S`` or ``-S`` instead).
    times: ``[k]`` strictly increasing times in [min(duration), max(duration)).
    tied_tol: absolute tolerance for tied risks.

  Returns:
    ``(auc [k] float64, mean_auc float)``; mean_auc integrates AUC(t) against
    the test Kaplan-Meier estimate (sksurv's definition).

  Raises:
    ValueError: invalid arrays (named, with rows), times not strictly
      increasing or outside the allowed range (stated in the message), test
      event times after the last training time or where G = 0.

  Source: Uno et al., JASA 102:527-537 (2007); Hung & Chiang, Can. J. Stat.
  38(1):8-26 (2010); ``sksurv.metrics.cumulative_dynamic_auc``.
  """
  from sksurv import metrics as skm
  tol = _check_tol(tied_tol)
  td, te, cens = _censoring_km(train_duration, train_event)
  d, e = checks.check_survival(duration, event)
  _check_1d((d, e), ("duration", "event"))
  if not e.any():
    raise ValueError(f"event: all {e.shape[0]} test patients are censored; AUC needs events")
  t = _check_times(times, d)
  p = _check_predictions(risk, d.shape[0], t.shape[0], "risk", allow_1d=True)
  rows = np.flatnonzero(e)
  _censoring_survival(cens, d[rows], rows, d.shape[0], "duration",
                      "Drop those test patients or use training data with longer follow-up.")
  with np.errstate(invalid="ignore", divide="ignore"):
    auc, mean_auc = skm.cumulative_dynamic_auc(_surv(te, td), _surv(e, d), p, t, tied_tol=tol)
  auc = np.asarray(auc, np.float64)
  if not np.all(np.isfinite(auc)):
    bad = t[~np.isfinite(auc)]
    raise ValueError(f"times: AUC is undefined at {bad}: no case (event up to t) or no "
                     "control (still at risk after t) there")
  return auc, float(mean_auc)


def brier_score(train_duration, train_event, duration, event, surv_prob, times):
  """Time-dependent Brier score with IPCW (Graf et al.), via scikit-survival.

  BS(t) = mean_i [ 1(T_i <= t, event_i) S_i(t)^2 / G(T_i)
                   + 1(T_i > t) (1 - S_i(t))^2 / G(t) ],
  with G the training censoring Kaplan-Meier estimate. Wraps
  ``sksurv.metrics.brier_score`` after validation.

  Args:
    train_duration: ``[n_train]`` training times (only for G).
    train_event: ``[n_train]`` training event indicator.
    duration: ``[n]`` test times; event: ``[n]`` test event indicator.
    surv_prob: ``[n, k]`` predicted survival probabilities S_i(times[j]) in
      [0, 1] (``[n]`` allowed when k = 1). Not risk scores.
    times: ``[k]`` strictly increasing times in [min(duration), max(duration)).

  Returns:
    ``(times [k], brier [k])`` float64 arrays.

  Raises:
    ValueError: invalid arrays (named, with rows), probabilities outside
      [0, 1], times not strictly increasing or outside the allowed range
      (stated in the message), test times after the last training time or
      where G = 0.

  Source: Graf et al., Stat. Med. 18(17-18):2529-2545 (1999);
  ``sksurv.metrics.brier_score``.
  """
  from sksurv import metrics as skm
  td, te, cens = _censoring_km(train_duration, train_event)
  d, e = checks.check_survival(duration, event)
  _check_1d((d, e), ("duration", "event"))
  t = _check_times(times, d)
  p = _check_predictions(surv_prob, d.shape[0], t.shape[0], "surv_prob", allow_1d=False)
  out = (p < 0) | (p > 1)
  if out.any():
    raise ValueError(f"surv_prob: survival probabilities must lie in [0, 1]; "
                     f"{checks._rows(out.any(axis=1))} have values outside")
  # sksurv evaluates G at every test time (events and censored) and at `times`,
  # and fails beyond the training follow-up; G = 0 there just gives weight 0.
  hint = "Use test data within the training follow-up or training data with longer follow-up."
  _censoring_survival(cens, d, np.arange(d.shape[0]), d.shape[0], "duration", hint, True)
  _censoring_survival(cens, t, np.arange(t.shape[0]), t.shape[0], "times", hint, True)
  t_out, bs = skm.brier_score(_surv(te, td), _surv(e, d), p, t)
  return np.asarray(t_out, np.float64), np.asarray(bs, np.float64)


def integrated_brier_score(train_duration, train_event, duration, event, surv_prob,
                           times) -> float:
  """Integrated Brier score: the trapezoid integral of BS(t) over times, / (t_k - t_1).

  Wraps ``sksurv.metrics.integrated_brier_score`` after the validation of
  ``brier_score`` (same arguments, shapes and errors), plus: at least two
  times are required.

  Returns:
    The IBS as a Python float (lower is better; 0.25 = an uninformative 0.5
    prediction).

  Source: Graf et al. (1999); ``sksurv.metrics.integrated_brier_score``.
  """
  if np.atleast_1d(np.asarray(times)).shape[0] < 2:
    raise ValueError("times: the integrated Brier score needs at least two time points")
  t, bs = brier_score(train_duration, train_event, duration, event, surv_prob, times)
  return float(np.trapezoid(bs, t) / (t[-1] - t[0]))
