"""Flax Linen models.

MMNN: 3D DenseNet image encoder, clinical MLP, concatenation fusion.
Fusion zoo (HEALNet, CM-MMF and baselines) over tabular and bag modalities.

Every model's ``__call__(..., *, train)`` returns ``(output, aux)`` where
``aux`` is a dict of named intermediates (as big_vision's models return
``(logits, out)``); ``jaxsurv.models.registry`` maps ``config.model.name``
to a model and its call contract.
"""

from jaxsurv.models.clinical_mlp import ClinicalMLP
from jaxsurv.models.densenet3d import DenseLayer, DenseNet3D
from jaxsurv.models.fusion import (CMMMF, BilinearFusion, ConcatFusion, CrossModalAttentionFusion,
                                   MeanFusion, PorpoiseGatedLateFusion, Unimodal)
from jaxsurv.models.healnet import HEALNet, PAPER_CONFIGS, l1_penalty
from jaxsurv.models.mil import AttentionMIL
from jaxsurv.models.mmnn import MODALITIES, MMNN
from jaxsurv.models.snn import SNN, AlphaDropout

__all__ = ["AlphaDropout", "AttentionMIL", "BilinearFusion", "CMMMF", "ClinicalMLP",
           "ConcatFusion", "CrossModalAttentionFusion", "DenseLayer", "DenseNet3D", "HEALNet",
           "MMNN", "MODALITIES", "MeanFusion", "PAPER_CONFIGS", "PorpoiseGatedLateFusion", "SNN",
           "Unimodal", "l1_penalty"]
