"""SarcNet: MIL over frozen tile features + a clinical MLP, Flax Linen.

SarcNet (Maussion et al., "Multimodal prediction of metastatic relapse using
federated deep learning in soft-tissue sarcoma with a complex genomic
profile", Scientific Reports 2025) is described in its abstract only as "a
multimodal deep-learning algorithm based on histological whole-slides and
clinical variables" trained by federated learning at two hospitals. Its
methods are not public, so **every architectural choice below is an
assumption** (``configs/sarcnet.py`` labels each one):

* a bag of frozen tile features ``[batch, tiles, dim]`` goes to a MIL
  aggregator: gated attention-MIL (Ilse, Tomczak & Welling, ICML 2018, eq. 9;
  ``jaxsurv.models.mil.AttentionMIL``) by default, or Chowder's top-k /
  bottom-k tile-score aggregator (Courtiol et al., "Classification and
  disease localization in histopathology using only global labels: a
  weakly-supervised approach", arXiv:1802.02212, §2.2: a per-tile score,
  the ``k`` highest and ``k`` lowest scores of the bag, then an MLP);
* the bag embedding (zeroed, with a 0/1 presence indicator, for a patient
  without a slide) is concatenated with a clinical MLP embedding;
* a fusion MLP and a head: column 0 is the Cox log-hazard of
  metastasis-free survival (higher = earlier event), and with
  ``binary_head`` column 1 the logit of an event before the horizon
  (5 years; ``jaxsurv.tasks.SingleOutcome.horizon_weight``).

Missing data: a patient whose bag has no valid tile (or whose presence is
False) has a zero bag embedding and presence indicator 0; a model without a
bag modality (e.g. the Rotterdam/GBSG clinical-only sites) is the clinical
branch alone.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxsurv.models.fusion import normalize_modalities, prepare_inputs
from jaxsurv.models.mil import AttentionMIL

xavier_normal = nn.initializers.xavier_normal()
MIL_KINDS = ("attention", "chowder")


def _tuple(v):
  return tuple(_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


class Chowder(nn.Module):
  """Chowder bag encoder: ``[batch, tiles, dim] -> [batch, out]``.

  ``Dense(1)`` tile scores (after an optional ``Dense(fc_dim) -> ReLU``
  tile embedding), the ``k`` largest and ``k`` smallest scores among the
  valid tiles (Courtiol et al. 2018 §2.2, "MinMax layer"; always ``2k``
  values, however many tile slots the batch has), then ``Dense -> ReLU``
  per width in ``hidden``. A bag with fewer than ``k`` valid tiles
  repeats its extreme valid score in the empty slots; a bag without any
  valid tile gets all-zero extremes (the caller treats it as missing).

  Attributes:
    k: number of top and of bottom scores (Chowder: R = 5).
    hidden: MLP widths after the MinMax layer (Chowder: 200, 100).
    fc_dim: tile embedding width before the score (0: score the raw features).
    dropout_rate: dropout in the MLP.
  """
  k: int = 5
  hidden: Sequence[int] = (200, 100)
  fc_dim: int = 0
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, mask, *, train: bool):
    """Returns ``(embedding [batch, hidden[-1]], tile scores [batch, tiles])``.

    Raises:
      ValueError: ``x`` not ``[batch, tiles, dim]``, ``mask`` not ``[batch,
        tiles]``, or ``k`` < 1.
    """
    if x.ndim != 3 or tuple(mask.shape) != tuple(x.shape[:2]):
      raise ValueError(f"Chowder expects x [batch, tiles, dim] and mask [batch, tiles], got "
                       f"{tuple(x.shape)} and {tuple(mask.shape)}")
    if self.k < 1:
      raise ValueError(f"Chowder k must be >= 1, got {self.k}")
    mask = mask.astype(bool)
    h = jnp.where(mask[..., None], x.astype(jnp.float32), 0.0)
    if self.fc_dim:
      h = nn.relu(nn.Dense(self.fc_dim, kernel_init=xavier_normal, name="fc")(h))
    s = nn.Dense(1, kernel_init=xavier_normal, name="score")(h)[..., 0]
    k = self.k
    # Always 2k extremes, whatever the number of tile slots (the parameters'
    # shapes must not depend on the padding): fewer slots than k are padded
    # with invalid ones.
    pad = max(0, k - x.shape[1])
    s_k = jnp.pad(s, ((0, 0), (0, pad)))
    m_k = jnp.pad(mask, ((0, 0), (0, pad)))
    big = jnp.finfo(jnp.float32).max
    top = jax.lax.top_k(jnp.where(m_k, s_k, -big), k)[0]
    bottom = -jax.lax.top_k(jnp.where(m_k, -s_k, -big), k)[0]
    n_valid = jnp.sum(mask, axis=1, keepdims=True)
    slot = jnp.arange(k)[None, :]
    # Slots beyond the valid tiles repeat the last valid extreme (0 if none).
    last_top = jnp.take_along_axis(top, jnp.clip(n_valid - 1, 0, k - 1), axis=1)
    last_bot = jnp.take_along_axis(bottom, jnp.clip(n_valid - 1, 0, k - 1), axis=1)
    top = jnp.where(slot < n_valid, top, last_top)
    bottom = jnp.where(slot < n_valid, bottom, last_bot)
    z = jnp.where(n_valid > 0, jnp.concatenate([top, bottom], axis=1), 0.0)
    for i, w in enumerate(_tuple(self.hidden)):
      z = nn.relu(nn.Dense(w, kernel_init=xavier_normal, name=f"mlp_{i}")(z))
      z = nn.Dropout(self.dropout_rate)(z, deterministic=not train)
    return z, jnp.where(mask, s, 0.0)


class SarcNet(nn.Module):
  """SarcNet-style MIL + clinical fusion (module docstring; all choices assumed).

  Attributes:
    modalities: ``(name, kind)`` pairs: at most one ``"bag"`` (tile features)
      and at least one ``"tabular"`` (clinical variables; several are
      concatenated).
    n_out: 1 (Cox log-hazard); derived from the config.
    binary_head: add a column with the logit of an event before the horizon.
    mil: ``"attention"`` (gated attention-MIL) or ``"chowder"``.
    mil_fc_dim, mil_attn_dim: attention-MIL widths (tile embedding, attention).
    mil_dropout: dropout in the MIL branch.
    chowder_k, chowder_hidden: Chowder's R and MLP widths.
    clinical_hidden: clinical MLP widths (Dense -> ReLU -> dropout each).
    fusion_hidden: fusion MLP widths after concatenation.
    dropout: dropout of the clinical and fusion MLPs.

  Call: ``(out [batch, n_out + binary_head], aux) = model.apply(variables,
  inputs, presence, train=...)`` with ``inputs {"clinical": [batch, f],
  "wsi": [batch, tiles, dim], "wsi_tile_mask": [batch, tiles]}`` and
  ``presence {m: bool [batch]}``; ``aux`` holds ``presence`` (effective) and
  ``mil_attention`` ``{bag: [batch, tiles]}`` (attention weights, or Chowder
  tile scores).
  """
  modalities: Sequence = (("clinical", "tabular"), ("wsi", "bag"))
  n_out: int = 1
  binary_head: bool = False
  mil: str = "attention"
  mil_fc_dim: int = 128
  mil_attn_dim: int = 64
  mil_dropout: float = 0.1
  chowder_k: int = 5
  chowder_hidden: Sequence[int] = (64, 32)
  clinical_hidden: Sequence[int] = (32,)
  fusion_hidden: Sequence[int] = (32,)
  dropout: float = 0.1

  def __post_init__(self):
    object.__setattr__(self, "modalities", normalize_modalities(_tuple(self.modalities)))
    for f in ("chowder_hidden", "clinical_hidden", "fusion_hidden"):
      object.__setattr__(self, f, _tuple(getattr(self, f)))
    kinds = [k for _, k in self.modalities]
    if kinds.count("bag") > 1 or "tabular" not in kinds:
      raise ValueError(f"SarcNet needs at least one tabular modality and at most one bag, got "
                       f"{self.modalities}")
    if self.mil not in MIL_KINDS:
      raise ValueError(f"SarcNet mil must be one of {MIL_KINDS}, got {self.mil!r}")
    if self.n_out != 1:
      raise ValueError(f"SarcNet has one Cox log-hazard output (n_out=1), got {self.n_out}")
    super().__post_init__()

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """See the class docstring. Returns ``(out, aux)``."""
    data, masks, present = prepare_inputs(inputs, presence, self.modalities)
    tab = [n for n, k in self.modalities if k == "tabular"]
    bag = [n for n, k in self.modalities if k == "bag"]
    z = jnp.concatenate([data[n] for n in tab], axis=1)
    for i, w in enumerate(self.clinical_hidden):
      z = nn.relu(nn.Dense(w, kernel_init=xavier_normal, name=f"clinical_{i}")(z))
      z = nn.Dropout(self.dropout)(z, deterministic=not train)
    parts, attention = [z], {}
    for name in bag:
      if self.mil == "attention":
        e, a = AttentionMIL(self.mil_fc_dim, self.mil_attn_dim, self.mil_fc_dim,
                            self.mil_dropout, name="mil")(data[name], masks[name], train=train)
      else:
        e, a = Chowder(self.chowder_k, self.chowder_hidden, self.mil_fc_dim, self.mil_dropout,
                       name="mil")(data[name], masks[name], train=train)
      p = present[name].astype(jnp.float32)[:, None]
      parts += [e * p, p]
      attention[name] = a
    h = jnp.concatenate(parts, axis=1)
    for i, w in enumerate(self.fusion_hidden):
      h = nn.relu(nn.Dense(w, kernel_init=xavier_normal, name=f"fusion_{i}")(h))
      h = nn.Dropout(self.dropout)(h, deterministic=not train)
    out = nn.Dense(self.n_out + int(self.binary_head), kernel_init=xavier_normal,
                   name="head")(h)
    return out, {"presence": present, "mil_attention": attention}


Model = SarcNet
