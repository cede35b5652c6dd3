"""HEALNet: hybrid early-fusion attention network, Flax Linen.

Hemker, Simidjievski & Jamnik, "HEALNet - Hybrid Multi-Modal Fusion for
Heterogeneous Biomedical Data", NeurIPS 2024 (Algorithms 1-2, eqs. 1-3),
re-implemented from the paper and from the behaviour of the authors'
released code, konst-int-i/healnet v0.1.0 ("the peer" below; its model is
``healnet/models/healnet.py``; no peer code copied).

A learned latent array ``S`` ``[num_latents, latent_dim]`` (initial values
set by ``latent_init``, see below) is broadcast over the batch and updated
once per layer and modality (paper Algorithm 2; peer ``HealNet.forward``)::

  for layer in range(depth):
    for m in modalities:
      dS = CrossAttn_m(LN(S), LN_m(tokens_m))        # latents query tokens
      S' = S + dS
      S' = S' + FF_m(LN(S'))                          # gated-SELU "SNN" block
      repeat self_per_cross_attn times:               # optional, per layer
        S' = S' + SelfAttn(LN(S')); S' = S' + FF(LN(S'))
      S = where(present_m[b], S', S)                  # per-patient skip
  out = Dense(n_out)(LN(mean_over_latents(S)))

Details (peer ``healnet/models/healnet.py``: ``Attention``, ``FeedForward``,
``fourier_encode``):

* Attention: ``q = W_q LN(S)``, ``k, v = W_kv LN(tokens)`` (no biases);
  ``softmax(q k^T / sqrt(d_head) / T)`` with temperature ``T = 0.5`` (the
  peer's fixed temperature, i.e. logits x 2), attention dropout, then
  ``Dense(latent_dim)`` and LeakyReLU(0.01). Padded tokens are masked.
* Feed-forward ("SNN" block, peer ``FeedForward`` with ``snn=True``):
  ``Dense(latent_dim -> 2 * 4 * latent_dim)`` split into ``(a, g)``,
  ``a * SELU(g)`` (GELU with ``snn=False``), ``Dense(-> latent_dim)``,
  dropout; pre-LayerNorm and a residual.
  Like the peer it has no AlphaDropout or LeCun init.
* Fourier position encoding (peer ``fourier_encode``): per axis, positions
  ``x`` in [-1, 1] and scales ``linspace(1, max_freq / 2, num_freq_bands)`` give
  ``[sin(pi s x), cos(pi s x), x]`` (``2 B + 1`` channels per axis),
  concatenated onto the token channels.

Tokenisation (a deliberate choice; the peer's TCGA inputs are built in
``tasks.py``, ``healnet/etl/loaders.py`` and ``config/main_gpu.yml``):

* tabular, ``tabular_tokens="vector"`` (default; the peer's TCGA setting
  ``omic_attention: True``): the whole feature vector is ONE token
  ``[batch, 1, features]``; with ``fourier_encode_data`` its (constant)
  position ``linspace(-1, 1, 1) = -1`` is encoded and appended, as the peer
  does (it acts as a learned bias on keys and values).
  ``tabular_tokens="features"``: every feature is a token
  ``[batch, features, 1]`` whose position is its feature index mapped to
  ``linspace(-1, 1, features)`` (so tokens are distinguishable) -- attention
  weights then score individual features. With ``feature_embed_dim = E >
  0`` each feature token also carries a learned embedding ``e_j`` ``[E]``
  (one per feature and modality, N(0, 1) init), so token ``j`` is
  ``[x_j, fourier(pos_j), e_j]``: with 2 Fourier bands at ``max_freq`` 2 the
  positions of neighbouring features differ by about ``pi * 2 / features``
  radians, too little for the keys to tell, say, 200 genes apart; the
  learned embedding gives every feature its own key (as the feature
  tokenizer of Gorishniy et al., "Revisiting Deep Learning Models for
  Tabular Data", NeurIPS 2021, gives it its own weight and bias). The paper
  does not say how a feature becomes a token.
* bag, ``bag_tokens="tiles"`` (default; the paper's patch tokens): each tile is
  a token ``[batch, n_tiles, dim]``, padding masked out of the softmax. If the
  modality is listed in ``spatial_axes``, ``inputs[m + "_positions"]``
  ``[batch, n_tiles, n_axes]`` (coordinates scaled to [-1, 1]) is
  Fourier-encoded and appended to each tile token.
  ``bag_tokens="channels"`` reproduces what the peer's TCGA pipeline does:
  the ``dim`` feature channels are the tokens, each a vector over the
  ``n_tiles`` slots ``[batch, dim, n_tiles]`` (padding slots hold zeros
  here, not the peer's stale rows), with the channel index Fourier-encoded.
  Parameters then depend on ``n_tiles`` and tile order matters; use it only
  to replicate the peer.

Missing modalities (the peer skips them per whole batch, in
``HealNet.forward``; see also konst-int-i/healnet issue #30): here per
patient, not per batch. A modality that is absent for patient b
(``presence`` False, or a bag with no valid tile) skips its whole step for
that patient -- cross-attention, feed-forward and the self-attention that
follows it -- so the latent passes through unchanged:
``S = where(present, S_updated, S)``. Missing inputs are also zeroed before
use, so garbage (even NaN) reaches neither the output nor the gradients.
A patient with no modality at all gets the prediction of the learned latents.

Weight sharing (``weight_sharing``; peer ``cache_fn`` and
``weight_tie_layers`` in ``HealNet.__init__``):

* ``"none"``: every layer has its own weights (peer default and the released
  paper configs ``weight_tie_layers=False``);
* ``"all"``: the paper's description ("attention weights are learned for each
  modality and are shared between layers"; eq. 3's shared update): one
  modality-specific cross-attention + feed-forward per modality, and one
  self-attention stack, used by every layer;
* ``"perceiver"``: the peer's ``weight_tie_layers=True``: layer 0 has its own
  weights, layers 1..depth-1 share one set. Unlike the peer, the
  feed-forward stays modality-specific in the shared layers (the peer's
  cache key makes it shared across modalities, ``HealNet.__init__``, an
  accident).

Latent initialisation (``latent_init``): the starting values of the
learned latent array ``S_0`` (a parameter, trained like every other):

* ``"normal"`` (default): N(0, 1), as the peer's ``HealNet.__init__``
  (``nn.Parameter(torch.randn(l_c, l_d))``); the default, so runs made before
  this option existed initialise bit for bit as they did;
* ``"uniform"``: U(0, 1) (values in [0, 1), mean 0.5), as the paper's
  Algorithm 1, line 1 (Appendix A: ``S_0[i, j] ~ U(0, 1)``).

Only the initial latents differ; every other parameter draws the same values
from the same rng in both cases.

Early fusion (``early_fusion=True``; the paper's "Early Fusion" baseline
restricted to what can be concatenated): all tabular modalities are
concatenated into ONE tabular modality named ``"early_fusion"`` (missing
ones contribute zeros, followed by one 0/1 presence indicator per tabular
modality so the model can tell "missing" from "zero"; it counts as present
when any tabular modality is present); bag modalities stay separate.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch nn.Linear's default weight init, U(+-1/sqrt(fan_in)) (the peer uses
# PyTorch defaults everywhere); biases start at 0.
from jaxsurv.models.common import torch_linear_init
from jaxsurv.models.fusion import (POSITIONS_SUFFIX, _check_n_out,
                                   _tuplify, normalize_modalities,
                                   prepare_inputs)

EARLY_FUSION_NAME = "early_fusion"
WEIGHT_SHARING = ("none", "all", "perceiver")
TABULAR_TOKENS = ("vector", "features")
BAG_TOKENS = ("tiles", "channels")
LATENT_INITS = ("normal", "uniform")

# Released per-cohort hyperparameters (konst-int-i/healnet v0.1.0,
# config/best_hyperparams.yml). Shared by all four:
# cross_heads=1, self_per_cross_attn=0, num_freq_bands=2, max_freq=2.0,
# fourier_encode_data=True, weight sharing off, snn=True, 4 time bins.
# "l1" is the coefficient for ``l1_penalty`` (not a model field).
_PAPER_SHARED = dict(cross_heads=1, self_per_cross_attn=0, num_freq_bands=2,
                     max_freq=2.0, fourier_encode_data=True,
                     weight_sharing="none", snn=True, n_out=4)
PAPER_CONFIGS = {
    "blca": dict(depth=2, num_latents=25, latent_dim=119, cross_dim_head=16,
                 attn_dropout=0.083, ff_dropout=0.473, l1=1.17e-5),
    "brca": dict(depth=2, num_latents=17, latent_dim=126, cross_dim_head=63,
                 attn_dropout=0.455, ff_dropout=0.365, l1=6.8e-6),
    "kirp": dict(depth=5, num_latents=17, latent_dim=62, cross_dim_head=27,
                 attn_dropout=0.318, ff_dropout=0.047, l1=4.63e-5),
    "ucec": dict(depth=2, num_latents=16, latent_dim=65, cross_dim_head=103,
                 attn_dropout=0.249, ff_dropout=0.057, l1=3.19e-4),
}
for _cfg in PAPER_CONFIGS.values():
  _cfg.update(_PAPER_SHARED)
del _cfg


def fourier_encode(pos, num_bands: int, max_freq: float):
  """Fourier features of positions, as HEALNet's ``fourier_encode``.

  Args:
    pos: ``[..., n_axes]`` positions, expected in ``[-1, 1]``.
    num_bands: B, number of frequency bands per axis.
    max_freq: scales are ``linspace(1, max_freq / 2, B)``.

  Returns:
    ``[..., n_axes * (2 B + 1)]`` float32: per axis
    ``[sin(pi s_1 x) .. sin(pi s_B x), cos(pi s_1 x) .. cos(pi s_B x), x]``.

  Raises:
    ValueError: if ``num_bands < 1``.
  """
  if num_bands < 1:
    raise ValueError(f"num_bands must be >= 1, got {num_bands}")
  pos = jnp.asarray(pos, jnp.float32)
  scales = jnp.linspace(1.0, max_freq / 2.0, num_bands, dtype=jnp.float32)
  x = pos[..., None] * scales * jnp.pi
  enc = jnp.concatenate([jnp.sin(x), jnp.cos(x), pos[..., None]], axis=-1)
  return enc.reshape(*pos.shape[:-1], pos.shape[-1] * (2 * num_bands + 1))


def grid_positions(n: int):
  """``[n, 1]`` positions ``linspace(-1, 1, n)`` of a 1-D token axis."""
  return jnp.linspace(-1.0, 1.0, n, dtype=jnp.float32)[:, None]


def l1_penalty(params, include: str = "all"):
  """Sum of absolute parameter values, HEALNet's L1 regulariser.

  ``include="all"`` matches the peer (konst-int-i/healnet
  ``healnet/utils/train_utils.py``): every leaf, i.e. the
  latent array, attention/feed-forward kernels, biases and LayerNorm scales
  and offsets. ``include="kernels"`` sums only leaves named ``kernel``
  (Dense weights), the usual choice when biases and norms should not be
  shrunk. The caller multiplies by the coefficient (``PAPER_CONFIGS[c]["l1"]``);
  note the peer adds it to ``loss / 16`` every step, i.e. effectively 16x
  (``healnet/main.py``).

  Args:
    params: a parameter pytree (e.g. ``variables["params"]``).
    include: ``"all"`` or ``"kernels"``.

  Returns:
    Scalar float32.

  Raises:
    ValueError: if ``include`` is unknown.
  """
  if include not in ("all", "kernels"):
    raise ValueError(f"include must be 'all' or 'kernels', got {include!r}")
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if include == "kernels":
      last = path[-1]
      key = getattr(last, "key", getattr(last, "name", None))
      if key != "kernel":
        continue
    total = total + jnp.sum(jnp.abs(leaf.astype(jnp.float32)))
  return total


class Attention(nn.Module):
  """Multi-head (cross-)attention as in HEALNet (peer ``Attention``).

  Attributes:
    heads: number of heads.
    dim_head: width per head.
    out_dim: output width (the latent dim).
    dropout_rate: dropout on the attention weights.
    temperature: softmax temperature (0.5 in the peer: logits x 2).
  """
  heads: int = 8  # Heads.
  dim_head: int = 64  # Width per head.
  out_dim: int = 128  # Output width (latent_dim).
  dropout_rate: float = 0.0  # Attention-weight dropout.
  temperature: float = 0.5  # Softmax temperature.

  @nn.compact
  def __call__(self, x, context, mask, *, train: bool):
    """Latents ``x`` attend to ``context``.

    Args:
      x: ``[batch, L, d_x]`` queries (the normalised latents).
      context: ``[batch, N, d_c]`` keys/values.
      mask: ``[batch, N]`` bool (True = attend) or None.
      train: enables attention dropout.

    Returns:
      ``(out [batch, L, out_dim], attention [batch, heads, L, N])``; the
      returned attention is before dropout, each row sums to 1 over unmasked
      tokens.
    """
    b, l, _ = x.shape
    n = context.shape[1]
    h, dh = self.heads, self.dim_head
    q = nn.Dense(h * dh, use_bias=False, kernel_init=torch_linear_init,
                 name="to_q")(x).reshape(b, l, h, dh)
    kv = nn.Dense(2 * h * dh, use_bias=False, kernel_init=torch_linear_init,
                  name="to_kv")(context)
    k, v = jnp.split(kv.reshape(b, n, 2 * h, dh), 2, axis=2)
    sim = jnp.einsum("blhd,bnhd->bhln", q, k) * (dh ** -0.5 / self.temperature)
    if mask is not None:
      # Finite fill: a fully masked row (missing patient) gives a uniform,
      # finite softmax whose update is discarded by the caller.
      sim = jnp.where(mask[:, None, None, :], sim, jnp.finfo(sim.dtype).min)
    attn = jax.nn.softmax(sim, axis=-1)
    dropped = nn.Dropout(self.dropout_rate)(attn, deterministic=not train)
    o = jnp.einsum("bhln,bnhd->blhd", dropped, v).reshape(b, l, h * dh)
    o = nn.Dense(self.out_dim, kernel_init=torch_linear_init,
                 bias_init=nn.initializers.zeros, name="to_out")(o)
    return nn.leaky_relu(o, 0.01), attn


class GatedFeedForward(nn.Module):
  """HEALNet's "SNN" feed-forward: ``Dense -> a * SELU(g) -> Dense -> Dropout``.

  ``[..., d] -> [..., d]``; the hidden width is ``mult * d`` (the first Dense
  outputs ``2 * mult * d``, split into value ``a`` and gate ``g``;
  peer ``FeedForward``). ``snn=False`` uses GELU for the gate (GEGLU).

  Attributes:
    mult: hidden width multiplier (4).
    dropout_rate: output dropout (the peer's ``ff_dropout``).
    snn: SELU gate (True) or GELU gate.
  """
  mult: int = 4  # Hidden width multiplier.
  dropout_rate: float = 0.0  # Output dropout.
  snn: bool = True  # SELU gate (HEALNet "snn") vs GELU.

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Args: ``x [..., d]``; returns ``[..., d]``."""
    d = x.shape[-1]
    a, g = jnp.split(nn.Dense(2 * self.mult * d, kernel_init=torch_linear_init,
                              name="wi")(x), 2, axis=-1)
    h = a * (nn.selu(g) if self.snn else nn.gelu(g, approximate=False))
    out = nn.Dense(d, kernel_init=torch_linear_init, name="wo")(h)
    return nn.Dropout(self.dropout_rate)(out, deterministic=not train)


class CrossBlock(nn.Module):
  """One modality's update: pre-norm cross-attention + gated feed-forward.

  ``S' = S + CrossAttn(LN(S), LN_ctx(tokens)); S' = S' + FF(LN(S'))``.
  Returns ``(S' [batch, L, D], attention [batch, heads, L, N])``.
  """
  heads: int = 8  # Cross-attention heads.
  dim_head: int = 64  # Width per head.
  attn_dropout: float = 0.0  # Attention dropout.
  ff_dropout: float = 0.0  # Feed-forward dropout.
  temperature: float = 0.5  # Attention temperature.
  snn: bool = True  # SELU-gated feed-forward.
  ff_mult: int = 4  # Feed-forward multiplier.

  @nn.compact
  def __call__(self, x, tokens, mask, *, train: bool):
    d = x.shape[-1]
    dx, attn = Attention(self.heads, self.dim_head, d, self.attn_dropout,
                         self.temperature, name="attn")(
                             nn.LayerNorm(epsilon=1e-5, name="norm")(x),
                             nn.LayerNorm(epsilon=1e-5, name="norm_context")(
                                 tokens),
                             mask, train=train)
    x = x + dx
    x = x + GatedFeedForward(self.ff_mult, self.ff_dropout, self.snn,
                             name="ff")(
                                 nn.LayerNorm(epsilon=1e-5, name="norm_ff")(x),
                                 train=train)
    return x, attn


class SelfBlock(nn.Module):
  """Latent self-attention + gated feed-forward, both pre-norm residual.

  ``[batch, L, D] -> [batch, L, D]``.
  """
  heads: int = 8  # Self-attention heads.
  dim_head: int = 64  # Width per head.
  attn_dropout: float = 0.0  # Attention dropout.
  ff_dropout: float = 0.0  # Feed-forward dropout.
  temperature: float = 0.5  # Attention temperature.
  snn: bool = True  # SELU-gated feed-forward.
  ff_mult: int = 4  # Feed-forward multiplier.

  @nn.compact
  def __call__(self, x, *, train: bool):
    d = x.shape[-1]
    xn = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
    dx, _ = Attention(self.heads, self.dim_head, d, self.attn_dropout,
                      self.temperature, name="attn")(xn, xn, None, train=train)
    x = x + dx
    return x + GatedFeedForward(self.ff_mult, self.ff_dropout, self.snn,
                                name="ff")(
                                    nn.LayerNorm(epsilon=1e-5,
                                                 name="norm_ff")(x),
                                    train=train)


def early_fusion_inputs(data, present, modalities):
  """Concatenates all tabular modalities into one (``early_fusion=True``).

  Args:
    data, present: outputs of ``prepare_inputs`` (missing data already 0).
    modalities: the ``(name, kind)`` pairs.

  Returns:
    ``(data, present, modalities)`` where the tabular modalities are replaced
    by ``"early_fusion"``: ``[batch, sum_m features_m + n_tabular]`` (features
    in modality order, then one 0/1 presence indicator per tabular modality),
    present when any tabular modality is present. Bags are unchanged and
    follow it.

  Raises:
    ValueError: if there is no tabular modality or a modality is already
      named ``"early_fusion"``.
  """
  tab = [n for n, k in modalities if k == "tabular"]
  if not tab:
    raise ValueError(f"early_fusion needs at least one tabular modality, got "
                     f"{modalities}")
  if any(n == EARLY_FUSION_NAME for n, _ in modalities):
    raise ValueError(f"modality name {EARLY_FUSION_NAME!r} is reserved when "
                     "early_fusion=True")
  fused = jnp.concatenate(
      [data[n] for n in tab]
      + [present[n][:, None].astype(jnp.float32) for n in tab], axis=-1)
  any_present = jnp.any(jnp.stack([present[n] for n in tab], axis=1), axis=1)
  new_mods = ((EARLY_FUSION_NAME, "tabular"),) + tuple(
      (n, k) for n, k in modalities if k != "tabular")
  new_data = {EARLY_FUSION_NAME: fused}
  new_present = {EARLY_FUSION_NAME: any_present}
  for n, k in modalities:
    if k != "tabular":
      new_data[n] = data[n]
      new_present[n] = present[n]
  return new_data, new_present, new_mods


class HEALNet(nn.Module):
  """HEALNet (Hemker et al., NeurIPS 2024) with per-patient modality masks.

  See the module docstring for the architecture, tokenisation, missing
  modalities, weight sharing and early fusion. Defaults are the peer's
  constructor defaults (konst-int-i/healnet v0.1.0, ``HealNet.__init__`` in
  ``healnet/models/healnet.py``); ``PAPER_CONFIGS[cohort]`` holds the
  released TCGA settings (drop its ``"l1"`` key before passing it).

  Attributes:
    modalities: ``(name, kind)`` pairs, kind ``"tabular"`` or ``"bag"``.
    n_out: time bins (4) or 1 (Cox log-hazard).
    depth: number of fusion layers (3).
    num_latents: latent array length l_c (128).
    latent_dim: latent width l_d (128).
    cross_heads: cross-attention heads (8; paper configs 1).
    cross_dim_head: width per cross-attention head (64).
    latent_heads: self-attention heads (8).
    latent_dim_head: width per self-attention head (64).
    attn_dropout: attention-weight dropout (0).
    ff_dropout: feed-forward output dropout (0).
    self_per_cross_attn: self-attention blocks after each modality update
      (1; paper configs 0); one stack per layer shared by the modalities.
    weight_sharing: ``"none"``, ``"all"`` or ``"perceiver"``.
    fourier_encode_data: append Fourier position features (True).
    num_freq_bands: B (2).
    max_freq: Fourier max frequency (10; paper configs 2).
    snn: SELU-gated feed-forward (True) or GELU-gated.
    ff_mult: feed-forward width multiplier (4).
    attn_temperature: softmax temperature (0.5 as the peer).
    tabular_tokens: ``"vector"`` or ``"features"``.
    bag_tokens: ``"tiles"`` or ``"channels"``.
    spatial_axes: ``(name, n_axes)`` pairs of bag modalities whose
      ``inputs[name + "_positions"]`` ``[batch, n_tiles, n_axes]`` (in [-1, 1])
      are Fourier-encoded (``bag_tokens="tiles"`` only).
    early_fusion: concatenate all tabular modalities into one first.
    feature_embed_dim: width E of the learned per-feature embedding appended
      to each per-feature token (``tabular_tokens="features"`` only; 0 =
      none, the peer's tokens).
    latent_init: initial latent array, ``"normal"`` N(0, 1) (the peer's;
      default) or ``"uniform"`` U(0, 1) (the paper's Algorithm 1).
    return_attention: what ``aux["attention"]`` holds: ``"heads"`` the full
      maps, ``"mean"`` the mean over heads and latents ``[batch, n_tokens]``
      (what the paper's Figure 3 averages; much smaller for large bags),
      ``"none"`` nothing.

  ``aux``: ``"presence"`` (per modality ``[batch]`` bool, after early fusion
  if on), ``"attention"`` (``"layer{i}/{m}"`` -> ``[batch, heads,
  num_latents, n_tokens]``, or ``[batch, n_tokens]`` with
  ``return_attention="mean"``; each latent's row sums to 1 over the valid
  tokens; zero for patients missing ``m``), ``"latents"``
  (final ``[batch, num_latents, latent_dim]``), ``"pooled"``
  (``[batch, latent_dim]``, the head's input before LayerNorm).
  """
  modalities: Sequence = (("omic", "tabular"), ("wsi", "bag"))  # (name, kind).
  n_out: int = 4  # Time-bin logits, or 1 for a Cox log-hazard.
  depth: int = 3  # Fusion layers.
  num_latents: int = 128  # l_c.
  latent_dim: int = 128  # l_d.
  cross_heads: int = 8  # Cross-attention heads.
  cross_dim_head: int = 64  # Cross-attention width per head.
  latent_heads: int = 8  # Self-attention heads.
  latent_dim_head: int = 64  # Self-attention width per head.
  attn_dropout: float = 0.0  # Attention dropout.
  ff_dropout: float = 0.0  # Feed-forward dropout.
  self_per_cross_attn: int = 1  # Self-attention blocks per modality step.
  weight_sharing: str = "none"  # "none", "all" (paper) or "perceiver" (peer).
  fourier_encode_data: bool = True  # Fourier position features.
  num_freq_bands: int = 2  # Fourier bands per axis.
  max_freq: float = 10.0  # Fourier max frequency.
  snn: bool = True  # SELU-gated feed-forward.
  ff_mult: int = 4  # Feed-forward width multiplier.
  attn_temperature: float = 0.5  # Softmax temperature (peer: 0.5).
  tabular_tokens: str = "vector"  # "vector" (1 token) or "features".
  bag_tokens: str = "tiles"  # "tiles" or "channels" (peer's TCGA code).
  spatial_axes: Sequence = ()  # (bag name, n_axes) with positions input.
  early_fusion: bool = False  # Concatenate tabular modalities first.
  feature_embed_dim: int = 0  # Learned per-feature embedding width (features).
  latent_init: str = "normal"  # "normal" N(0, 1) (peer) or "uniform" U(0, 1).
  return_attention: str = "heads"  # "heads", "mean" or "none" (see aux).

  def __post_init__(self):
    object.__setattr__(self, "modalities",
                       normalize_modalities(_tuplify(self.modalities)))
    object.__setattr__(self, "spatial_axes", _tuplify(self.spatial_axes))
    super().__post_init__()

  def _check_config(self):
    _check_n_out(self.n_out)
    checks = [("weight_sharing", self.weight_sharing, WEIGHT_SHARING),
              ("tabular_tokens", self.tabular_tokens, TABULAR_TOKENS),
              ("bag_tokens", self.bag_tokens, BAG_TOKENS),
              ("latent_init", self.latent_init, LATENT_INITS),
              ("return_attention", self.return_attention,
               ("heads", "mean", "none"))]
    for field, value, allowed in checks:
      if value not in allowed:
        raise ValueError(f"HEALNet {field} must be one of {allowed}, got "
                         f"{value!r}")
    for field in ("depth", "num_latents", "latent_dim", "cross_heads",
                  "cross_dim_head", "latent_heads", "latent_dim_head",
                  "ff_mult"):
      if getattr(self, field) < 1:
        raise ValueError(f"HEALNet {field} must be >= 1, got "
                         f"{getattr(self, field)}")
    if self.self_per_cross_attn < 0:
      raise ValueError(f"self_per_cross_attn must be >= 0, got "
                       f"{self.self_per_cross_attn}")
    if self.feature_embed_dim < 0:
      raise ValueError(f"feature_embed_dim must be >= 0, got "
                       f"{self.feature_embed_dim}")
    if self.feature_embed_dim and self.tabular_tokens != "features":
      raise ValueError("feature_embed_dim needs tabular_tokens='features', got "
                       f"{self.tabular_tokens!r}")
    kinds = dict(self.modalities)
    for pair in self.spatial_axes:
      if len(pair) != 2:
        raise ValueError(
            f"spatial_axes entries are (name, n_axes), got {pair!r}")
      name, n_axes = pair
      if kinds.get(name) != "bag":
        raise ValueError(f"spatial_axes names must be bag modalities, got "
                         f"{name!r} (modalities {self.modalities})")
      if n_axes < 1:
        raise ValueError(f"spatial_axes[{name!r}] must be >= 1, got {n_axes}")
    if self.spatial_axes and self.bag_tokens != "tiles":
      raise ValueError("spatial_axes needs bag_tokens='tiles', got "
                       f"{self.bag_tokens!r}")

  def _tokens(self, name, kind, x, mask, inputs):
    """Token array ``[batch, N, C]`` and mask ``[batch, N]`` or None."""
    fourier = lambda pos: fourier_encode(pos, self.num_freq_bands,
                                         self.max_freq)
    b = x.shape[0]
    pos = None
    if kind == "tabular":
      if self.tabular_tokens == "vector":
        tokens = x[:, None, :]
      else:
        tokens = x[:, :, None]
      if self.fourier_encode_data:
        pos = fourier(grid_positions(tokens.shape[1]))
      if self.tabular_tokens == "features" and self.feature_embed_dim:
        emb = self.param(f"feature_embed_{name}", nn.initializers.normal(1.0),
                         (tokens.shape[1], self.feature_embed_dim), jnp.float32)
        pos = emb if pos is None else jnp.concatenate([pos, emb], axis=-1)
      mask = None
    elif self.bag_tokens == "channels":
      tokens = jnp.swapaxes(x, 1, 2)
      if self.fourier_encode_data:
        pos = fourier(grid_positions(tokens.shape[1]))
      mask = None
    else:
      tokens = x
      axes = dict(self.spatial_axes)
      if name in axes:
        key = name + POSITIONS_SUFFIX
        if key not in inputs:
          raise ValueError(f"inputs is missing {key!r}: bag {name!r} is in "
                           "spatial_axes, so it needs [batch, n_tiles, "
                           f"{axes[name]}] positions in [-1, 1]")
        p = jnp.asarray(inputs[key], jnp.float32)
        if tuple(p.shape) != (*x.shape[:2], axes[name]):
          raise ValueError(f"inputs[{key!r}] must have shape "
                           f"{(*x.shape[:2], axes[name])}, got "
                           f"{tuple(p.shape)}")
        p = jnp.where(mask[..., None], p, 0.0)  # padding may hold garbage
        tokens = jnp.concatenate([tokens, fourier(p)], axis=-1)
    if pos is not None:
      pos = jnp.broadcast_to(pos, (b, *pos.shape))
      tokens = jnp.concatenate([tokens, pos], axis=-1)
    return tokens, mask

  @nn.compact
  def __call__(self, inputs, presence, *, train: bool):
    """Runs HEALNet on a batch (interface of ``jaxsurv.models.fusion``).

    Args:
      inputs: ``inputs[m]`` ``[batch, features]`` (tabular) or
        ``[batch, n_tiles, dim]`` with ``inputs[m + "_tile_mask"]``
        ``[batch, n_tiles]`` (bag); ``inputs[m + "_positions"]``
        ``[batch, n_tiles, n_axes]`` for bags in ``spatial_axes``.
      presence: ``presence[m]`` ``[batch]`` bool.
      train: enables dropout (needs a ``"dropout"`` rng if rates > 0).

    Returns:
      ``(out [batch, n_out] float32, aux)`` (see the class docstring).

    Raises:
      ValueError: bad configuration or inputs (shape, missing keys).
    """
    self._check_config()
    data, masks, present = prepare_inputs(inputs, presence, self.modalities)
    modalities = self.modalities
    if self.early_fusion:
      data, present, modalities = early_fusion_inputs(data, present,
                                                      modalities)
    tokens = {}
    for name, kind in modalities:
      tokens[name] = self._tokens(name, kind, data[name], masks.get(name),
                                  inputs)

    # N(0, 1) (peer) or U(0, 1) (paper Algorithm 1); same rng either way.
    latent_init = (nn.initializers.normal(1.0) if self.latent_init == "normal"
                   else nn.initializers.uniform(1.0))
    latents = self.param("latents", latent_init,
                         (self.num_latents, self.latent_dim), jnp.float32)
    batch = next(iter(data.values())).shape[0]
    x = jnp.broadcast_to(latents, (batch, *latents.shape))

    cross_kw = dict(heads=self.cross_heads, dim_head=self.cross_dim_head,
                    attn_dropout=self.attn_dropout,
                    ff_dropout=self.ff_dropout,
                    temperature=self.attn_temperature, snn=self.snn,
                    ff_mult=self.ff_mult)
    self_kw = dict(cross_kw, heads=self.latent_heads,
                   dim_head=self.latent_dim_head)
    # Which weight set each layer uses (weight_sharing).
    if self.weight_sharing == "none":
      groups = list(range(self.depth))
    elif self.weight_sharing == "all":
      groups = [0] * self.depth
    else:
      groups = [min(i, 1) for i in range(self.depth)]
    cross_blocks, self_blocks = {}, {}
    for g in sorted(set(groups)):
      for name, _ in modalities:
        cross_blocks[g, name] = CrossBlock(**cross_kw, name=f"cross_{g}_{name}")
      self_blocks[g] = [SelfBlock(**self_kw, name=f"self_{g}_{j}")
                        for j in range(self.self_per_cross_attn)]

    attention = {}
    for i, g in enumerate(groups):
      for name, _ in modalities:
        tok, mask = tokens[name]
        y, attn = cross_blocks[g, name](x, tok, mask, train=train)
        for block in self_blocks[g]:
          y = block(y, train=train)
        p = present[name]
        x = jnp.where(p[:, None, None], y, x)
        if self.return_attention == "mean":
          attn = jnp.mean(attn, axis=(1, 2))
        if self.return_attention != "none":
          attention[f"layer{i}/{name}"] = jnp.where(
              p.reshape(-1, *(1,) * (attn.ndim - 1)), attn, 0.0)
    pooled = jnp.mean(x, axis=1)
    out = nn.Dense(self.n_out, kernel_init=torch_linear_init,
                   bias_init=nn.initializers.zeros, name="head")(
                       nn.LayerNorm(epsilon=1e-5, name="head_norm")(pooled))
    aux = {"presence": dict(present), "attention": attention, "latents": x,
           "pooled": pooled}
    return out, aux


Model = HEALNet  # big_vision-style alias: every model file exports Model.
