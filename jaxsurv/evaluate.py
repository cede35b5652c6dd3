"""Evaluation of survival predictions over whole splits, and the run's reports.

Metrics are computed on the host over a *whole* split (never averaged per
batch): Harrell's C, Uno's IPCW C, the integrated Brier score, time-dependent
AUC at fixed horizons, and a bootstrap SD / percentile interval of Harrell's C.
Survival curves of Cox models come from the Breslow baseline fitted on the
training split's risks (``jaxsurv.survival.BreslowBaseline``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsurv import metrics, survival
from jaxsurv.io import pyplot, save_png_atomic


def _horizon_key(years: float) -> str:
  return f"{years:g}y"


def _safe(fn, *args, **kwargs):
  """Runs a metric; returns (value, None) or (None, reason) for undefined cases.

  A metric can be undefined on a split (e.g. no comparable pairs, a horizon
  beyond the follow-up); the report then says why instead of crashing a run
  that already trained.
  """
  try:
    return fn(*args, **kwargs), None
  except ValueError as e:
    return None, str(e)


def evaluate_outcome(*, risk: np.ndarray, duration: np.ndarray, event: np.ndarray,
                     train_risk: np.ndarray, train_duration: np.ndarray,
                     train_event: np.ndarray, horizons_years: Sequence[float],
                     bootstrap_resamples: int = 0, seed: int = 0,
                     survival_fn=None) -> dict:
  """Metrics of one outcome on one split.

  Args:
    risk: ``[n]`` log-hazards on the split (higher = earlier event).
    duration: ``[n]`` durations in days. event: ``[n]`` 0/1.
    train_risk, train_duration, train_event: ``[m]`` on the training split,
      for the Breslow baseline and the censoring distribution (IPCW).
    horizons_years: horizons for the time-dependent AUC and event
      probabilities (years; 365.25 days each).
    bootstrap_resamples: number of bootstrap resamples of Harrell's C (0: off).
    survival_fn: the model's own survival, ``survival_fn(times [T] days) ->
      [n, T]`` (e.g. a time-bin model's step function,
      ``survival.discrete_survival_at``); None: a Breslow baseline fitted on
      the training risks, ``S(t | x) = S_0(t) ** exp(risk)`` (Cox models).

  Returns:
    ``{"n", "events", "cindex", "cindex_uno", "ibs", "auc": {"2y": ...},
    "cindex_sd", "cindex_ci", "notes": {...}}``; a metric that is undefined
    on this split is None and ``notes`` says why.
  """
  out: dict = {"n": int(len(risk)), "events": int(np.sum(event)), "notes": {}}
  out["cindex"], why = _safe(metrics.concordance_index, duration, event, risk)
  if why:
    out["notes"]["cindex"] = why
  horizons = survival.horizons_in_days(horizons_years)
  # The censoring distribution G is only known up to the training split's
  # last follow-up t_max. The IPCW metrics below only look at times < t_max,
  # where censoring the split administratively at t_max changes nothing
  # (a patient followed beyond t_max is still at risk at every time used).
  t_max = float(train_duration.max())
  late = duration >= t_max
  ipcw_duration = np.where(late, np.nextafter(t_max, 0.0), duration)
  ipcw_event = np.where(late, 0, event)
  tau = float(min(horizons.max(), np.nextafter(t_max, 0.0)))
  uno, why = _safe(metrics.concordance_index_ipcw, train_duration, train_event,
                   ipcw_duration, ipcw_event, risk, tau=tau)
  out["cindex_uno"] = None if uno is None else float(uno[0])
  if why:
    out["notes"]["cindex_uno"] = why
  if survival_fn is None:
    baseline = survival.BreslowBaseline.fit(train_risk, train_duration, train_event)
    survival_fn = lambda t: baseline.survival(risk, t)
  lo, hi = np.percentile(duration, [10, 90])
  hi = min(hi, t_max * 0.999)
  times = np.linspace(lo, hi, 50) if hi > lo else np.array([lo])
  surv = survival_fn(times)
  out["ibs"], why = _safe(metrics.integrated_brier_score, train_duration, train_event,
                          ipcw_duration, ipcw_event, surv, times)
  if why:
    out["notes"]["ibs"] = why
  out["auc"] = {}
  for years, h in zip(horizons_years, horizons):
    p = survival.event_probability(survival_fn(np.array([h]))[:, 0])
    value, why = _safe(metrics.cumulative_dynamic_auc, train_duration, train_event,
                       ipcw_duration, ipcw_event, p, [h])
    key = _horizon_key(years)
    if value is not None:
      value = float(np.ravel(value[0] if isinstance(value, tuple) else value)[0])
    out["auc"][key] = value
    if why:
      out["notes"][f"auc_{key}"] = why
  if bootstrap_resamples and out["cindex"] is not None:
    b, why = _safe(metrics.bootstrap_cindex, duration, event, risk,
                   n_resamples=bootstrap_resamples, seed=seed)
    if b is not None:
      out["cindex_sd"] = float(b.sd)
      out["cindex_ci"] = [float(b.ci_low), float(b.ci_high)]
    else:
      out["notes"]["cindex_sd"] = why
  if not out["notes"]:
    del out["notes"]
  return out


def report_outcomes(outcomes: Sequence[str], risk: Mapping[str, np.ndarray],
                    targets: Mapping[str, tuple], *, horizons_years: Sequence[float],
                    bootstrap_resamples: int = 0, seed: int = 0,
                    parts: Sequence[str] = ("val", "test"),
                    survival_fns: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
  """The evaluation report of any run: ``evaluate_outcome`` per part and outcome.

  The same report (and so the same ``results.json`` keys) for every model
  family: Harrell's and Uno's C, the integrated Brier score and the
  time-dependent AUC at the horizons from a Breslow baseline fitted on the
  training part's risks, and the bootstrap SD and 95% CI of Harrell's C.

  Args:
    outcomes: outcome names, e.g. ``("os", "dm")``.
    risk: ``{part: [n, outcomes]}`` risk scores (higher = earlier event);
      must include ``"train"``.
    targets: ``{part: (duration [n, outcomes] days, event [n, outcomes],
      outcome_mask [n, outcomes])}`` (``jaxsurv.tasks`` ``targets``).
    horizons_years, bootstrap_resamples, seed: see ``evaluate_outcome``.
    parts: the parts to report.
    survival_fns: ``{part: survival_fn}`` of a single-outcome model with its
      own survival curves (``evaluate_outcome``'s ``survival_fn`` over the
      part's patients); None: Breslow from the training risks.

  Returns:
    ``(report, baselines)``: ``{part: {outcome: metrics}}`` (an outcome
    without an event in the training part is left out) and ``{outcome:
    survival.BreslowBaseline}`` fitted on the training part.
  """
  d_tr, e_tr, m_tr = targets["train"]
  baselines, report = {}, {}
  for j, o in enumerate(outcomes):
    m = m_tr[:, j]
    if m.any() and e_tr[m, j].any():
      baselines[o] = survival.BreslowBaseline.fit(risk["train"][m, j], d_tr[m, j], e_tr[m, j])
  for name in parts:
    d, e, msk = targets[name]
    report[name] = {}
    for j, o in enumerate(outcomes):
      if o not in baselines:
        continue
      m, mt = msk[:, j], m_tr[:, j]
      report[name][o] = evaluate_outcome(
          risk=risk[name][m, j], duration=d[m, j], event=e[m, j],
          train_risk=risk["train"][mt, j], train_duration=d_tr[mt, j], train_event=e_tr[mt, j],
          horizons_years=horizons_years, bootstrap_resamples=bootstrap_resamples, seed=seed,
          survival_fn=_masked(survival_fns, name, m, len(outcomes)))
  return report, baselines


def _masked(survival_fns, part: str, mask: np.ndarray, n_outcomes: int):
  """A part's survival function restricted to the patients of ``mask``."""
  if survival_fns is None:
    return None
  if n_outcomes != 1:
    raise ValueError("survival_fns is for single-outcome models")
  fn = survival_fns[part]
  return lambda t: fn(t)[mask]


def survival_columns(prefix: str, baseline: survival.BreslowBaseline, risk: np.ndarray,
                     horizons_years: Sequence[float]) -> dict:
  """Per-patient S(h) and P(event by h) columns for the predictions CSV."""
  cols = {}
  s = baseline.survival(risk, survival.horizons_in_days(horizons_years))
  for j, years in enumerate(horizons_years):
    cols[f"surv_{prefix}_{_horizon_key(years)}"] = s[:, j]
    cols[f"p_{prefix}_{_horizon_key(years)}"] = 1.0 - s[:, j]
  return cols


def plot_km_by_risk_group(path, *, risk, duration, event, threshold, title: str) -> None:
  """Kaplan-Meier curves (scikit-survival) of the high- and low-risk groups.

  ``threshold`` should come from the training split (e.g. its median risk) so
  the grouping is not fitted on the plotted split.
  """
  from sksurv.nonparametric import kaplan_meier_estimator
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5, 4))
  for name, sel, color in (("low risk", risk <= threshold, "tab:blue"),
                           ("high risk", risk > threshold, "tab:red")):
    if sel.sum() == 0:
      continue
    t, s = kaplan_meier_estimator(event[sel].astype(bool), duration[sel] / 365.25)
    ax.step(t, s, where="post", color=color, label=f"{name} (n={int(sel.sum())})")
  ax.set_xlabel("years")
  ax.set_ylabel("survival probability")
  ax.set_ylim(0, 1.02)
  ax.set_title(title)
  ax.legend()
  fig.tight_layout()
  save_png_atomic(fig, path)
  plt.close(fig)


def plot_training_curves(path, history: Sequence[Mapping]) -> None:
  """Training loss, validation loss and validation C-index per epoch.

  ``history``: the trainer's epoch records (``train_loss``: the training
  objective, e.g. the blended Cox loss of MMNN or the NLL + L1 of the fusion
  zoo; ``val_loss``: the selection loss on the whole validation part;
  ``val_cindex_<outcome>``).
  """
  plt = pyplot()
  epochs = [h["epoch"] for h in history]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  axes[0].plot(epochs, [h["train_loss"] for h in history], label="train (objective)")
  axes[0].plot(epochs, [h["val_loss"] for h in history], label="validation (selection loss)")
  axes[0].set_xlabel("epoch")
  axes[0].set_ylabel("loss")
  axes[0].legend()
  for key in sorted({k for h in history for k in h if k.startswith("val_cindex_")}):
    axes[1].plot(epochs, [h.get(key, math.nan) for h in history], label=key[len("val_"):])
  axes[1].set_xlabel("epoch")
  axes[1].set_ylabel("validation C-index")
  axes[1].legend()
  fig.tight_layout()
  save_png_atomic(fig, path)
  plt.close(fig)
