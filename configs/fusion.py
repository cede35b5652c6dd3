r"""Fusion baselines on TCGA-BRCA: concatenation, mean, bilinear, early fusion,
unimodal SNN / attention-MIL (and the shared base of healnet.py, cmmmf.py,
porpoise.py).

  python launch.py --config=configs/fusion.py:model=concat,modalities=clinical+rna \
      --workdir=runs/concat
  python launch.py --config=configs/fusion.py:model=unimodal,modalities=rna,local \
      --workdir=runs/snn_rna

Config argument (comma separated):
  model=NAME        concat (default), mean, bilinear, early_fusion, unimodal
                    (also healnet, cmmmf, porpoise: prefer their own files)
  modalities=A+B    from clinical, rna, mirna, methylation and wsi (the
                    synthetic WSI bag modality); default clinical+rna
  wsi=KIND          pam50 (bags driven by the real PAM50 subtype; default) or
                    noise (an independent-noise control), used when wsi is listed
  loss=NAME         nll (4 time bins, default) or cox
  fold=K            which of the 5 patient-level folds (default 0)
  local             CPU-sized settings (smaller networks, fewer epochs, early
                    stopping); the defaults are the papers' settings

Paper settings (the baselines of CM-MMF Table 1 follow "the PORPOISE official
pipeline", mahmoodlab/PORPOISE ``utils/core_utils.py``): Adam, lr 2e-4, weight decay 1e-5 (PyTorch L2), 20
epochs, batch 1 with gradient accumulation over 32 bags (here a padded batch
of 32, the same mean over 32 patients), NLL with alpha 0, no bin weights, L1
1e-5 (PORPOISE applies it to the omic branch; here to all parameters), SNN
``omic_dim -> 256 -> 256`` (ELU, AlphaDropout 0.25), attention MIL 512/256,
concatenation MLP 256-256. No early stopping in PORPOISE; here the best
validation-loss epoch is kept (the test part is never used for selection).
Early fusion is HEALNet with every tabular modality concatenated into one
(HEALNet Table 1 "Early Fusion"), with HEALNet's BRCA settings.

``local`` (2 CPU cores; training settings chosen on the validation parts
only, see ``base_config``): widths 64 (SNN 64 -> 64, concatenation MLP 64-64,
bilinear scale 16 / mmhid 64; unimodal SNN 64-64 with SELU), MIL 128/64 on at
most 64 tiles per bag; HEALNet's loss for every model (NLL alpha 0.4,
inverse-frequency bin weights); batch 32, AdamW (lr 3e-3, weight decay 1e-2,
cosine with 1 warm-up epoch); the final epoch of 30 (HEALNet: 10) is kept
(``selection="last"``; the validation part is monitored only); output bias
started at the training part's marginal hazards; no L1 (HEALNet: 1e-4,
CM-MMF: 1e-4, see their files). L1 was checked on the validation parts
(clinical+rna, mean validation C over 5 folds and 3 seeds, L1 0 / 3e-5 /
1e-4): concatenation 0.829 / 0.828 / 0.806, PORPOISE 0.840 / 0.834 / 0.817;
unimodal clinical 0.824 / - / 0.825 and RNA 0.656 / - / 0.640; none helped.
"""

import ml_collections

from configs.common import parse_arg
from jaxsurv.models.healnet import PAPER_CONFIGS

TABULAR = ("clinical", "rna", "mirna", "methylation")

# HEALNet's released BRCA hyperparameters (konst-int-i/healnet
# config/best_hyperparams.yml) as model kwargs.
HEALNET_BRCA = {k: v for k, v in PAPER_CONFIGS["brca"].items() if k not in ("l1", "n_out")}


def parse_modalities(spec: str) -> tuple[tuple[str, ...], bool]:
  """``"clinical+rna+wsi"`` -> ``(("clinical", "rna"), True)``.

  Raises:
    ValueError: an unknown or repeated modality, or none at all.
  """
  mods = [m for m in spec.split("+") if m]
  unknown = [m for m in mods if m not in TABULAR + ("wsi",)]
  if unknown or not mods or len(set(mods)) != len(mods):
    raise ValueError(f"modalities={spec!r}: use '+'-joined names from "
                     f"{TABULAR + ('wsi',)}, each once")
  return tuple(m for m in mods if m != "wsi"), "wsi" in mods


def model_defaults(model: str, local: bool) -> dict:
  """Model kwargs (``config.model``) per model name, paper or local size."""
  snn = dict(snn_activation="elu", snn_dropout=0.25)
  mil = dict(mil_fc_dim=512, mil_attn_dim=256, mil_dropout=0.25)
  if local:
    mil = dict(mil_fc_dim=128, mil_attn_dim=64, mil_dropout=0.25)
  if model == "unimodal":
    return dict(snn_hidden=(64, 64) if local else (256, 256, 256, 256), snn_activation="selu",
                snn_dropout=0.25, **mil)
  if model in ("concat", "mean", "bilinear"):
    d = dict(embed_dim=64 if local else 256, snn_hidden=(64,) if local else (256,), **snn, **mil)
    if model == "concat":
      d["hidden"] = (64, 64) if local else (256, 256)
    if model == "bilinear":
      d.update(scale_dim=16 if local else 32, mmhid=64 if local else 256, gate=True, skip=True,
               fusion_dropout=0.25)
    return d
  if model == "porpoise":
    return dict(embed_dim=64 if local else 256, snn_hidden=(64,) if local else (256,), **snn,
                **mil, fusion="bilinear", gate=True, skip=True,
                scale_dim=16 if local else 32, mmhid=64 if local else 256, fusion_dropout=0.25)
  if model == "cmmmf":
    return dict(embed_dim=128, snn_hidden=(128,), **snn, **mil, attn_dim=128,
                attn_activation="tanh", share_attention=True, embedding_norm="minmax")
  if model in ("healnet", "early_fusion"):
    return dict(HEALNET_BRCA, return_attention="mean")
  raise ValueError(f"unknown model {model!r}")


def base_config(model: str, modalities: str = "clinical+rna", *, wsi: str = "pam50",
                loss: str = "nll", fold: int = 0, local: bool = False) -> ml_collections.ConfigDict:
  """The shared fusion-trainer config (PORPOISE-pipeline training defaults)."""
  tab, with_wsi = parse_modalities(modalities)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # model.name picks the registered model (jaxsurv.models.registry); the other
  # model fields are its keyword arguments.
  c.model = ml_collections.ConfigDict(dict(name=model, **model_defaults(model, local)))

  c.data = ml_collections.ConfigDict()
  c.data.cohort = "tcga_brca"
  c.data.modalities = tab
  c.data.wsi = wsi if with_wsi else ml_collections.config_dict.placeholder(str)
  c.data.wsi_seed = 0
  # load_tcga_brca kwargs of the synthetic bags: 384-d tiles, 50-300 per
  # patient (local: at most 64 kept, a deterministic subsample).
  c.data.wsi_kwargs = ml_collections.ConfigDict(dict(
      wsi_dim=384, wsi_tiles=(50, 300), wsi_max_tiles=64 if local else 300))
  c.data.n_bins = 4
  c.data.n_folds = 5
  c.data.fold = fold
  c.data.fold_seed = 0
  c.data.val_fraction = 0.15  # 70/15/15 as HEALNet.
  c.data.stratify = ("event",)

  c.loss = ml_collections.ConfigDict(dict(
      name=loss, alpha=0.0, bin_weights=False, l1=1e-5, l1_include="all", ties="breslow"))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=2e-4, weight_decay=1e-5, schedule="constant", pct_start=0.3,
      div_factor=25.0, final_div_factor=1e4, warmup_epochs=0, final_lr_fraction=0.0,
      clip_norm=0.0))
  c.batch_size = 32
  c.eval_batch_size = 128
  c.grad_accum_steps = 1
  c.drop_remainder = False  # The last batch is padded with masked rows.
  c.num_epochs = 20
  # Model selection and early stopping on the validation part: "val_loss"
  # (the data loss, HEALNet), "val_cindex" (Harrell's C) or "last" (the final
  # epoch, PORPOISE).
  c.selection = "val_loss"
  c.early_stopping = ml_collections.ConfigDict(dict(patience=0, min_epochs=0, min_delta=0.0))
  c.train = ml_collections.ConfigDict(dict(modality_dropout=0.0, input_noise=0.0,
                                           init_output_bias=local))
  c.eval = ml_collections.ConfigDict(dict(horizons_years=(2.0, 5.0), bootstrap_resamples=200))
  c.log_every_steps = 0  # Non-finite losses are checked at the end of each epoch.
  c.progress_bar = True

  if model in ("healnet", "early_fusion"):
    # HEALNet (konst-int-i/healnet healnet/main.py): NLL alpha 0.4 with inverse-frequency bin
    # weights, L1 6.8e-6 (BRCA; added once, not the peer's effective 16x),
    # Adam + OneCycle (max lr 0.008) over 50 epochs, batch 4 (main_gpu.yml;
    # the paper's Table 5 says 8), early stopping patience 5 on val NLL.
    c.loss.update(alpha=0.4, bin_weights=True, l1=PAPER_CONFIGS["brca"]["l1"])
    c.optimizer.update(name="adam", lr=0.008, weight_decay=0.0, schedule="onecycle")
    c.batch_size = 4
    c.num_epochs = 50
    c.early_stopping.patience = 5

  if local:
    # CPU-sized training, chosen on the validation parts of the 5 folds only
    # (mean validation C-index of the final epoch, which involves no
    # per-fold selection and so compares settings without optimism):
    # * one loss for every model, HEALNet's (alpha 0.4, inverse-frequency
    #   bin weights; HEALNet used it for its baselines too): validation C
    #   CM-MMF 0.76 vs 0.64 with alpha 0 and no weights (which collapsed in 2
    #   of 5 folds), PORPOISE 0.85 vs 0.84, concatenation 0.84 either way;
    # * the final epoch of a fixed budget ("last"): choosing the epoch by the
    #   validation C-index (~8 events per validation part) gave a validation
    #   C of the chosen epochs well above that of later, similar epochs, i.e.
    #   mostly noise; the NLL rose while the C-index rose (predictions grew
    #   more confident), so NLL selection kept the near-constant first epochs;
    # * AdamW lr 3e-3 (1e-3 learned too slowly with AlphaDropout), weight
    #   decay 1e-2, cosine decay with 1 warm-up epoch, batch 32, 30 epochs
    #   (HEALNet: 10, see configs/healnet.py).
    c.batch_size = 32
    c.num_epochs = 30
    c.selection = "last"
    c.early_stopping.update(patience=0, min_epochs=0)
    c.optimizer.update(name="adamw", lr=3e-3, weight_decay=1e-2, schedule="cosine",
                       warmup_epochs=1, final_lr_fraction=0.05)
    c.loss.update(alpha=0.4, bin_weights=True, l1=0.0)
    if model in ("healnet", "early_fusion"):
      # Validation C-index of the final epoch: 10 epochs 0.83, 15 0.82, 25 0.77.
      c.num_epochs = 10
      c.loss.update(l1=PAPER_CONFIGS["brca"]["l1"])
  if loss == "cox":
    c.loss.bin_weights = False  # Time-bin weights belong to the NLL.
  return c


def get_config(arg=None):
  """Returns the config; see the module docstring for ``arg``."""
  a = parse_arg(arg, model="concat", modalities="clinical+rna", wsi="pam50", loss="nll",
                fold=0, local=False)
  return base_config(a["model"], a["modalities"], wsi=a["wsi"], loss=a["loss"],
                     fold=a["fold"], local=a["local"])
