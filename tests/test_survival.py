"""Survival curves and time bins against scikit-survival and hand computations."""

import numpy as np
import pytest

from jaxsurv import survival


def _whas500_linear_predictor():
  from sksurv.datasets import load_whas500
  x, y = load_whas500()
  num = x.select_dtypes("number").to_numpy(float)
  num = (num - num.mean(0)) / num.std(0)
  risk = num @ np.random.default_rng(0).normal(scale=0.3, size=num.shape[1])
  return risk, y["lenfol"].astype(float), y["fstat"].astype(bool)


def test_breslow_matches_sksurv_estimator():
  from sksurv.linear_model.coxph import BreslowEstimator
  risk, duration, event = _whas500_linear_predictor()
  ours = survival.BreslowBaseline.fit(risk, duration, event)
  ref = BreslowEstimator().fit(risk, event, duration)
  # From the first event time on: before it, sksurv's step function returns
  # its first value, whereas H0 is 0 there.
  times = np.linspace(duration[event].min(), duration.max(), 57)
  np.testing.assert_allclose(ours.cumulative_hazard_at(times), ref.cum_baseline_hazard_(times),
                             rtol=1e-10)
  curves = ours.survival(risk[:7], times[1:-1])
  ref_curves = np.stack([f(times[1:-1]) for f in ref.get_survival_function(risk[:7])])
  np.testing.assert_allclose(curves, ref_curves, rtol=1e-10)


def test_breslow_hand_case_and_shift():
  # Times 1 (event), 2 (censored), 3 (event); risks 0, log 2, 0.
  risk = np.array([0.0, np.log(2.0), 0.0])
  base = survival.BreslowBaseline.fit(risk, [1.0, 2.0, 3.0], [1, 0, 1])
  np.testing.assert_allclose(base.times, [1.0, 3.0])
  np.testing.assert_allclose(base.cum_hazard, [1 / 4, 1 / 4 + 1])
  # Risks where exp(eta) overflows and H0 underflows float64 still give the
  # same curves (log-space H0).
  big = survival.BreslowBaseline.fit(risk + 800.0, [1.0, 2.0, 3.0], [1, 0, 1])
  np.testing.assert_allclose(big.log_cum_hazard + 800.0, np.log(base.cum_hazard), rtol=1e-12)
  np.testing.assert_allclose(big.survival(np.array([800.0]), [3.0]), [[np.exp(-1.25)]], rtol=1e-12)
  s = base.survival(np.array([0.0]), [0.5, 1.0, 3.0])
  np.testing.assert_allclose(s, [[1.0, np.exp(-0.25), np.exp(-1.25)]])
  rt = survival.BreslowBaseline.from_dict(base.to_dict())
  np.testing.assert_allclose(rt.cum_hazard, base.cum_hazard)
  with pytest.raises(ValueError, match="no events"):
    survival.BreslowBaseline.fit([0.0, 1.0], [1.0, 2.0], [0, 0])


def test_time_bins_fit_on_training_fold_only():
  rng = np.random.default_rng(1)
  duration = rng.exponential(1000, size=200)
  event = rng.random(200) < 0.5
  bins = survival.TimeBins.fit(duration, event, n_bins=4)
  expected = np.quantile(duration[event], [0.25, 0.5, 0.75])
  np.testing.assert_allclose(bins.cuts, expected)
  idx = bins.bin_index(duration)
  assert idx.min() == 0 and idx.max() == 3
  counts = np.bincount(idx[event], minlength=4)
  assert np.all(np.abs(counts - event.sum() / 4) <= 1)  # Quartiles of the uncensored.
  # Test-fold durations outside the training range still map to valid bins.
  np.testing.assert_array_equal(bins.bin_index([0.0, 1e9]), [0, 3])
  # Censored durations do not move the cuts.
  more = survival.TimeBins.fit(np.r_[duration, 1e7], np.r_[event, False], n_bins=4)
  assert more.cuts == bins.cuts
  assert survival.TimeBins.from_dict(bins.to_dict()) == bins
  with pytest.raises(ValueError, match="distinct uncensored"):
    survival.TimeBins.fit([1.0, 2.0, 3.0], [1, 1, 0], n_bins=4)


def test_discrete_survival_and_risk():
  logits = np.array([[0.0, 0.0, 0.0], [-2.0, 1.0, 3.0]])
  h = 1 / (1 + np.exp(-logits))
  expected = np.cumprod(1 - h, axis=1)
  np.testing.assert_allclose(survival.discrete_survival(logits), expected, rtol=1e-12)
  np.testing.assert_allclose(survival.discrete_risk(logits), -expected.sum(1), rtol=1e-12)
  bins = survival.TimeBins(cuts=(10.0, 20.0))
  s = survival.discrete_survival_at(logits, bins, [5.0, 10.0, 25.0])
  np.testing.assert_allclose(s, np.c_[np.ones(2), expected[:, 0], expected[:, 1]], rtol=1e-12)
  np.testing.assert_allclose(survival.event_probability(s), 1 - s)
  np.testing.assert_allclose(survival.horizons_in_days([2, 5]), [730.5, 1826.25])
