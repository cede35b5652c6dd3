"""Tests for jaxsurv.fusion_train: the fusion-zoo trainer on one fold.

A small synthetic ``MultimodalCohort`` (clinical + omic tabular modalities
and a tiny WSI bag modality, outcome driven by one clinical feature) and
tiny models keep the file fast; references are hand computations (marginal
hazards, L1 sum), the loss on the unpadded rows, and invariance of training
to everything in the test part.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from configs import fusion as fusion_configs
from jaxsurv import fusion_train as ft
from jaxsurv.data import multimodal as mm
from jaxsurv.losses import discrete_time_nll
from jaxsurv.models.healnet import l1_penalty

TINY = {
    "concat": dict(embed_dim=4, snn_hidden=(4,), hidden=(4,), mil_fc_dim=4, mil_attn_dim=4),
    "cmmmf": dict(embed_dim=4, snn_hidden=(4,), attn_dim=4, mil_fc_dim=4, mil_attn_dim=4),
    "healnet": dict(depth=1, num_latents=2, latent_dim=4, cross_dim_head=4, cross_heads=1,
                    self_per_cross_attn=0, return_attention="mean"),
}


def synthetic_cohort(n=90, seed=0, modalities=("clinical", "omic"), wsi=False,
                     absent=None):
  """Cohort with risk driven by clinical feature 0; ``absent`` = {modality: rows}."""
  rng = np.random.default_rng(seed)
  ids = np.array([f"p{i:03d}" for i in range(n)])
  clin = rng.normal(size=(n, 3)).astype(np.float32)
  tab = {"clinical": clin, "omic": rng.normal(size=(n, 5)).astype(np.float32)}
  tab = {m: tab[m] for m in modalities}
  presence = {m: np.ones(n, bool) for m in tab}
  for m, rows in (absent or {}).items():
    presence[m][list(rows)] = False
    tab[m][list(rows)] = np.nan
  duration = rng.exponential(1000 * np.exp(-0.8 * clin[:, 0])) + 1
  event = (rng.random(n) < 0.5).astype(int)
  cohort = mm.MultimodalCohort(ids, tab, {}, presence, duration, event,
                               pd.DataFrame({"grp": rng.integers(0, 2, n)}))
  if wsi:
    bags = [rng.normal(size=(int(k), 3)) for k in rng.integers(1, 5, n)]
    cohort = cohort.with_bags("wsi", bags, max_tiles=4, rng=np.random.default_rng(0))
  return cohort


def tiny_config(name="concat", modalities="clinical+omic", **overrides):
  c = fusion_configs.base_config(name, "clinical+rna", local=True)
  mods = modalities.split("+")
  c.data.modalities = tuple(m for m in mods if m != "wsi")
  c.model = dict(TINY[name], name=name)
  c.num_epochs = 3
  c.batch_size = 16
  c.eval_batch_size = 32
  c.progress_bar = False
  c.data.n_folds = 3
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _split(cohort, fold=0, n_folds=3):
  return mm.cv_folds(cohort, n_folds, seed=0, val_fraction=0.2)[fold]


@pytest.fixture(scope="module")
def concat_trainer():
  cohort = synthetic_cohort()
  cfg = tiny_config("concat", selection="val_loss",
                    **{"early_stopping.patience": 0, "loss.l1": 1e-3})
  return ft.FusionTrainer(cfg, ft.model_modalities(cohort)), cohort


def test_train_and_evaluate_end_to_end_writes_outputs(tmp_path, monkeypatch):
  cohort = synthetic_cohort(wsi=True)
  monkeypatch.setattr(ft, "load_cohort", lambda config: cohort)
  cfg = tiny_config("healnet", "clinical+omic+wsi")
  cfg.data.n_folds = 3
  results = ft.train_and_evaluate(cfg, str(tmp_path))
  for name in ("config.json", "splits.json", "transform.json", "history.csv",
               "predictions.csv", "results.json", "healnet_attention_clinical.csv",
               "healnet_attention_omic.csv", "healnet_attention_wsi.csv"):
    assert (tmp_path / name).exists(), name
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["test"]["cindex"] == pytest.approx(results["test"]["cindex"])
  assert saved["modalities"] == ["clinical", "omic", "wsi"]
  split = mm.cv_folds(cohort, 3, seed=0, val_fraction=0.15)[0]
  pred = pd.read_csv(tmp_path / "predictions.csv")
  assert sorted(pred.loc[pred.split == "test", "patient_id"]) == sorted(split.test)
  assert sorted(pred.loc[pred.split == "val", "patient_id"]) == sorted(split.val)
  assert {"risk", "logit_3", "surv_3", "present_wsi"} <= set(pred.columns)
  # risk = -sum_k S_k, S from the logits.
  logits = pred[[f"logit_{k}" for k in range(4)]].to_numpy()
  s = np.cumprod(1.0 / (1.0 + np.exp(logits)), axis=1)
  np.testing.assert_allclose(pred["risk"], -s.sum(1), rtol=1e-5, atol=1e-6)
  # The whole-vector token of a tabular modality gets all the attention.
  att = pd.read_csv(tmp_path / "healnet_attention_clinical.csv")
  np.testing.assert_allclose(att["clinical"], 1.0, rtol=1e-5)
  bag = pd.read_csv(tmp_path / "healnet_attention_wsi.csv")
  assert (bag["effective_tiles"] <= bag["n_tiles"] + 1e-6).all()
  assert 0 <= results["best_epoch"] < 3


def test_cmmmf_writes_modality_and_tile_attention(tmp_path):
  cohort = synthetic_cohort(wsi=True)
  cfg = tiny_config("cmmmf", "clinical+omic+wsi", num_epochs=1)
  trainer = ft.FusionTrainer(cfg, ft.model_modalities(cohort))
  res, _ = ft.run_fold(trainer, cohort, _split(cohort), tmp_path)
  w = pd.read_csv(tmp_path / "modality_attention.csv")
  np.testing.assert_allclose(w[["weight_clinical", "weight_omic", "weight_wsi"]].sum(1), 1.0,
                             rtol=1e-5)
  tiles = pd.read_csv(tmp_path / "mil_attention_wsi.csv")
  n_tiles = cohort.bags["wsi"][1].sum(1)
  ids = dict(zip(cohort.patient_ids, n_tiles))
  assert (tiles["n_tiles"].to_numpy() == tiles["patient_id"].map(ids).to_numpy()).all()
  assert res["val"]["n"] + res["test"]["n"] == len(w)
  long = pd.read_csv(tmp_path / "mil_attention_tiles_wsi.csv")
  assert len(long) == tiles["n_tiles"].sum()
  np.testing.assert_allclose(long.groupby("patient_id")["weight"].sum(), 1.0, rtol=1e-5)
  for png in ("modality_attention.png", "mil_attention_tiles_wsi.png", "km_test_os.png",
              "training_curves.png"):
    assert (tmp_path / png).stat().st_size > 0, png


def test_selection_is_argmin_val_loss_and_ignores_the_test_part(concat_trainer):
  trainer, cohort = concat_trainer
  split = _split(cohort)
  run = trainer.fit(cohort, split)
  val_losses = [h["val_loss"] for h in run.history]
  assert run.best_epoch == int(np.argmin(val_losses))
  # The returned parameters are those of the best epoch: their val loss.
  res, _ = trainer.evaluate(run, cohort, "val")
  assert res["loss"] == pytest.approx(min(val_losses), rel=1e-5)
  # Scrambling everything about the test patients changes nothing in training.
  idx = cohort.indices(split)["test"]
  rng = np.random.default_rng(1)
  tab = {m: x.copy() for m, x in cohort.tabular.items()}
  for x in tab.values():
    x[idx] = rng.normal(size=(len(idx), x.shape[1])) * 100
  dur, ev = cohort.duration.copy(), cohort.event.copy()
  dur[idx] = rng.exponential(50, len(idx)) + 1
  ev[idx] = 1 - ev[idx]
  other = mm.MultimodalCohort(cohort.patient_ids, tab, {}, dict(cohort.presence), dur, ev,
                              cohort.covariates, cohort.feature_names)
  run2 = trainer.fit(other, split)
  assert run2.best_epoch == run.best_epoch
  assert [h["val_loss"] for h in run2.history] == val_losses
  jax.tree.map(np.testing.assert_array_equal, run2.params, run.params)


def test_early_stopping_on_val_cindex(concat_trainer):
  _, cohort = concat_trainer
  cfg = tiny_config("concat", num_epochs=6, selection="val_cindex",
                    **{"early_stopping.patience": 1, "loss.l1": 1e-3})
  trainer = ft.FusionTrainer(cfg, ft.model_modalities(cohort))
  # Same model, optimiser and loss: the compiled step is shared.
  assert trainer.train_step is concat_trainer[0].train_step
  run = trainer.fit(cohort, _split(cohort))
  cs = [h["val_cindex"] for h in run.history]
  assert run.best_epoch == int(np.argmax(cs))
  # Stopped exactly `patience` epochs after the best one (or ran to the end).
  assert len(run.history) == min(6, run.best_epoch + 2)


def test_train_step_adds_l1_once_and_pads_with_masked_rows(concat_trainer):
  tr, cohort = concat_trainer
  cfg = tr.config
  split = _split(cohort)
  idx = cohort.indices(split)
  tf = mm.FoldTransform.fit(cohort, idx["train"])
  part = tf.transform(cohort, idx["train"])
  state = tr.init_state(jax.random.key(0), part)
  params0 = jax.tree.map(np.array, state.params)
  sel = np.arange(5)  # 5 real rows padded to 16.
  batch = tr.batch(part, sel, 16)
  assert np.asarray(batch["mask"]).sum() == 5
  bw = jnp.asarray(tf.bin_weights, jnp.float32)
  _, meas = tr.train_step(state, batch, jax.random.key(3), jnp.float32(0.0), bw)
  expected_l1 = 1e-3 * float(l1_penalty(params0))
  assert float(meas["l1"]) == pytest.approx(expected_l1, rel=1e-5)
  assert float(meas["loss"]) == pytest.approx(float(meas["data_loss"]) + expected_l1, rel=1e-5)
  # The data loss is the mean over the 5 real rows (dropout: use eval outputs
  # of a no-dropout twin to check the masking itself).
  out, _ = tr.model.apply({"params": params0}, _sub(part["inputs"], sel),
                          _sub(part["presence"], sel), train=False)
  ref = discrete_time_nll(out, part["bin_index"][sel], part["event"][sel], alpha=cfg.loss.alpha)
  pad = tr.model.apply({"params": params0}, batch["inputs"], batch["presence"], train=False)[0]
  got = discrete_time_nll(pad, batch["bin_index"], batch["event"], alpha=cfg.loss.alpha,
                          mask=batch["mask"])
  assert float(got) == pytest.approx(float(ref), rel=1e-5)


def _sub(tree, sel):
  return jax.tree.map(lambda a: np.asarray(a)[sel], tree)


def test_drop_presence_never_drops_everything():
  n = 400
  pres = {"a": np.ones(n, bool), "b": np.r_[np.ones(n - 50, bool), np.zeros(50, bool)],
          "c": np.ones(n, bool)}
  pres["a"][:10] = False
  out = jax.jit(ft.drop_presence, static_argnums=2)(jax.random.key(0), pres, 1.0)
  kept = np.stack([np.asarray(out[m]) for m in pres], 1)
  had = np.stack([pres[m] for m in pres], 1)
  assert (kept <= had).all()
  np.testing.assert_array_equal(kept.sum(1), 1)  # p = 1: exactly one left each.
  half = ft.drop_presence(jax.random.key(1), pres, 0.5)
  kept = np.stack([np.asarray(half[m]) for m in pres], 1)
  assert (kept <= had).all() and (kept.sum(1) >= 1).all()
  assert 0.4 < kept.sum() / had.sum() < 0.7
  same = ft.drop_presence(jax.random.key(1), pres, 0.0)
  for m in pres:
    np.testing.assert_array_equal(np.asarray(same[m]), pres[m])


def test_marginal_hazard_logits_by_hand():
  # bins: 0,0,1,1,2,3 ; events at rows 0 (bin 0), 2 (bin 1), 5 (bin 3).
  b = np.array([0, 0, 1, 1, 2, 3])
  e = np.array([1, 0, 1, 0, 0, 1])
  h = np.array([1 / 6, 1 / 4, 1e-3, 1 - 1e-3])  # d/n, clipped.
  np.testing.assert_allclose(ft.marginal_hazard_logits(b, e, 4), np.log(h / (1 - h)))


def test_bad_configs_and_absent_modality_raise(concat_trainer):
  _, cohort = concat_trainer
  with pytest.raises(ValueError, match="model.name"):
    ft.build_model(tiny_config("concat", **{"model.name": "nope"}), ft.model_modalities(cohort))
  with pytest.raises(ValueError, match="derived"):
    ft.build_model(tiny_config("concat", **{"model.n_out": 2}), ft.model_modalities(cohort))
  with pytest.raises(ValueError, match="unimodal.*exactly one"):
    ft.build_model(tiny_config("concat", model={"name": "unimodal"}),
                   ft.model_modalities(cohort))
  with pytest.raises(ValueError, match="selection"):
    trainer = ft.FusionTrainer(tiny_config("concat", selection="test_cindex"),
                               ft.model_modalities(cohort))
    trainer.fit(cohort, _split(cohort))
  # A modality nobody in the training part has: a clear error naming it.
  split = _split(cohort)
  train_rows = cohort.indices(split)["train"]
  bad = synthetic_cohort(absent={"omic": train_rows})
  trainer = ft.FusionTrainer(tiny_config("concat"), ft.model_modalities(bad))
  with pytest.raises(ValueError, match="modality 'omic' has no present patients in the "
                                       "training part of fold 0"):
    trainer.fit(bad, split)


def test_configs_build_and_document_paper_settings():
  from configs import cmmmf, healnet, porpoise
  h = healnet.get_config()
  assert h.model.name == "healnet" and "trainer" not in h
  assert h.model.num_latents == 17 and h.model.latent_dim == 126 and h.loss.l1 == 6.8e-6
  assert h.loss.alpha == 0.4 and h.loss.bin_weights and h.optimizer.schedule == "onecycle"
  assert healnet.get_config("early_fusion").model.name == "early_fusion"
  c = cmmmf.get_config("modalities=rna+wsi")
  assert c.data.modalities == ("rna",) and c.data.wsi == "pam50" and c.model.embed_dim == 128
  p = porpoise.get_config("local,fusion=concat")
  assert p.model.fusion == "concat" and p.num_epochs == 30
  with pytest.raises(ValueError, match="modalities"):
    fusion_configs.get_config("modalities=clinical+ct")
  for cfg in (h, c, p, fusion_configs.get_config("model=unimodal,modalities=rna")):
    mods = tuple((m, "tabular") for m in cfg.data.modalities)
    if cfg.data.wsi:
      mods += (("wsi", "bag"),)
    ft.build_model(cfg, mods)  # Every config's model kwargs are valid fields.


def test_checkpointed_fold_resumes_after_a_kill_like_an_uninterrupted_run(tmp_path, monkeypatch):
  """Orbax latest + best for a fusion run: killed after epoch 1, rerun, same results."""
  from jaxsurv.trainer import loop
  cohort = synthetic_cohort(wsi=True)
  cfg = tiny_config("healnet", "clinical+omic+wsi", num_epochs=4, selection="val_loss")
  split = _split(cohort)
  trainer = ft.FusionTrainer(cfg, ft.model_modalities(cohort))
  full, run = ft.run_fold(trainer, cohort, split, tmp_path / "full", checkpoint=True)
  assert run.resumed_from is None
  assert (tmp_path / "full" / "checkpoints").is_dir()
  for part in ("val", "test"):  # The report every jaxsurv run gives.
    assert {"cindex", "cindex_uno", "ibs", "auc"} <= set(full[part]["os"])
    assert full[part]["os"]["cindex"] == pytest.approx(full[part]["cindex"])

  real = loop.epoch_order
  def killed(seed, epoch, n):
    if epoch == 2:
      raise KeyboardInterrupt("simulated kill")
    return real(seed, epoch, n)
  monkeypatch.setattr(loop, "epoch_order", killed)
  with pytest.raises(KeyboardInterrupt):
    ft.run_fold(trainer, cohort, split, tmp_path / "resumed", checkpoint=True)
  assert not (tmp_path / "resumed" / "results.json").exists()
  monkeypatch.setattr(loop, "epoch_order", real)
  resumed, run = ft.run_fold(trainer, cohort, split, tmp_path / "resumed", checkpoint=True)
  assert run.resumed_from == 2  # Epochs 0 and 1 came from the checkpoint.
  assert resumed["best_epoch"] == full["best_epoch"]
  for part in ("val", "test"):
    assert resumed[part]["loss"] == pytest.approx(full[part]["loss"], rel=1e-6)
    assert resumed[part]["os"] == full[part]["os"]
  a = pd.read_csv(tmp_path / "full" / "predictions.csv")
  b = pd.read_csv(tmp_path / "resumed" / "predictions.csv")
  np.testing.assert_allclose(b["risk"], a["risk"], rtol=1e-6)
  h_full = pd.read_csv(tmp_path / "full" / "history.csv")
  h_res = pd.read_csv(tmp_path / "resumed" / "history.csv")
  np.testing.assert_allclose(h_res["val_loss"], h_full["val_loss"], rtol=1e-6)


def test_report_uses_a_time_bin_models_own_survival_for_ibs():
  """IBS of the report == scikit-survival's on the step-function survival."""
  from sksurv.metrics import integrated_brier_score
  from sksurv.util import Surv
  from jaxsurv import evaluate, survival
  rng = np.random.default_rng(0)
  n = 120
  d = rng.exponential(1500, (n, 1)) + 1
  e = (rng.random((n, 1)) < 0.6).astype(int)
  logits = rng.normal(-1.5, 0.5, (n, 4))
  bins = survival.TimeBins.fit(d[:, 0], e[:, 0], 4)
  risk = survival.discrete_risk(logits)[:, None]
  tr, te = np.arange(80), np.arange(80, n)
  fns = {"train": lambda t: survival.discrete_survival_at(logits[tr], bins, t),
         "test": lambda t: survival.discrete_survival_at(logits[te], bins, t)}
  targets = {"train": (d[tr], e[tr], np.ones((80, 1), bool)),
             "test": (d[te], e[te], np.ones((40, 1), bool))}
  rep, _ = evaluate.report_outcomes(("os",), {"train": risk[tr], "test": risk[te]}, targets,
                                    horizons_years=(2.0,), parts=("test",), survival_fns=fns)
  t_max = d[tr, 0].max()
  late = d[te, 0] >= t_max
  dd, ee = np.where(late, np.nextafter(t_max, 0), d[te, 0]), np.where(late, 0, e[te, 0])
  lo, hi = np.percentile(d[te, 0], [10, 90])
  times = np.linspace(lo, min(hi, t_max * 0.999), 50)
  ref = integrated_brier_score(Surv.from_arrays(e[tr, 0].astype(bool), d[tr, 0]),
                               Surv.from_arrays(ee.astype(bool), dd),
                               survival.discrete_survival_at(logits[te], bins, times), times)
  assert rep["test"]["os"]["ibs"] == pytest.approx(ref, rel=1e-9)
  breslow, _ = evaluate.report_outcomes(("os",), {"train": risk[tr], "test": risk[te]}, targets,
                                        horizons_years=(2.0,), parts=("test",))
  assert breslow["test"]["os"]["ibs"] != pytest.approx(ref, rel=1e-6)
