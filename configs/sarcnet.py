r"""SarcNet (Maussion et al., Scientific Reports 2025): MIL + clinical, federated.

  python launch.py --config=configs/sarcnet.py:local --workdir=runs/sarcnet
  python launch.py --config=configs/sarcnet.py:local,cohort=tcga_brca --workdir=runs/sarcnet_tcga

Config argument (comma separated): ``local`` (2 CPU cores), ``cohort=``
``rotterdam_gbsg`` (default: two institutions, recurrence-free survival,
clinical variables only) or ``tcga_brca`` (six regions of tissue source
sites, clinical + PAM50-driven synthetic tile bags, OS), ``strategy=fedavg``
or ``fedprox``, ``mil=attention`` or ``chowder``, ``binary_head`` (adds the
5-year binary head).

The run writes ``results.json``, ``table.md``/``table.csv`` (federated vs
pooled vs each site alone vs a Cox model on nomogram variables vs grade, on
each site's test patients and on all of them), ``rounds.csv``/``rounds.png``
and ``predictions.csv`` (``jaxsurv.sarcnet``).

What the paper gives: WSI + clinical variables, federated learning across two
hospitals (n = 221 and 390), the endpoint 5-year metastasis-free survival,
AUC 0.797 (0.762-0.833) vs the Sarculator nomogram 0.778 and FNCLCC grade
0.706. **Everything else below is an assumption** (the methods are not
public): the tile features are frozen and given; the MIL aggregator (gated
attention-MIL, Chowder as an option) and its widths; the clinical MLP
(one layer of 32) and fusion (concatenation, one layer of 32); the Cox loss
(Breslow) with an optional 5-year binary head; FedAvg weighted by training
patients, with the rounds, local epochs, optimiser (Adam, constant lr 1e-3,
weight decay 1e-4), batch 64 and dropout 0.1 below; site-local
standardisation; the last round's model.

``local`` (2 CPU cores): 10 rounds x 2 local epochs, 200 bootstrap
resamples; otherwise 30 rounds x 2 local epochs and 1000 resamples.
"""

import ml_collections

from configs.common import parse_arg
from jaxsurv.data import sites


def get_config(arg=None):
  """Returns the SarcNet config; see the module docstring for ``arg``."""
  a = parse_arg(arg, local=False, cohort="rotterdam_gbsg", strategy="fedavg", mil="attention",
                binary_head=False)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict()
  c.data.cohort = a["cohort"]
  c.data.split_seed = 0
  c.data.fractions = (0.7, 0.15, 0.15)
  c.data.n_bins = 4
  c.data.site_dirs = ""
  c.data.regions = ""
  c.compare = ml_collections.ConfigDict()
  if a["cohort"] == "tcga_brca":
    # Europe (71 patients) and Canada (23) have no death at all: the Cox
    # partial likelihood is undefined there, so they are left out.
    c.data.regions = "Northeast+South+West+Midwest"
    c.data.columns = sites.tcga_clinical_columns()
    c.data.log1p = ("number_of_lymph_nodes",)
    # Synthetic PAM50-driven bags (the only WSI-like modality with survival here).
    c.data.wsi_dim = 64
    c.data.wsi_tiles = (20, 60)
    c.data.wsi_max_tiles = 64
    # TCGA-BRCA has no histological grade: AJCC pathologic stage stands in for it.
    c.compare.nomogram = ("years_to_birth", "pathology_T_stage", "pathology_N_stage")
    c.compare.grade = "pathologic_stage"
    c.compare.grade_label = "Stage alone"
  else:
    c.data.columns = sites.ROTTERDAM_GBSG_NUMERIC
    c.data.log1p = ("nodes", "pgr", "er")
    c.data.wsi_dim = 0  # No slides at these institutions: the clinical branch alone.
    # Nomogram-style variables (Sarculator: age, size, grade, histology; no
    # histology in these breast cohorts).
    c.compare.nomogram = ("age", "size_band", "grade")
    c.compare.grade = "grade"
    c.compare.grade_label = "Grade alone"
  c.compare.n_boot = 200 if a["local"] else 1000

  c.model = ml_collections.ConfigDict()
  c.model.name = "sarcnet"
  c.model.mil = a["mil"]
  c.model.mil_fc_dim = 64
  c.model.mil_attn_dim = 32
  c.model.mil_dropout = 0.1
  c.model.chowder_k = 5
  c.model.chowder_hidden = (32, 16)
  c.model.clinical_hidden = (32,)
  c.model.fusion_hidden = (32,)
  c.model.dropout = 0.1

  c.loss = ml_collections.ConfigDict()
  c.loss.name = "cox"
  c.loss.ties = "breslow"
  c.loss.l1 = 0.0
  c.loss.horizon_weight = 0.5 if a["binary_head"] else 0.0

  c.federated = ml_collections.ConfigDict()
  c.federated.strategy = a["strategy"]
  c.federated.proximal_mu = 0.01 if a["strategy"] == "fedprox" else 0.0
  c.federated.rounds = 10 if a["local"] else 30
  c.federated.local_epochs = 2
  c.federated.timeout_s = 3600.0
  # Per-round validation C-index and 5-year AUC at every site (rounds.csv/png).
  # In a deployment each is one more ClientApp process per site and round.
  c.federated.evaluate = True

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adam"
  c.optimizer.lr = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "constant"
  c.batch_size = 64
  c.eval_batch_size = 256
  c.num_epochs = 0  # Set by the trainer: rounds x local_epochs (jaxsurv.federated).
  c.selection = "last"
  c.log_every_steps = 0
  c.progress_bar = False
  return c
