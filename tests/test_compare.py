"""``python -m jaxsurv.compare mmnn`` (MMNN Table 3).

The classical rows against scikit-survival called directly on the same
features; the paired bootstrap by hand; the whole command on the tiny
phantom cohort (rows present, reused on a rerun, another config refused).
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np
import pandas as pd
import pytest
from sksurv.ensemble import RandomSurvivalForest
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from conftest import tiny_mmnn_config
from jaxsurv import compare
from jaxsurv import metrics
from jaxsurv.errors import UserError


def _cohort(n=240, seed=0):
  rng = np.random.default_rng(seed)
  age = rng.normal(60, 10, n)
  grade = rng.integers(1, 4, n)
  size = rng.choice(["<=20", "20-50", ">50"], n)
  eta = 0.04 * (age - 60) + 0.5 * (grade - 2) + 0.6 * (size == ">50")
  t = rng.exponential(2000 * np.exp(-eta))
  c = rng.uniform(300, 4000, n)
  table = pd.DataFrame({"patient_id": [f"p{i:03d}" for i in range(n)], "age": age,
                        "grade": grade, "size": size})
  for o, shift in (("os", 0.0), ("dm", 200.0)):
    table[f"{o}_time"] = np.minimum(t + shift, c)
    table[f"{o}_event"] = (t + shift <= c).astype(int)
  table.loc[3, "age"] = np.nan  # Imputed (training median) and flagged.
  ids = table["patient_id"].to_numpy()
  return table, {"train": ids[:160], "val": ids[160:200], "test": ids[200:]}


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 3
  c.data = ml_collections.ConfigDict(dict(outcomes=("os", "dm")))
  c.eval = ml_collections.ConfigDict(dict(bootstrap_resamples=20))
  c.compare = ml_collections.ConfigDict(dict(
      sarculator=("age", "size", "grade", "histology"), clinical=("age", "grade"),
      size_grade=("size", "grade"),
      rsf=dict(n_estimators=20, min_samples_leaf=10, max_features="sqrt", n_jobs=1)))
  return c


@pytest.mark.parametrize("row", ["sarculator_coxph", "sarculator_rsf", "clinical_rsf"])
def test_classical_rows_equal_scikit_survival_on_the_same_features(row):
  table, parts = _cohort()
  config = _config()
  res = compare.classical_row(row, table, parts, config)
  expected_vars = ["age", "grade", "size"] if row.startswith("sarculator") else ["age", "grade"]
  assert res["variables"] == expected_vars
  assert res["missing_variables"] == (["histology"] if row.startswith("sarculator") else [])
  numeric, categorical, _ = compare.split_variables(table, expected_vars)
  assert categorical == (["size"] if row.startswith("sarculator") else [])
  xs, _ = compare.design_matrices(table, parts, numeric, categorical)
  by_id = table.set_index("patient_id")
  for o in ("os", "dm"):
    tr, te = by_id.loc[parts["train"]], by_id.loc[parts["test"]]
    y = Surv.from_arrays(event=tr[f"{o}_event"].astype(bool), time=tr[f"{o}_time"])
    if row.endswith("coxph"):
      model = CoxPHSurvivalAnalysis(alpha=1e-4, ties="breslow").fit(xs["train"], y)
    else:
      model = RandomSurvivalForest(n_estimators=20, min_samples_leaf=10, max_features="sqrt",
                                   n_jobs=1, random_state=config.seed).fit(xs["train"], y)
    risk = model.predict(xs["test"])
    np.testing.assert_allclose(res["test_risk"][o], risk, rtol=1e-10)
    c = concordance_index_censored(te[f"{o}_event"].astype(bool), te[f"{o}_time"], risk)[0]
    assert res["outcomes"][o]["cindex"] == pytest.approx(c, abs=1e-9)
    assert 0 < res["outcomes"][o]["ibs"] < 0.5 and 0.5 < res["outcomes"][o]["cindex"] < 1


def test_elastic_net_cox_cv_equals_a_hand_rolled_cross_validation():
  from sklearn.model_selection import KFold
  from sksurv.linear_model import CoxnetSurvivalAnalysis
  table, parts = _cohort()
  rng = np.random.default_rng(5)
  feats = pd.DataFrame(rng.normal(size=(len(table), 4)), columns=[f"f{i}" for i in range(4)],
                       index=table["patient_id"])
  feats["f0"] += 0.02 * (table["age"].fillna(60).to_numpy() - 60)  # One informative feature.
  config = _config()
  config.compare.coxnet = dict(l1_ratios=(0.5, 1.0), n_alphas=5, alpha_min_ratio=0.3, folds=5)
  res = compare.classical_row("radiomics_clinical_coxnet", table, parts, config, feats)
  assert res["variables"] == ["radiomics (4)", "age", "grade"]
  numeric = ["age", "grade"] + [f"radiomics:f{i}" for i in range(4)]
  joined = pd.concat([table, feats.reset_index(drop=True).add_prefix("radiomics:")], axis=1)
  xs, _ = compare.design_matrices(joined, parts, numeric, [])
  by_id = table.set_index("patient_id")
  for o in ("os", "dm"):
    tr, te = by_id.loc[parts["train"]], by_id.loc[parts["test"]]
    ev, t = tr[f"{o}_event"].to_numpy().astype(bool), tr[f"{o}_time"].to_numpy()
    y = Surv.from_arrays(event=ev, time=t)
    # cv.glmnet's procedure: the whole path per fold, every alpha scored on the held-out fold.
    best = (-1.0, None, None, None)
    for l1 in (0.5, 1.0):
      alphas = CoxnetSurvivalAnalysis(l1_ratio=l1, n_alphas=5,
                                      alpha_min_ratio=0.3).fit(xs["train"], y).alphas_
      cs = np.zeros((5, len(alphas)))
      for f, (fit_idx, val_idx) in enumerate(KFold(5, shuffle=True, random_state=config.seed)
                                             .split(xs["train"])):
        m = CoxnetSurvivalAnalysis(l1_ratio=l1, alphas=alphas).fit(xs["train"][fit_idx],
                                                                   y[fit_idx])
        for k, a in enumerate(alphas):
          cs[f, k] = concordance_index_censored(ev[val_idx], t[val_idx],
                                                m.predict(xs["train"][val_idx], alpha=a))[0]
      k = int(np.argmax(cs.mean(axis=0)))
      if cs.mean(axis=0)[k] > best[0]:
        best = (cs.mean(axis=0)[k], alphas[k], l1, alphas[: k + 1])
    got = res["outcomes"][o]["cv_best"]
    assert got["cv_cindex"] == pytest.approx(best[0], abs=1e-12)
    assert (got["alpha"], got["l1_ratio"]) == pytest.approx((best[1], best[2]))
    model = CoxnetSurvivalAnalysis(l1_ratio=best[2], alphas=best[3]).fit(xs["train"], y)
    np.testing.assert_allclose(res["test_risk"][o], model.predict(xs["test"]), rtol=1e-9)
    c = concordance_index_censored(te[f"{o}_event"].astype(bool), te[f"{o}_time"],
                                   model.predict(xs["test"]))[0]
    assert res["outcomes"][o]["cindex"] == pytest.approx(c, abs=1e-9)
    assert np.all((np.asarray(res["test_p5y"][o]) >= 0) & (np.asarray(res["test_p5y"][o]) <= 1))


@pytest.mark.parametrize("row", ["radiomics_rsf", "radiomics_clinical_rsf"])
def test_radiomics_forests_equal_scikit_survival_on_the_same_features(row):
  table, parts = _cohort()
  rng = np.random.default_rng(7)
  feats = pd.DataFrame(rng.normal(size=(len(table), 3)), columns=["shape_a", "t1c_b", "t2fs_c"],
                       index=table["patient_id"])
  feats.iloc[205] = np.nan  # A test patient PyRadiomics could not featurise: imputed.
  feats.iloc[7] = np.nan  # A training patient too: one indicator column, not three.
  res = compare.classical_row(row, table, parts, _config(), feats)
  clinical = [] if row == "radiomics_rsf" else ["age", "grade"]
  assert res["variables"] == ["radiomics (3; 2 patients without, imputed)"] + clinical
  joined = pd.concat([table, feats.reset_index(drop=True).add_prefix("radiomics:")], axis=1)
  xs, names = compare.design_matrices(joined, parts, clinical + [f"radiomics:{c}" for c in feats],
                                      [])
  flags = [i for i, n in enumerate(names) if n.startswith("radiomics:") and n.endswith("__missing")]
  assert len(flags) == 3 and all(np.array_equal(xs["train"][:, flags[0]], xs["train"][:, i])
                                 for i in flags)
  keep = [i for i in range(len(names)) if i not in flags[1:]]
  xs = {p: x[:, keep] for p, x in xs.items()}
  assert res["features"] == len(keep) == len(clinical) + 3 + 1 + (row != "radiomics_rsf")
  by_id = table.set_index("patient_id")
  for o in ("os", "dm"):
    tr = by_id.loc[parts["train"]]
    y = Surv.from_arrays(event=tr[f"{o}_event"].astype(bool), time=tr[f"{o}_time"])
    model = RandomSurvivalForest(n_estimators=20, min_samples_leaf=10, max_features="sqrt",
                                 n_jobs=1, random_state=3).fit(xs["train"], y)
    np.testing.assert_allclose(res["test_risk"][o], model.predict(xs["test"]), rtol=1e-10)
    assert np.isfinite(res["test_risk"][o]).all()


def test_radiomics_rows_without_features_are_skipped():
  table, parts = _cohort()
  res = compare.classical_row("radiomics_rsf", table, parts, _config(), None)
  assert "no images" in res["skipped"]


def test_a_row_without_any_of_its_variables_is_skipped_with_the_reason():
  table, parts = _cohort()
  config = _config()
  config.compare.sarculator = ("histology",)
  res = compare.classical_row("sarculator_rsf", table, parts, config)
  assert "histology" in res["skipped"]


def test_paired_difference_uses_the_same_resamples_for_both_models():
  table, parts = _cohort()
  te = table.set_index("patient_id").loc[parts["test"]]
  d, e = te["os_time"].to_numpy(), te["os_event"].to_numpy()
  rng = np.random.default_rng(1)
  a = [-np.log(d) + rng.normal(0, 0.5, len(d)) for _ in range(2)]
  b = [rng.normal(size=len(d))]
  res = compare.paired_difference(d, e, a, b, n_resamples=50, seed=4)
  c = lambda r: metrics.concordance_index(d, e, r)
  assert res["diff"] == pytest.approx(np.mean([c(r) for r in a]) - c(b[0]), abs=1e-9)
  w = metrics.bootstrap_weights(len(d), 50, 4)
  reps = []
  for k in range(50):
    idx = np.repeat(np.arange(len(d)), w[k])
    reps.append(np.mean([metrics.concordance_index(d[idx], e[idx], r[idx]) for r in a])
                - metrics.concordance_index(d[idx], e[idx], b[0][idx]))
  assert res["ci"] == pytest.approx([np.percentile(reps, 2.5), np.percentile(reps, 97.5)],
                                    abs=1e-9)
  assert res["ci"][0] > 0  # A model close to the truth beats noise.


def test_compare_command_writes_every_row_reuses_them_and_refuses_another_config(tmp_path):
  config = tiny_mmnn_config(num_epochs=1)
  config.compare.coxnet = dict(l1_ratios=(0.5,), n_alphas=4, alpha_min_ratio=0.1, folds=3)
  rows = ["sarculator_coxph", "radiomics_rsf", "radiomics_clinical_coxnet", "mmnn", "oracle"]
  out = tmp_path / "cmp"
  df = compare.run_compare(config, out, seeds=1, rows=rows)
  assert list(df["row"]) == rows
  table = pd.read_csv(out / "table3.csv")
  assert list(table["row"]) == rows
  got = table.set_index("row")
  assert got["skipped"].isna().all(), got["skipped"]
  for r in rows:
    assert 0 <= got.loc[r, "cindex_os"] <= 1, r
  assert got.loc["radiomics_rsf", "variables"] == "radiomics (200)"
  assert got.loc["mmnn", "pretrained"] == False  # noqa: E712 (a CSV bool)
  for o in ("os", "dm"):
    fig = pd.read_csv(out / "figures" / f"fig2_{o}.csv")
    assert {"MMNN", "Radiomics, RSF"} <= set(fig["model"])
  md = (out / "table3.md").read_text()
  assert "figures/fig2_os.png" in md and "## Grad-CAM localisation" in md
  loc = json.loads((out / "localisation" / "mmnn_block_1.json").read_text())
  preds = pd.read_csv(out / "runs" / "mmnn" / "seed_0" / "predictions.csv")
  assert loc["n_patients"] == int((preds["split"] == "test").sum())
  assert set(loc["results"]) == {"increasing", "decreasing"} and loc["phantom"]
  assert got.loc["mmnn", "n_params"] > 0 and got.loc["mmnn", "saw_size_grade"] == "yes"
  assert got.loc["mmnn", "gflops_per_sample"] > 0
  assert np.isfinite(got.loc["sarculator_coxph", "mmnn_minus_row_os"])
  md = (out / "table3.md").read_text()
  assert "| Radiomics, RSF |" in md and "Paired bootstrap" in md
  assert (out / "runs" / "mmnn" / "seed_0" / "results.json").exists()
  # Rerun: every finished row is reused (no run is trained again).
  stamp = {p: p.stat().st_mtime_ns for p in (out / "rows").iterdir()}
  results = out / "runs" / "mmnn" / "seed_0" / "results.json"
  before = results.stat().st_mtime_ns
  df2 = compare.run_compare(config, out, seeds=1, rows=rows)
  assert results.stat().st_mtime_ns == before
  assert {p: p.stat().st_mtime_ns for p in (out / "rows").iterdir()} == stamp
  pd.testing.assert_frame_equal(df.reset_index(drop=True), df2.reset_index(drop=True))
  assert json.loads((out / "compare.json").read_text())["config"]["seed"] == config.seed
  other = tiny_mmnn_config(num_epochs=2)
  with pytest.raises(UserError, match="another config"):
    compare.run_compare(other, out, seeds=1, rows=rows)
  with pytest.raises(UserError, match="unknown rows"):
    compare.run_compare(config, tmp_path / "x", seeds=1, rows=["nope"])


def test_network_rows_differ_only_in_modalities_blending_and_seed():
  config = tiny_mmnn_config()
  rows = {r: compare.network_config(r, config, 2) for r in compare.NETWORKS}
  assert tuple(rows["densenet"].data.modalities) == ("image",)
  assert not rows["densenet"].blend.enabled and not rows["mmnn_noblend"].blend.enabled
  assert tuple(rows["mmnn_noblend"].data.modalities) == ("image", "clinical")
  assert rows["mmnn"].blend.enabled == config.blend.enabled
  assert all(c.seed == config.seed + 2 for c in rows.values())
  with pytest.raises(ValueError, match="not a network row"):
    compare.network_config("clinical_rsf", config, 0)
