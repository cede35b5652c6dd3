"""Fig. 2 metrics (``jaxsurv.metrics.horizon``) and the figure writer (``jaxsurv.figures``).

The ROC curve's area against scikit-survival's cumulative/dynamic AUC, a
hand-computed curve, binormal smoothing on exactly binormal points, and
calibration against Kaplan-Meier by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sksurv.metrics import cumulative_dynamic_auc
from sksurv.util import Surv

from jaxsurv import figures
from jaxsurv.metrics import horizon


def _cohort(n=400, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=n)
  t = rng.exponential(1000 * np.exp(-x))
  c = rng.exponential(1500, size=n)
  d, e = np.minimum(t, c), (t <= c).astype(int)
  return d, e, np.round(x + rng.normal(size=n), 1)  # Rounded: many tied scores.


@pytest.mark.parametrize("q", [0.3, 0.5, 0.7])
def test_roc_area_equals_scikit_survival_cumulative_dynamic_auc(q):
  d, e, r = _cohort()
  tr, te = slice(0, 250), slice(250, None)
  h = float(np.quantile(d[te], q))
  curve = horizon.time_dependent_roc(d[tr], e[tr], d[te], e[te], r[te], h)
  ref = cumulative_dynamic_auc(Surv.from_arrays(e[tr].astype(bool), d[tr]),
                               Surv.from_arrays(e[te].astype(bool), d[te]), r[te], [h])[0][0]
  assert curve.auc == pytest.approx(ref, abs=1e-12)
  assert curve.n_cases == int(np.sum(e[te].astype(bool) & (d[te] <= h)))
  assert curve.n_controls == int(np.sum(d[te] > h))
  assert curve.fpr[0] == curve.tpr[0] == 0 and curve.fpr[-1] == curve.tpr[-1] == 1
  assert np.all(np.diff(curve.fpr) >= 0) and np.all(np.diff(curve.tpr) >= 0)


def test_roc_curve_by_hand_without_censoring_in_training():
  # No censoring in the training set: G = 1, every case weighs 1.
  train_d, train_e = np.array([1.0, 2, 3, 4, 50]), np.ones(5)
  d = np.array([1.0, 2, 3, 10, 11, 12])
  e = np.array([1, 1, 0, 1, 1, 0])
  r = np.array([0.9, 0.5, 0.8, 0.7, 0.1, 0.5])
  # Horizon 5: cases = {0, 1} (index 2 censored before 5 is neither), controls = {3, 4, 5}.
  curve = horizon.time_dependent_roc(train_d, train_e, d, e, r, 5.0)
  # Thresholds 0.9, 0.8 (neither), 0.7 (control), 0.5 (case 1 + control 5 tied), 0.1.
  np.testing.assert_allclose(curve.tpr, [0, 0.5, 0.5, 0.5, 1, 1])
  np.testing.assert_allclose(curve.fpr, [0, 0, 0, 1 / 3, 2 / 3, 1])
  # Pairs: case 0 beats all 3 controls; case 1 beats control 4, ties 5, loses to 3.
  assert curve.auc == pytest.approx((3 + 1 + 0.5) / 6)


def test_roc_needs_cases_and_controls():
  with pytest.raises(ValueError, match="cases"):
    horizon.time_dependent_roc([1.0, 5], [1, 1], [10.0, 20], [1, 1], [0.1, 0.2], 5.0)


def test_binormal_smoothing_recovers_a_binormal_curve():
  a, b = 1.2, 0.8
  fpr = np.linspace(0, 1, 41)
  tpr = stats.norm.cdf(a + b * stats.norm.ppf(fpr))
  tpr[0], tpr[-1] = 0, 1
  curve = horizon.ROCCurve(fpr, tpr, float(np.trapezoid(tpr, fpr)), 10, 10)
  sf, st, auc = horizon.binormal_smooth(curve, n_points=41)
  np.testing.assert_allclose(st, tpr, atol=1e-9)
  assert auc == pytest.approx(stats.norm.cdf(a / np.sqrt(1 + b * b)), abs=1e-12)
  assert auc == pytest.approx(curve.auc, abs=5e-3)  # Trapezoids under a concave curve.


def test_calibration_groups_by_hand():
  # No censoring: observed = share of events by the horizon in each group.
  d = np.array([1.0, 9, 2, 8, 3, 7, 4, 6, 5, 10])
  e = np.ones(10, int)
  p = np.arange(10) / 10.0
  cal = horizon.calibration_by_group(d, e, p, 5.5, groups=2)
  np.testing.assert_array_equal(cal.n, [5, 5])
  np.testing.assert_allclose(cal.predicted, [0.2, 0.7])
  # Group 1 (p 0..0.4): durations 1, 9, 2, 8, 3 -> 3 events by 5.5; group 2: 7, 4, 6, 5, 10 -> 2.
  np.testing.assert_allclose(cal.observed, [0.6, 0.4])
  assert np.all(cal.observed_low <= cal.observed) and np.all(cal.observed <= cal.observed_high)
  with pytest.raises(ValueError, match="\\[0, 1\\]"):
    horizon.calibration_by_group(d, e, p + 1, 5.5)


def test_calibration_with_censoring_is_one_minus_kaplan_meier():
  d, e, r = _cohort(200, seed=3)
  p = 1 / (1 + np.exp(-r))
  cal = horizon.calibration_by_group(d, e, p, 800.0, groups=4)
  order = np.argsort(p, kind="mergesort")
  for k, idx in enumerate(np.array_split(order, 4)):
    # Product-limit estimate by hand.
    s = 1.0
    for t in np.unique(d[idx][(e[idx] == 1) & (d[idx] <= 800.0)]):
      at_risk = np.sum(d[idx] >= t)
      s *= 1 - np.sum((d[idx] == t) & (e[idx] == 1)) / at_risk
    assert cal.observed[k] == pytest.approx(1 - s, abs=1e-12)
    assert cal.predicted[k] == pytest.approx(p[idx].mean())


def test_figure_and_its_data_are_written(tmp_path):
  d, e, r = _cohort()
  p = 1 / (1 + np.exp(-r))
  c = figures.model_curves(train_duration=d[:250], train_event=e[:250], duration=d[250:],
                           event=e[250:], probability=p[250:], horizon_days=900.0)
  figures.plot_roc_calibration(tmp_path / "fig2_os.png", {"model A": c}, title="OS")
  assert (tmp_path / "fig2_os.png").stat().st_size > 1000
  data = pd.read_csv(tmp_path / "fig2_os.csv")
  assert set(data["panel"]) == {"roc", "roc_smoothed", "calibration"}
  np.testing.assert_allclose(data[data["panel"] == "roc"]["y"], c.roc.tpr)
