"""MMNN: 3D DenseNet image branch + clinical MLP, late concatenation fusion.

Re-implementation of the multimodal network of MMNN ("A multimodal neural
network with gradient blending improves predictions of survival and metastasis
in sarcoma", Fig. 4; code DigITs-AIML/MMNN_STS ``models/densenet.py``,
``models/mlp.py``, ``models/multimodal.py``) from its description, not its
code:

* image branch: ``DenseNet3D`` (DenseNet-121, 2-channel T1/T2 MRI) -> 12-d
  embedding;
* clinical branch: ``ClinicalMLP`` (11 -> ... -> 12) -> 12-d embedding;
* fusion: ``concat[image, clinical]`` (24-d) -> Linear -> log-hazard per
  outcome, ``[batch, n_outcomes]`` (column 0 = OS, column 1 = DM by default);
* gradient-blending heads: Linear(12 -> n_outcomes) on each embedding alone,
  so that ``jaxsurv.blending`` can weight the three Cox losses
  (Wang, Tran & Feiszli, CVPR 2020).

Higher output = higher log-hazard = higher risk (jaxsurv's convention).

Missing modalities: there are no per-patient presence masks. Every patient in
a batch must have every modality the model is built with; the data layer has
to impute or drop patients with a missing modality.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
from flax.core import FrozenDict
import jax.numpy as jnp

from jaxsurv.models.clinical_mlp import ClinicalMLP
from jaxsurv.models.common import torch_linear_init
from jaxsurv.models.densenet3d import DenseNet3D

MODALITIES = ("image", "clinical")


def _hashable(value):
  """Recursively turns dicts into FrozenDicts and lists into tuples."""
  if isinstance(value, Mapping):
    return FrozenDict({k: _hashable(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(_hashable(v) for v in value)
  return value


def _head(n_outcomes: int, name: str) -> nn.Dense:
  """Linear log-hazard head in float32 (PyTorch Linear weight init, zero bias)."""
  return nn.Dense(n_outcomes, kernel_init=torch_linear_init,
                  bias_init=nn.initializers.zeros, dtype=jnp.float32, name=name)


class MMNN(nn.Module):
  """Image + clinical survival model with per-modality heads for blending.

  Attributes:
    n_outcomes: log-hazard columns (2: OS, DM).
    modalities: ``("image", "clinical")`` (multimodal), ``("image",)`` or
      ``("clinical",)``. A unimodal model builds only that branch and its
      head (``image_head`` / ``clinical_head``) and returns it as ``"mm"``.
    image_kwargs: keyword arguments for ``DenseNet3D`` (None: DenseNet-121,
      12-d embedding, dropout 0.2, BatchNorm).
    clinical_kwargs: keyword arguments for ``ClinicalMLP`` (None: MMNN's
      11 -> 32 -> 16 -> 8 -> 8 -> 8 -> 12, dropout 0.2, BatchNorm).

  Submodule names (stable checkpoint paths): ``image_encoder``,
  ``clinical_encoder``, ``mm_head``, ``image_head``, ``clinical_head``.
  """
  n_outcomes: int = 2  # Log-hazard outputs (OS, DM).
  modalities: Sequence[str] = MODALITIES  # Branches to build.
  image_kwargs: Optional[Mapping[str, Any]] = None  # DenseNet3D(**kwargs).
  clinical_kwargs: Optional[Mapping[str, Any]] = None  # ClinicalMLP(**kwargs).

  def __post_init__(self):
    # Freeze config containers so the module stays hashable (jit static args,
    # Flax transforms) when built from plain dicts/lists, e.g. a config file.
    for field in ("modalities", "image_kwargs", "clinical_kwargs"):
      value = getattr(self, field)
      if isinstance(value, (Mapping, list)):
        object.__setattr__(self, field, _hashable(value))
    super().__post_init__()

  @nn.compact
  def __call__(self, image, clinical, *, train: bool):
    """Computes log-hazards.

    Args:
      image: ``[batch, depth, height, width, channels]`` volumes, or None for a
        clinical-only model (ignored by a clinical-only model).
      clinical: ``[batch, n_clinical]`` features, or None for an image-only
        model (ignored by an image-only model).
      train: dropout and batch statistics on; needs a ``"dropout"`` rng and
        ``mutable=["batch_stats"]`` when the encoders use them.

    Returns:
      ``(outputs, aux)``. ``outputs`` maps head name to ``[batch, n_outcomes]``
      float32 log-hazards: ``{"mm", "image", "clinical"}`` for the multimodal
      model, ``{"mm"}`` alone for a unimodal one. ``aux`` holds
      ``"image_embedding"`` / ``"clinical_embedding"`` (``[batch, 12]``), for
      the multimodal model ``"fused"`` (``[batch, 24]``), and the encoders'
      intermediates under ``"image"`` / ``"clinical"`` (see
      ``DenseNet3D.__call__``; Grad-CAM uses
      ``aux["image"]["last_dense_block"]`` and, for its gradient,
      ``image_kwargs=dict(perturb_last_block=True)``).

    Raises:
      ValueError: unknown or repeated modality, ``n_outcomes < 1``, a needed
        input is None, or the two inputs' batch sizes differ.
    """
    mods = tuple(self.modalities)
    if not mods or len(set(mods)) != len(mods) or set(mods) - set(MODALITIES):
      raise ValueError(f"modalities must be a non-empty subset of {MODALITIES} "
                       f"without repeats, got {mods}")
    if self.n_outcomes < 1:
      raise ValueError(f"n_outcomes must be >= 1, got {self.n_outcomes}")
    inputs = {"image": image, "clinical": clinical}
    for m in mods:
      if inputs[m] is None:
        raise ValueError(f"MMNN with modalities={mods} needs a {m!r} input, "
                         "got None")
    if len(mods) == 2 and image.shape[0] != clinical.shape[0]:
      raise ValueError("image and clinical batch sizes differ: "
                       f"image {tuple(image.shape)}, clinical "
                       f"{tuple(clinical.shape)}")

    aux = {}
    emb = {}
    if "image" in mods:
      emb["image"], aux["image"] = DenseNet3D(
          **(self.image_kwargs or {}), name="image_encoder")(image, train=train)
    if "clinical" in mods:
      emb["clinical"], aux["clinical"] = ClinicalMLP(
          **(self.clinical_kwargs or {}), name="clinical_encoder")(
              clinical, train=train)
    for m in mods:
      aux[f"{m}_embedding"] = emb[m]

    uni = {m: _head(self.n_outcomes, f"{m}_head")(emb[m]) for m in mods}
    if len(mods) == 1:
      return {"mm": uni[mods[0]]}, aux
    fused = jnp.concatenate([emb["image"], emb["clinical"]], axis=-1)
    aux["fused"] = fused
    outputs = {"mm": _head(self.n_outcomes, "mm_head")(fused), **uni}
    return outputs, aux


Model = MMNN  # big_vision-style alias: every model file exports Model.
