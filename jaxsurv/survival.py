"""Survival curves from model outputs, and time bins for discrete-time models.

* Cox models: the Breslow estimate of the baseline cumulative hazard, fitted on
  the training risks, gives per-patient curves S(t | x) = exp(-H0(t) exp(eta)).
* Discrete-time (logistic hazard) models: S(t_k | x) = prod_{l<=k} (1 - h_l).
* ``event_probability`` gives P(T <= horizon | x) = 1 - S(horizon | x), e.g.
  the predicted 5-year probability of metastasis used for time-dependent AUC.

These run on the host in numpy (they are evaluation-time utilities over whole
splits); the discrete-time functions also accept JAX arrays.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxsurv import checks


# ----------------------------------------------------------------------------
# Time bins (discrete-time models).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TimeBins:
  """Time bins from quantiles of the uncensored training durations.

  Bin k covers ``[cuts[k-1], cuts[k])`` with ``cuts[-1] = -inf`` and
  ``cuts[K-1] = +inf`` implied: durations below the first cut fall in bin 0
  and durations at or above the last cut in the last bin, so patients of a
  test fold outside the training range still get a valid bin. This matches
  PORPOISE/HEALNet binning (quartiles of uncensored survival times, outer
  edges widened to cover every patient) but is fitted on the training fold
  only; the peers fit on the whole cohort, which leaks test data.

  Attributes:
    cuts: ``[bins - 1]`` interior cut points, in the duration's unit (days).
  """

  cuts: tuple[float, ...]

  @property
  def n_bins(self) -> int:
    return len(self.cuts) + 1

  @classmethod
  def fit(cls, duration, event, n_bins: int = 4) -> "TimeBins":
    """Fits ``n_bins`` quantile bins on the uncensored training durations.

    Args:
      duration: ``[n]`` training durations (e.g. days), >= 0.
      event: ``[n]`` training event indicators.
      n_bins: number of bins (HEALNet/PORPOISE use 4).

    Raises:
      ValueError: on invalid input, ``n_bins < 1``, or fewer distinct
        uncensored durations than bins.
    """
    d, e = checks.check_survival(duration, event)
    if n_bins < 1:
      raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    uncensored = d[e]
    if np.unique(uncensored).size < n_bins:
      raise ValueError(f"need at least {n_bins} distinct uncensored durations to fit "
                       f"{n_bins} time bins, got {np.unique(uncensored).size}")
    qs = np.quantile(uncensored, np.linspace(0, 1, n_bins + 1)[1:-1])
    return cls(cuts=tuple(float(q) for q in qs))

  def bin_index(self, duration) -> np.ndarray:
    """Maps durations ``[n]`` to bin indices ``[n]`` (int32) in ``[0, n_bins)``."""
    d = checks.check_duration(duration)
    return np.searchsorted(np.asarray(self.cuts), d, side="right").astype(np.int32)

  def bin_bounds(self) -> np.ndarray:
    """``[n_bins + 1]`` bin edges with 0 and +inf as the outer edges."""
    return np.concatenate([[0.0], self.cuts, [np.inf]])

  def to_dict(self) -> dict:
    return {"cuts": list(self.cuts)}

  @classmethod
  def from_dict(cls, d: dict) -> "TimeBins":
    return cls(cuts=tuple(float(c) for c in d["cuts"]))


def discrete_survival(logits) -> np.ndarray:
  """Survival at the end of each bin from hazard logits.

  Args:
    logits: ``[n, bins]`` hazard logits (h = sigmoid(logit)).

  Returns:
    ``[n, bins]`` S_k = prod_{l<=k} (1 - h_l), computed as exp(cumsum(-softplus)).
  """
  x = np.asarray(logits, dtype=np.float64)
  log_1mh = -np.logaddexp(0.0, x)
  return np.exp(np.cumsum(log_1mh, axis=-1))


def discrete_risk(logits) -> np.ndarray:
  """Risk score ``[n]`` for discrete-time models: -sum_k S_k (PORPOISE/HEALNet).

  Higher means earlier event, so it can be passed to the concordance index.
  """
  return -discrete_survival(logits).sum(axis=-1)


def discrete_survival_at(logits, bins: TimeBins, times) -> np.ndarray:
  """Step-function survival S(t | x) ``[n, len(times)]`` from a discrete model.

  S is 1 before the first cut and S_k on ``[cuts[k], cuts[k+1])``: the hazard
  of bin k is taken to act at the bin's end. With the last bin open-ended, S
  after the last cut is S_{K-2}; S_{K-1} (survival past the last, unbounded
  bin) is not a survival at any finite time.
  """
  s = discrete_survival(logits)
  t = checks.check_duration(times, "times")
  idx = np.searchsorted(np.asarray(bins.cuts), t, side="right")  # bins fully passed
  s_pad = np.concatenate([np.ones(s.shape[:-1] + (1,)), s], axis=-1)
  return s_pad[..., idx]


# ----------------------------------------------------------------------------
# Breslow baseline hazard (Cox models).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BreslowBaseline:
  """Breslow estimate of the baseline cumulative hazard H0(t).

  H0(t) = sum_{t_k <= t} d_k / sum_{j : T_j >= t_k} exp(eta_j), over distinct
  event times t_k with d_k events (Breslow 1972). Equal to
  ``sksurv.linear_model.coxph.BreslowEstimator``.

  H0 is kept in log space, so that risks far from 0 (e.g. eta ~ 800, where
  H0 itself underflows float64) still give correct curves.

  Attributes:
    times: ``[k]`` distinct event times of the training set (ascending).
    log_cum_hazard: ``[k]`` log H0 at those times (right-continuous steps).
  """

  times: np.ndarray
  log_cum_hazard: np.ndarray

  @property
  def cum_hazard(self) -> np.ndarray:
    """``[k]`` H0 at ``times``."""
    return np.exp(self.log_cum_hazard)

  @classmethod
  def fit(cls, risk, duration, event) -> "BreslowBaseline":
    """Fits H0 from training risks ``[n]``, durations ``[n]`` and events ``[n]``.

    O(n log n): one sort and a reverse cumulative sum.

    Raises:
      ValueError: on invalid input or a training set without events.
    """
    d, e, r = checks.check_survival(duration, event, risk)
    if d.ndim != 1:
      raise ValueError(f"expected 1-D arrays, got shape {d.shape}")
    if not e.any():
      raise ValueError("cannot fit a Breslow baseline: the training set has no events")
    order = np.argsort(d, kind="stable")
    d, e, r = d[order], e[order], r[order]
    shift = r.max()  # exp(eta - shift) avoids overflow; undone in log space.
    w = np.exp(r - shift)
    at_risk = np.cumsum(w[::-1])[::-1]
    times, first = np.unique(d, return_index=True)
    deaths = np.add.reduceat(e.astype(np.float64), first)
    keep = deaths > 0
    log_increments = np.log(deaths[keep]) - np.log(at_risk[first[keep]]) - shift
    return cls(times=times[keep], log_cum_hazard=np.logaddexp.accumulate(log_increments))

  def _log_h0_at(self, times) -> np.ndarray:
    t = checks.check_duration(times, "times")
    idx = np.searchsorted(self.times, t, side="right")
    return np.concatenate([[-np.inf], self.log_cum_hazard])[idx]

  def cumulative_hazard_at(self, times) -> np.ndarray:
    """H0 at ``times`` ``[m]`` (0 before the first event time)."""
    return np.exp(self._log_h0_at(times))

  def survival(self, risk, times) -> np.ndarray:
    """Per-patient survival curves S(t | x) = exp(-H0(t) exp(eta)).

    Args:
      risk: ``[n]`` log-hazards of the patients (same model as the fit).
      times: ``[m]`` times (same unit as the training durations).

    Returns:
      ``[n, m]`` survival probabilities.
    """
    r = checks.as_float_array(risk, "risk")
    log_h0 = self._log_h0_at(times)
    return np.exp(-np.exp(r[:, None] + log_h0[None, :]))

  def to_dict(self) -> dict:
    return {"times": self.times.tolist(), "log_cum_hazard": self.log_cum_hazard.tolist()}

  @classmethod
  def from_dict(cls, d: dict) -> "BreslowBaseline":
    return cls(times=np.asarray(d["times"], float),
               log_cum_hazard=np.asarray(d["log_cum_hazard"], float))


def event_probability(survival_at_horizon) -> np.ndarray:
  """P(T <= t | x) = 1 - S(t | x): e.g. the 5-year probability of metastasis.

  Higher means higher risk, so it can be passed to time-dependent AUC as the
  risk score at that horizon.
  """
  return 1.0 - np.asarray(survival_at_horizon, dtype=np.float64)


def horizons_in_days(years: Sequence[float]) -> np.ndarray:
  """Converts horizons in years to days (365.25 days per year)."""
  return np.asarray(years, dtype=np.float64) * 365.25


def horizon_labels(duration, event, horizon_days: float, *, xp=np):
  """Binary status at a horizon: ``(label, known)``, both ``[n]``.

  ``label`` is 1.0 for an event at or before ``horizon_days`` and 0.0
  otherwise; ``known`` is False for patients censored before the horizon
  (their status is unknown), True otherwise. This is the "binary" 5-year
  AUC's case definition (cases: event by the horizon; controls: followed
  beyond it) and the label of SarcNet's optional binary head.

  Args:
    duration: ``[n]`` days to event or censoring.
    event: ``[n]`` 1 = event, 0 = censored.
    horizon_days: the horizon in days (5 years = 1826.25).
    xp: ``numpy`` or ``jax.numpy`` (the task's loss runs under jit).
  """
  d = xp.asarray(duration)
  e = xp.asarray(event).astype(bool)
  case = e & (d <= horizon_days)
  known = case | (d > horizon_days)
  return case.astype(xp.float32), known
