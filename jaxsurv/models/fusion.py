"""Multimodal fusion models with per-patient missing modalities, Flax Linen.

Every model here (and ``jaxsurv.models.healnet.HEALNet``) has one interface so
that a single trainer can drive them all::

  out, aux = model.apply(variables, inputs, presence, train=False,
                         rngs={"dropout": key})   # rngs only when training

* ``modalities``: the model's modality names and kinds, a tuple of pairs, e.g.
  ``(("rna", "tabular"), ("clinical", "tabular"), ("wsi", "bag"))``.
* tabular modality ``m``: ``inputs[m]`` is ``[batch, features_m]``;
* bag modality ``m`` (WSI tile features): ``inputs[m]`` is
  ``[batch, n_tiles, dim]`` and ``inputs[m + "_tile_mask"]`` is
  ``[batch, n_tiles]`` bool (padding = False);
* ``presence[m]`` is ``[batch]`` bool; False means modality ``m`` is missing
  for that patient: its values may be garbage (even NaN) and never influence
  the output. A bag with no valid tile counts as missing.
* ``out`` is ``[batch, n_out]`` float32: ``n_out`` time-bin logits for the
  discrete-time NLL (hazard = sigmoid(logit); default 4 bins, as PORPOISE's
  ``NLLSurvLoss``, mahmoodlab/PORPOISE ``utils/loss_func.py``) or
  ``n_out=1`` for a Cox log-hazard (higher = higher risk).
* ``aux`` holds named intermediates: ``"presence"`` (effective presence per
  modality, ``[batch]`` bool), ``"embeddings"`` (per modality
  ``[batch, embed_dim]``, zero where missing), ``"mil_attention"`` (per bag
  modality ``[batch, n_tiles]``), plus model-specific entries.

Missing-modality handling (all models): missing inputs are first replaced by
zeros with ``jnp.where`` (so garbage/NaN cannot reach the graph or its
gradients), then each model removes the modality's contribution in its own
documented way.

Models:
  * ``CMMMF``: cross-modality attention fusion (Deng, Shaikh, Shannon & Nie,
    "Cross-modality Attention-based Multimodal Fusion for Non-small Cell
    Lung Cancer (NSCLC) Patient Survival Prediction"), built on
    ``CrossModalAttentionFusion``.
  * ``ConcatFusion``, ``MeanFusion``, ``BilinearFusion``: baselines.
  * ``PorpoiseGatedLateFusion``: PORPOISE's MMF (Chen et al., Cancer Cell 2022;
    mahmoodlab/PORPOISE ``models/model_porpoise.py``).
  * ``Unimodal``: one SNN or AttentionMIL with a head.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsurv.models.mil import AttentionMIL, masked_softmax, xavier_normal
from jaxsurv.models.snn import SNN

KINDS = ("tabular", "bag")
TILE_MASK_SUFFIX = "_tile_mask"
POSITIONS_SUFFIX = "_positions"


# ------------------------------------------------------------ interface helpers


def normalize_modalities(modalities) -> tuple[tuple[str, str], ...]:
  """Validates ``modalities`` and returns it as a tuple of ``(name, kind)``.

  Args:
    modalities: sequence of ``(name, kind)`` pairs, kind in ``KINDS``.

  Returns:
    A tuple of 2-tuples (hashable, so the module can be a jit static arg).

  Raises:
    ValueError: if empty, a pair is malformed, a kind is unknown, a name is
      repeated, empty, contains "/" or ends in a reserved suffix.
  """
  if isinstance(modalities, (str, bytes)) or not modalities:
    raise ValueError("modalities must be a non-empty sequence of (name, kind) "
                     f"pairs, got {modalities!r}")
  out = []
  for pair in modalities:
    if isinstance(pair, (str, bytes)) or len(pair) != 2:
      raise ValueError(
          f"each modality must be a (name, kind) pair, got {pair!r}")
    name, kind = pair
    if not isinstance(name, str) or not name or "/" in name:
      raise ValueError(f"modality name must be a non-empty string without '/', "
                       f"got {name!r}")
    if name.endswith(TILE_MASK_SUFFIX) or name.endswith(POSITIONS_SUFFIX):
      raise ValueError(f"modality name {name!r} ends in a reserved suffix "
                       f"({TILE_MASK_SUFFIX!r}, {POSITIONS_SUFFIX!r})")
    if kind not in KINDS:
      raise ValueError(f"modality {name!r}: kind must be one of {KINDS}, got "
                       f"{kind!r}")
    out.append((name, kind))
  names = [n for n, _ in out]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"modality names must be unique, repeated: {dup}")
  return tuple(out)


def _tuplify(value):
  """Recursively turns lists into tuples (config lists -> hashable fields)."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuplify(v) for v in value)
  return value


def prepare_inputs(inputs: Mapping, presence: Mapping, modalities):
  """Checks shapes, computes effective presence and zeroes missing data.

  Args:
    inputs: see the module docstring (``inputs[m]``, and for bags
      ``inputs[m + "_tile_mask"]``). Extra keys are ignored.
    presence: ``presence[m]`` ``[batch]`` bool for every modality ``m``.
    modalities: ``(name, kind)`` pairs (validated by ``normalize_modalities``).

  Returns:
    ``(data, masks, present)``, dicts keyed by modality name:
    ``data[m]`` float32, same shape as ``inputs[m]``, exactly 0 wherever the
    modality is missing or a tile is padding; ``masks[m]`` ``[batch, n_tiles]``
    bool for bags (valid tiles of present patients); ``present[m]`` ``[batch]``
    bool (for bags also requires at least one valid tile).

  Raises:
    ValueError: naming the key, if an input or presence array is absent, has
      the wrong rank or shape, or the batch sizes disagree.
  """
  modalities = normalize_modalities(modalities)
  data, masks, present = {}, {}, {}
  batch = None
  for name, kind in modalities:
    if name not in inputs:
      raise ValueError(f"inputs is missing modality {name!r} (kind {kind}); "
                       f"got keys {sorted(inputs)}")
    if name not in presence:
      raise ValueError(f"presence is missing modality {name!r}; got keys "
                       f"{sorted(presence)}")
    x = jnp.asarray(inputs[name])
    p = jnp.asarray(presence[name])
    want = 2 if kind == "tabular" else 3
    if x.ndim != want:
      layout = ("[batch, features]" if kind == "tabular"
                else "[batch, n_tiles, dim]")
      raise ValueError(f"inputs[{name!r}] ({kind}) must be {layout}, got shape "
                       f"{tuple(x.shape)}")
    if batch is None:
      batch = x.shape[0]
    if x.shape[0] != batch:
      raise ValueError(f"inputs[{name!r}] has batch size {x.shape[0]}, other "
                       f"modalities have {batch}")
    if tuple(p.shape) != (batch,):
      raise ValueError(f"presence[{name!r}] must have shape ({batch},) "
                       f"([batch]), got {tuple(p.shape)}")
    p = p.astype(bool)
    if kind == "bag":
      key = name + TILE_MASK_SUFFIX
      if key not in inputs:
        raise ValueError(f"inputs is missing {key!r}, the [batch, n_tiles] "
                         f"tile mask of bag modality {name!r}")
      mask = jnp.asarray(inputs[key])
      if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(f"inputs[{key!r}] must have shape {tuple(x.shape[:2])}"
                         f" ([batch, n_tiles]), got {tuple(mask.shape)}")
      mask = mask.astype(bool) & p[:, None]
      p = jnp.any(mask, axis=1)
      masks[name] = mask
      x = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)
    else:
      x = jnp.where(p[:, None], x.astype(jnp.float32), 0.0)
    data[name] = x
    present[name] = p
  return data, masks, present


def _head(n_out: int, name: str = "head") -> nn.Dense:
  """Output layer: ``n_out`` time-bin logits or 1 Cox log-hazard."""
  return nn.Dense(n_out, kernel_init=xavier_normal, name=name)


def _check_n_out(n_out: int):
  if n_out < 1:
    raise ValueError(f"n_out must be >= 1 (time bins, or 1 for a Cox "
                     f"log-hazard), got {n_out}")


# ------------------------------------------------------------------- encoders


class ModalityEncoders(nn.Module):
  """Per-modality encoders: SNN for tabular, AttentionMIL for bags.

  Each modality ``m`` gets its own encoder (submodule ``m``) producing a
  ``[batch, embed_dim]`` embedding, set to exactly 0 for patients where ``m``
  is missing.

  Attributes:
    modalities: ``(name, kind)`` pairs.
    embed_dim: embedding width of every modality (256 PORPOISE, 128 CM-MMF).
    snn_hidden: SNN widths before the final ``embed_dim`` layer; PORPOISE's
      ``fc_omic`` is ``omic_dim -> 256 -> 256``, i.e. ``(256,)`` + 256.
    snn_activation: ``"selu"`` or ``"elu"`` (PORPOISE).
    snn_dropout: AlphaDropout rate.
    mil_fc_dim: AttentionMIL instance width (512).
    mil_attn_dim: AttentionMIL attention width (256).
    mil_dropout: AttentionMIL dropout (0.25).
    mil_input_dropout: dropout on raw tile features (PORPOISE dropinput, 0).
    mil_gated: gated attention.
  """
  modalities: Sequence = ()  # (name, kind) pairs.
  embed_dim: int = 256  # Embedding width per modality.
  snn_hidden: Sequence[int] = (256,)  # SNN widths before the embedding layer.
  snn_activation: str = "selu"  # "selu" or "elu".
  snn_dropout: float = 0.25  # AlphaDropout rate.
  mil_fc_dim: int = 512  # MIL instance width.
  mil_attn_dim: int = 256  # MIL attention width.
  mil_dropout: float = 0.25  # MIL dropout.
  mil_input_dropout: float = 0.0  # Dropout on raw tile features.
  mil_gated: bool = True  # Gated MIL attention.

  def __post_init__(self):
    object.__setattr__(self, "modalities", _tuplify(self.modalities))
    object.__setattr__(self, "snn_hidden", _tuplify(self.snn_hidden))
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """Encodes every modality.

    Args:
      inputs, presence: see the module docstring.
      train: enables dropout.

    Returns:
      ``(embeddings, present, mil_attention)``: dicts keyed by modality name;
      ``embeddings[m]`` ``[batch, embed_dim]`` float32 (0 where missing),
      ``present[m]`` ``[batch]`` bool, ``mil_attention[m]`` ``[batch, n_tiles]``
      for bag modalities (0 on padding and for missing patients).

    Raises:
      ValueError: bad inputs (see ``prepare_inputs``).
    """
    modalities = normalize_modalities(self.modalities)
    data, masks, present = prepare_inputs(inputs, presence, modalities)
    embeddings, mil_attention = {}, {}
    for name, kind in modalities:
      if kind == "tabular":
        emb = SNN((*self.snn_hidden, self.embed_dim), self.snn_activation,
                  self.snn_dropout, name=name)(data[name], train=train)
      else:
        emb, att = AttentionMIL(
            self.mil_fc_dim, self.mil_attn_dim, self.embed_dim,
            self.mil_dropout, self.mil_input_dropout, self.mil_gated,
            name=name)(data[name], masks[name], train=train)
        mil_attention[name] = att
      embeddings[name] = jnp.where(present[name][:, None], emb, 0.0)
    return embeddings, present, mil_attention


def _stack(embeddings, present, modalities):
  """``[batch, M, d]`` embeddings and ``[batch, M]`` presence, model order."""
  names = [n for n, _ in modalities]
  f = jnp.stack([embeddings[n] for n in names], axis=1)
  p = jnp.stack([present[n] for n in names], axis=1)
  return f, p


def _base_aux(embeddings, present, mil_attention):
  return {"presence": dict(present), "embeddings": dict(embeddings),
          "mil_attention": dict(mil_attention)}


# ------------------------------------------------------------ fusion modules


class CrossModalAttentionFusion(nn.Module):
  """CM-MMF cross-modality attention (Deng et al., eqs. 1-2).

  ``e_m = w^T act(V f_m + c) + b``; ``a = softmax_m(e)`` over the modalities
  present for each patient; ``fused = sum_m a_m f_m``. With
  ``share_weights=True`` (the paper's proposed design, Table 2 strategy 4)
  V and w are the same for every modality (the paper's "two 1x1 convolutions
  with shareable kernels"; PORPOISE's non-gated ``Attn_Net`` applied to the
  stack of embeddings, mahmoodlab/PORPOISE ``models/model_porpoise.py``);
  ``share_weights=False`` gives each modality its own V_m, w_m (Table 2
  strategies 1/3).

  Attributes:
    attn_dim: N, the width of V (not given in the paper; 128 here).
    activation: ``"tanh"`` (proposed) or ``"relu"`` (Table 2 ablation).
    share_weights: share V and w across modalities.
  """
  attn_dim: int = 128  # Width N of the first 1x1 layer.
  activation: str = "tanh"  # "tanh" (paper) or "relu".
  share_weights: bool = True  # Shared V, w (paper's proposed design).

  @nn.compact
  def __call__(self, f, present):
    """Fuses modality embeddings.

    Args:
      f: ``[batch, M, d]`` embeddings (rows of missing modalities are ignored).
      present: ``[batch, M]`` bool.

    Returns:
      ``(fused, weights)``: ``fused`` ``[batch, d]``; ``weights``
      ``[batch, M]``, summing to 1 over present modalities, 0 for missing
      ones, all 0 (and ``fused`` = 0) for a patient with no modality.

    Raises:
      ValueError: if ``f`` is not 3-D, ``present`` is not ``[batch, M]`` or
        ``activation`` is unknown.
    """
    if f.ndim != 3 or tuple(present.shape) != tuple(f.shape[:2]):
      raise ValueError("CrossModalAttentionFusion expects f [batch, M, d] and "
                       f"present [batch, M], got {tuple(f.shape)} and "
                       f"{tuple(present.shape)}")
    if self.activation not in ("tanh", "relu"):
      raise ValueError(f"activation must be 'tanh' or 'relu', got "
                       f"{self.activation!r}")
    act = jnp.tanh if self.activation == "tanh" else nn.relu
    if self.share_weights:
      e = nn.Dense(1, kernel_init=xavier_normal, name="w")(
          act(nn.Dense(self.attn_dim, kernel_init=xavier_normal,
                       name="V")(f)))[..., 0]
    else:
      e = jnp.stack([
          nn.Dense(1, kernel_init=xavier_normal, name=f"w{i}")(
              act(nn.Dense(self.attn_dim, kernel_init=xavier_normal,
                           name=f"V{i}")(f[:, i])))[..., 0]
          for i in range(f.shape[1])], axis=1)
    weights = masked_softmax(e, present.astype(bool), axis=1)
    fused = jnp.einsum("bm,bmd->bd", weights, f)
    return fused, weights


class GatedKroneckerFusion(nn.Module):
  """Gated Kronecker-product fusion (Pathomic Fusion / PORPOISE BilinearFusion).

  As PORPOISE's ``BilinearFusion`` (mahmoodlab/PORPOISE
  ``models/model_utils.py``, used by ``PorpoiseMMF`` in
  ``models/model_porpoise.py``): per modality i, ``h_i = ReLU(Dense(s)(v_i))``;
  with gating ``z_i = Dense(s)([v_1; ...; v_M])`` and
  ``o_i = Dropout(ReLU(Dense(s)(sigmoid(z_i) * h_i)))``, without gating
  ``o_i = Dropout(ReLU(Dense(s)(h_i)))``. Then::

    p   = flatten([o_1; 1] x ... x [o_M; 1])        # (s+1)^M; 33 x 33 = 1089
    e   = Dropout(ReLU(encoder1(Dropout(p))))       # Dense(mmhid)
    e   = [e; v_1; ...; v_M]                        # only with skip
    out = Dropout(ReLU(encoder2(e)))                # Dense(mmhid)

  ``encoder2`` is applied with and without ``skip``: its input width is
  ``mmhid + sum_i d_i`` with ``skip`` and ``mmhid`` without (PORPOISE:
  ``Linear(256 + skip_dim, mmhid)``, ``skip_dim = 0`` without skip). Earlier
  versions of this module applied ``encoder2`` only with ``skip`` and had no
  dropout after ``encoder1`` and ``encoder2``; ``skip=False`` therefore
  lacked one ``Dense(mmhid) -> ReLU`` layer (``mmhid * (mmhid + 1)``
  parameters) compared with PORPOISE. Parameter names are unchanged. One
  difference remains: PORPOISE fixes ``encoder1``'s width at 256 whatever
  ``mmhid`` is; here it is ``mmhid`` (the same for PORPOISE's mmhid 256).

  More than 2 modalities: the full M-way outer product (Pathomic Fusion's
  trimodal tensor fusion). Its width ``(s+1)^M`` grows fast; a ValueError is
  raised above ``max_product_dim``. PORPOISE's optional ``nn.Bilinear`` gate
  input is not implemented (it only exists for 2 modalities); the gate uses
  a linear map of the concatenated embeddings for any M.

  Missing modality i: ``v_i`` is already 0 and ``o_i`` is set to 0, so its
  augmented vector is ``[0, ..., 0, 1]`` and the outer product keeps only the
  terms of the present modalities (the appended 1 is what makes the unimodal
  terms survive).

  Attributes:
    scale_dim: s, per-modality gated width (256 / 8 = 32 in PORPOISE).
    mmhid: fused width (256), the output width of ``encoder1`` and
      ``encoder2``.
    gate: use the sigmoid gate (PORPOISE class default True; its CLI default
      is False).
    skip: concatenate the embeddings to ``encoder1``'s output before
      ``encoder2`` (class default True; CLI False).
    dropout_rate: dropout on ``o_i``, on the product and after ``encoder1``
      and ``encoder2`` (0.25).
    max_product_dim: refuse larger outer products.
  """
  scale_dim: int = 32  # Gated width per modality.
  mmhid: int = 256  # Fused width.
  gate: bool = True  # Sigmoid gate per modality.
  skip: bool = True  # Concatenate embeddings before encoder2.
  dropout_rate: float = 0.25  # Dropout on o_i, the product, encoder1/2.
  max_product_dim: int = 1 << 16  # Largest allowed (s+1)^M.

  @nn.compact
  def __call__(self, embs, present, *, train: bool):
    """Fuses modality embeddings.

    Args:
      embs: list of M ``[batch, d_i]`` embeddings (0 where missing).
      present: ``[batch, M]`` bool.
      train: enables dropout.

    Returns:
      ``[batch, mmhid]`` float32.

    Raises:
      ValueError: if M < 2 or ``(scale_dim + 1)^M > max_product_dim``.
    """
    m = len(embs)
    if m < 2:
      raise ValueError(f"GatedKroneckerFusion needs >= 2 modalities, got {m}")
    size = (self.scale_dim + 1) ** m
    if size > self.max_product_dim:
      raise ValueError(f"Kronecker product of {m} modalities at scale_dim "
                       f"{self.scale_dim} has {size} features > "
                       f"max_product_dim {self.max_product_dim}; lower "
                       f"scale_dim or raise max_product_dim")
    v_all = jnp.concatenate(embs, axis=-1)
    batch = v_all.shape[0]
    prod = None
    for i, v in enumerate(embs):
      h = nn.relu(nn.Dense(self.scale_dim, kernel_init=xavier_normal,
                           name=f"h{i}")(v))
      if self.gate:
        z = nn.Dense(self.scale_dim, kernel_init=xavier_normal,
                     name=f"z{i}")(v_all)
        h = nn.sigmoid(z) * h
      o = nn.relu(nn.Dense(self.scale_dim, kernel_init=xavier_normal,
                           name=f"o{i}")(h))
      o = nn.Dropout(self.dropout_rate, name=f"o{i}_dropout")(
          o, deterministic=not train)
      o = jnp.where(present[:, i:i + 1], o, 0.0)
      o = jnp.concatenate([o, jnp.ones((batch, 1), o.dtype)], axis=-1)
      prod = o if prod is None else (
          prod[:, :, None] * o[:, None, :]).reshape(batch, -1)
    out = nn.Dropout(self.dropout_rate, name="post_fusion_dropout")(
        prod, deterministic=not train)
    out = nn.relu(nn.Dense(self.mmhid, kernel_init=xavier_normal,
                           name="encoder1")(out))
    out = nn.Dropout(self.dropout_rate, name="encoder1_dropout")(
        out, deterministic=not train)
    if self.skip:
      out = jnp.concatenate([out, v_all], axis=-1)
    out = nn.relu(nn.Dense(self.mmhid, kernel_init=xavier_normal,
                           name="encoder2")(out))
    return nn.Dropout(self.dropout_rate, name="encoder2_dropout")(
        out, deterministic=not train)


class _ConcatMLP(nn.Module):
  """``[emb_1; ...; emb_M; presence] -> (Dense -> ReLU)*``, PORPOISE concat."""
  hidden: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, embs, present):
    x = jnp.concatenate([*embs, present.astype(jnp.float32)], axis=-1)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, kernel_init=xavier_normal,
                           name=f"dense{i}")(x))
    return x


# --------------------------------------------------------------------- models

_ENCODER_FIELDS = ("embed_dim", "snn_hidden", "snn_activation", "snn_dropout",
                   "mil_fc_dim", "mil_attn_dim", "mil_dropout",
                   "mil_input_dropout", "mil_gated")


def _encoders(model) -> ModalityEncoders:
  """Builds the ``encoders`` submodule from a model's encoder fields."""
  return ModalityEncoders(model.modalities,
                          **{k: getattr(model, k) for k in _ENCODER_FIELDS},
                          name="encoders")


class _FusionBase(nn.Module):
  """Shared fields of the encoder-then-fuse models (not used directly).

  Attributes:
    modalities: ``(name, kind)`` pairs.
    n_out: time bins (default 4) or 1 (Cox log-hazard).
    embed_dim ... mil_gated: see ``ModalityEncoders``.
  """
  modalities: Sequence = (("omic", "tabular"), ("wsi", "bag"))  # (name, kind).
  n_out: int = 4  # Time-bin logits, or 1 for a Cox log-hazard.
  embed_dim: int = 256  # Per-modality embedding width.
  snn_hidden: Sequence[int] = (256,)  # SNN widths before embed_dim.
  snn_activation: str = "selu"  # "selu" (Klambauer) or "elu" (PORPOISE).
  snn_dropout: float = 0.25  # AlphaDropout rate.
  mil_fc_dim: int = 512  # MIL instance width.
  mil_attn_dim: int = 256  # MIL attention width.
  mil_dropout: float = 0.25  # MIL dropout.
  mil_input_dropout: float = 0.0  # Dropout on raw tile features.
  mil_gated: bool = True  # Gated MIL attention.

  def __post_init__(self):
    object.__setattr__(self, "modalities",
                       normalize_modalities(_tuplify(self.modalities)))
    object.__setattr__(self, "snn_hidden", _tuplify(self.snn_hidden))
    super().__post_init__()


class CMMMF(_FusionBase):
  """CM-MMF: AMIL (WSI) + SNN (RNA, clinical) + cross-modality attention.

  Deng, Shaikh, Shannon & Nie, "Cross-modality Attention-based Multimodal
  Fusion for Non-small Cell Lung Cancer (NSCLC) Patient Survival
  Prediction" (section numbers below refer to that paper):

  * unimodal embeddings (§2.1): AttentionMIL with rho to 128 for bags, SNN to
    128 for tabular modalities (PORPOISE's blocks, mahmoodlab/PORPOISE
    ``models/model_porpoise.py``, with rho and the SNN at 128 instead of 256);
  * normalisation of the embeddings to [0, 1] before fusion (§2.2, §3.4;
    read here as per-patient, per-modality min-max, ``embedding_norm``);
  * ``CrossModalAttentionFusion`` with shared V, w and tanh (eq. 1-2);
  * a one-layer classifier -> ``[batch, n_out]`` (4-bin NLL in the paper).

  Missing modalities drop out of the softmax over modalities for that
  patient, so the present ones share the attention mass. The paper's
  training-time Gaussian noise on the input features belongs to the data
  pipeline and is not part of the model.

  Attributes (besides ``_FusionBase``'s; ``embed_dim`` defaults to 128 and
  ``snn_activation`` to "elu" since CM-MMF reuses PORPOISE's blocks):
    attn_dim: width N of the modality attention (not in the paper).
    attn_activation: "tanh" (paper) or "relu".
    share_attention: shared V, w across modalities (paper).
    embedding_norm: "minmax" (paper §2.2) or "none".

  ``aux`` adds ``"modality_attention"`` ``[batch, M]`` (model modality order)
  and ``"fused"`` ``[batch, embed_dim]``.
  """
  embed_dim: int = 128  # CM-MMF embedding width.
  snn_hidden: Sequence[int] = (128,)  # SNN widths before embed_dim.
  snn_activation: str = "elu"  # PORPOISE's SNN block.
  attn_dim: int = 128  # Width N of V.
  attn_activation: str = "tanh"  # Paper: tanh.
  share_attention: bool = True  # Paper: shared V and w.
  embedding_norm: str = "minmax"  # "minmax" or "none".

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """See the module docstring for the interface.

    Returns:
      ``(out [batch, n_out], aux)``.

    Raises:
      ValueError: bad inputs, ``n_out < 1`` or unknown ``embedding_norm``.
    """
    _check_n_out(self.n_out)
    if self.embedding_norm not in ("minmax", "none"):
      raise ValueError(f"embedding_norm must be 'minmax' or 'none', got "
                       f"{self.embedding_norm!r}")
    embeddings, present, mil_att = _encoders(self)(inputs, presence,
                                                   train=train)
    f, p = _stack(embeddings, present, self.modalities)
    if self.embedding_norm == "minmax":
      lo = jnp.min(f, axis=-1, keepdims=True)
      hi = jnp.max(f, axis=-1, keepdims=True)
      # eps keeps a constant (e.g. all-zero ReLU) embedding finite (-> 0).
      f = (f - lo) / (hi - lo + 1e-6)
      f = jnp.where(p[..., None], f, 0.0)
    fused, weights = CrossModalAttentionFusion(
        self.attn_dim, self.attn_activation, self.share_attention,
        name="fusion")(f, p)
    out = _head(self.n_out)(fused)
    aux = _base_aux(embeddings, present, mil_att)
    aux.update(modality_attention=weights, fused=fused)
    return out, aux


class ConcatFusion(_FusionBase):
  """Concatenation fusion (Mobadersany et al. 2018; PORPOISE ``concat``).

  ``[emb_1; ...; emb_M; presence_1..M] -> (Dense -> ReLU) x len(hidden) ->
  head``. A missing modality's embedding is set to 0 and its presence
  indicator (0/1, appended after the embeddings) tells the MLP that the zeros
  mean "missing" rather than "all features zero"; without the indicators a
  missing modality would be indistinguishable from a genuine zero embedding.

  Attributes (besides ``_FusionBase``'s):
    hidden: MLP widths after concatenation (PORPOISE: 256, 256).

  ``aux`` adds ``"fused"`` ``[batch, hidden[-1]]``.
  """
  hidden: Sequence[int] = (256, 256)  # MLP widths after concatenation.

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """See the module docstring. Returns ``(out [batch, n_out], aux)``."""
    _check_n_out(self.n_out)
    embeddings, present, mil_att = _encoders(self)(inputs, presence,
                                                   train=train)
    f, p = _stack(embeddings, present, self.modalities)
    fused = _ConcatMLP(_tuplify(self.hidden), name="fusion")(
        [f[:, i] for i in range(f.shape[1])], p)
    out = _head(self.n_out)(fused)
    aux = _base_aux(embeddings, present, mil_att)
    aux["fused"] = fused
    return out, aux


class MeanFusion(_FusionBase):
  """Mean-vector fusion (Cheerla & Gevaert 2019): mean of present embeddings.

  ``fused = sum_m p_m f_m / max(sum_m p_m, 1)`` -> head. A patient with no
  modality gets ``fused = 0`` (output = head bias).

  ``aux`` adds ``"fused"`` ``[batch, embed_dim]``.
  """

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """See the module docstring. Returns ``(out [batch, n_out], aux)``."""
    _check_n_out(self.n_out)
    embeddings, present, mil_att = _encoders(self)(inputs, presence,
                                                   train=train)
    f, p = _stack(embeddings, present, self.modalities)
    count = jnp.sum(p, axis=1, keepdims=True).astype(jnp.float32)
    fused = jnp.sum(f, axis=1) / jnp.maximum(count, 1.0)
    out = _head(self.n_out)(fused)
    aux = _base_aux(embeddings, present, mil_att)
    aux["fused"] = fused
    return out, aux


class BilinearFusion(_FusionBase):
  """Gated Kronecker (bilinear) fusion, Pathomic Fusion / PORPOISE style.

  Encoders -> ``GatedKroneckerFusion`` (see there for the gate, the M > 2
  outer product and missing modalities) -> head. Needs >= 2 modalities.

  Attributes (besides ``_FusionBase``'s):
    scale_dim: per-modality gated width (32 = 256 / 8 in PORPOISE).
    mmhid: fused width (256).
    gate: sigmoid gates.
    skip: skip connection.
    fusion_dropout: dropout inside the fusion (0.25).

  ``aux`` adds ``"fused"`` ``[batch, mmhid]``.
  """
  scale_dim: int = 32  # Gated width per modality.
  mmhid: int = 256  # Fused width.
  gate: bool = True  # Sigmoid gates.
  skip: bool = True  # Skip connection from the embeddings.
  fusion_dropout: float = 0.25  # Dropout inside the fusion.

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """See the module docstring. Returns ``(out [batch, n_out], aux)``."""
    _check_n_out(self.n_out)
    embeddings, present, mil_att = _encoders(self)(inputs, presence,
                                                   train=train)
    f, p = _stack(embeddings, present, self.modalities)
    fused = GatedKroneckerFusion(self.scale_dim, self.mmhid, self.gate,
                                 self.skip, self.fusion_dropout,
                                 name="fusion")(
                                     [f[:, i] for i in range(f.shape[1])], p,
                                     train=train)
    out = _head(self.n_out)(fused)
    aux = _base_aux(embeddings, present, mil_att)
    aux["fused"] = fused
    return out, aux


class PorpoiseGatedLateFusion(_FusionBase):
  """PORPOISE MMF (Chen et al., Cancer Cell 2022).

  As ``PorpoiseMMF`` in mahmoodlab/PORPOISE ``models/model_porpoise.py``.
  WSI: ``[input dropout] -> Dense(512) -> ReLU -> Dropout(.25) -> gated
  attention (D=256) -> pooled 512 -> rho Dense(256) -> ReLU -> Dropout(.25)``;
  omics: 2 SNN blocks ``omic_dim -> 256 -> 256`` with **ELU** and
  AlphaDropout(.25); fusion:

  * ``"bilinear"`` (default): the gated Kronecker fusion, scale_dim 32
    (256 / 8), mmhid 256, per-modality sigmoid gates and a skip connection
    (the class defaults; PORPOISE's CLI leaves gates and skip off: set
    ``gate=False, skip=False`` for that);
  * ``"concat"``: ``[h_path; h_omic] -> Dense(256) -> ReLU -> Dense(256) ->
    ReLU``, plus the presence indicators of ``ConcatFusion``;

  then ``classifier_mm = Linear(256 -> n_out)``.

  PORPOISE has no missing modalities; here they are handled as in
  ``GatedKroneckerFusion`` / ``ConcatFusion``. More than 2 modalities (e.g. a
  separate clinical modality) use the M-way product. Initialisation:
  Xavier-normal for the WSI branch and fusion, as PORPOISE; the SNN uses
  LeCun-normal (PORPOISE's MMF leaves PyTorch's default there; only its
  standalone SNN calls ``init_max_weights``, ``models/model_utils.py``).

  Attributes (besides ``_FusionBase``'s):
    fusion: ``"bilinear"`` or ``"concat"``.
    gate, skip, scale_dim, mmhid, fusion_dropout: see ``BilinearFusion``.

  ``aux`` adds ``"fused"`` ``[batch, 256]``.
  """
  snn_activation: str = "elu"  # PORPOISE: ELU, not SELU.
  fusion: str = "bilinear"  # "bilinear" or "concat".
  scale_dim: int = 32  # 256 / scale_dim 8.
  mmhid: int = 256  # Fused width.
  gate: bool = True  # Class default; PORPOISE CLI default is False.
  skip: bool = True  # Class default; PORPOISE CLI default is False.
  fusion_dropout: float = 0.25  # Dropout inside the fusion.

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """See the module docstring. Returns ``(out [batch, n_out], aux)``.

    Raises:
      ValueError: bad inputs, unknown ``fusion`` or ``n_out < 1``.
    """
    _check_n_out(self.n_out)
    if self.fusion not in ("bilinear", "concat"):
      raise ValueError(f"fusion must be 'bilinear' or 'concat', got "
                       f"{self.fusion!r}")
    embeddings, present, mil_att = _encoders(self)(inputs, presence,
                                                   train=train)
    f, p = _stack(embeddings, present, self.modalities)
    embs = [f[:, i] for i in range(f.shape[1])]
    if self.fusion == "bilinear":
      fused = GatedKroneckerFusion(self.scale_dim, self.mmhid, self.gate,
                                   self.skip, self.fusion_dropout,
                                   name="fusion")(embs, p, train=train)
    else:
      fused = _ConcatMLP((self.mmhid, self.mmhid), name="fusion")(embs, p)
    out = _head(self.n_out, name="classifier_mm")(fused)
    aux = _base_aux(embeddings, present, mil_att)
    aux["fused"] = fused
    return out, aux


class Unimodal(nn.Module):
  """A single-modality model: SNN (tabular) or AttentionMIL (bag) + head.

  Tabular: PORPOISE's standalone SNN, 4 blocks of 256 with LeCun-normal init
  (``activation`` "selu" as Klambauer et al., or "elu" as PORPOISE) ->
  ``Linear(256 -> n_out)``. Bag: PorpoiseAMIL, ``Dense(512) -> ReLU ->
  Dropout -> gated attention -> pooled 512`` (no rho unless ``mil_out_dim``)
  -> ``Linear(-> n_out)``.

  A patient whose single modality is missing gets the zero embedding, i.e.
  the head's bias (no information); the trainer should normally drop such
  patients for a unimodal model.

  Attributes:
    modalities: exactly one ``(name, kind)`` pair.
    n_out: time bins (4) or 1 (Cox).
    snn_hidden: SNN widths ((256,) * 4, PORPOISE "small").
    snn_activation, snn_dropout: SNN options.
    mil_fc_dim, mil_attn_dim, mil_dropout, mil_input_dropout, mil_gated:
      AttentionMIL options.
    mil_out_dim: rho width, or None (PorpoiseAMIL: no rho).

  ``aux``: ``"presence"``, ``"embeddings"``, ``"mil_attention"`` as above.
  """
  modalities: Sequence = (("omic", "tabular"),)  # Exactly one pair.
  n_out: int = 4  # Time-bin logits, or 1 for a Cox log-hazard.
  snn_hidden: Sequence[int] = (256, 256, 256, 256)  # SNN widths.
  snn_activation: str = "selu"  # "selu" or "elu".
  snn_dropout: float = 0.25  # AlphaDropout rate.
  mil_fc_dim: int = 512  # MIL instance width.
  mil_attn_dim: int = 256  # MIL attention width.
  mil_out_dim: Optional[int] = None  # rho width; None = pooled fc_dim.
  mil_dropout: float = 0.25  # MIL dropout.
  mil_input_dropout: float = 0.0  # Dropout on raw tile features.
  mil_gated: bool = True  # Gated attention.

  def __post_init__(self):
    object.__setattr__(self, "modalities",
                       normalize_modalities(_tuplify(self.modalities)))
    object.__setattr__(self, "snn_hidden", _tuplify(self.snn_hidden))
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """See the module docstring. Returns ``(out [batch, n_out], aux)``.

    Raises:
      ValueError: if ``modalities`` has more than one entry, bad inputs or
        ``n_out < 1``.
    """
    _check_n_out(self.n_out)
    if len(self.modalities) != 1:
      raise ValueError(f"Unimodal takes exactly one modality, got "
                       f"{self.modalities}")
    (name, kind), = self.modalities
    data, masks, present = prepare_inputs(inputs, presence, self.modalities)
    mil_att = {}
    if kind == "tabular":
      emb = SNN(self.snn_hidden, self.snn_activation, self.snn_dropout,
                name=name)(data[name], train=train)
    else:
      emb, mil_att[name] = AttentionMIL(
          self.mil_fc_dim, self.mil_attn_dim, self.mil_out_dim,
          self.mil_dropout, self.mil_input_dropout, self.mil_gated,
          name=name)(data[name], masks[name], train=train)
    emb = jnp.where(present[name][:, None], emb, 0.0)
    out = _head(self.n_out)(emb)
    return out, _base_aux({name: emb}, present, mil_att)


def count_params(params) -> int:
  """Total number of scalars in a parameter pytree."""
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(params)))


# big_vision-style alias: the file's headline model (the others are baselines).
Model = CMMMF
