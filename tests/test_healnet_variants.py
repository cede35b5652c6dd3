"""Tests for the HEALNet config variants of configs/healnet.py.

``released`` (= the plain default) and ``local`` are checked against
snapshots of ``get_config(...).to_dict()`` taken before the variants were
added (full literals for the default and ``local`` on clinical + RNA,
sha256 digests of a canonical repr for other argument combinations), so a
silent change to an existing command's meaning fails here. ``paper`` is
checked for what the paper (Hemker et al., "HEALNet: Multimodal Fusion for
Heterogeneous Biomedical Data", NeurIPS 2024, Table 5 and Algorithm 1) asks:
shared weights (parameter count flat in depth), 8 heads, per-feature tokens,
U(0, 1) latents, L1 + L2, Adam beta1 0.92; one training epoch on a tiny
synthetic cohort gives finite losses. The attention inspection (Fig. 3) is
checked on a synthetic cohort where two known features of 24 carry the
hazard: trained with per-feature tokens, HEALNet's mean attention must rank
exactly those two first.
"""

import hashlib

import jax
import numpy as np
import pytest

from configs import healnet as healnet_configs
from jaxsurv import fusion_train as ft
from jaxsurv.trainer import optim
from test_fusion_train import _split, synthetic_cohort

MODS = (("clinical", "tabular"), ("rna", "tabular"))
N_CLIN, N_RNA = 20, 200
VARIANTS = ("released", "paper", "local")

# configs/healnet.py get_config().to_dict() before the variants existed.
DEFAULT_SNAPSHOT = {
    'batch_size': 4,
    'data': {'cohort': 'tcga_brca', 'fold': 0, 'fold_seed': 0,
             'modalities': ('clinical', 'rna'), 'n_bins': 4, 'n_folds': 5,
             'stratify': ('event',), 'val_fraction': 0.15, 'wsi': None,
             'wsi_kwargs': {'wsi_dim': 384, 'wsi_max_tiles': 300, 'wsi_tiles': (50, 300)},
             'wsi_seed': 0},
    'drop_remainder': False,
    'early_stopping': {'min_delta': 0.0, 'min_epochs': 0, 'patience': 5},
    'eval': {'bootstrap_resamples': 200, 'horizons_years': (2.0, 5.0)},
    'eval_batch_size': 128, 'grad_accum_steps': 1, 'log_every_steps': 0,
    'loss': {'alpha': 0.4, 'bin_weights': True, 'l1': 6.8e-06, 'l1_include': 'all',
             'name': 'nll', 'ties': 'breslow'},
    'model': {'attn_dropout': 0.455, 'cross_dim_head': 63, 'cross_heads': 1, 'depth': 2,
              'ff_dropout': 0.365, 'fourier_encode_data': True, 'latent_dim': 126,
              'max_freq': 2.0, 'name': 'healnet', 'num_freq_bands': 2, 'num_latents': 17,
              'return_attention': 'mean', 'self_per_cross_attn': 0, 'snn': True,
              'weight_sharing': 'none'},
    'num_epochs': 50,
    'optimizer': {'clip_norm': 0.0, 'div_factor': 25.0, 'final_div_factor': 10000.0,
                  'final_lr_fraction': 0.0, 'lr': 0.008, 'name': 'adam', 'pct_start': 0.3,
                  'schedule': 'onecycle', 'warmup_epochs': 0, 'weight_decay': 0.0},
    'progress_bar': True, 'seed': 0, 'selection': 'val_loss',
    'train': {'init_output_bias': False, 'input_noise': 0.0, 'modality_dropout': 0.0},
}
# get_config("local").to_dict() before the variants existed.
LOCAL_SNAPSHOT = {
    'batch_size': 32,
    'data': {'cohort': 'tcga_brca', 'fold': 0, 'fold_seed': 0,
             'modalities': ('clinical', 'rna'), 'n_bins': 4, 'n_folds': 5,
             'stratify': ('event',), 'val_fraction': 0.15, 'wsi': None,
             'wsi_kwargs': {'wsi_dim': 384, 'wsi_max_tiles': 64, 'wsi_tiles': (50, 300)},
             'wsi_seed': 0},
    'drop_remainder': False,
    'early_stopping': {'min_delta': 0.0, 'min_epochs': 0, 'patience': 0},
    'eval': {'bootstrap_resamples': 200, 'horizons_years': (2.0, 5.0)},
    'eval_batch_size': 128, 'grad_accum_steps': 1, 'log_every_steps': 0,
    'loss': {'alpha': 0.4, 'bin_weights': True, 'l1': 0.0001, 'l1_include': 'all',
             'name': 'nll', 'ties': 'breslow'},
    'model': {'attn_dropout': 0.455, 'cross_dim_head': 63, 'cross_heads': 1, 'depth': 2,
              'ff_dropout': 0.365, 'fourier_encode_data': True, 'latent_dim': 126,
              'max_freq': 2.0, 'name': 'healnet', 'num_freq_bands': 2, 'num_latents': 17,
              'return_attention': 'mean', 'self_per_cross_attn': 0, 'snn': True,
              'weight_sharing': 'none'},
    'num_epochs': 10,
    'optimizer': {'clip_norm': 0.0, 'div_factor': 25.0, 'final_div_factor': 10000.0,
                  'final_lr_fraction': 0.05, 'lr': 0.003, 'name': 'adamw', 'pct_start': 0.3,
                  'schedule': 'cosine', 'warmup_epochs': 1, 'weight_decay': 0.01},
    'progress_bar': True, 'seed': 0, 'selection': 'last',
    'train': {'init_output_bias': True, 'input_noise': 0.0, 'modality_dropout': 0.2},
}
# sha256 of _canonical(get_config(arg).to_dict()) before the variants existed.
SNAPSHOT_DIGESTS = {
    "": "2257733291e4c8f5d762bca85f089e29bf6e1974e08e74edc293bf2bbd7c5d5d",
    "modalities=clinical+rna+wsi":
        "a131307ad7ee546584563fbba77c1e34cb5f68336c0f11e7af918d33b49cb719",
    "fold=2": "7015ddd6f1256fed0a2a25584208bdcd8065a335264e82af5b33eb89bb068589",
    "loss=cox": "0d5c5b4aed12ab067ad892d939f431fdb123ebc6dcbeb2fc357d88d129b7ad18",
    "early_fusion": "a3c159b0d9f0f63b4cb097aeb4c750a06995f5634d1882d2f94af3c3b87b60dd",
    "modalities=rna,fold=3": "9687e1c5e77e870947db728b87c84b31b9a7f91a69d6b0e720f89b50779326d3",
    "local": "0085be58229edfbb1087e5e4f5888c4ca008ec8cc7b74388cbfc747826a183e3",
    "local,modalities=clinical+rna+wsi":
        "f9f7e5fc99b100ddc71bffbc2ade52b79b71e3be7a3209840d69e4330720cd4a",
    "local,fold=4": "a2d451be7caa9c563901e70d423afe27b477da0ac42359a8cae1cb44854555c9",
    "local,early_fusion": "32334ea842b753c8f57e4359cb1631a681371b43d44b6972716e993968d1859f",
    "local,loss=cox": "573b492c85c627408ca5d183ce6b1f4bcfc2c6accd7fec5a4ed74b034e9e9bfa",
}


def _canonical(x) -> str:
  """repr with dict keys sorted at every level (tuples and lists kept apart)."""
  if isinstance(x, dict):
    return "{" + ", ".join(f"{k!r}: {_canonical(v)}" for k, v in sorted(x.items())) + "}"
  if isinstance(x, (list, tuple)):
    body = ", ".join(_canonical(v) for v in x)
    if isinstance(x, list):
      return "[" + body + "]"
    return "(" + body + ("," if len(x) == 1 else "") + ")"
  return repr(x)


def _digest(arg: str) -> str:
  d = healnet_configs.get_config(arg or None).to_dict()
  return hashlib.sha256(_canonical(d).encode()).hexdigest()


def _inputs(batch=2):
  r = np.random.default_rng(0)
  inputs = {"clinical": r.normal(size=(batch, N_CLIN)).astype(np.float32),
            "rna": r.normal(size=(batch, N_RNA)).astype(np.float32)}
  presence = {m: np.ones(batch, bool) for m, _ in MODS}
  return inputs, presence


def _shapes(config):
  """``(model, params ShapeDtypeStructs, (out, aux) shapes)`` without computing."""
  model = ft.build_model(config, MODS)
  inputs, presence = _inputs()
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs, presence,
                                                train=False))
  out = jax.eval_shape(lambda v: model.apply(v, inputs, presence, train=False), variables)
  return model, variables["params"], out


def _n_params(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


# ------------------------------------------------------------------ snapshots


def test_released_and_default_equal_the_pre_variant_default():
  assert healnet_configs.get_config().to_dict() == DEFAULT_SNAPSHOT
  assert healnet_configs.get_config("released").to_dict() == DEFAULT_SNAPSHOT
  assert healnet_configs.get_config(None).to_dict() == DEFAULT_SNAPSHOT


def test_local_equals_the_pre_variant_local():
  assert healnet_configs.get_config("local").to_dict() == LOCAL_SNAPSHOT


@pytest.mark.parametrize("arg", sorted(SNAPSHOT_DIGESTS))
def test_combinations_match_pre_variant_snapshots(arg):
  assert _digest(arg) == SNAPSHOT_DIGESTS[arg], arg
  if not arg.startswith("local"):  # "released" spelled out changes nothing.
    assert _digest(",".join(filter(None, ["released", arg]))) == SNAPSHOT_DIGESTS[arg]


def test_canonical_digest_sees_changes():
  # The digest is not blind: one changed leaf, or a tuple turned into a list,
  # changes it.
  d = dict(DEFAULT_SNAPSHOT)
  assert hashlib.sha256(_canonical(d).encode()).hexdigest() == SNAPSHOT_DIGESTS[""]
  d["batch_size"] = 8
  assert hashlib.sha256(_canonical(d).encode()).hexdigest() != SNAPSHOT_DIGESTS[""]
  assert _canonical((1,)) != _canonical([1])


def test_variants_are_exclusive_and_combine_with_other_arguments():
  with pytest.raises(ValueError, match="at most one"):
    healnet_configs.get_config("paper,local")
  with pytest.raises(ValueError, match="at most one"):
    healnet_configs.get_config("released,paper")
  c = healnet_configs.get_config("paper,modalities=clinical+rna+wsi,fold=2")
  assert c.data.fold == 2 and c.data.wsi == "pam50"
  assert c.model.weight_sharing == "all"
  e = healnet_configs.get_config("paper,early_fusion")
  assert e.model.name == "early_fusion" and e.model.tabular_tokens == "features"


# ------------------------------------------------------------------- paper


def test_paper_config_values():
  c = healnet_configs.get_config("paper")
  released = healnet_configs.get_config("released")
  m = c.model
  assert (m.weight_sharing, m.cross_heads, m.cross_dim_head, m.tabular_tokens,
          m.feature_embed_dim, m.latent_init) == ("all", 8, 63, "features", 8, "uniform")
  assert (m.depth, m.num_latents, m.latent_dim) == (2, 17, 126)  # Table 5, BRCA.
  assert (m.attn_dropout, m.ff_dropout) == (0.46, 0.36)
  assert m.self_per_cross_attn == 0  # Algorithm 2 has no latent self-attention.
  assert c.loss.to_dict() == dict(released.loss.to_dict(), l1=6e-6)
  assert (c.loss.name, c.loss.bin_weights) == ("nll", True)
  o = c.optimizer
  assert (o.name, o.lr, o.schedule, o.b1, o.weight_decay) == ("adam", 0.008, "onecycle", 0.92,
                                                             2.6e-4)
  assert (c.batch_size, c.num_epochs, c.early_stopping.patience, c.selection) == (
      8, 50, 5, "val_loss")
  # The trainer's optimiser reads b1 and the (coupled, "adam") L2.
  assert optim.optimizer_spec(c)[:3] == ("adam", 2.6e-4, 0.92)
  assert optim.optimizer_spec(released)[:3] == ("adam", 0.0, 0.9)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_builds_for_clinical_and_rna(variant):
  c = healnet_configs.get_config(variant)
  model, params, (out, aux) = _shapes(c)
  assert out.shape == (2, 4)
  assert params["latents"].shape == (17, 126)
  kv = {m: params[f"cross_0_{m}"]["attn"]["to_kv"]["kernel"].shape for m, _ in MODS}
  q = params["cross_0_rna"]["attn"]["to_q"]["kernel"].shape
  # Fourier features of the (one or per-feature) token position: 2 * 2 + 1.
  if variant == "paper":
    assert model.latent_init == "uniform"
    # Value + Fourier position + the 8-dim learned feature embedding.
    assert kv == {"clinical": (1 + 5 + 8, 2 * 8 * 63), "rna": (1 + 5 + 8, 2 * 8 * 63)}
    assert params["feature_embed_rna"].shape == (N_RNA, 8)
    assert params["feature_embed_clinical"].shape == (N_CLIN, 8)
    assert q == (126, 8 * 63)
    assert aux["attention"]["layer0/rna"].shape == (2, N_RNA)  # one weight per feature
    assert aux["attention"]["layer1/clinical"].shape == (2, N_CLIN)
    assert sorted(k for k in params if k.startswith("cross")) == [
        "cross_0_clinical", "cross_0_rna"]  # both layers use one set
  else:
    assert model.latent_init == "normal"
    assert kv == {"clinical": (N_CLIN + 5, 2 * 63), "rna": (N_RNA + 5, 2 * 63)}
    assert q == (126, 63)
    assert aux["attention"]["layer0/rna"].shape == (2, 1)  # the whole vector
    assert sorted(k for k in params if k.startswith("cross")) == [
        "cross_0_clinical", "cross_0_rna", "cross_1_clinical", "cross_1_rna"]


def test_paper_parameter_count_does_not_grow_with_depth():
  counts = {}
  for variant in ("paper", "released"):
    for depth in (1, 3):
      c = healnet_configs.get_config(variant)
      c.model.depth = depth
      counts[variant, depth] = _n_params(_shapes(c)[1])
  assert counts["paper", 1] == counts["paper", 3]
  assert counts["released", 3] > counts["released", 1]  # the check can fail


def test_paper_init_has_uniform_latents():
  model = ft.build_model(healnet_configs.get_config("paper"), MODS)
  inputs, presence = _inputs()
  params = jax.jit(lambda: model.init(jax.random.key(0), inputs, presence, train=False))()
  lat = np.asarray(params["params"]["latents"])
  assert lat.min() >= 0.0 and lat.max() < 1.0
  assert abs(lat.mean() - 0.5) < 0.03  # 2142 values: sd of the mean 0.006


def test_paper_variant_trains_one_epoch_with_finite_loss():
  cohort = synthetic_cohort(n=60)  # clinical (3 features) + omic (5)
  c = healnet_configs.get_config("paper")
  c.data.modalities = ("clinical", "omic")
  c.data.n_folds = 3
  # Smaller widths; everything the paper variant sets on top of released
  # (8 heads, shared weights, per-feature tokens, U(0, 1) latents, L1, L2,
  # b1, batch 8, OneCycle) is kept.
  c.model.update(num_latents=4, latent_dim=8, cross_dim_head=4)
  c.num_epochs = 1
  c.eval_batch_size = 32
  c.progress_bar = False
  trainer = ft.FusionTrainer(c, ft.model_modalities(cohort))
  assert (trainer.model.weight_sharing, trainer.model.cross_heads,
          trainer.model.tabular_tokens, trainer.model.latent_init) == (
              "all", 8, "features", "uniform")
  run = trainer.fit(cohort, _split(cohort))
  (rec,) = run.history
  for key in ("train_loss", "train_data_loss", "train_l1", "val_loss"):
    assert np.isfinite(rec[key]), (key, rec[key])
  assert rec["train_l1"] > 0
  assert rec["step"] == trainer.trainer.steps_per_epoch(len(run.idx["train"]))
  assert np.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0
  assert np.isfinite(np.asarray(run.params["latents"])).all()


# ------------------------------------------------------------- inspection

RECOVERY_TRUE = (3, 17)


def recovery_run(workdir, *, seed=0, feature_embed_dim=8, latent_init="normal", n=500,
                 n_feat=24, epochs=30):
  """Trains per-feature-token HEALNet on ``log h = 2 (x_3 - x_17)``; returns
  ``(results, test-part feature ranking, top-features table)``."""
  import pandas as pd
  from jaxsurv.data import multimodal as mm
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, n_feat)).astype(np.float32)
  a, b = RECOVERY_TRUE
  duration = rng.exponential(1000 * np.exp(-2.0 * (x[:, a] - x[:, b]))) + 1
  event = (rng.random(n) < 0.7).astype(int)
  cohort = mm.MultimodalCohort(np.array([f"p{i:03d}" for i in range(n)]), {"omic": x}, {},
                               {"omic": np.ones(n, bool)}, duration, event,
                               feature_names={"omic": [f"g{j}" for j in range(n_feat)]})
  c = healnet_configs.get_config("local")
  c.data.modalities = ("omic",)
  c.model.update(depth=1, num_latents=8, latent_dim=16, cross_heads=4, cross_dim_head=8,
                 self_per_cross_attn=0, attn_dropout=0.0, ff_dropout=0.0,
                 tabular_tokens="features", feature_embed_dim=feature_embed_dim,
                 latent_init=latent_init, return_attention="mean")
  c.loss.l1 = 0.0
  c.batch_size, c.eval_batch_size, c.num_epochs, c.progress_bar = 32, 128, epochs, False
  folds = mm.cv_folds(cohort, 3, seed=0, val_fraction=0.2)
  trainer = ft.FusionTrainer(c, ft.model_modalities(cohort))
  res, _ = ft.run_fold(trainer, cohort, folds[0], workdir, progress=False)
  ranking = pd.read_csv(workdir / "healnet_feature_ranking_omic_test.csv")
  top = pd.read_csv(workdir / "healnet_top_features_omic.csv")
  return res, ranking, top


def test_attention_inspection_recovers_the_features_that_carry_the_hazard(tmp_path):
  """Fig. 3's inspection on a cohort whose hazard depends on 2 of 24 features.

  ``log h = 2 (x_3 - x_17)``; the other 22 features are noise. HEALNet with
  per-feature tokens and the learned feature embedding (the paper variant's
  tokenisation; ``local``'s optimiser, shrunk to 1 layer, 8 latents, 4
  heads) is trained through ``run_fold``; the ranking it writes for the test
  part must put g3 and g17 first, and most test patients' own top feature
  must be one of them.
  """
  res, ranking, top = recovery_run(tmp_path / "run")
  assert set(ranking["feature"].head(2)) == {f"g{j}" for j in RECOVERY_TRUE}, ranking.head(5)
  assert ranking["mean_attention"].iloc[1] > 2.0 / 24  # well above uniform
  assert res["test"]["cindex"] > 0.75
  first = top[(top["split"] == "test") & (top["rank"] == 0)]
  assert len(first) == res["test"]["n"]
  assert first["feature"].isin([f"g{j}" for j in RECOVERY_TRUE]).mean() > 0.5
