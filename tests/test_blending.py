"""Tests for jaxsurv.blending (gradient blending, Wang et al. CVPR 2020).

Expected numbers are worked out by hand in the comments.
"""

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsurv.blending import (BlendRecord, GradientBlender, blend_weights,
                              history_rows, plot_history)

HEADS = ("mm", "image", "clinical")

# Hand example. Previous: L^T = 1.0, L^V = 1.2 for every head (O = 0.2).
# Current:      mm: L^T 0.6, L^V 1.0 -> dG = 0.2,  O = 0.4, dO = 0.2
#            image: L^T 0.5, L^V 1.3 -> dG = -0.1, O = 0.8, dO = 0.6
#         clinical: L^T 0.8, L^V 1.1 -> dG = 0.1,  O = 0.3, dO = 0.1
# Sum mode: ratios max(dG, 0) / dO^2 = [5, 0, 10] -> weights [1/3, 0, 2/3].
PREV_T, PREV_V = [1.0, 1.0, 1.0], [1.2, 1.2, 1.2]
CUR_T, CUR_V = [0.6, 0.5, 0.8], [1.0, 1.3, 1.1]


def test_hand_computed_sum_mode():
  res = blend_weights(PREV_T, PREV_V, CUR_T, CUR_V)
  assert res.updated
  assert res.weights.dtype == np.float32 and res.weights.shape == (3,)
  np.testing.assert_allclose(res.delta_g, [0.2, -0.1, 0.1], atol=1e-12)
  np.testing.assert_allclose(res.delta_o, [0.2, 0.6, 0.1], atol=1e-12)
  np.testing.assert_allclose(res.weights, [1 / 3, 0.0, 2 / 3], rtol=1e-6)
  assert res.weights[1] == 0.0


def test_floor_mixes_towards_minimum_weight():
  # floor 0.1: w = 0.1 + (1 - 3 * 0.1) * [1/3, 0, 2/3] = [0.3333, 0.1, 0.5667].
  res = blend_weights(PREV_T, PREV_V, CUR_T, CUR_V, floor=0.1)
  np.testing.assert_allclose(res.weights, [1 / 3, 0.1, 0.5666667], rtol=1e-6)
  np.testing.assert_allclose(res.weights.sum(), 1.0, rtol=1e-6)


def test_eps_clamps_zero_overfitting_change():
  # dO = 0 for head 0: its ratio is dG / eps = 0.1 / 1e-8 = 1e7, head 1 has
  # dG = 0.1 and dO = 0.1, ratio 10: weights 1e7 / (1e7 + 10) and 10 / (...).
  res = blend_weights([1.0, 1.0], [1.2, 1.2], [0.9, 0.8], [1.1, 1.1])
  np.testing.assert_allclose(res.delta_o, [0.0, 0.1], atol=1e-12)
  np.testing.assert_allclose(res.weights, [1e7 / (1e7 + 10), 10 / (1e7 + 10)],
                             rtol=1e-5)
  res = blend_weights([1.0, 1.0], [1.2, 1.2], [0.9, 0.8], [1.1, 1.1],
                      eps_o2=1e-2)  # Ratios 10 and 10.
  np.testing.assert_allclose(res.weights, [0.5, 0.5], rtol=1e-6)


def test_all_generalisation_negative_keeps_previous():
  prev_w = np.array([0.5, 0.3, 0.2])
  res = blend_weights(PREV_T, PREV_V, [0.9, 0.8, 0.7], [1.2, 1.25, 1.3],
                      prev_weights=prev_w)
  assert not res.updated
  np.testing.assert_allclose(res.weights, prev_w, rtol=1e-7)
  np.testing.assert_allclose(res.delta_g, [0.0, -0.05, -0.1], atol=1e-12)
  res = blend_weights(PREV_T, PREV_V, [0.9, 0.8, 0.7], [1.2, 1.25, 1.3])
  np.testing.assert_allclose(res.weights, [1 / 3] * 3, rtol=1e-7)


def test_softmax_mode_matches_mmnn_hand_computation():
  # z = dG / dO^2 = [0.2/0.04, -0.1/0.36, 0.1/0.01] = [5, -0.27778, 10];
  # softmax by hand: exp(z) / sum = [0.0066926, 3.41575e-5, 0.9932732].
  res = blend_weights(PREV_T, PREV_V, CUR_T, CUR_V, mode="softmax")
  assert res.updated
  np.testing.assert_allclose(res.weights,
                             [0.006692622, 3.415754e-05, 0.9932732], rtol=1e-5)
  sum_mode = blend_weights(PREV_T, PREV_V, CUR_T, CUR_V).weights
  assert not np.allclose(res.weights, sum_mode, atol=1e-3)
  assert res.weights[1] > 0  # Softmax never switches the overfitting head off.
  # No keep-previous rule: all dG < 0 still "updates".
  res = blend_weights(PREV_T, PREV_V, [0.9, 0.8, 0.7], [1.2, 1.25, 1.3],
                      mode="softmax")
  assert res.updated
  # dO ~ 1e-16 (rounding): softmax saturates to one-hot, as in MMNN.
  res = blend_weights([1.0, 1.0], [1.2, 1.2], [0.9, 0.8], [1.1, 1.1],
                      mode="softmax")
  np.testing.assert_array_equal(res.weights, [1.0, 0.0])
  # dO exactly 0 (binary-exact numbers): MMNN would give NaN; we raise.
  with pytest.raises(ValueError, match=r"dO = 0 .* heads \[0\]"):
    blend_weights([1.0, 1.0], [1.5, 1.5], [0.75, 0.5], [1.25, 1.25],
                  mode="softmax")


def test_blend_weights_errors():
  with pytest.raises(ValueError, match="cur_val: NaN or infinite"):
    blend_weights(PREV_T, PREV_V, CUR_T, [1.0, np.nan, 1.0])
  with pytest.raises(ValueError, match="one shape"):
    blend_weights(PREV_T, PREV_V, CUR_T, [1.0, 1.0])
  with pytest.raises(ValueError, match="floor must be in"):
    blend_weights(PREV_T, PREV_V, CUR_T, CUR_V, floor=0.4)
  with pytest.raises(ValueError, match="mode must be"):
    blend_weights(PREV_T, PREV_V, CUR_T, CUR_V, mode="max")
  with pytest.raises(ValueError, match="prev_weights"):
    blend_weights(PREV_T, PREV_V, CUR_T, CUR_V, prev_weights=[0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match="eps_o2"):
    blend_weights(PREV_T, PREV_V, CUR_T, CUR_V, eps_o2=0.0)


def _scripted_losses(epoch):
  """Per-head (train, held-out) losses, linear in the epoch.

  mm generalises (held-out falls, gap grows slowly), image overfits (train
  falls fast, held-out rises), clinical improves a little and overfits a bit.
  Over 5 epochs: mm dG 0.075, dO 0.025 -> ratio 120; image dG -0.05 -> 0;
  clinical dG 0.02, dO 0.03 -> ratio 22.2. Weights 120/142.2, 0, 22.2/142.2.
  """
  train = {"mm": 1.0 - 0.02 * epoch, "image": 1.0 - 0.03 * epoch,
           "clinical": 1.0 - 0.01 * epoch}
  val = {"mm": 1.1 - 0.015 * epoch, "image": 1.1 + 0.01 * epoch,
         "clinical": 1.1 - 0.004 * epoch}
  return train, val


def test_blender_scripted_curves():
  blender = GradientBlender(HEADS)
  np.testing.assert_allclose(blender.weights, [1 / 3] * 3)
  weights = []
  for epoch in range(4, 30, 5):  # Updates after every 5th epoch.
    weights.append(blender.update(epoch, *_scripted_losses(epoch)))
  np.testing.assert_allclose(weights[0], [1 / 3] * 3)  # Warm-up: reference.
  assert [r.status for r in blender.history] == ["reference"] + ["updated"] * 5
  expected = np.array([120.0, 0.0, 0.02 / 0.03 ** 2])
  expected /= expected.sum()
  for w in weights[1:]:
    assert w.dtype == np.float32
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
    assert w[1] == 0.0 and w[0] == w.max()  # Overfitter off; mm leads.
  # With a floor the overfitting head keeps exactly the floor.
  floored = GradientBlender(HEADS, floor=0.05)
  for epoch in (4, 9):
    w = floored.update(epoch, *_scripted_losses(epoch))
  np.testing.assert_allclose(w[1], 0.05, rtol=1e-6)


def test_blender_keeps_weights_and_moves_reference():
  blender = GradientBlender(HEADS)
  blender.update(0, dict(zip(HEADS, PREV_T)), dict(zip(HEADS, PREV_V)))
  w1 = blender.update(5, dict(zip(HEADS, CUR_T)), dict(zip(HEADS, CUR_V)))
  np.testing.assert_allclose(w1, [1 / 3, 0, 2 / 3], rtol=1e-6)
  # Every held-out loss rises: weights kept, reference still moves on.
  worse_v = {"mm": 1.05, "image": 1.4, "clinical": 1.2}
  worse_t = {"mm": 0.55, "image": 0.4, "clinical": 0.75}
  w2 = blender.update(10, worse_t, worse_v)
  np.testing.assert_array_equal(w2, w1)
  assert blender.history[-1].status == "kept"
  # Next window measured from epoch 10: dG = [0.05, 0.1, 0.1];
  # O_10 = [0.5, 1.0, 0.45], O_15 = [0.55, 1.1, 0.45] -> dO = [0.05, 0.1, 0]:
  # ratios [20, 10, 0.1 / 1e-8]: clinical takes (almost) everything.
  w3 = blender.update(15, {"mm": 0.45, "image": 0.2, "clinical": 0.65},
                      {"mm": 1.0, "image": 1.3, "clinical": 1.1})
  expected = np.array([20.0, 10.0, 1e7]) / (1e7 + 30.0)
  np.testing.assert_allclose(w3, expected, rtol=1e-5)
  np.testing.assert_allclose(
      [blender.history[-1].delta_o[h] for h in HEADS], [0.05, 0.1, 0.0],
      atol=1e-12)


def test_blender_softmax_mode_differs():
  sm = GradientBlender(HEADS, mode="softmax")
  sm.update(0, dict(zip(HEADS, PREV_T)), dict(zip(HEADS, PREV_V)))
  w = sm.update(5, dict(zip(HEADS, CUR_T)), dict(zip(HEADS, CUR_V)))
  np.testing.assert_allclose(w, [0.006692622, 3.415754e-05, 0.9932732],
                             rtol=1e-5)


def test_blender_errors():
  blender = GradientBlender(HEADS)
  t, v = _scripted_losses(0)
  with pytest.raises(ValueError, match=r"missing \['clinical'\]"):
    blender.update(0, {"mm": 1.0, "image": 1.0}, v)
  with pytest.raises(ValueError, match=r"unexpected \['omics'\]"):
    blender.update(0, t, {**v, "omics": 1.0})
  with pytest.raises(ValueError, match="val_losses: NaN"):
    blender.update(0, t, {**v, "mm": float("nan")})
  with pytest.raises(ValueError, match="expected a scalar"):
    blender.update(0, t, {**v, "mm": np.ones(2)})
  blender.update(4, t, v)
  with pytest.raises(ValueError, match="epoch must increase"):
    blender.update(4, t, v)
  with pytest.raises(ValueError, match="unique"):
    GradientBlender(("mm", "mm"))


def test_weights_feed_a_jitted_step_without_retracing():
  traces = []

  @jax.jit
  def weighted_loss(w, losses):
    traces.append(1)  # Runs only while tracing.
    return jnp.dot(w, losses)

  blender = GradientBlender(HEADS)
  losses = jnp.array([1.0, 2.0, 3.0])
  results = []
  for epoch in range(4, 20, 5):
    w = blender.update(epoch, *_scripted_losses(epoch))
    results.append(float(weighted_loss(w, losses)))
  assert len(traces) == 1
  np.testing.assert_allclose(results[0], 2.0, rtol=1e-6)  # Uniform weights.


def test_history_csv_to_dict_and_plot(tmp_path):
  blender = GradientBlender(HEADS, floor=0.01)
  for epoch in range(4, 20, 5):
    blender.update(epoch, *_scripted_losses(epoch))
  path = blender.to_csv(tmp_path / "gblend.csv")
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4
  assert rows[0]["status"] == "reference" and rows[0]["delta_g_mm"] == ""
  assert [int(r["epoch"]) for r in rows] == [4, 9, 14, 19]
  for r, rec in zip(rows, blender.history):
    for h in HEADS:
      assert float(r[f"weight_{h}"]) == pytest.approx(rec.weights[h])
      assert float(r[f"val_{h}"]) == pytest.approx(rec.val_losses[h])
  assert float(rows[2]["delta_g_image"]) == pytest.approx(-0.05)
  assert history_rows(blender.history) == blender.history_rows()

  # JSON round trip of the host-side state, then identical next update.
  state = json.loads(json.dumps(blender.to_dict()))
  assert state == blender.state_dict()
  restored = GradientBlender.from_dict(state)
  assert restored.history == blender.history
  nxt = _scripted_losses(24)
  np.testing.assert_array_equal(restored.update(24, *nxt),
                                blender.update(24, *nxt))

  png = plot_history(blender, tmp_path / "gblend.png")
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="empty"):
    plot_history([], tmp_path / "empty.png")
  assert isinstance(blender.history[0], BlendRecord)
