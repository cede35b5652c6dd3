"""Tests for jaxsurv.metrics against scikit-survival, lifelines and a brute-force reference.

Every concordance test runs with JAX's x64 mode on and off (the ``x64``
fixture), because the module must be exact in both: float64 like sksurv, or
float32 with exact integer counts. Sizes stay small so the file runs in well
under a minute; compiled code is shared through the persistent cache that
``conftest.py`` enables.
"""

import jax
import numpy as np
import pytest
from lifelines.utils import concordance_index as lifelines_cindex
from sksurv import metrics as skm
from sksurv.datasets import load_gbsg2, load_veterans_lung_cancer, load_whas500
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.preprocessing import OneHotEncoder
from sksurv.util import Surv

from jaxsurv import metrics


@pytest.fixture(params=[True, False], ids=["x64", "x32"])
def x64(request):
  with jax.enable_x64(request.param):
    yield request.param


def brute_force(duration, event, risk, tied_tol=1e-8):
  """O(n^2) numpy reference with the rules of the issue, written from the definition.

  Pair (i, j) is comparable iff event_i and (T_i < T_j or (T_i == T_j and not
  event_j)); concordant iff risk_i > risk_j; |risk_i - risk_j| <= tol is a tie.
  """
  t = np.asarray(duration, float)
  e = np.asarray(event, bool)
  r = np.asarray(risk, float)
  comp = e[:, None] & ((t[:, None] < t[None, :]) | ((t[:, None] == t[None, :]) & ~e[None, :]))
  tie = np.abs(r[None, :] - r[:, None]) <= tied_tol
  conc = (r[:, None] > r[None, :]) & ~tie
  n_comp = int(comp.sum())
  n_conc = int((comp & conc).sum())
  n_tie = int((comp & tie).sum())
  tied_time = int((comp & (t[:, None] == t[None, :])).sum())
  return (n_conc + 0.5 * n_tie) / n_comp, n_conc, n_comp - n_conc - n_tie, n_tie, tied_time


def sksurv_tuple(duration, event, risk, tied_tol=1e-8):
  out = skm.concordance_index_censored(np.asarray(event, bool), np.asarray(duration, float),
                                       np.asarray(risk, float), tied_tol=tied_tol)
  return (float(out[0]),) + tuple(int(x) for x in out[1:])


# --- Hand cases from scikit-survival's own tests (tests/test_metrics.py). ---


@pytest.mark.parametrize("method", ["tree", "dense"])
def test_sksurv_hand_case_tied_event_and_time(x64, method):
  time = [34, 11, 11, 5, 1, 89, 13, 45, 7, 13, 9, 13]
  event = [True, False, False, False, True, False, True, True, False, False, False, True]
  estimate = [1, 19, 13, 13, 15, 14, 19, 23, 11, 10, 11, 1]
  got = metrics.concordance_counts(time, event, estimate, method=method)
  assert tuple(got[1:]) == (12, 9, 1, 2)
  assert got.cindex == pytest.approx(0.5681818, abs=1e-7)
  assert tuple(got) == sksurv_tuple(time, event, estimate) == brute_force(time, event, estimate)


@pytest.mark.parametrize("method", ["tree", "dense"])
def test_sksurv_hand_case_almost_tied_risk(x64, method):
  # Risks 12 +- 4.5e-9 differ by 9e-9 <= tied_tol: a tie. In float32 both
  # round to 12.0, so with tied_tol=0 only the float64 order (kept by the
  # wrapper's two-part split) gives sksurv's answer.
  event = [False, True, True, False, True, True, False, False]
  time = [1, 5, 6, 11, 34, 45, 46, 50]
  estimate = [5, 15, 11, 34, 12 + 4.5e-9, 3, 9, 12 - 4.5e-9]
  got = metrics.concordance_counts(time, event, estimate, method=method)
  assert tuple(got) == (0.59375, 9, 6, 1, 0)
  # With tied_tol=0 the near tie becomes concordant for the event at 34.
  got0 = metrics.concordance_counts(time, event, estimate, tied_tol=0.0, method=method)
  assert tuple(got0) == sksurv_tuple(time, event, estimate, 0.0) == brute_force(
      time, event, estimate, 0.0)
  assert got0.tied_risk == 0


# --- Real cohorts. ---


def _cox_risk(x, y):
  xt = OneHotEncoder().fit_transform(x)
  return CoxPHSurvivalAnalysis(alpha=1e-4).fit(xt, y).predict(xt)


@pytest.mark.parametrize("dataset, method, x64_mode", [
    ("whas500", "tree", True), ("whas500", "tree", False), ("whas500", "dense", True),
    ("gbsg2", "dense", True), ("gbsg2", "dense", False), ("veteran", "dense", True),
])
def test_real_cohorts_match_sksurv_and_lifelines(dataset, method, x64_mode):
  if dataset == "whas500":
    x, y = load_whas500()
    event, duration = y["fstat"], y["lenfol"]
    risk = _cox_risk(x, y)
  elif dataset == "gbsg2":
    x, y = load_gbsg2()
    event, duration = y["cens"], y["time"]
    risk = x["pnodes"].to_numpy(float)  # a column with many exact ties
  else:
    x, y = load_veterans_lung_cancer()
    event, duration = y["Status"], y["Survival_in_days"]
    risk = -x["Karnofsky_score"].to_numpy(float)  # higher performance = lower risk
  with jax.enable_x64(x64_mode):
    got = metrics.concordance_counts(duration, event, risk, method=method)
  assert tuple(got) == sksurv_tuple(duration, event, risk)
  # lifelines reads scores as survival-like, hence -risk; ties are exact there,
  # and these risks have no pairs closer than 1e-8 without being equal.
  assert got.cindex == pytest.approx(lifelines_cindex(duration, -risk, event), abs=1e-12)


# --- Random cases with heavy ties. ---


def _random_case(rng, n, tie_kind):
  duration = rng.integers(0, 6, n).astype(float)          # many tied times, time 0 allowed
  event = rng.random(n) < rng.uniform(0.2, 0.9)
  if tie_kind == "rounded":
    risk = np.round(rng.normal(size=n), 1)
  elif tie_kind == "near":
    # Exact ties plus pairs 4e-9 (tied) and 2e-8 (not tied) apart.
    risk = np.round(rng.normal(size=n), 1) + rng.choice([0.0, 4e-9, -4e-9, 2e-8], n)
  else:
    risk = rng.normal(size=n)
  event[rng.integers(n)] = True
  return duration, event, risk


@pytest.mark.parametrize("method", ["tree", "dense"])
@pytest.mark.parametrize("tie_kind", ["rounded", "near", "continuous"])
def test_random_heavy_ties_match_brute_force_and_sksurv(tie_kind, method, x64):
  rng = np.random.default_rng({"rounded": 0, "near": 1, "continuous": 2}[tie_kind])
  # Sizes stay in two padding buckets (64 and 512) to bound compile time.
  for n in [2, 3, 7, 40, 64, 300, 500]:
    duration, event, risk = _random_case(rng, n, tie_kind)
    ref = brute_force(duration, event, risk)
    if ref[1] + ref[2] + ref[3] == 0:
      with pytest.raises(metrics.NoComparablePairsError):
        metrics.concordance_counts(duration, event, risk, method=method)
      continue
    got = metrics.concordance_counts(duration, event, risk, method=method)
    assert tuple(got) == ref, (n, tie_kind)
    assert tuple(got) == sksurv_tuple(duration, event, risk)


@pytest.mark.parametrize("tol", [0.0, 0.05, 0.3])
def test_tied_tol_windows(tol, x64):
  # Wide tolerances make the tie windows span many distinct risks (the
  # galloping search must leave the runs of exact ties).
  rng = np.random.default_rng(3)
  duration, event, risk = _random_case(rng, 300, "rounded")
  risk = risk + rng.normal(scale=0.01, size=risk.shape)
  got = metrics.concordance_counts(duration, event, risk, tied_tol=tol, method="tree")
  assert tuple(got) == brute_force(duration, event, risk, tol)
  assert tuple(got) == sksurv_tuple(duration, event, risk, tol)


def test_lifelines_on_tied_risks():
  rng = np.random.default_rng(4)
  duration, event, risk = _random_case(rng, 400, "rounded")
  assert metrics.concordance_index(duration, event, risk) == pytest.approx(
      lifelines_cindex(duration, -risk, event), abs=1e-12)


def test_float32_mode_keeps_float64_order():
  # Times 1 and 1 + 1e-12, and risks 1e-9 apart around 1.0, are identical in
  # float32; the wrapper must still see them as sksurv does in float64.
  duration = np.array([1.0, 1.0 + 1e-12, 2.0, 3.0, 3.0, 4.0])
  event = np.array([1, 1, 0, 1, 1, 0])
  risk = np.array([1.0, 1.0 + 3e-8, 1.0 - 3e-8, 0.5, 0.5 + 5e-9, 0.2])
  ref = sksurv_tuple(duration, event, risk)
  assert ref == brute_force(duration, event, risk)
  with jax.enable_x64(False):
    for method in ["tree", "dense"]:
      assert tuple(metrics.concordance_counts(duration, event, risk, method=method)) == ref


def test_ulp_close_times_and_risks_take_the_exact_paths():
  # In x64 the tree core sorts (high bits of the key, index) packed in int64;
  # values one ulp apart share those bits, which sends times through the
  # exact fallback sort and risks through the in-group bisection.
  one_up = np.nextafter(1.0, 2.0)
  rng = np.random.default_rng(9)
  duration = rng.choice([one_up, 1.0, 2.0, np.nextafter(2.0, 3.0)], 60)
  event = rng.random(60) < 0.6
  risk = rng.choice([0.5, np.nextafter(0.5, 1.0), np.nextafter(0.5, 0.0), 0.7], 60)
  with jax.enable_x64(True):
    for tol in [0.0, 1e-8]:
      got = metrics.concordance_counts(duration, event, risk, tied_tol=tol, method="tree")
      assert tuple(got) == brute_force(duration, event, risk, tol)
      assert tuple(got) == sksurv_tuple(duration, event, risk, tol)


def test_harrell_c_is_jittable_and_honours_mask(x64):
  rng = np.random.default_rng(5)
  duration, event, risk = _random_case(rng, 50, "rounded")
  pad = 14
  mask = np.r_[np.ones(50, bool), np.zeros(pad, bool)]
  # Padding rows hold junk that would change C if it were used.
  d = np.r_[duration, np.full(pad, 0.5)]
  e = np.r_[event, np.ones(pad, bool)]
  r = np.r_[risk, np.full(pad, 9.0)]
  c = jax.jit(lambda d, e, r, m: metrics.harrell_c(d, e, r, mask=m))(d, e, r, mask)
  assert float(c) == pytest.approx(brute_force(duration, event, risk)[0], rel=1e-6)


# --- Bad input. ---


@pytest.mark.parametrize("bad, pattern", [
    (dict(duration=[1.0, np.nan, 3.0]), r"duration.*rows \[1\]"),
    (dict(duration=[1.0, -2.0, 3.0]), r"duration: negative.*rows \[1\]"),
    (dict(event=[1, 2, 0]), r"event: values outside.*rows \[1\]"),
    (dict(risk=[0.1, np.inf, 0.3]), r"risk.*rows \[1\]"),
    (dict(risk=[0.1, 0.2]), r"mismatched shapes"),
    (dict(event=[0, 0, 0]), r"event: all 3 patients are censored"),
    (dict(duration=[[1.0, 2.0, 3.0]], event=[[1, 0, 1]], risk=[[1.0, 2.0, 3.0]]),
     r"duration: expected a 1-D array"),
    (dict(duration=[1.0], event=[1], risk=[0.5]), r"at least two patients"),
])
def test_bad_input_names_argument_and_rows(bad, pattern):
  args = dict(duration=[1.0, 2.0, 3.0], event=[1, 0, 1], risk=[0.1, 0.2, 0.3])
  args.update(bad)
  with pytest.raises(ValueError, match=pattern):
    metrics.concordance_index(**args)


def test_float32_mode_rejects_scores_beyond_float32():
  with jax.enable_x64(False), pytest.raises(ValueError, match=r"risk: values beyond the float32"
                                                               r" range at rows \[0\]"):
    metrics.concordance_index([1.0, 2.0, 3.0], [1, 0, 1], [1e39, 0.0, 1.0])


def test_no_comparable_pairs_raises_like_sksurv():
  # Only one event, at the last time, tied with nobody censored: no pair.
  duration, event, risk = [1.0, 2.0, 3.0], [0, 0, 1], [0.1, 0.2, 0.3]
  with pytest.raises(ValueError):
    skm.concordance_index_censored(np.array(event, bool), np.array(duration), np.array(risk))
  with pytest.raises(metrics.NoComparablePairsError, match="no comparable pair"):
    metrics.concordance_index(duration, event, risk)
  # Two events at the same (last) time are not comparable either.
  with pytest.raises(metrics.NoComparablePairsError):
    metrics.concordance_index([5.0, 5.0], [1, 1], [0.1, 0.2])
  with pytest.raises(ValueError, match="tied_tol"):
    metrics.concordance_index([1.0, 2.0], [1, 1], [0.1, 0.2], tied_tol=-1)


# --- IPCW metrics against scikit-survival. ---


@pytest.fixture(scope="module")
def gbsg2_split():
  x, y = load_gbsg2()
  xt = OneHotEncoder().fit_transform(x)
  rng = np.random.default_rng(0)
  idx = rng.permutation(len(y))
  train, test = idx[:450], idx[450:]
  model = CoxPHSurvivalAnalysis(alpha=1e-4).fit(xt.iloc[train], y[train])
  risk = model.predict(xt.iloc[test])
  # Keep test follow-up inside the training follow-up (IPCW needs G there).
  keep = y["time"][test] < y["time"][train].max()
  test, risk = test[keep], risk[keep]
  surv_fns = model.predict_survival_function(xt.iloc[test])
  times = np.percentile(y["time"][test], [10, 25, 40, 55, 70, 80])
  surv = np.asarray([[fn(t) for t in times] for fn in surv_fns])
  return dict(y_train=y[train], y_test=y[test], risk=risk, times=times, surv=surv)


def _arrays(y):
  return y["time"], y["cens"]


@pytest.mark.parametrize("tau", [None, 1200.0])
def test_uno_matches_sksurv(gbsg2_split, tau):
  s = gbsg2_split
  (td, te), (d, e) = _arrays(s["y_train"]), _arrays(s["y_test"])
  ref = skm.concordance_index_ipcw(s["y_train"], s["y_test"], s["risk"], tau=tau)
  got = metrics.concordance_index_ipcw(td, te, d, e, s["risk"], tau=tau)
  assert got.cindex == pytest.approx(ref[0], abs=1e-6)
  assert tuple(got[1:]) == tuple(int(v) for v in ref[1:])


def test_uno_errors_state_the_allowed_range():
  # The last training time is an event, so G stays > 0 but is unknown beyond it.
  train_d, train_e = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1, 0, 0, 1])
  d, e, r = np.array([1.5, 2.5, 6.0]), np.array([1, 0, 1]), np.array([0.3, 0.2, 0.1])
  with pytest.raises(ValueError, match=r"duration: times after the last training duration 4.*"
                                       r"rows \[2\].*allowed times are <= 4"):
    metrics.concordance_index_ipcw(train_d, train_e, d, e, r)
  # Truncating at tau drops the late event, as sksurv does.
  got = metrics.concordance_index_ipcw(train_d, train_e, d, e, r, tau=4.0)
  ref = skm.concordance_index_ipcw(Surv.from_arrays(train_e, train_d), Surv.from_arrays(e, d), r,
                                   tau=4.0)
  assert got.cindex == pytest.approx(ref[0], abs=1e-12)
  # A training set whose last time is censored has G = 0 there: infinite weights.
  with pytest.raises(ValueError, match=r"G\(t\).* is 0 at the times of rows \[2\]"):
    metrics.concordance_index_ipcw(train_d, [1, 0, 1, 0], d, e, r)


@pytest.mark.parametrize("two_d", [False, True])
def test_cumulative_dynamic_auc_matches_sksurv(gbsg2_split, two_d):
  s = gbsg2_split
  (td, te), (d, e) = _arrays(s["y_train"]), _arrays(s["y_test"])
  risk = 1.0 - s["surv"] if two_d else s["risk"]
  ref_auc, ref_mean = skm.cumulative_dynamic_auc(s["y_train"], s["y_test"], risk, s["times"])
  auc, mean_auc = metrics.cumulative_dynamic_auc(td, te, d, e, risk, s["times"])
  np.testing.assert_allclose(auc, ref_auc, atol=1e-6)
  assert mean_auc == pytest.approx(ref_mean, abs=1e-6)


def test_brier_and_ibs_match_sksurv(gbsg2_split):
  s = gbsg2_split
  (td, te), (d, e) = _arrays(s["y_train"]), _arrays(s["y_test"])
  ref_t, ref_bs = skm.brier_score(s["y_train"], s["y_test"], s["surv"], s["times"])
  t, bs = metrics.brier_score(td, te, d, e, s["surv"], s["times"])
  np.testing.assert_allclose(t, ref_t)
  np.testing.assert_allclose(bs, ref_bs, atol=1e-6)
  ref_ibs = skm.integrated_brier_score(s["y_train"], s["y_test"], s["surv"], s["times"])
  assert metrics.integrated_brier_score(td, te, d, e, s["surv"], s["times"]) == pytest.approx(
      ref_ibs, abs=1e-6)


def test_time_dependent_metric_errors(gbsg2_split):
  s = gbsg2_split
  (td, te), (d, e) = _arrays(s["y_train"]), _arrays(s["y_test"])
  late = [d.max()]
  with pytest.raises(ValueError, match=r"times: .* outside the test follow-up range; allowed "
                                       r"times are in \["):
    metrics.brier_score(td, te, d, e, s["surv"][:, :1], late)
  with pytest.raises(ValueError, match="allowed times are in"):
    metrics.cumulative_dynamic_auc(td, te, d, e, s["risk"], [d.min() - 1.0])
  with pytest.raises(ValueError, match="strictly increasing"):
    metrics.cumulative_dynamic_auc(td, te, d, e, s["risk"], s["times"][::-1])
  with pytest.raises(ValueError, match=r"risk: expected shape"):
    metrics.cumulative_dynamic_auc(td, te, d, e, s["risk"][:, None][:, [0, 0]], s["times"])
  with pytest.raises(ValueError, match=r"surv_prob: survival probabilities must lie in \[0, 1\]"):
    metrics.brier_score(td, te, d, e, s["surv"] + 1.0, s["times"])
  with pytest.raises(ValueError, match="at least two time points"):
    metrics.integrated_brier_score(td, te, d, e, s["surv"][:, :1], s["times"][:1])
  with pytest.raises(ValueError, match="train_event: all training patients are censored"):
    metrics.brier_score(td, np.zeros_like(te), d, e, s["surv"], s["times"])


# --- Bootstrap. ---


@pytest.mark.parametrize("method", ["dense", "tree"])
def test_bootstrap_replicates_equal_sksurv_on_materialised_resamples(method, x64):
  rng = np.random.default_rng(6)
  duration, event, risk = _random_case(rng, 120, "near")
  res = metrics.bootstrap_cindex(duration, event, risk, n_resamples=40, seed=3, method=method,
                                 chunk=16)
  weights = metrics.bootstrap_weights(120, 40, seed=3)
  assert weights.sum(axis=1).tolist() == [120] * 40
  for b in [0, 1, 17, 39]:
    idx = np.repeat(np.arange(120), weights[b])  # copies of one patient sit side by side
    ref = sksurv_tuple(duration[idx], event[idx], risk[idx])[0]
    assert res.replicates[b] == pytest.approx(ref, abs=1e-12 if x64 else 1e-6)
  assert res.estimate == metrics.concordance_index(duration, event, risk)
  assert res.n_invalid == 0 and res.replicates.shape == (40,)
  assert res.sd == pytest.approx(np.std(res.replicates, ddof=1))
  assert res.ci_low < res.estimate < res.ci_high


def test_bootstrap_methods_agree_and_chunking_does_not_matter():
  rng = np.random.default_rng(7)
  duration, event, risk = _random_case(rng, 120, "rounded")
  a = metrics.bootstrap_cindex(duration, event, risk, n_resamples=40, seed=1, method="dense")
  b = metrics.bootstrap_cindex(duration, event, risk, n_resamples=40, seed=1, method="tree",
                               chunk=16)
  np.testing.assert_allclose(a.replicates, b.replicates, atol=1e-12)
  np.testing.assert_array_equal(metrics.bootstrap_weights(120, 30, seed=1, first=50),
                                metrics.bootstrap_weights(120, 80, seed=1)[50:])
  c = metrics.bootstrap_cindex(duration, event, risk, n_resamples=40, seed=2, method="dense")
  assert not np.allclose(a.replicates, c.replicates)


def test_weighted_concordance_zero_weights_drop_patients():
  rng = np.random.default_rng(8)
  duration, event, risk = _random_case(rng, 120, "near")
  w = (rng.random(120) < 0.7).astype(float)
  keep = w > 0
  ref = brute_force(duration[keep], event[keep], risk[keep])[0]
  for method in ["dense", "tree"]:
    # 16 rows, like the bootstrap tests' chunks, so the compiled code is shared.
    got = metrics.weighted_concordance_index(duration, event, risk, np.tile(w, (16, 1)),
                                             method=method)
    np.testing.assert_allclose(got, ref, atol=1e-12)
  with pytest.raises(ValueError, match="weights: negative"):
    metrics.weighted_concordance_index(duration, event, risk, -w)


def test_generic_bootstrap_loops_over_resamples(gbsg2_split):
  s = gbsg2_split
  (td, te), (d, e) = _arrays(s["y_train"]), _arrays(s["y_test"])
  fn = lambda d_, e_, surv_: metrics.brier_score(td, te, d_, e_, surv_, s["times"][:3])[1]
  res = metrics.bootstrap(fn, d, e, s["surv"][:, :3], n_resamples=8, seed=11)
  assert res.replicates.shape == (8, 3)
  # Replicate b is the metric on the b-th numpy resample of the patients.
  rng = np.random.default_rng(11)
  for b in range(2):
    idx = rng.integers(0, len(d), len(d))
    ref = skm.brier_score(s["y_train"], s["y_test"][idx], s["surv"][idx, :3], s["times"][:3])[1]
    np.testing.assert_allclose(res.replicates[b], ref, atol=1e-12)
  np.testing.assert_allclose(res.estimate, fn(d, e, s["surv"][:, :3]))
  with pytest.raises(ValueError, match=r"arrays\[0\]: expected leading dimension"):
    metrics.bootstrap(fn, d, e, s["surv"][:10])
