r"""PORPOISE gated late fusion (Chen et al., Cancer Cell 2022) on TCGA-BRCA.

  python launch.py --config=configs/porpoise.py --workdir=runs/porpoise
  python launch.py --config=configs/porpoise.py:local,modalities=rna+wsi \
      --workdir=runs/porpoise_wsi

Config argument (comma separated; see configs/fusion.py): modalities=A+B
(default clinical+rna; rna+wsi is PORPOISE's own pairing with the synthetic
PAM50 bags), wsi=pam50|noise, loss=nll|cox, fold=K, local, fusion=concat
(PORPOISE's concatenation variant instead of the gated bilinear fusion).

Expected results (2 CPU cores, 2026-12-01, ``python -m jaxsurv.cv table``,
5 folds, with PORPOISE's encoder2 path): test C 0.752 ± 0.078 on clinical +
RNA and 0.679 ± 0.087 on RNA + WSI bags (Coxnet 0.774 on clinical + RNA).

Paper settings (mahmoodlab/PORPOISE, ``models/model_porpoise.py`` and
``utils/core_utils.py``): WSI branch
Dense 512 -> gated attention (256) -> rho 256; omic SNN 256 -> 256 (ELU,
AlphaDropout 0.25); gated Kronecker fusion (scale 32, mmhid 256, per-modality
sigmoid gates and skip connection: the class defaults; the CLI default turns
gates and skip off); 4-bin NLL with alpha 0; Adam, lr 2e-4, weight decay 1e-5,
20 epochs, batch 1 with 32-bag gradient accumulation (a batch of 32 here),
L1 1e-5 (PORPOISE: omic branch only; here all parameters). PORPOISE evaluates
the last epoch on its validation fold; here the best validation-loss epoch
is kept and a separate test part is scored.

``local`` (2 CPU cores): widths 64 (scale 16), MIL 128/64, HEALNet's loss
(alpha 0.4, inverse-frequency bin weights; validation C 0.85 vs 0.84 with
PORPOISE's alpha 0), batch 32, AdamW (lr 3e-3, weight decay 1e-2, cosine) for
30 epochs, the final epoch kept, the output bias started at the training
part's marginal hazards.
"""

from configs.common import parse_arg
from configs.fusion import base_config


def get_config(arg=None):
  """Returns the PORPOISE config; see the module docstring for ``arg``."""
  a = parse_arg(arg, modalities="clinical+rna", wsi="pam50", loss="nll", fold=0, local=False,
                fusion="bilinear")
  c = base_config("porpoise", a["modalities"], wsi=a["wsi"], loss=a["loss"], fold=a["fold"],
                  local=a["local"])
  if a["fusion"] not in ("bilinear", "concat"):
    raise ValueError(f"fusion must be bilinear or concat, got {a['fusion']!r}")
  c.model.fusion = a["fusion"]
  return c
