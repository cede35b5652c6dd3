r"""HEALNet (hybrid early fusion; Hemker et al., NeurIPS 2024) on TCGA-BRCA.

  python launch.py --config=configs/healnet.py --workdir=runs/healnet
  python launch.py --config=configs/healnet.py:paper --workdir=runs/healnet_paper
  python launch.py --config=configs/healnet.py:local --workdir=runs/healnet_local
  python -m jaxsurv.cv table --config=configs/healnet.py:local --out=runs/cv_healnet

Config argument (comma separated; see configs/fusion.py): modalities=A+B
(default clinical+rna; add wsi for the synthetic PAM50 bags), wsi=pam50|noise,
loss=nll|cox, fold=K, early_fusion (the paper's "Early Fusion" baseline: every
tabular modality concatenated into one HEALNet input), and at most one
variant:

* ``released`` (also the plain default, which is identical): the authors'
  released BRCA run (section "``released``" below);
* ``paper``: the paper's text and Table 5 where they are clear (section
  "``paper``" below);
* ``local``: CPU-sized, chosen on the validation parts (section "``local``").

e.g. ``configs/healnet.py:paper,modalities=clinical+rna+wsi,fold=2``.

Expected results (2 CPU cores, 2026-12-01): ``:local`` fold 0 in about 36 s,
validation C 0.786, test C 0.688; over the 5 folds (``python -m jaxsurv.cv
table``) test C 0.749 ± 0.088 on clinical + RNA, 0.743 ± 0.086 with the WSI
bags (Coxnet 0.774 / 0.769). ``:paper`` fold 0 in about 65 s (early stopping
after 11 epochs), validation C 0.680, test C 0.758; 5 folds: test C 0.745 ±
0.075 (validation 0.762), 0.719 ± 0.069 with the WSI bags. ``:released``
(the default) 5 folds: test C 0.646 ± 0.082 (validation 0.751): its early
stopping on the validation NLL ends after 6-10 epochs with the best epoch
at 0-4.

``released`` and the default: the released BRCA run (konst-int-i/healnet
config/best_hyperparams.yml and main_gpu.yml; healnet/main.py):

* model: depth 2, 17 latents of width 126, 1 cross-attention head of width 63,
  attention dropout 0.455, feed-forward dropout 0.365, no latent
  self-attention (self_per_cross_attn 0), Fourier encoding with 2 bands and
  max_freq 2, no weight sharing across layers, SELU-gated feed-forward; each
  tabular modality is one token (the peer's ``omic_attention: True``);
* loss: 4-bin NLL with alpha 0.4 and inverse-frequency bin weights fitted on
  the training part; L1 6.8e-6 on every parameter, added once per step (the
  peer adds it to loss/16, an effective 16x);
* Adam (no weight decay) with OneCycle to max lr 0.008 over 50 epochs,
  batch 4 (main_gpu.yml; the paper's Table 5 says 8), early stopping with
  patience 5 on the validation NLL, best weights restored (deep copy);
* 70/15/15 train/val/test per patient (the peer splits per slide).

``paper``: Hemker et al., "HEALNet: Multimodal Fusion for Heterogeneous
Biomedical Data", NeurIPS 2024 (arXiv title "HEALNet - Hybrid Multi-Modal
Fusion for Heterogeneous Biomedical Data") -- the text (Methods, paragraphs
"Architecture", Eqs. 1-3, "Preserving structural information", Eq. 4, and
"High-dimensional biomedical data"), Appendix A (Algorithms 1-2) and
Appendix D (Table 5, BRCA column). On top of ``released`` it sets:

* ``model.weight_sharing="all"``: "attention weights are learned for each
  modality and are shared between layers" (Introduction; Fig. 1 caption) and
  "the final implementation uses weight sharing between layers" (before
  Eq. 3); the released configs share nothing (``weight_tie_layers: False``);
* ``model.cross_heads=8`` with ``cross_dim_head=63`` per head (Table 5
  "Attention heads 8", "Dims per head 63"; the released configs use 1 head);
* ``model.attn_dropout=0.46``, ``model.ff_dropout=0.36`` (Table 5 as printed;
  best_hyperparams.yml has 0.455 and 0.365);
* ``model.tabular_tokens="features"``: every omic/clinical feature is a token,
  so attention scores are per feature (Eq. 4, "attention scores for each
  feature"; Fig. 3 inspects "high-attention omic features"); the released
  code feeds the whole vector as one token (``omic_attention: True``);
* ``model.feature_embed_dim=8``: each feature token is ``[value, Fourier
  position, learned 8-dim feature embedding]``. The paper does not say how a
  feature becomes a token; the released code's per-feature path uses the
  value and a 2-band Fourier code of the feature index only, which barely
  tells neighbouring features apart (``jaxsurv/models/healnet.py``). On a
  synthetic cohort where 2 of 24 features carry the hazard
  (``recovery_run`` in ``tests/test_healnet_variants.py``: 500 patients,
  ``local``'s optimiser, 30 epochs, data seeds 0-3) the embedding put both
  true features at the top of the mean attention in 4 of 4 seeds with
  U(0, 1) latents (test C 0.83-0.88) and 3 of 4 with N(0, 1) (0.73-0.89);
  without it the attention stayed near uniform and the model barely learnt
  (0 of 4, test C 0.53-0.61). The width 8 was not tuned;
* ``model.latent_init="uniform"``: S_0 ~ U(0, 1) (Algorithm 1, line 1; the
  released code draws N(0, 1));
* ``loss.l1=6e-6`` (Table 5 "L1 reg 0.000006"; best_hyperparams.yml 6.8e-6),
  added once per step; the NLL with inverse bin weighting (Table 5 "Loss NLL",
  "Loss weighting inverse"), bins from the uncensored patients ("Subset
  uncensored") -- both as ``released``;
* L2 as Adam's (coupled, PyTorch ``Adam(weight_decay=...)``) weight decay
  ``optimizer.weight_decay=2.6e-4``: the text says "HEALNet implements both
  L1 and L2 regularisation" but Table 5 gives no L2 value; 2.6e-4 is the only
  value in the authors' configs (config/main_gpu.yml has ``weight_decay:
  None`` active and ``# weight_decay: 0.00026 # or None`` commented out
  below it), and it is coupled because the released code is PyTorch Adam;
* ``optimizer.b1=0.92``: Table 5 "Momentum 0.92" with "Optimizer Adam"; Adam's
  momentum is its first-moment decay beta1, so b1=0.92 (b2 stays 0.999);
* batch 8 (Table 5; the released main_gpu.yml says 4), Adam, OneCycle to max
  lr 0.008, 50 epochs, early stopping patience 5 on the validation NLL
  (Table 5; as ``released``).

Departures of ``paper`` from the paper, and why:

* Where the paper says nothing the released code's choice is kept: NLL alpha
  0.4; OneCycle's warm-up fraction 0.3, start lr/25 and end lr/(25 * 1e4)
  (PyTorch ``OneCycleLR`` defaults); Fourier position features with 2 bands
  and max_freq 2; softmax temperature 0.5 and LeakyReLU after the attention
  output (the text only says "scaled dot product attention ... with
  adjustments for tabular and image data"); the gated-SELU "SNN" block
  (Algorithm 2, line 8, names an SNN but not its form); the head on the mean
  over latents (Algorithm 1 "LinearHead(S_T)" leaves the pooling open); L1 on
  every parameter (the text does not say which); no latent self-attention
  (``self_per_cross_attn=0``, as Algorithm 2, which has none).
* ``weight_sharing="all"`` also shares each modality's feed-forward (SNN)
  block between layers, not only the attention weights: Eq. 3 makes the
  whole update ``psi(.; rho)`` shared and Algorithm 2 applies the SNN inside
  it.
* beta1 is constant: PyTorch's ``OneCycleLR`` also cycles Adam's beta1 by
  default (between 0.85 and 0.95), which Table 5's single "Momentum 0.92"
  does not describe; the trainer has no momentum schedule.
* Data and protocol, as in every variant: this project's TCGA-BRCA clinical
  and RNA features (and synthetic WSI bags, one token per tile) rather than
  the paper's 2,922 omic features (Table 4) and ResNet50 patch features; 5
  patient-level stratified folds with 70/15/15 parts and time bins from the
  training part's uncensored patients (the paper: five cross-validation
  folds, bins from the whole cohort's uncensored patients); missing
  modalities skipped per patient; the best validation-NLL epoch restored.
* ``loss=cox`` or ``early_fusion`` combine with ``paper`` but are not the
  paper's HEALNet (Cox is mentioned only as future work; "Early Fusion" is a
  baseline).

``local`` (2 CPU cores; chosen on the validation parts only): the same
network, loss and L1, batch 32, AdamW (lr 3e-3, weight decay 1e-2, cosine
with 1 warm-up epoch) for 10 epochs, the final epoch kept (validation C-index
of the final epoch over the 5 folds: 0.83 after 10 epochs, 0.82 after 15,
0.77 after 25; per-feature tokens ``model.tabular_tokens='features'``: 0.73),
the output bias started at the training part's marginal hazards,
whole-modality dropout 0.2 in training (validation C 0.842 vs 0.827 without),
and L1 1e-4, close to the peer's effective 16 x 6.8e-6 = 1.09e-4 (mean
validation C over 5 folds and 3 seeds: 6.8e-6 0.826 (5 seeds), 3e-5 0.830,
1e-4 0.832, 3e-4 0.829, 1e-3 0.648; the differences up to 3e-4 are within
noise, the peer's strength decides).

Attention outputs: with one token per tabular modality each modality's
cross-attention is trivially 1 (``healnet_attention_<m>.csv``); per-feature
weights need ``--config.model.tabular_tokens=features`` (set by ``paper``);
bag modalities give per-tile weights either way.
"""

from configs.common import parse_arg
from configs.fusion import base_config

VARIANTS = ("released", "paper", "local")

# The ``paper`` variant's changes to ``released`` (see the module docstring).
PAPER_MODEL = dict(weight_sharing="all", cross_heads=8, cross_dim_head=63, attn_dropout=0.46,
                   ff_dropout=0.36, tabular_tokens="features", feature_embed_dim=8,
                   latent_init="uniform")
PAPER_L1 = 6e-6  # Table 5, BRCA.
PAPER_WEIGHT_DECAY = 2.6e-4  # L2: no value in the paper; see the module docstring.
PAPER_B1 = 0.92  # Table 5 "Momentum" as Adam's beta1.
PAPER_BATCH_SIZE = 8  # Table 5.


def get_config(arg=None):
  """Returns the HEALNet config; see the module docstring for ``arg``.

  Raises:
    ValueError: an unknown argument, or more than one of ``VARIANTS``.
  """
  a = parse_arg(arg, modalities="clinical+rna", wsi="pam50", loss="nll", fold=0, local=False,
                released=False, paper=False, early_fusion=False)
  chosen = [v for v in VARIANTS if a[v]]
  if len(chosen) > 1:
    raise ValueError(f"choose at most one HEALNet variant of {VARIANTS}, got {chosen}")
  model = "early_fusion" if a["early_fusion"] else "healnet"
  c = base_config(model, a["modalities"], wsi=a["wsi"], loss=a["loss"], fold=a["fold"],
                  local=a["local"])
  if a["paper"]:
    c.model.update(PAPER_MODEL)
    c.loss.l1 = PAPER_L1
    c.optimizer.update(name="adam", weight_decay=PAPER_WEIGHT_DECAY, b1=PAPER_B1)
    c.batch_size = PAPER_BATCH_SIZE
  if a["local"] and model == "healnet":
    # Whole-modality dropout 0.2 per patient in training (never all of a
    # patient's modalities): mean validation C-index 0.842 vs 0.827 without
    # and 0.831 with 0.4 (clinical+rna, 5 folds).
    c.train.modality_dropout = 0.2
    # L1 at about the peer's effective strength (see the module docstring).
    c.loss.l1 = 1e-4
  return c
