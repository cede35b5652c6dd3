"""Tests for jaxsurv.cv: the cross-validation driver, Coxnet baseline and tables.

Synthetic cohorts stand in for TCGA-BRCA (``CohortCache(loader=...)``); the
Coxnet baseline is checked against scikit-survival used directly, the table
layout against hand-computed means and SDs.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler
from sksurv.linear_model import CoxnetSurvivalAnalysis
from sksurv.metrics import concordance_index_censored
from sksurv.util import Surv

from conftest import REPO, subprocess_pythonpath
from configs import fusion as fusion_configs
from jaxsurv import cv
from jaxsurv.data import multimodal as mm


def synthetic_loader(n=90, seed=0):
  """A ``load_tcga_brca``-like loader over synthetic tabular modalities."""

  def load(modalities=("clinical", "rna"), wsi=None, seed_=0, **_):
    rng = np.random.default_rng(seed)
    ids = np.array([f"p{i:03d}" for i in range(n)])
    clin = rng.normal(size=(n, 3)).astype(np.float32)
    rna = rng.normal(size=(n, 6)).astype(np.float32)
    rna[:, 0] += clin[:, 0]  # Some shared signal.
    duration = rng.exponential(1000 * np.exp(-0.8 * clin[:, 0] - 0.3 * rna[:, 1])) + 1
    event = (rng.random(n) < 0.5).astype(int)
    all_tab = {"clinical": clin, "rna": rna}
    tab = {m: all_tab[m] for m in modalities}
    return mm.MultimodalCohort(ids, tab, {}, {m: np.ones(n, bool) for m in tab}, duration,
                               event)

  return lambda modalities, wsi=None, seed=0, **kw: load(tuple(modalities), wsi, seed, **kw)


def tiny(model, modalities="clinical+rna", **over):
  c = fusion_configs.base_config(model, modalities, local=True)
  c.num_epochs = 2
  c.batch_size = 16
  c.eval_batch_size = 32
  c.progress_bar = False
  if model == "unimodal":
    c.model.update(snn_hidden=(4,))
  else:
    c.model.update(embed_dim=4, snn_hidden=(4,), hidden=(4,))
  for k, v in over.items():
    c[k] = v
  return c


def _cache():
  return cv.CohortCache(n_folds=3, fold_seed=0, val_fraction=0.2, loader=synthetic_loader())


def test_run_table_wires_train_rows_and_writes_the_table(tmp_path, monkeypatch):
  cache = _cache()
  calls = []
  real_fit = mm.FoldTransform.fit.__func__

  def spy(cls, cohort, train, **kw):
    calls.append((kw.get("fold"), np.asarray(train).copy(), cohort.n_patients))
    return real_fit(cls, cohort, train, **kw)

  monkeypatch.setattr(mm.FoldTransform, "fit", classmethod(spy))
  entries = [cv.Entry("concat", "clinical+rna", tiny("concat")),
             cv.Entry("coxnet", "clinical+rna"), cv.Entry("coxnet", "clinical")]
  df = cv.run_table(entries, tmp_path, cache=cache, progress=False)
  cohort = cache.cohort("clinical+rna")
  folds = cache.folds(cohort)
  assert len(calls) == 3 * 3
  for fold, train, _ in calls:
    idx = cohort.indices(folds[fold])
    np.testing.assert_array_equal(np.sort(train), np.sort(idx["train"]))
    assert not set(train) & (set(idx["test"]) | set(idx["val"]))
  # Per-fold outputs and the long table.
  assert len(df) == 9 and set(df["fold"]) == {0, 1, 2}
  for k in range(3):
    res = json.loads((tmp_path / "runs" / "concat__clinical-rna" / f"fold{k}" /
                      "results.json").read_text())
    row = df[(df.model == "concat") & (df.fold == k)].iloc[0]
    assert row["test_cindex"] == pytest.approx(res["test"]["cindex"])
    assert res["test"]["n"] == len(folds[k].test)
  summary = pd.read_csv(tmp_path / "summary.csv")
  assert list(summary.columns) == ["Model", "Backbone", "Fusion", "clinical+rna", "clinical"]
  assert list(summary["Model"]) == ["Concatenation", "Coxnet"]
  assert summary.loc[0, "clinical"] == "–"
  md = (tmp_path / "table.md").read_text()
  assert "| Model | Backbone | Fusion | clinical+rna | clinical |" in md
  paired = pd.read_csv(tmp_path / "paired.csv")
  assert list(paired["Model"]) == ["Concatenation"] and paired.loc[0, "folds"] == 3
  assert "minus Coxnet" in md
  cv.write_table(df[df.model != "coxnet"], tmp_path)  # Without Coxnet: no stale paired.csv.
  assert not (tmp_path / "paired.csv").exists()
  assert "minus Coxnet" not in (tmp_path / "table.md").read_text()
  # Resume: a second run with the same configs reuses every fold.
  before = (tmp_path / "runs" / "concat__clinical-rna" / "fold0" / "results.json").stat()
  cv.run_table(entries[:1], tmp_path / ".", cache=cache, progress=False)
  after = (tmp_path / "runs" / "concat__clinical-rna" / "fold0" / "results.json").stat()
  assert before.st_mtime_ns == after.st_mtime_ns


def test_coxnet_matches_scikit_survival_directly():
  cache = _cache()
  cohort = cache.cohort("clinical+rna")
  split = cache.folds(cohort)[1]
  res = cv.coxnet_fold(cohort, split, l1_ratio=0.5, n_alphas=20, alpha_min_ratio=0.05)
  idx = cohort.indices(split)
  x = np.concatenate([cohort.tabular["clinical"], cohort.tabular["rna"]], 1).astype(np.float64)
  scaler = StandardScaler().fit(x[idx["train"]])
  y = Surv.from_arrays(cohort.event[idx["train"]].astype(bool), cohort.duration[idx["train"]])
  ref = CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=20, alpha_min_ratio=0.05,
                               max_iter=100_000).fit(scaler.transform(x[idx["train"]]), y)

  def c_of(part, alpha):
    r = ref.predict(scaler.transform(x[idx[part]]), alpha=alpha)
    return concordance_index_censored(cohort.event[idx[part]].astype(bool),
                                      cohort.duration[idx[part]], r)[0]

  val_c = [c_of("val", a) for a in ref.alphas_]
  best = ref.alphas_[int(np.argmax(val_c))]  # First maximum: the larger alpha.
  assert res["alpha"] == pytest.approx(best)
  assert res["val"]["cindex"] == pytest.approx(max(val_c))
  assert res["test"]["cindex"] == pytest.approx(c_of("test", best))
  assert res["n_features"] == 9 and 0 <= res["n_nonzero"] <= 9


def test_summary_table_means_and_sds():
  df = pd.DataFrame({
      "model": ["healnet"] * 3 + ["coxnet"] * 5,
      "modalities": ["clinical+rna"] * 3 + ["clinical"] * 2 + ["clinical+rna"] * 3,
      "fold": [0, 1, 2, 0, 1, 0, 1, 2],
      "test_cindex": [0.7, 0.8, 0.75, 0.6, 0.7, 0.71, 0.73, None],
  })
  t = cv.summary_table(df)
  assert list(t.columns) == ["Model", "Backbone", "Fusion", "clinical+rna", "clinical"]
  assert t.loc[0, "clinical+rna"] == f"0.750 ± {np.std([0.7, 0.8, 0.75], ddof=1):.3f}"
  assert t.loc[0, "clinical"] == "–"
  assert t.loc[1, "clinical"] == f"0.650 ± {np.std([0.6, 0.7], ddof=1):.3f}"
  assert t.loc[1, "clinical+rna"] == f"0.720 ± {np.std([0.71, 0.73], ddof=1):.3f}"  # None skipped.
  md = cv.to_markdown(t)
  assert md.splitlines()[0] == "| Model | Backbone | Fusion | clinical+rna | clinical |"


def test_paired_table_differences_to_coxnet_by_hand():
  df = pd.DataFrame({
      "model": ["healnet"] * 3 + ["coxnet"] * 3 + ["concat"] * 2 + ["coxnet"],
      "modalities": ["clinical+rna"] * 8 + ["clinical"],
      "fold": [0, 1, 2, 0, 1, 2, 0, 2, 0],
      "test_cindex": [0.7, 0.8, 0.75, 0.72, 0.70, 0.80, 0.71, None, 0.9],
  })
  t = cv.paired_table(df)
  assert list(t["Model"]) == ["HEALNet", "Concatenation"]
  d = np.array([0.7 - 0.72, 0.8 - 0.70, 0.75 - 0.80])
  assert t.loc[0, "difference"] == f"{d.mean():.3f} ± {d.std(ddof=1):.3f}"
  assert t.loc[0, "better"] == "1/3" and t.loc[0, "folds"] == 3
  # Fold 2 of concat is undefined: one pair left, no SD.
  assert t.loc[1, "difference"] == f"{0.71 - 0.72:.3f}" and t.loc[1, "better"] == "0/1"
  assert cv.paired_table(df[df.model != "coxnet"]).empty


def test_missing_masks_are_shared_and_p1_keeps_one_modality():
  pres = {"clinical": np.ones(50, bool), "rna": np.ones(50, bool)}
  a = cv.missing_masks(pres, 0.5, seed=0, fold=1, repeat=2)
  b = cv.missing_masks(pres, 0.5, seed=0, fold=1, repeat=2)
  for m in pres:
    np.testing.assert_array_equal(a[m], b[m])
  one = cv.missing_masks(pres, 1.0, seed=0, fold=0, repeat=0)
  np.testing.assert_array_equal(one["clinical"].astype(int) + one["rna"], 1)
  assert 10 < one["clinical"].sum() < 40
  none = cv.missing_masks(pres, 0.0, seed=0, fold=0, repeat=0)
  assert all(none[m].all() for m in pres)


def test_run_missing_tiny(tmp_path, monkeypatch):
  cache = _cache()
  configs = {("concat", "clinical+rna"): tiny("concat"),
             ("unimodal", "clinical"): tiny("unimodal", "clinical"),
             ("unimodal", "rna"): tiny("unimodal", "rna")}
  monkeypatch.setattr(cv, "entry_config",
                      lambda model, mods, **kw: configs[model, mods].copy_and_resolve_references())
  df = cv.run_missing(["concat"], "clinical+rna", tmp_path, ps=(0.0, 1.0), repeats=2,
                      folds=[0], cache=cache, progress=False)
  assert set(df["model"]) == {"concat", "late_unimodal"}
  full = df[(df.model == "concat") & (df.p == 0.0)].iloc[0]
  res = json.loads((tmp_path / "runs" / "concat__clinical-rna" / "fold0" /
                    "results.json").read_text())
  assert full["test_cindex"] == pytest.approx(res["test"]["cindex"])
  assert df[df.p == 1.0]["present_fraction"].tolist() == pytest.approx([0.5, 0.5])
  table = pd.read_csv(tmp_path / "missing.csv")
  assert list(table.columns) == ["Model", "Missing modality handling", "all present (p=0)",
                                 "one modality each (p=1)"]
  # Late fusion at p=0 is the mean of the two unimodal risks: recompute it.
  preds = {m: pd.read_csv(tmp_path / "runs" / f"unimodal__{m}" / "fold0" / "predictions.csv")
           for m in ("clinical", "rna")}
  t = {m: p[p.split == "test"].set_index("patient_id") for m, p in preds.items()}
  ids = t["clinical"].index
  risk = (t["clinical"]["risk"] + t["rna"].loc[ids, "risk"]) / 2
  c = concordance_index_censored(t["clinical"]["event"].astype(bool),
                                 t["clinical"]["duration"], risk.to_numpy())[0]
  late = df[(df.model == "late_unimodal") & (df.p == 0.0)].iloc[0]
  assert late["test_cindex"] == pytest.approx(c, rel=1e-6)
  with pytest.raises(ValueError, match=">= 2 modalities"):
    cv.run_missing(["concat"], "clinical", tmp_path, cache=cache)


def test_entries_and_overrides():
  entries = cv.parse_entries(["healnet@clinical+rna", "coxnet@rna"],
                             overrides=["num_epochs=3", "optimizer.lr=0.01"])
  assert entries[0].config.model.name == "healnet" and entries[0].config.num_epochs == 3
  assert entries[0].config.optimizer.lr == 0.01 and entries[1].config is None
  assert cv.modality_label(entries[0].config) == "clinical+rna"
  with pytest.raises(ValueError, match="model@modalities"):
    cv.parse_entries(["healnet"])
  with pytest.raises(ValueError, match="unknown model"):
    cv.parse_entries(["transformer@rna"])
  with pytest.raises(ValueError, match="unknown config field"):
    cv.parse_entries(["concat@rna"], overrides=["optimizer.nope=1"])
  with pytest.raises(ValueError, match="modalities='rna\\+foo'"):
    cv.parse_entries(["concat@rna+foo"])
  with pytest.raises(ValueError, match="invalid literal for int"):
    cv.parse_entries(["concat@rna"], overrides=["num_epochs=many"])
  cfg = cv.entry_config("cmmmf", "rna+wsi")
  assert cv.modality_label(cfg) == "rna+wsi" and cfg.model.name == "cmmmf"
  # Named config variants: their own rows, keys and labels; the config is the variant's.
  from configs import healnet as healnet_configs
  local, paper, released = cv.parse_entries(
      ["healnet@clinical+rna", "healnet:paper@clinical+rna", "healnet:released@clinical+rna"])
  assert paper.config.to_dict() == healnet_configs.get_config(
      "modalities=clinical+rna,paper").to_dict()
  assert released.config.to_dict() == healnet_configs.get_config("modalities=clinical+rna").to_dict()
  assert local.config.to_dict() == healnet_configs.get_config(
      "modalities=clinical+rna,local").to_dict()
  assert (paper.model, paper.key) == ("healnet:paper", "healnet-paper__clinical-rna")
  assert local.key == "healnet__clinical-rna"  # earlier runs' folders are reused
  assert cv.model_label("healnet:paper")[0] == "HEALNet (paper)"
  assert cv.model_label("healnet")[:2] == ("HEALNet", "HEALNet")
  with pytest.raises(ValueError, match="unknown variant 'tuned'"):
    cv.parse_entries(["healnet:tuned@clinical+rna"])
  with pytest.raises(ValueError, match="unknown variant"):
    cv.parse_entries(["concat:paper@clinical+rna"])
  # Overrides are typed by the field (as --config.x=y): a tuple, a new model kwarg.
  cfg = cv.apply_overrides(cfg, ["data.stratify=('event', 'pam50')", "model.new_kwarg=(1, 2)",
                                 "train.input_noise=0.1"])
  assert cfg.data.stratify == ("event", "pam50") and cfg.model.new_kwarg == (1, 2)
  assert cfg.train.input_noise == 0.1


# ----------------------------------------------------------------------------
# Command line (absl flags; ml_collections config file; errors end through jaxsurv.cli).
# ----------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch, tmp_path):
  """Replaces run_table / run_missing by recorders; restores the JAX cache settings."""
  import jax
  calls = {}

  def table(entries, out, **kw):
    calls["table"] = (entries, pathlib.Path(out), kw)
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out) / "table.md").write_text("table")

  def missing(models, modalities, out, **kw):
    calls["missing"] = (models, modalities, pathlib.Path(out), kw)
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(out) / "missing.md").write_text("missing")

  monkeypatch.setattr(cv, "run_table", table)
  monkeypatch.setattr(cv, "run_missing", missing)
  monkeypatch.setenv("JAXSURV_CACHE", str(tmp_path / "cache"))
  monkeypatch.chdir(REPO)  # The documented commands run from the repository root.
  saved = (jax.config.jax_compilation_cache_dir,
           jax.config.jax_persistent_cache_min_compile_time_secs)
  yield calls
  jax.config.update("jax_compilation_cache_dir", saved[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", saved[1])


def test_cli_documented_commands(captured, tmp_path, capsys):
  import jax
  out = tmp_path / "cv_table"
  assert cv.main(["table", "--with-wsi", f"--out={out}"]) == 0
  entries, where, kw = captured["table"]
  assert where == out and capsys.readouterr().out.startswith("table")
  assert [f"{e.model}@{e.modalities}" for e in entries] == list(cv.TABLE_ENTRIES + cv.WSI_ENTRIES)
  healnet = next(e for e in entries if e.model == "healnet")
  assert healnet.config.num_epochs == 10  # The local variant.
  assert kw["resume"] and kw["folds"] is None and kw["cache"].n_folds == 5
  assert kw["coxnet_kwargs"] == {"l1_ratio": 0.5}
  # Every command's compilation cache (jaxsurv.cli.run) honours $JAXSURV_CACHE; off on request.
  from jaxsurv import cli
  folder = cli.setup_compilation_cache(True)
  assert folder == tmp_path / "cache" / "jax_compilation_cache" and folder.is_dir()
  assert jax.config.jax_compilation_cache_dir == str(folder)
  enabled = jax.config.jax_enable_compilation_cache
  try:
    assert cli.setup_compilation_cache(False) is None
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)

  assert cv.main(["table", "--config=configs/healnet.py:local", "--config.num_epochs=3",
                  "--set", "optimizer.lr=0.01", "--folds=0,1", "--no-resume", "--n-folds", "3",
                  f"--out={out}"]) == 0
  entries, _, kw = captured["table"]
  assert len(entries) == 1 and entries[0].model == "healnet"
  assert entries[0].config.num_epochs == 3 and entries[0].config.optimizer.lr == 0.01
  assert kw["folds"] == [0, 1] and not kw["resume"] and kw["cache"].n_folds == 3

  assert cv.main(["table", "--entries=concat@clinical,coxnet@clinical", "--no-coxnet",
                  "--config=configs/cmmmf.py:local,modalities=rna", f"--out={out}"]) == 0
  assert [f"{e.model}@{e.modalities}" for e in captured["table"][0]] == [
      "concat@clinical", "cmmmf@rna"]

  assert cv.main(["missing", f"--out={tmp_path / 'missing'}", "--p=0,1", "--repeats=2"]) == 0
  models, modalities, where, kw = captured["missing"]
  assert models == list(cv.MISSING_MODELS) and modalities == "clinical+rna"
  assert kw["ps"] == [0.0, 1.0] and kw["repeats"] == 2 and kw["late_unimodal"]


def test_cli_bad_command_lines(captured, tmp_path, capsys):
  out = f"--out={tmp_path / 'o'}"
  assert cv.main([out]) == 1 and "expected one command" in capsys.readouterr().err
  assert cv.main(["table", "--models=concat", out]) == 1
  assert "--models belongs to the other command" in capsys.readouterr().err
  assert cv.main(["table"]) == 1 and "out" in capsys.readouterr().err  # --out is required.
  assert cv.main(["table", "--set", "nope=1", out]) == 2
  assert capsys.readouterr().err.strip() == (
      "jaxsurv: error: override 'nope=1': unknown config field 'nope'")
  assert cv.main(["table", "--folds=0,x", out]) == 2
  assert "--folds: expected comma-separated integers" in capsys.readouterr().err
  assert cv.main(["table", "--config=configs/nope.py", out]) == 2
  assert "--config: the config file could not be loaded" in capsys.readouterr().err
  assert not captured


def test_cli_as_a_module_ends_with_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "jaxsurv.cv", "table", "--entries=healnet",
                         f"--out={tmp_path / 'o'}"], capture_output=True, text=True, timeout=300,
                        cwd=REPO, env=dict(os.environ, PYTHONPATH=subprocess_pythonpath(),
                                           JAXSURV_CACHE=str(tmp_path / "cache")))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines() == [
      "jaxsurv: error: entry 'healnet' must be model@modalities, e.g. healnet@clinical+rna"]
  assert not (tmp_path / "o").exists()


def test_attention_stability_across_folds(tmp_path):
  """Per-fold rankings on disk -> combined ranking, overlaps and the table.md section."""
  entry = cv.Entry("healnet:paper", "clinical+rna")
  feats = [f"g{j}" for j in range(8)]
  orders = {0: feats, 1: feats[1::-1] + feats[2:], 2: feats[::-1]}
  for k, order in orders.items():
    wd = tmp_path / "runs" / entry.key / f"fold{k}"
    wd.mkdir(parents=True)
    pd.DataFrame({"feature": order, "mean_attention": np.linspace(0.3, 0.05, 8),
                  "rank": range(8), "n_patients": 5}).to_csv(
                      wd / "healnet_feature_ranking_rna_test.csv", index=False)
  rows = cv.attention_stability(tmp_path, entry, [0, 1, 2])
  (row,) = rows
  assert row["top k"] == 2 == cv.stability_top_k(8)  # 8 // 4
  # Top 2: {g0, g1} in folds 0 and 1, {g7, g6} in fold 2.
  assert row["mean overlap"] == "0.33" and row["min overlap"] == "0.00"
  assert row["chance"] == "0.25" and row["in every fold's top k"] == 0
  summary = json.loads((tmp_path / "attention" / entry.key / "stability_rna.json").read_text())
  assert summary["pairwise_overlap"] == {"0-1": 1.0, "0-2": 0.0, "1-2": 0.0}
  combined = pd.read_csv(tmp_path / "attention" / entry.key / "feature_ranking_rna.csv")
  assert list(combined.columns[:4]) == ["feature", "mean_attention", "mean_rank", "top_k_folds"]
  # An entry without per-feature attention gives nothing.
  assert cv.attention_stability(tmp_path, cv.Entry("concat", "clinical+rna"), [0, 1, 2]) == []
  df = pd.DataFrame([{"model": "healnet:paper", "modalities": "clinical+rna", "fold": k,
                      "val_cindex": 0.7, "test_cindex": 0.6} for k in range(3)])
  cv.write_table(df, tmp_path, stability=pd.DataFrame(rows))
  text = (tmp_path / "table.md").read_text()
  assert "HEALNet (paper)" in text and "top-k features" in text
  assert (tmp_path / "attention_stability.csv").exists()
