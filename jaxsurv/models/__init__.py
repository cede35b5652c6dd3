"""Flax Linen models: 3D DenseNet image encoder, clinical MLP, MMNN.

Every model's ``__call__(..., *, train)`` returns ``(output, aux)`` where
``aux`` is a dict of named intermediates (STYLE.md §2 item 9).
"""

from jaxsurv.models.clinical_mlp import ClinicalMLP
from jaxsurv.models.densenet3d import DenseLayer, DenseNet3D
from jaxsurv.models.mmnn import MODALITIES, MMNN

__all__ = ["ClinicalMLP", "DenseLayer", "DenseNet3D", "MMNN", "MODALITIES"]
