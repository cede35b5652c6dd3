"""The MMNN paper's Fig. 2 for a comparison: 5-year ROC curves and calibration, per outcome.

One PNG per outcome with two panels, every model of the comparison on them:

* left, the cumulative/dynamic ROC at the horizon
  (``jaxsurv.metrics.horizon.time_dependent_roc``): the empirical curve
  (thin steps) and its binormal smoothing (the line, as the paper's
  "smoothed ROC"); the legend gives the empirical AUC, which is the table's
  AUC;
* right, calibration (``jaxsurv.metrics.horizon.calibration_by_group``):
  mean predicted against Kaplan-Meier observed event probability by the
  horizon per quintile of predicted probability, with the observed 95% CI,
  and the identity line.

The numbers behind each figure are written beside it as CSV, so a figure can
be redrawn or checked without rerunning anything. Drawn with matplotlib's
Agg canvas (``jaxsurv.io.pyplot``), written atomically.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, NamedTuple

import numpy as np
import pandas as pd

from jaxsurv.io import pyplot, save_png_atomic, write_csv_atomic
from jaxsurv.metrics import horizon as horizon_lib

PathLike = str | os.PathLike


class ModelCurves(NamedTuple):
  """One model's Fig. 2 data at one horizon and outcome.

  Attributes:
    roc: the empirical ROC curve.
    smooth_fpr, smooth_tpr: ``[k]`` the binormal-smoothed curve (None when it
      cannot be fitted).
    calibration: predicted vs observed per risk group.
  """
  roc: horizon_lib.ROCCurve
  smooth_fpr: np.ndarray | None
  smooth_tpr: np.ndarray | None
  calibration: horizon_lib.Calibration


def model_curves(*, train_duration, train_event, duration, event, probability,
                 horizon_days: float, groups: int = 5) -> ModelCurves:
  """Fig. 2 data of one model.

  Args:
    train_duration, train_event: ``[m]`` training durations (days) and event
      indicators (for the censoring weights).
    duration, event: ``[n]`` test durations (days) and event indicators.
    probability: ``[n]`` predicted ``P(T <= horizon | x)`` (higher = earlier
      event, so it also serves as the ROC's score).
    horizon_days: the horizon (days; 5 years = 1826.25).
    groups: calibration groups (5: quintiles).

  Raises:
    ValueError: as ``time_dependent_roc`` / ``calibration_by_group``.
  """
  roc = horizon_lib.time_dependent_roc(train_duration, train_event, duration, event,
                                       probability, horizon_days)
  try:
    sf, st, _ = horizon_lib.binormal_smooth(roc)
  except ValueError:
    sf = st = None
  cal = horizon_lib.calibration_by_group(duration, event, probability, horizon_days,
                                         groups=groups)
  return ModelCurves(roc, sf, st, cal)


def curves_table(curves: Mapping[str, ModelCurves]) -> pd.DataFrame:
  """The numbers behind a figure, long format: ``model, panel, x, y, low, high, n``."""
  rows = []
  for name, c in curves.items():
    rows += [{"model": name, "panel": "roc", "x": x, "y": y} for x, y in zip(c.roc.fpr, c.roc.tpr)]
    if c.smooth_fpr is not None:
      rows += [{"model": name, "panel": "roc_smoothed", "x": x, "y": y}
               for x, y in zip(c.smooth_fpr, c.smooth_tpr)]
    cal = c.calibration
    rows += [{"model": name, "panel": "calibration", "x": p, "y": o, "low": lo, "high": hi, "n": k}
             for p, o, lo, hi, k in zip(cal.predicted, cal.observed, cal.observed_low,
                                        cal.observed_high, cal.n)]
  return pd.DataFrame(rows, columns=["model", "panel", "x", "y", "low", "high", "n"])


def plot_roc_calibration(path: PathLike, curves: Mapping[str, ModelCurves], *,
                         title: str) -> None:
  """Writes the two-panel figure to ``path`` (PNG) and its data beside it (suffix ``.csv``)."""
  plt = pyplot()
  fig, (ax_roc, ax_cal) = plt.subplots(1, 2, figsize=(11, 4.8))
  colours = plt.get_cmap("tab10")
  for i, (name, c) in enumerate(curves.items()):
    col = colours(i % 10)
    ax_roc.step(c.roc.fpr, c.roc.tpr, where="post", color=col, lw=0.6, alpha=0.5)
    if c.smooth_fpr is not None:
      ax_roc.plot(c.smooth_fpr, c.smooth_tpr, color=col, lw=1.6,
                  label=f"{name} (AUC {c.roc.auc:.3f})")
    else:
      ax_roc.plot([], [], color=col, label=f"{name} (AUC {c.roc.auc:.3f})")
    cal = c.calibration
    ax_cal.errorbar(cal.predicted, cal.observed,
                    yerr=[cal.observed - cal.observed_low, cal.observed_high - cal.observed],
                    color=col, marker="o", ms=4, lw=1.0, capsize=2, label=name)
  ax_roc.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
  ax_roc.set_xlabel("1 - specificity")
  ax_roc.set_ylabel("sensitivity")
  ax_roc.set_title("ROC at the horizon (line: binormal smoothing)")
  ax_roc.legend(fontsize=7, loc="lower right")
  ax_cal.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
  ax_cal.set_xlim(0, 1)
  ax_cal.set_ylim(0, 1)
  ax_cal.set_xlabel("predicted event probability")
  ax_cal.set_ylabel("observed (Kaplan-Meier, 95% CI)")
  ax_cal.set_title("calibration by quintile of predicted probability")
  ax_cal.legend(fontsize=7, loc="upper left")
  fig.suptitle(title)
  fig.tight_layout()
  save_png_atomic(fig, path)
  plt.close(fig)
  write_csv_atomic(curves_table(curves), pathlib.Path(path).with_suffix(".csv"))
