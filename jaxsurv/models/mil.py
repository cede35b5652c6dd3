"""Gated attention multiple-instance learning (AMIL) on padded bags, Flax.

Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance Learning",
ICML 2018, eq. 9 (gated attention): for instance embeddings ``h_k``::

  a_k = softmax_k( w^T ( tanh(V h_k) * sigmoid(U h_k) ) ),   z = sum_k a_k h_k

PORPOISE's ``PorpoiseAMIL`` / MMF WSI branch (mahmoodlab/PORPOISE
``models/model_porpoise.py``) wraps this as:
optional input dropout -> ``Linear(1024 -> 512) -> ReLU -> Dropout(0.25)`` ->
gated attention (L=512, D=256, dropout 0.25 after tanh and sigmoid) ->
attention pooling -> ``rho = Linear(512 -> 256) -> ReLU -> Dropout(0.25)``.
Weights are Xavier-normal, biases zero (PORPOISE ``initialize_weights``).

Unlike PORPOISE (batch size 1, no padding), bags here are padded to a common
``n_tiles`` with a boolean tile mask (SurvPath style): padded tiles get
attention exactly 0 and cannot influence the embedding. A bag without any
valid tile gets all-zero attention and the pooled vector 0 (no NaN); callers
treat it as a missing modality (``jaxsurv.models.fusion``).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

xavier_normal = nn.initializers.xavier_normal()


def masked_softmax(scores, mask, axis: int = -1):
  """Softmax of ``scores`` over the entries where ``mask`` is True.

  Masked-out entries get exactly 0. If a row has no True entry, the whole row
  is 0 (rather than NaN or a uniform distribution over padding). Gradients are
  finite in both cases.

  Args:
    scores: float array, e.g. ``[batch, n_tiles]``.
    mask: bool array broadcastable to ``scores``.
    axis: axis to normalise over.

  Returns:
    Float array shaped like ``scores``; sums to 1 over valid entries of every
    row with at least one valid entry, else 0.
  """
  scores = scores.astype(jnp.float32)
  mask = jnp.broadcast_to(mask, scores.shape)
  # Padding must not enter the max (it may hold garbage scores).
  safe = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  shift = jnp.max(safe, axis=axis, keepdims=True)
  shift = jnp.where(jnp.any(mask, axis=axis, keepdims=True), shift, 0.0)
  e = jnp.where(mask, jnp.exp(jnp.where(mask, scores - shift, 0.0)), 0.0)
  denom = jnp.sum(e, axis=axis, keepdims=True)
  return e / jnp.where(denom > 0, denom, 1.0)


class GatedAttention(nn.Module):
  """Attention logits ``[batch, n_tiles]`` of instances ``[batch, n_tiles, L]``.

  Gated (Ilse et al. 2018 eq. 9; PORPOISE ``Attn_Net_Gated``):
  ``w^T (Dropout(tanh(V h)) * Dropout(sigmoid(U h)))``; non-gated
  (``gated=False``; PORPOISE ``Attn_Net``): ``w^T Dropout(tanh(V h))``.
  Returns unnormalised scores (logits); the caller applies the masked softmax.

  Attributes:
    hidden: D, the width of V and U (256 in PORPOISE).
    dropout_rate: dropout after tanh and sigmoid (0.25 in PORPOISE).
    gated: gated (True) or plain tanh attention.
  """
  hidden: int = 256  # Attention hidden width D.
  dropout_rate: float = 0.25  # Dropout inside the attention net.
  gated: bool = True  # Gated attention (Ilse eq. 9) vs tanh-only (eq. 8).

  @nn.compact
  def __call__(self, h, *, train: bool):
    """Scores every instance.

    Args:
      h: ``[..., n_tiles, L]`` instance embeddings.
      train: enables dropout.

    Returns:
      ``[..., n_tiles]`` float32 attention logits.
    """
    a = jnp.tanh(nn.Dense(self.hidden, kernel_init=xavier_normal, name="V")(h))
    a = nn.Dropout(self.dropout_rate)(a, deterministic=not train)
    if self.gated:
      b = nn.sigmoid(nn.Dense(self.hidden, kernel_init=xavier_normal,
                              name="U")(h))
      b = nn.Dropout(self.dropout_rate)(b, deterministic=not train)
      a = a * b
    return nn.Dense(1, kernel_init=xavier_normal, name="w")(a)[..., 0]


class AttentionMIL(nn.Module):
  """Gated-attention MIL bag encoder: ``[batch, n_tiles, dim] -> [batch, out]``.

  ``input_dropout -> Dense(fc_dim) -> ReLU -> Dropout -> GatedAttention ->
  masked softmax over valid tiles -> attention pooling -> [rho]``, where rho is
  ``Dense(out_dim) -> ReLU -> Dropout`` (PORPOISE MMF's WSI branch); with
  ``out_dim=None`` the pooled ``fc_dim`` vector is returned (PorpoiseAMIL).

  Attributes:
    fc_dim: instance embedding width L (512 in PORPOISE).
    attn_dim: attention hidden width D (256 in PORPOISE).
    out_dim: rho output width (256 in PORPOISE MMF, 128 in CM-MMF) or None.
    dropout_rate: dropout after the instance fc, in the attention net and after
      rho (0.25 in PORPOISE).
    input_dropout: dropout on the raw tile features (PORPOISE ``dropinput``,
      default 0.0).
    gated: gated attention (True) or tanh-only.

  Call: ``embedding, attention = AttentionMIL(...).apply(variables, x, mask,
  train=...)``.
  """
  fc_dim: int = 512  # Instance embedding width L.
  attn_dim: int = 256  # Attention hidden width D.
  out_dim: Optional[int] = 256  # rho width; None: return the pooled fc_dim.
  dropout_rate: float = 0.25  # Dropout after fc, attention and rho.
  input_dropout: float = 0.0  # Dropout on raw tile features.
  gated: bool = True  # Gated attention.

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    """Encodes a padded bag.

    Args:
      x: ``[batch, n_tiles, dim]`` tile features (values at padded tiles are
        ignored).
      mask: ``[batch, n_tiles]`` bool, True for valid tiles.
      train: enables dropout.

    Returns:
      ``(embedding, attention)``: ``embedding`` is ``[batch, out_dim]`` (or
      ``[batch, fc_dim]`` when ``out_dim`` is None) float32; ``attention`` is
      ``[batch, n_tiles]`` float32, summing to 1 over the valid tiles of each
      bag, exactly 0 on padding, and all 0 for a bag with no valid tile.

    Raises:
      ValueError: if ``x`` is not 3-D or ``mask`` is not ``[batch, n_tiles]``.
    """
    if x.ndim != 3:
      raise ValueError("AttentionMIL expects x of shape [batch, n_tiles, dim], "
                       f"got shape {tuple(x.shape)}")
    if tuple(mask.shape) != tuple(x.shape[:2]):
      raise ValueError("AttentionMIL mask must have shape "
                       f"{tuple(x.shape[:2])} "
                       f"([batch, n_tiles]), got {tuple(mask.shape)}")
    mask = mask.astype(bool)
    # Zero padded tiles so that garbage (even NaN/inf) never enters the graph;
    # a NaN there would otherwise poison gradients through 0 * NaN.
    x = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)
    x = nn.Dropout(self.input_dropout)(x, deterministic=not train)
    h = nn.relu(nn.Dense(self.fc_dim, kernel_init=xavier_normal, name="fc")(x))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=not train)
    scores = GatedAttention(self.attn_dim, self.dropout_rate, self.gated,
                            name="attention")(h, train=train)
    attention = masked_softmax(scores, mask, axis=-1)
    pooled = jnp.einsum("bn,bnd->bd", attention, h)
    if self.out_dim is None:
      return pooled, attention
    z = nn.relu(nn.Dense(self.out_dim, kernel_init=xavier_normal,
                         name="rho")(pooled))
    z = nn.Dropout(self.dropout_rate)(z, deterministic=not train)
    return z, attention


Model = AttentionMIL  # big_vision-style alias: every model file exports Model.
