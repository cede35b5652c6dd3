"""Cox partial likelihood and discrete-time NLL against references.

References: scikit-survival's CoxPHOptimizer (Breslow and Efron), lifelines'
CoxPHFitter log-likelihood (Efron), a brute-force numpy partial likelihood,
hand-computed cases, and the PORPOISE/HEALNet NLL formula in numpy.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify
from jax.test_util import check_grads

from jaxsurv.losses import checked_cox_ph_loss, cox_ph_loss, discrete_time_nll, duration_ranks

from conftest import REPO, subprocess_pythonpath, subprocess_xla_flags


def brute_force_cox_nll(risk, duration, event, ties):
  """O(n^2) negative log partial likelihood straight from the definition."""
  risk, duration, event = map(np.asarray, (risk, duration, event))
  total = 0.0
  for t in np.unique(duration[event == 1]):
    h = (duration == t) & (event == 1)
    at_risk = duration >= t
    r = np.exp(risk[at_risk]).sum()
    d = np.exp(risk[h]).sum()
    m = h.sum()
    total += risk[h].sum()
    if ties == "breslow":
      total -= m * np.log(r)
    else:
      total -= sum(np.log(r - k / m * d) for k in range(m))
  return -total


def tied_data(rng, n, n_times=8, event_rate=0.6):
  duration = rng.integers(1, n_times + 1, size=n).astype(float)
  event = (rng.random(n) < event_rate).astype(int)
  risk = rng.normal(size=n)
  return risk, duration, event


def test_hand_case_breslow():
  # Leaving out the censored subject tied at t=1 (as torchsurv 0.2.0's tie path
  # in github.com/Novartis/torchsurv src/torchsurv/loss/cox.py does) would give
  # 0.3 + log(e^-0.3 + e^1.2) = 1.7014 instead of the exact 2.0422.
  risk = jnp.array([0.5, -0.3, 1.2])
  duration = jnp.array([1.0, 1.0, 2.0])
  event = jnp.array([0, 1, 1])
  loss = cox_ph_loss(risk, duration, event, reduction="sum")
  # By hand: -(-0.3 - log(e^0.5 + e^-0.3 + e^1.2)) - (1.2 - 1.2) = 2.04216
  expected = 0.3 + np.log(np.exp(0.5) + np.exp(-0.3) + np.exp(1.2))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(loss, 2.0422, atol=1e-4)
  np.testing.assert_allclose(cox_ph_loss(risk, duration, event), expected / 2, rtol=1e-6)


def test_hand_case_efron_tied_events():
  # Two tied events at t=1 plus a censored subject at t=1 and one later event.
  risk = np.array([0.2, 0.7, -0.4, 0.1])
  duration = np.array([1.0, 1.0, 1.0, 3.0])
  event = np.array([1, 1, 0, 1])
  r = np.exp(risk).sum()
  d = np.exp(0.2) + np.exp(0.7)
  efron = -(0.2 + 0.7 - np.log(r) - np.log(r - 0.5 * d))
  breslow = -(0.2 + 0.7 - 2 * np.log(r))
  np.testing.assert_allclose(cox_ph_loss(risk, duration, event, ties="efron", reduction="sum"),
                             efron, rtol=1e-6)
  np.testing.assert_allclose(cox_ph_loss(risk, duration, event, ties="breslow", reduction="sum"),
                             breslow, rtol=1e-6)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_with_heavy_ties(ties, seed):
  rng = np.random.default_rng(seed)
  risk, duration, event = tied_data(rng, 60, n_times=6)
  with jax.enable_x64(True):
    got = cox_ph_loss(jnp.asarray(risk), jnp.asarray(duration), jnp.asarray(event),
                      ties=ties, reduction="sum")
  np.testing.assert_allclose(got, brute_force_cox_nll(risk, duration, event, ties), rtol=1e-12)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("loader", ["load_whas500", "load_gbsg2", "load_veterans_lung_cancer"])
def test_matches_sksurv_optimizer(ties, loader):
  """Equals scikit-survival's CoxPHOptimizer.nlog_likelihood * n (x64)."""
  from sksurv import datasets
  from sksurv.linear_model.coxph import CoxPHOptimizer
  x, y = getattr(datasets, loader)()
  num = x.select_dtypes("number").to_numpy(float)
  num = (num - num.mean(0)) / num.std(0)
  rng = np.random.default_rng(0)
  beta = rng.normal(scale=0.3, size=num.shape[1])
  risk = num @ beta
  event_field, time_field = y.dtype.names
  event = y[event_field].astype(int)
  duration = y[time_field].astype(float)
  opt = CoxPHOptimizer(risk[:, None], event.astype(bool), duration, alpha=np.array([0.0]), ties=ties)
  expected = opt.nlog_likelihood(np.array([1.0])) * len(risk)
  with jax.enable_x64(True):
    got = cox_ph_loss(jnp.asarray(risk), jnp.asarray(duration), jnp.asarray(event),
                      ties=ties, reduction="sum")
  np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_efron_equals_lifelines_log_likelihood_on_rossi():
  from lifelines import CoxPHFitter
  from lifelines.datasets import load_rossi
  rossi = load_rossi()
  cph = CoxPHFitter().fit(rossi, duration_col="week", event_col="arrest")
  x = rossi.drop(columns=["week", "arrest"])[cph.params_.index].to_numpy(float)
  risk = x @ cph.params_.to_numpy()
  with jax.enable_x64(True):
    got = cox_ph_loss(jnp.asarray(risk), jnp.asarray(rossi["week"].to_numpy(float)),
                      jnp.asarray(rossi["arrest"].to_numpy()), ties="efron", reduction="sum")
  np.testing.assert_allclose(-float(got), cph.log_likelihood_, rtol=1e-9)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_gradients(ties):
  rng = np.random.default_rng(3)
  risk, duration, event = tied_data(rng, 12, n_times=4)
  with jax.enable_x64(True):
    f = lambda r: cox_ph_loss(r, jnp.asarray(duration), jnp.asarray(event), ties=ties)
    check_grads(f, (jnp.asarray(risk),), order=1, modes=("rev",))


def test_no_events_gives_zero_and_zero_gradient():
  risk = jnp.array([0.3, -1.0, 2.0])
  duration = jnp.array([1.0, 2.0, 3.0])
  event = jnp.zeros(3, jnp.int32)
  for ties in ("breslow", "efron"):
    f = jax.jit(jax.value_and_grad(lambda r: cox_ph_loss(r, duration, event, ties=ties)))
    val, grad = f(risk)
    assert float(val) == 0.0
    np.testing.assert_array_equal(grad, np.zeros(3))


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_mask_equals_removing_rows(ties):
  rng = np.random.default_rng(4)
  risk, duration, event = tied_data(rng, 20, n_times=5)
  keep = rng.random(20) < 0.6
  # Padding may hold garbage, even NaN: it must not leak into loss or gradient.
  padded_risk = np.where(keep, risk, np.nan)
  f = lambda r: cox_ph_loss(r, jnp.asarray(duration), jnp.asarray(event), ties=ties, mask=keep)
  val, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(padded_risk))
  ref, ref_grad = jax.value_and_grad(
      lambda r: cox_ph_loss(r, duration[keep], event[keep], ties=ties))(jnp.asarray(risk[keep]))
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  np.testing.assert_allclose(grad[keep], ref_grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grad[~keep], 0.0)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_extreme_risk_scores_float32(ties):
  risk = jnp.array([1e4, -1e4, 0.0, 5e3, -3e3], jnp.float32)
  duration = jnp.array([1.0, 1.0, 2.0, 3.0, 3.0])
  event = jnp.array([0, 1, 1, 1, 1])
  val, grad = jax.value_and_grad(lambda r: cox_ph_loss(r, duration, event, ties=ties))(risk)
  assert np.isfinite(val) and np.all(np.isfinite(grad))
  # Risk set of t=1 is dominated by the 1e4 subject: the loss is ~2e4/4 from it.
  assert float(val) > 1e3


def test_multiple_outcomes_and_vmap():
  rng = np.random.default_rng(5)
  risk = rng.normal(size=(16, 2)).astype(np.float32)
  duration = rng.integers(1, 6, size=(16, 2)).astype(np.float32)
  event = (rng.random((16, 2)) < 0.5).astype(np.int32)
  both = cox_ph_loss(risk, duration, event, ties="efron")
  assert both.shape == (2,)
  for k in range(2):
    np.testing.assert_allclose(both[k], cox_ph_loss(risk[:, k], duration[:, k], event[:, k],
                                                    ties="efron"), rtol=1e-6)
  # A per-outcome mask drops a patient from one outcome only.
  mask = np.ones((16, 2), bool)
  mask[:4, 1] = False
  masked = cox_ph_loss(risk, duration, event, mask=mask)
  np.testing.assert_allclose(masked[1], cox_ph_loss(risk[4:, 1], duration[4:, 1], event[4:, 1]),
                             rtol=1e-6)
  # vmap over a leading axis of independent batches.
  batched = jax.vmap(lambda r, d, e: cox_ph_loss(r, d, e))(risk.T, duration.T, event.T)
  np.testing.assert_allclose(batched, cox_ph_loss(risk, duration, event), rtol=1e-6)


def test_bad_input_messages():
  ok = dict(risk=[0.1, 0.2, 0.3], duration=[1.0, 2.0, 3.0], event=[1, 0, 1])
  with pytest.raises(ValueError, match=r"duration: NaN or infinite values at rows \[1\]"):
    cox_ph_loss(ok["risk"], [1.0, np.nan, 3.0], ok["event"])
  with pytest.raises(ValueError, match=r"duration: negative durations at rows \[2\]"):
    cox_ph_loss(ok["risk"], [1.0, 2.0, -3.0], ok["event"])
  with pytest.raises(ValueError, match=r"event: values outside \{0, 1\} at rows \[0\]"):
    cox_ph_loss(ok["risk"], ok["duration"], [2, 0, 1])
  with pytest.raises(ValueError, match="risk: NaN"):
    cox_ph_loss([0.1, np.nan, 0.3], ok["duration"], ok["event"])
  with pytest.raises(ValueError, match="mismatched shapes"):
    cox_ph_loss(ok["risk"], ok["duration"][:2], ok["event"])
  with pytest.raises(ValueError, match="ties must be"):
    cox_ph_loss(**ok, ties="exact")


def test_sharded_loss_equals_single_device():
  """On 4 fake CPU devices, a batch sharded over a data mesh gives the global loss."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from jaxsurv.losses import cox_ph_loss
      assert jax.device_count() == 4, jax.devices()
      rng = np.random.default_rng(0)
      n = 64
      risk = rng.normal(size=n).astype(np.float32)
      duration = rng.integers(1, 10, size=n).astype(np.float32)
      event = (rng.random(n) < 0.5).astype(np.int32)
      explicit = jax.make_mesh((4,), ("data",))  # Explicit axes (the default).
      auto = jax.sharding.Mesh(np.array(jax.devices()), ("data",))  # Auto axes.
      for mesh, ties in [(explicit, "breslow"), (explicit, "efron"), (auto, "efron")]:
        sh = NamedSharding(mesh, P("data"))
        args = [jax.device_put(a, sh) for a in (risk, duration, event)]
        f = jax.jit(jax.value_and_grad(lambda r, d, e: cox_ph_loss(r, d, e, ties=ties)))
        v_sh, g_sh = f(*args)
        v_1, g_1 = jax.value_and_grad(lambda r: cox_ph_loss(r, duration, event, ties=ties))(risk)
        per_device = np.mean([float(cox_ph_loss(risk[i::4], duration[i::4], event[i::4], ties=ties))
                              for i in range(4)])
        assert abs(float(v_sh) - float(v_1)) < 1e-5 * abs(float(v_1)), (v_sh, v_1)
        np.testing.assert_allclose(np.asarray(g_sh), np.asarray(g_1), rtol=1e-5, atol=1e-7)
        assert abs(per_device - float(v_1)) > 1e-3  # A per-device loss is a different objective.
      print("SHARDED_OK")
      """)
  env = dict(os.environ,
             XLA_FLAGS=subprocess_xla_flags("--xla_force_host_platform_device_count=4"),
             JAX_PLATFORMS="cpu", PYTHONPATH=subprocess_pythonpath())
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "SHARDED_OK" in proc.stdout


# ----------------------------------------------------------------------------
# Durations closer than one float32 step; device-side input checks.
# ----------------------------------------------------------------------------


def sub_float32_cohort(seed=11):
  """Pairs of durations 2e-4 day apart near 12,000-14,000 days (float32 step there:
  2^-10 ~ 9.8e-4 day), plus ordinary ones; float32 merges each pair into a tie."""
  rng = np.random.default_rng(seed)
  base = rng.uniform(11000, 14000, 60).round(0)
  duration = np.concatenate([base, base + 2e-4, rng.uniform(100, 14000, 80)])
  event = np.concatenate([np.ones(60), rng.random(60) < 0.7, rng.random(80) < 0.5]).astype(int)
  risk = rng.normal(size=duration.size)
  assert np.unique(duration.astype(np.float32)).size < np.unique(duration).size - 50
  return risk, duration, event


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_sub_float32_durations_keep_float64_tie_groups(ties):
  """Default float32 mode, host durations: the float64 loss, not the merged one."""
  from sksurv.linear_model.coxph import CoxPHOptimizer
  risk, duration, event = sub_float32_cohort()
  ref = brute_force_cox_nll(risk, duration, event, ties)
  opt = CoxPHOptimizer(risk[:, None], event.astype(bool), duration, alpha=np.array([0.0]),
                       ties=ties)
  np.testing.assert_allclose(opt.nlog_likelihood(np.array([1.0])) * len(risk), ref, rtol=1e-12)
  merged = brute_force_cox_nll(risk, duration.astype(np.float32).astype(np.float64), event, ties)
  assert abs(merged - ref) / ref > 2e-4  # What the float32 cast used to give.
  assert not jax.config.jax_enable_x64
  got = cox_ph_loss(risk, duration, event, ties=ties, reduction="sum")
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  # Host durations closed over inside jit are ranked at trace time too.
  f = jax.jit(lambda r: cox_ph_loss(r, duration, event, ties=ties, reduction="sum"))
  np.testing.assert_allclose(float(f(jnp.asarray(risk, jnp.float32))), ref, rtol=1e-5)
  # Two outcomes at once: each column keeps its own float64 order.
  both = cox_ph_loss(np.stack([risk, risk[::-1]], 1), np.stack([duration, duration[::-1]], 1),
                     np.stack([event, event[::-1]], 1), ties=ties, reduction="sum")
  np.testing.assert_allclose(np.asarray(both), [ref, ref], rtol=1e-5)


def test_sub_float32_durations_match_lifelines_efron():
  from lifelines import CoxPHFitter
  import pandas as pd
  risk, duration, event = sub_float32_cohort(seed=12)
  x = risk + np.random.default_rng(0).normal(size=risk.size)
  cph = CoxPHFitter().fit(pd.DataFrame({"x": x, "t": duration, "e": event}), "t", "e")
  got = cox_ph_loss(x * float(cph.params_["x"]), duration, event, ties="efron", reduction="sum")
  np.testing.assert_allclose(-float(got), cph.log_likelihood_, rtol=1e-5)


@pytest.mark.parametrize("ties", ["breslow", "efron"])
def test_traced_float32_durations_tie_at_float32_resolution(ties):
  """The documented jit behaviour, and the documented way around it."""
  risk, duration, event = sub_float32_cohort()
  ref = brute_force_cox_nll(risk, duration, event, ties)
  merged = brute_force_cox_nll(risk, duration.astype(np.float32).astype(np.float64), event, ties)
  f = jax.jit(lambda r, d, e: cox_ph_loss(r, d, e, ties=ties, reduction="sum"))
  r32 = jnp.asarray(risk, jnp.float32)
  np.testing.assert_allclose(float(f(r32, jnp.asarray(duration, jnp.float32), event)), merged,
                             rtol=1e-5)
  # A float32 jax.Array (not traced) is already rounded: same float32 groups.
  np.testing.assert_allclose(float(cox_ph_loss(r32, jnp.asarray(duration, jnp.float32), event,
                                               ties=ties, reduction="sum")), merged, rtol=1e-5)
  ranks = duration_ranks(duration)
  assert ranks.dtype == np.int32 and ranks.shape == duration.shape
  np.testing.assert_allclose(float(f(r32, ranks, event)), ref, rtol=1e-5)
  # Ranks of a batch sliced from the cohort's ranks keep the batch's order.
  idx = np.random.default_rng(1).permutation(duration.size)[:90]
  np.testing.assert_allclose(
      float(f(r32[idx], ranks[idx], event[idx])),
      brute_force_cox_nll(risk[idx], duration[idx], event[idx], ties), rtol=1e-5)
  # With x64, float64 durations keep float64 groups even with float32 risks.
  with jax.enable_x64(True):
    got = jax.jit(lambda r, d, e: cox_ph_loss(r, d, e, ties=ties, reduction="sum"))(
        r32, jnp.asarray(duration, jnp.float64), event)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_integer_durations_compare_exactly_under_jit():
  # 2^24 and 2^24 + 1 are one float32 value; as int32 they stay distinct.
  duration = np.array([2**24, 2**24 + 1, 2**24 + 1, 5], np.int32)
  risk = np.array([0.3, -0.2, 0.9, 0.1])
  event = np.array([1, 1, 0, 1])
  f = jax.jit(lambda r, d, e: cox_ph_loss(r, d, e, reduction="sum"))
  np.testing.assert_allclose(float(f(jnp.asarray(risk, jnp.float32), jnp.asarray(duration), event)),
                             brute_force_cox_nll(risk, duration, event, "breslow"), rtol=1e-6)


def test_duration_ranks():
  np.testing.assert_array_equal(duration_ranks([3.0, 1.0, 3.0, 12345.0, 12345.0002]),
                                [1, 0, 1, 2, 3])
  np.testing.assert_array_equal(duration_ranks(np.array([[2, 7], [7, 2], [5, 5]])),
                                [[0, 2], [2, 0], [1, 1]])
  with pytest.raises(ValueError, match=r"duration: NaN or infinite values at rows \[1\]"):
    duration_ranks([1.0, np.nan])
  with pytest.raises(ValueError, match="negative"):
    duration_ranks([1.0, -2.0])
  with pytest.raises(TypeError, match="outside jit"):
    jax.jit(duration_ranks)(jnp.ones(3))


def test_checkify_catches_bad_inputs_under_jit():
  risk = jnp.array([0.1, 0.2, 0.3, -0.4])
  duration = jnp.array([1.0, 2.0, 3.0, 4.0])
  event = jnp.array([1, 0, 1, 1])
  f = jax.jit(checked_cox_ph_loss, static_argnames=("ties", "reduction"))
  err, loss = f(risk, duration, event)
  assert err.get() is None
  np.testing.assert_allclose(loss, cox_ph_loss(risk, duration, event), rtol=1e-6)
  err, _ = f(risk, duration.at[1].set(jnp.nan), event)
  assert "duration: NaN, infinite or negative value at row 1" in err.get()
  with pytest.raises(checkify.JaxRuntimeError, match="duration"):
    err.throw()
  err, _ = f(risk, duration.at[3].set(-1.0), event, ties="efron")
  assert "duration" in err.get() and "row 3" in err.get()
  err, _ = f(risk, duration, event.at[0].set(2))
  assert "event: value outside {0, 1} at row 0" in err.get()
  err, _ = f(risk.at[2].set(jnp.nan), duration, event)
  assert "risk: NaN or infinite value at row 2" in err.get()
  # Masked (padding) rows may hold anything.
  keep = jnp.array([True, False, True, True])
  err, _ = f(risk.at[1].set(jnp.nan), duration.at[1].set(jnp.nan), event.at[1].set(7), mask=keep)
  assert err.get() is None
  # [batch, outcomes]: row and outcome are named.
  d2 = jnp.stack([duration, duration], 1).at[2, 1].set(jnp.nan)
  err, _ = f(jnp.stack([risk, risk], 1), d2, jnp.stack([event, event], 1))
  assert "at row 2 (outcome 1)" in err.get()
  # Host durations (ranked on the host) under a traced mask: flagged from the host.
  g = jax.jit(lambda r, m: checkify.checkify(
      lambda: cox_ph_loss(r, np.array([1.0, np.nan, 3.0, 4.0]), np.array([1, 0, 1, 1]), mask=m,
                          check=True))())
  assert "duration" in g(risk, jnp.ones(4, bool))[0].get()
  assert g(risk, keep)[0].get() is None
  # The user-written form of the docstring, and what happens without checkify.
  h = jax.jit(checkify.checkify(lambda r, d, e: cox_ph_loss(r, d, e, check=True)))
  assert "event" in h(risk, duration, event.at[3].set(2))[0].get()
  with pytest.raises(ValueError, match="not functionalized"):
    jax.jit(lambda r, d, e: cox_ph_loss(r, d, e, check=True))(risk, duration, event)


# ----------------------------------------------------------------------------
# Discrete-time NLL.
# ----------------------------------------------------------------------------


def porpoise_nll(logits, y, event, alpha, weights=None, eps=1e-7):
  """The PORPOISE/HEALNet formula (sigmoid, cumprod, clamp) in numpy."""
  h = 1 / (1 + np.exp(-logits))
  s = np.cumprod(1 - h, axis=1)
  s_pad = np.concatenate([np.ones((len(y), 1)), s], axis=1)
  idx = np.arange(len(y))
  c = 1 - event
  s_prev = np.clip(s_pad[idx, y], eps, None)
  h_this = np.clip(h[idx, y], eps, None)
  s_this = np.clip(s_pad[idx, y + 1], eps, None)
  uncens = -(1 - c) * (np.log(s_prev) + np.log(h_this))
  cens = -c * np.log(s_this)
  w = 1.0 if weights is None else weights[y] / weights.sum()
  return np.mean((1 - alpha) * w * (cens + uncens) + alpha * uncens)


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("weighted", [False, True])
def test_discrete_nll_matches_porpoise_formula(alpha, weighted):
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(30, 4))
  y = rng.integers(0, 4, size=30)
  event = (rng.random(30) < 0.5).astype(int)
  weights = np.array([1 / 5, 1 / 9, 1 / 7, 1 / 9]) if weighted else None
  got = discrete_time_nll(logits, y, event, alpha=alpha, bin_weights=weights)
  np.testing.assert_allclose(got, porpoise_nll(logits, y, event, alpha, weights), rtol=1e-5)


def test_discrete_nll_gradient_not_zeroed_by_clamp():
  # Hazard logit 40 in the event bin of a censored patient: S ~ e^-40 < 1e-7,
  # where the peers' clamp gives a zero gradient. Ours stays informative.
  logits = jnp.array([[40.0, 0.0, 0.0, 0.0]])
  grad = jax.grad(lambda z: discrete_time_nll(z, jnp.array([1]), jnp.array([0])))(logits)
  assert grad[0, 0] > 0.5
  assert np.all(np.isfinite(grad))


def test_discrete_nll_mask_and_errors():
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(10, 3)).astype(np.float32)
  y = rng.integers(0, 3, size=10)
  event = (rng.random(10) < 0.5).astype(int)
  mask = np.arange(10) < 6
  np.testing.assert_allclose(discrete_time_nll(logits, y, event, mask=mask),
                             discrete_time_nll(logits[:6], y[:6], event[:6]), rtol=1e-6)
  with jax.enable_x64(True):
    check_grads(lambda z: discrete_time_nll(z, y, event, alpha=0.3), (jnp.asarray(logits, jnp.float64),),
                order=1, modes=("rev",))
  with pytest.raises(ValueError, match=r"bin_index: values outside \[0, 3\) at rows \[2\]"):
    discrete_time_nll(logits[:3], np.array([0, 1, 3]), event[:3])
  with pytest.raises(ValueError, match="event"):
    discrete_time_nll(logits[:3], y[:3], np.array([0, 1, 5]))
