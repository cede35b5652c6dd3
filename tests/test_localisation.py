"""Tests for jaxsurv.localisation (and the Grad-CAM ``sign`` option).

References are independent of the code under test: fractions and shells
counted by hand on tiny arrays, the decreasing-sign map computed by hand from
given activations and gradients, the phantom's own intensities (the necrotic
core is dark on T1c, the oedema bright on T2-FS) for the re-rendered tissue
masks, and the model's own forward pass for the risk scores of the summary.

One tiny sarcoma phantom cohort (4 patients, seed 2, 16^3 grid) is prepared
per module; the end-to-end summary uses an untrained tiny MMNN on it (no
training run: its variables come from ``init``).
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_mmnn_config
from jaxsurv import gradcam, localisation
from jaxsurv.errors import UserError


# ----------------------------------------------------------------------------
# Fractions, chance, periphery: by hand.
# ----------------------------------------------------------------------------


def test_region_and_chance_fractions_by_hand():
  # 2 patients, 2 outcomes, a 1 x 2 x 2 grid (4 voxels).
  cam = np.zeros((2, 2, 1, 2, 2), np.float32)
  cam[0, 0, 0] = [[1.0, 0.5], [0.0, 0.5]]  # mass 2
  cam[0, 1, 0] = [[0.0, 0.0], [0.0, 1.0]]  # mass 1
  cam[1, 0, 0] = [[0.25, 0.25], [0.25, 0.25]]  # mass 1, uniform
  # cam[1, 1] all zero: no mass.
  region = np.zeros((2, 1, 2, 2), bool)
  region[0, 0, 0, 0] = True  # patient 0: voxel (0, 0) only
  region[1, 0, 1] = True  # patient 1: the second row, 2 voxels
  frac = localisation.region_fractions(cam, {"r": region, "none": np.zeros_like(region)})
  np.testing.assert_allclose(frac["r"][0], [1.0 / 2.0, 0.0])
  assert frac["r"][1, 0] == pytest.approx(0.5)
  assert np.isnan(frac["r"][1, 1])  # all-zero map
  np.testing.assert_array_equal(frac["none"][0], [0.0, 0.0])
  chance = localisation.chance_fractions({"r": region})
  np.testing.assert_allclose(chance["r"], [1 / 4, 2 / 4])
  # A uniform map puts exactly the chance fraction in any region.
  assert frac["r"][1, 0] == pytest.approx(chance["r"][1])
  with pytest.raises(UserError, match="regions\\['r'\\]"):
    localisation.region_fractions(cam, {"r": region[:, :, :1]})
  with pytest.raises(UserError, match="non-negative"):
    localisation.region_fractions(-cam, {"r": region})


def test_periphery_on_an_anisotropic_grid():
  # One tumour voxel in a 5^3 grid of 3 x 1 x 1 mm voxels (D, H, W).
  mask = np.zeros((5, 5, 5), bool)
  mask[2, 2, 2] = True
  spacing = (3.0, 1.0, 1.0)
  # Width 2 mm: no neighbour along D (3 mm away); in the D = 2 slice the
  # offsets (dh, dw) with dh^2 + dw^2 <= 4, i.e. the 4 edge neighbours (1 mm),
  # the 4 diagonals (1.41 mm) and the 4 at 2 mm; (1, 2) is 2.24 mm: out.
  offsets = [(1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1),
             (2, 0), (-2, 0), (0, 2), (0, -2)]
  expected = np.zeros_like(mask)
  for dh, dw in offsets:
    expected[2, 2 + dh, 2 + dw] = True
  np.testing.assert_array_equal(localisation.periphery(mask, 2.0, spacing), expected)
  # Width 3 mm: the whole D = 2 slice (farthest corner 2.83 mm) but the
  # tumour, plus the two voxels straight along D (exactly 3 mm): 24 + 2.
  shell = localisation.periphery(mask, 3.0, spacing)
  expected = np.zeros_like(mask)
  expected[2] = True
  expected[2, 2, 2] = False
  expected[1, 2, 2] = expected[3, 2, 2] = True
  np.testing.assert_array_equal(shell, expected)
  assert not localisation.periphery(mask, 0.0, spacing).any()
  with pytest.raises(UserError, match="empty tumour mask"):
    localisation.periphery(np.zeros_like(mask), 2.0, spacing)
  with pytest.raises(UserError, match="spacing_mm"):
    localisation.periphery(mask, 2.0, (3.0, 1.0))


# ----------------------------------------------------------------------------
# Grad-CAM sign.
# ----------------------------------------------------------------------------


def test_decreasing_sign_is_relu_of_minus_the_weighted_sum():
  # 1 patient, a 2 x 1 x 1 layer with 2 channels: voxel 0 has A = (1, 0),
  # voxel 1 has A = (0, 1). Outcome 0: gradients (1, -2) at both voxels, so
  # alpha = (1, -2) and sum_c alpha_c A_c = (1, -2) over the two voxels.
  # Outcome 1: gradients (0, 1) and (0, 3), alpha = (0, 2), sum = (0, 2).
  a = np.array([[[[[1.0, 0.0]]], [[[0.0, 1.0]]]]], np.float32)  # [1, 2, 1, 1, 2]
  g = np.zeros((2, 1, 2, 1, 1, 2), np.float32)
  g[0, 0, :, 0, 0] = [1.0, -2.0]
  g[1, 0, 0, 0, 0] = [0.0, 1.0]
  g[1, 0, 1, 0, 0] = [0.0, 3.0]
  inc = gradcam.grad_cam_from_gradients(a, g, (2, 1, 1))
  same = gradcam.grad_cam_from_gradients(a, g, (2, 1, 1), sign="increasing")
  dec = gradcam.grad_cam_from_gradients(a, g, (2, 1, 1), sign="decreasing")
  # Increasing (unchanged): ReLU(1, -2) = (1, 0), peak 1; ReLU(0, 2) = (0, 2), peak 2.
  np.testing.assert_allclose(np.asarray(inc.cam)[0, :, :, 0, 0], [[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(inc.peak, [[1.0, 2.0]])
  np.testing.assert_allclose(inc.weights, [[[1.0, -2.0], [0.0, 2.0]]])
  for x, y in zip(inc, same):
    np.testing.assert_array_equal(x, y)
  # Decreasing: ReLU(-(1, -2)) = (0, 2), peak 2; ReLU(-(0, 2)) = (0, 0): all zero.
  np.testing.assert_allclose(np.asarray(dec.cam)[0, :, :, 0, 0], [[0.0, 1.0], [0.0, 0.0]])
  np.testing.assert_allclose(dec.peak, [[2.0, 0.0]])
  np.testing.assert_allclose(dec.weights, [[[-1.0, 2.0], [0.0, -2.0]]])
  with pytest.raises(ValueError, match="sign"):
    gradcam.grad_cam_from_gradients(a, g, (2, 1, 1), sign="negative")


# ----------------------------------------------------------------------------
# The phantom cohort.
# ----------------------------------------------------------------------------


def _config(**overrides):
  return tiny_mmnn_config(**{"data.n_patients": 4, "data.cohort_seed": 2,
                             "data.prepare_workers": 1, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  from jaxsurv import train
  root = tmp_path_factory.mktemp("localisation")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXSURV_CACHE", str(root / "cache"))
    return train.load_cohort(_config())


def test_phantom_tissues_reproduce_the_stored_mask(prepared):
  ids = list(prepared.patient_ids)
  masks = localisation.phantom_tissue_masks(prepared, ids)  # seed 2 from the metadata
  np.testing.assert_array_equal(masks["tumour"], prepared.masks > 0)
  core, oedema, tumour = masks["core"], masks["oedema"], masks["tumour"]
  assert not (core & ~tumour).any() and not (oedema & tumour).any()
  assert core.any() and oedema.any()
  t1c, t2fs = prepared.images[..., 0], prepared.images[..., 1]
  for i in range(len(ids)):
    rim = tumour[i] & ~core[i]
    if core[i].sum() >= 2 and rim.sum() >= 2:  # necrosis: dark on T1c
      assert t1c[i][core[i]].mean() < t1c[i][rim].mean() - 0.5
  # Oedema raises T2-FS over the rest of the soft tissue just around the tumour.
  for i in range(len(ids)):
    if oedema[i].sum() >= 2:
      spacing = prepared.case_geometry(i)[0].spacing[::-1]
      near = localisation.periphery(tumour[i], 30.0, spacing) & ~oedema[i]
      assert t2fs[i][oedema[i]].mean() > t2fs[i][near].mean()
  # The wrong seed, or a stored mask that the rendering does not reproduce.
  with pytest.raises(UserError, match="another seed"):
    localisation.phantom_tissue_masks(prepared, ids[:1], seed=3)
  saved = prepared.masks[0].copy()
  try:
    prepared.masks[0, 0, 0, 0] ^= 1
    with pytest.raises(UserError, match="differs from the stored mask"):
      localisation.phantom_tissue_masks(prepared, ids[:1])
  finally:
    prepared.masks[0] = saved


# ----------------------------------------------------------------------------
# End to end on an untrained tiny MMNN.
# ----------------------------------------------------------------------------


def _run(prepared, modalities):
  from jaxsurv import predict, train
  from jaxsurv.data import clinical as clinical_lib
  config = _config(**{"data.modalities": modalities})
  model = train.build_model(config)
  clin = None
  if "clinical" in modalities:
    clin = clinical_lib.ClinicalPreprocessor(numeric=tuple(config.data.numeric),
                                             categorical=tuple(config.data.categorical))
    clin.fit(prepared.table)
  n_feat = clin.n_features if clin is not None else 1
  image = (jnp.zeros((1,) + prepared.images.shape[1:], jnp.float32) if "image" in modalities
           else None)
  # Jitted: an eager init of the DenseNet takes seconds, a cached compile does not.
  v = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), image,
                                                          jnp.zeros((1, n_feat)))
  return predict.TrainedRun(
      workdir=prepared.dataset_dir, config=config, model=model, variables=dict(v),
      clinical=clin, preprocess=prepared.preprocess, baselines={}, outcomes=("os", "dm"),
      modalities=tuple(modalities), spec=prepared.spec, best_step=0, best_epoch=None,
      fingerprint=prepared.fingerprint), clin


def test_summary_end_to_end(prepared):
  from jaxsurv import train
  run, clin = _run(prepared, ("image", "clinical"))
  ids = list(prepared.patient_ids[::-1])  # not cohort order
  rows = [list(prepared.patient_ids).index(p) for p in ids]
  df = localisation.localisation_table(run, prepared, ids, batch_size=3)
  assert len(df) == len(ids) * 2 * 2
  # Risk scores: the model's own forward pass on the same patients.
  out = train.predict_fn(run.variables["params"], run.variables["batch_stats"],
                         prepared.images[rows], clin.transform(prepared.table.iloc[rows]),
                         model=run.model)
  for k, o in enumerate(run.outcomes):
    d = df[(df["sign"] == "increasing") & (df["outcome"] == o)]
    assert list(d["patient_id"]) == ids
    np.testing.assert_allclose(d["risk"], np.asarray(out["mm"])[:, k], rtol=1e-4, atol=1e-5)
  inc = df[df["sign"] == "increasing"].reset_index(drop=True)
  dec = df[df["sign"] == "decreasing"].reset_index(drop=True)
  np.testing.assert_array_equal(inc["risk"], dec["risk"])
  # ReLU(x) and ReLU(-x) are not both zero unless x is.
  assert not (inc["all_zero"] & dec["all_zero"]).any()
  # Chance: region voxels / 16^3, the tumour inside tumour + periphery.
  tum = (prepared.masks[rows] > 0).reshape(len(ids), -1).mean(1)
  np.testing.assert_allclose(inc[inc["outcome"] == "os"]["chance_tumour"], tum)
  assert (df["chance_tumour_periphery"] > df["chance_tumour"]).all()
  ok = df["frac_tumour"].notna()
  assert (df["frac_tumour_periphery"][ok] >= df["frac_tumour"][ok] - 1e-12).all()
  assert df["frac_tumour"].isna().equals(df["all_zero"])

  results = localisation.summarise(df, phantom=True)
  for s in ("increasing", "decreasing"):
    for o in ("os", "dm"):
      res = results[s][o]
      groups = res["groups"]
      d = df[(df["sign"] == s) & (df["outcome"] == o)]
      assert groups["all"]["n_maps"] == 4 and groups["low"]["n_maps"] == 2
      assert groups["high"]["n_maps"] == 2
      assert groups["all"]["n_all_zero"] == int(d["all_zero"].sum())
      assert res["median_risk"] == pytest.approx(float(np.median(d["risk"])))
      low = d[d["risk"] < np.median(d["risk"])]["frac_tumour"].dropna()
      assert groups["low"]["tumour"]["n"] == len(low)
      if len(low):
        assert groups["low"]["tumour"]["median"] == pytest.approx(float(np.median(low)))
      assert "core_vs_latent_necrosis" in groups["all"]["spearman"]

  # Image-only runs work (zeros as the clinical input); clinical-only runs are skipped.
  img = localisation.localisation_summary(_run(prepared, ("image",))[0], prepared, ids[:3],
                                          batch_size=3, signs=("decreasing",))
  json.dumps(img, allow_nan=False)
  assert img["phantom"] and img["n_patients"] == 3 and list(img["results"]) == ["decreasing"]
  assert img["results"]["decreasing"]["os"]["groups"]["all"]["n_maps"] == 3
  text = localisation.markdown(img)
  assert "| sign | outcome | group |" in text and "rho necrosis" in text
  assert img["statement"] in text and "risk-decreasing" in img["statement"]
  clin_only = localisation.localisation_summary(_run(prepared, ("clinical",))[0], prepared, ids)
  assert "no image branch" in clin_only["skipped"]
  assert "skipped" in localisation.markdown(clin_only)
  with pytest.raises(UserError, match="not in cohort"):
    localisation.localisation_table(run, prepared, ["nobody"])
