"""Self-normalising network (SNN) encoder and AlphaDropout, Flax Linen.

Klambauer, Unterthiner, Mayr & Hochreiter, "Self-Normalizing Neural
Networks", NeurIPS 2017: Dense layers with LeCun-normal weights
(N(0, 1/fan_in)), the SELU activation and AlphaDropout keep activations near
zero mean and unit variance without any normalisation layer.

PORPOISE / MCAT (mahmoodlab/PORPOISE ``models/model_utils.py``) use the
same block with **ELU** instead of SELU
(``SNN_Block = Linear -> ELU -> AlphaDropout(0.25)``); the ``activation``
field selects either. AlphaDropout always uses SELU's saturation value
(as PyTorch's ``nn.AlphaDropout`` does), so with ELU the block is only
"self-normalising" in name.

Flax Linen (0.12.8) has no AlphaDropout, so it is implemented here.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

# SELU constants (Klambauer et al. 2017, eq. 2 / Theorem 1).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946
# Saturation value of SELU for x -> -inf: alpha' = -lambda * alpha.
SELU_ALPHA_PRIME = -SELU_SCALE * SELU_ALPHA

ACTIVATIONS = ("selu", "elu")

# LeCun normal exactly as in the SNN paper and PORPOISE's ``init_max_weights``:
# an untruncated N(0, 1/fan_in). (flax's ``lecun_normal`` is truncated.)
lecun_normal_untruncated = nn.initializers.variance_scaling(
    1.0, "fan_in", "normal")


def alpha_dropout_affine(rate: float) -> tuple[float, float]:
  """Affine correction ``(a, b)`` of AlphaDropout for drop probability ``rate``.

  Dropped units are set to ``alpha' = -lambda * alpha`` and every unit is then
  mapped to ``a * x + b`` so that inputs with zero mean and unit variance keep
  them (Klambauer et al. 2017, Section "New Dropout Technique"; with keep
  probability ``q = 1 - rate``)::

    a = (q + alpha'^2 q (1 - q))^(-1/2),   b = -a (1 - q) alpha'

  Args:
    rate: drop probability in ``[0, 1)``.

  Returns:
    ``(a, b)`` as Python floats.

  Raises:
    ValueError: if ``rate`` is outside ``[0, 1)``.
  """
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"AlphaDropout rate must be in [0, 1), got {rate}")
  q = 1.0 - rate
  a = (q + SELU_ALPHA_PRIME ** 2 * q * (1.0 - q)) ** -0.5
  b = -a * (1.0 - q) * SELU_ALPHA_PRIME
  return a, b


class AlphaDropout(nn.Module):
  """AlphaDropout (Klambauer et al. 2017): dropout that keeps mean/variance.

  Each element is independently replaced by ``alpha' = -1.7581`` (SELU's
  negative saturation) with probability ``rate``; then ``a * x + b`` restores
  zero mean and unit variance for standardised SELU inputs (see
  ``alpha_dropout_affine``). Identity when ``deterministic`` or ``rate == 0``.

  Attributes:
    rate: drop probability in ``[0, 1)``.
    rng_collection: rng stream name (``"dropout"``, as ``nn.Dropout``).

  Call: ``y = AlphaDropout(rate)(x, deterministic=...)``; ``x`` any shape,
  ``y`` the same shape and dtype.
  """
  rate: float = 0.25  # Drop probability.
  rng_collection: str = "dropout"  # Rng stream used when training.

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    """Applies AlphaDropout.

    Args:
      x: any-shape float array.
      deterministic: if True (evaluation), returns ``x`` unchanged.

    Returns:
      Array with the shape and dtype of ``x``.

    Raises:
      ValueError: if ``rate`` is outside ``[0, 1)``.
    """
    a, b = alpha_dropout_affine(self.rate)
    if deterministic or self.rate == 0.0:
      return x
    rng = self.make_rng(self.rng_collection)
    keep = jax.random.bernoulli(rng, 1.0 - self.rate, x.shape)
    y = jnp.where(keep, x, jnp.asarray(SELU_ALPHA_PRIME, x.dtype))
    return (a * y + b).astype(x.dtype)


class SNN(nn.Module):
  """Self-normalising MLP encoder: ``[batch, features] -> [batch, sizes[-1]]``.

  Every layer is ``Dense -> activation -> AlphaDropout`` (the last one too, as
  PORPOISE's ``fc_omic`` and the standalone SNN's hidden blocks), with
  LeCun-normal weights N(0, 1/fan_in) and zero biases.

  Attributes:
    hidden_sizes: widths of the layers; the last is the embedding size.
      PORPOISE MMF ``fc_omic``: ``(256, 256)``; the standalone SNN "small":
      ``(256, 256, 256, 256)``.
    activation: ``"selu"`` (Klambauer et al. 2017) or ``"elu"`` (PORPOISE).
    dropout_rate: AlphaDropout rate after every layer (0.25 in PORPOISE).

  Call: ``embedding = SNN(...).apply(variables, x, train=...)`` (needs a
  ``"dropout"`` rng when ``train`` and ``dropout_rate > 0``).
  """
  hidden_sizes: Sequence[int] = (256, 256)  # Layer widths (last = output).
  activation: str = "selu"  # "selu" or "elu".
  dropout_rate: float = 0.25  # AlphaDropout rate.

  def __post_init__(self):
    # Lists (from configs) would make the module unhashable.
    if isinstance(self.hidden_sizes, list):
      object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Encodes tabular features.

    Args:
      x: ``[batch, features]`` float (standardised; no NaN).
      train: enables AlphaDropout.

    Returns:
      ``[batch, hidden_sizes[-1]]`` float32 embedding.

    Raises:
      ValueError: if ``x`` is not 2-D, ``hidden_sizes`` is empty or has a
        non-positive width, or ``activation`` is unknown.
    """
    if x.ndim != 2:
      raise ValueError(f"SNN expects x of shape [batch, features], got shape "
                       f"{tuple(x.shape)}")
    if not self.hidden_sizes or min(self.hidden_sizes) < 1:
      raise ValueError(f"SNN hidden_sizes must be non-empty and positive, got "
                       f"{tuple(self.hidden_sizes)}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"SNN activation must be one of {ACTIVATIONS}, got "
                       f"{self.activation!r}")
    act = nn.selu if self.activation == "selu" else nn.elu
    x = x.astype(jnp.float32)
    for i, width in enumerate(self.hidden_sizes):
      x = nn.Dense(width, kernel_init=lecun_normal_untruncated,
                   bias_init=nn.initializers.zeros, name=f"dense{i}")(x)
      x = act(x)
      x = AlphaDropout(self.dropout_rate, name=f"alpha_dropout{i}")(
          x, deterministic=not train)
    return x


Model = SNN  # big_vision-style alias: every model file exports Model.
