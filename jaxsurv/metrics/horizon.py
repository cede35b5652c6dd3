"""Performance at one horizon: the time-dependent ROC curve and calibration by risk group.

The two panels of the MMNN paper's Fig. 2 (5-year ROC and calibration), as
arrays; ``jaxsurv.figures`` draws them.

* ``time_dependent_roc``: the cumulative/dynamic ROC curve at a horizon
  ``t`` (Heagerty et al., Biometrics 56:337-344, 2000; IPCW estimator of
  Uno et al., JASA 102:527-537, 2007). Cases are patients with an event by
  ``t``, each weighted ``1 / G(T_i)`` (``G`` the censoring Kaplan-Meier
  estimate of the training set, scikit-survival's
  ``CensoringDistributionEstimator``); controls are patients still at risk
  after ``t``, unweighted. The trapezoidal area under the curve is exactly
  ``sksurv.metrics.cumulative_dynamic_auc`` at ``t`` (ties count one half).
  ``binormal_smooth`` gives the smoothed curve the paper draws: a binormal
  fit ``probit(TPR) = a + b probit(FPR)`` by least squares on the empirical
  points, as pROC's ``smooth(method="binormal")`` (Robin et al., BMC
  Bioinformatics 12:77, 2011; Metz, Semin Nucl Med 8:283-298, 1978).
* ``calibration_by_group``: predicted against observed event probability by
  ``t``, per group of patients ranked by predicted probability (quintiles by
  default): predicted = the group's mean ``P(T <= t | x)``, observed =
  ``1 - KM(t)`` of the group with its 95% log-log confidence interval
  (scikit-survival's ``kaplan_meier_estimator``), so censoring is handled
  as in a Kaplan-Meier curve rather than by dropping censored patients.

Risk convention: higher score = higher hazard (earlier event); times in days
(any unit, as long as it is the same for durations and the horizon).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxsurv import checks


class ROCCurve(NamedTuple):
  """A time-dependent ROC curve at one horizon.

  Attributes:
    fpr, tpr: ``[k]`` false- and true-positive rates, from (0, 0) to (1, 1),
      one point per distinct score threshold (descending).
    auc: the trapezoidal area under the curve.
    n_cases: patients with an event by the horizon.
    n_controls: patients still at risk after the horizon.
  """
  fpr: np.ndarray
  tpr: np.ndarray
  auc: float
  n_cases: int
  n_controls: int


def time_dependent_roc(train_duration, train_event, duration, event, risk, horizon: float, *,
                       tied_tol: float = 1e-8) -> ROCCurve:
  """Cumulative/dynamic ROC curve at ``horizon`` with IPCW case weights.

  Args:
    train_duration, train_event: ``[m]`` training durations (days) and event
      indicators (0/1), for the censoring distribution ``G`` only.
    duration, event: ``[n]`` test durations (days) and event indicators.
    risk: ``[n]`` risk scores (or event probabilities by ``horizon``),
      higher = earlier event.
    horizon: the time ``t`` (days), inside the test follow-up.
    tied_tol: scores closer than this are one threshold (as scikit-survival).

  Returns:
    :class:`ROCCurve`; its ``auc`` equals
    ``sksurv.metrics.cumulative_dynamic_auc(..., times=[horizon])``.

  Raises:
    ValueError: invalid arrays, no case or no control at ``horizon``, or a
      case after the training set's last follow-up (``G`` undefined).
  """
  from sksurv.nonparametric import CensoringDistributionEstimator  # pylint: disable=import-outside-toplevel
  from sksurv.util import Surv  # pylint: disable=import-outside-toplevel
  td, te = checks.check_survival(train_duration, train_event)
  d, e = checks.check_survival(duration, event)
  r = checks.as_float_array(risk, "risk")
  if r.shape != d.shape:
    raise ValueError(f"risk: expected shape {d.shape} (one score per patient), got {r.shape}")
  cases = e.astype(bool) & (d <= horizon)
  controls = d > horizon
  if not cases.any() or not controls.any():
    raise ValueError(f"horizon {horizon:g}: {int(cases.sum())} cases (event by the horizon) and "
                     f"{int(controls.sum())} controls (at risk after it); the ROC needs both")
  cens = CensoringDistributionEstimator().fit(Surv.from_arrays(te.astype(bool), td))
  with np.errstate(divide="ignore"):
    ipcw = cens.predict_ipcw(Surv.from_arrays(e.astype(bool), d))
  w = np.where(cases, ipcw, 0.0)
  if not np.all(np.isfinite(w)):
    raise ValueError("duration: a test event lies after the training set's last follow-up, "
                     "where the censoring distribution is 0 (drop those patients)")
  order = np.argsort(-r, kind="mergesort")
  rs, ws, cs = r[order], w[order], controls[order].astype(float)
  # One threshold per group of scores within tied_tol of each other.
  last_of_group = np.append(np.abs(np.diff(rs)) > tied_tol, True)
  # At most 1 and ending at exactly 1, whatever the rounding of the running sums.
  tp = np.minimum(np.cumsum(ws)[last_of_group] / ws.sum(), 1.0)
  fp = np.minimum(np.cumsum(cs)[last_of_group] / cs.sum(), 1.0)
  tp[-1] = fp[-1] = 1.0
  tpr, fpr = np.concatenate([[0.0], tp]), np.concatenate([[0.0], fp])
  return ROCCurve(fpr=fpr, tpr=tpr, auc=float(np.trapezoid(tpr, fpr)),
                  n_cases=int(cases.sum()), n_controls=int(controls.sum()))


def binormal_smooth(curve: ROCCurve, n_points: int = 101) -> tuple[np.ndarray, np.ndarray, float]:
  """Binormal smoothing of an empirical ROC curve.

  Fits ``probit(TPR) = a + b probit(FPR)`` by least squares on the curve's
  points with both rates strictly inside (0, 1) (pROC's binormal method).

  Returns:
    ``(fpr [n_points], tpr [n_points], auc)``, ``auc = Phi(a / sqrt(1 + b^2))``,
    the area under the smoothed curve.

  Raises:
    ValueError: fewer than two interior points (nothing to fit).
  """
  from scipy import stats  # pylint: disable=import-outside-toplevel
  inside = (curve.fpr > 0) & (curve.fpr < 1) & (curve.tpr > 0) & (curve.tpr < 1)
  if inside.sum() < 2:
    raise ValueError("binormal smoothing needs at least two ROC points strictly inside (0, 1)")
  x, y = stats.norm.ppf(curve.fpr[inside]), stats.norm.ppf(curve.tpr[inside])
  b, a = np.polyfit(x, y, 1)
  fpr = np.linspace(0.0, 1.0, n_points)
  with np.errstate(divide="ignore", invalid="ignore"):
    tpr = stats.norm.cdf(a + b * stats.norm.ppf(fpr))
  tpr[0], tpr[-1] = 0.0, 1.0
  return fpr, tpr, float(stats.norm.cdf(a / np.sqrt(1.0 + b * b)))


class Calibration(NamedTuple):
  """Calibration at one horizon, one entry per risk group (lowest predicted first).

  Attributes:
    predicted: ``[g]`` mean predicted event probability by the horizon.
    observed: ``[g]`` Kaplan-Meier event probability by the horizon.
    observed_low, observed_high: ``[g]`` its 95% confidence interval.
    n: ``[g]`` patients per group.
  """
  predicted: np.ndarray
  observed: np.ndarray
  observed_low: np.ndarray
  observed_high: np.ndarray
  n: np.ndarray


def calibration_by_group(duration, event, probability, horizon: float, *,
                         groups: int = 5) -> Calibration:
  """Predicted against Kaplan-Meier observed event probability by ``horizon``.

  Args:
    duration, event: ``[n]`` durations (days) and event indicators (0/1).
    probability: ``[n]`` predicted ``P(T <= horizon | x)`` in [0, 1].
    horizon: days.
    groups: number of groups of (nearly) equal size by ranked probability
      (5: quintiles).

  Returns:
    :class:`Calibration`. A group whose follow-up ends before the horizon
    takes the Kaplan-Meier value at its last time (stated by ``n`` only; such
    groups are rare at 5 years in the cohorts here).

  Raises:
    ValueError: invalid arrays, probabilities outside [0, 1] or fewer
      patients than groups.
  """
  from sksurv.nonparametric import kaplan_meier_estimator  # pylint: disable=import-outside-toplevel
  d, e = checks.check_survival(duration, event)
  p = checks.as_float_array(probability, "probability")
  if p.shape != d.shape:
    raise ValueError(f"probability: expected shape {d.shape}, got {p.shape}")
  if np.any((p < 0) | (p > 1)):
    raise ValueError("probability: values must lie in [0, 1] (event probabilities by the horizon)")
  if groups < 1 or len(d) < groups:
    raise ValueError(f"groups: need 1 <= groups <= patients ({len(d)}), got {groups}")
  parts = np.array_split(np.argsort(p, kind="mergesort"), groups)
  pred, obs, lo, hi, n = [], [], [], [], []
  for idx in parts:
    t, s, ci = kaplan_meier_estimator(e[idx].astype(bool), d[idx], conf_type="log-log")
    k = np.searchsorted(t, horizon, side="right") - 1
    s_t, ci_lo, ci_hi = (1.0, 1.0, 1.0) if k < 0 else (s[k], ci[0][k], ci[1][k])
    pred.append(float(np.mean(p[idx])))
    obs.append(1.0 - float(s_t))
    lo.append(1.0 - float(ci_hi))
    hi.append(1.0 - float(ci_lo))
    n.append(len(idx))
  return Calibration(*(np.asarray(v, float) for v in (pred, obs, lo, hi)),
                     n=np.asarray(n, int))
