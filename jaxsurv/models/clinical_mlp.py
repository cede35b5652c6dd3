"""Clinical-variable MLP encoder, Flax Linen (MMNN's clinical branch).

Layer widths follow MMNN (DigITs-AIML/MMNN_STS ``models/mlp.py``; the MMNN
paper's Fig. 4A): 11 inputs -> 32 -> 16 -> 8 -> 8 -> 8 -> 12-feature
embedding. Every layer is Dense -> norm -> ReLU -> dropout, the
embedding layer included (MMNN also ends its feature layer with a ReLU).

Deliberate deviations from the MMNN code, which has two quirks:

* MMNN uses ``Dropout1d`` on a 2-D ``[batch, features]`` input. PyTorch reads
  that as one unbatched ``[channels, length]`` sample, so it zeroes whole
  patients' rows instead of single features. Here dropout is ordinary
  element-wise dropout (``nn.Dropout``), which is what the layer is meant to do.
* MMNN's first layer applies ReLU before dropout and every later layer applies
  dropout before ReLU. Here every layer uses one order: norm -> ReLU -> dropout
  (the two orders are equivalent for element-wise dropout anyway, since
  ReLU(m * x) = m * ReLU(x) for a non-negative mask m).

The input width is taken from the data (11 in MMNN: clinical variables that
the data layer has already standardised and imputed, which the MMNN code,
DigITs-AIML/MMNN_STS ``data/utils.py``, does not do).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxsurv.models.common import torch_linear_init

MLP_NORMS = ("batch", "layer", "none")


class ClinicalMLP(nn.Module):
  """Clinical MLP: ``[batch, n_clinical] -> [batch, features]`` embedding.

  Attributes:
    hidden_sizes: widths of the hidden layers ((32, 16, 8, 8, 8) in MMNN).
    features: embedding size (12 in MMNN).
    dropout_rate: element-wise dropout after every layer (0.2 in MMNN).
    norm: "batch" (MMNN; running statistics in ``batch_stats``), "layer"
      (LayerNorm, no batch dependence) or "none".
    final_activation: apply norm/ReLU/dropout after the embedding layer too
      (True, as MMNN); False leaves the embedding as a plain linear output.
    dtype: computation dtype; params stay float32; output is float32.

  Call: ``embedding, intermediates = model.apply(variables, x, train=...)``.
  """
  hidden_sizes: Sequence[int] = (32, 16, 8, 8, 8)  # Hidden layer widths.
  features: int = 12  # Embedding size.
  dropout_rate: float = 0.2  # Element-wise dropout (not MMNN's row dropout).
  norm: str = "batch"  # "batch", "layer" or "none".
  final_activation: bool = True  # Norm/ReLU/dropout on the embedding layer.
  dtype: Any = None  # Computation dtype.

  def __post_init__(self):
    # A list (e.g. from a JSON/YAML config) would make the module unhashable.
    if isinstance(self.hidden_sizes, list):
      object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Encodes clinical variables.

    Args:
      x: ``[batch, n_clinical]`` float features (standardised, no NaN).
      train: enables dropout (needs a ``"dropout"`` rng when the rate > 0) and,
        with ``norm="batch"``, batch statistics (apply with
        ``mutable=["batch_stats"]``).

    Returns:
      ``(embedding, intermediates)``: ``embedding`` is ``[batch, features]``
      float32; ``intermediates["hidden_i"]`` (i = 1..len(hidden_sizes)) is each
      hidden layer's output ``[batch, hidden_sizes[i-1]]``.

    Raises:
      ValueError: if ``x`` is not 2-D, ``norm`` is unknown or a size is < 1.
    """
    if x.ndim != 2:
      raise ValueError("ClinicalMLP expects x of shape [batch, n_clinical], "
                       f"got shape {tuple(x.shape)}")
    if self.norm not in MLP_NORMS:
      raise ValueError(f"norm must be one of {MLP_NORMS}, got {self.norm!r}")
    sizes = (*self.hidden_sizes, self.features)
    if min(sizes) < 1:
      raise ValueError("ClinicalMLP sizes must be positive, got hidden_sizes="
                       f"{tuple(self.hidden_sizes)} features={self.features}")
    if self.dtype is not None:
      x = x.astype(self.dtype)
    out = {}
    n = len(sizes)
    for i, width in enumerate(sizes):
      last = i == n - 1
      x = nn.Dense(width, kernel_init=torch_linear_init,
                   bias_init=nn.initializers.zeros, dtype=self.dtype,
                   name=f"dense{i}")(x)
      if last and not self.final_activation:
        break
      if self.norm == "batch":
        # momentum 0.9 == PyTorch BatchNorm1d momentum 0.1.
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                         epsilon=1e-5, dtype=self.dtype, name=f"norm{i}")(x)
      elif self.norm == "layer":
        x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=f"norm{i}")(x)
      x = nn.relu(x)
      if self.dropout_rate > 0:
        x = nn.Dropout(self.dropout_rate, name=f"dropout{i}")(
            x, deterministic=not train)
      if not last:
        out[f"hidden_{i + 1}"] = x
    return x.astype(jnp.float32), out


Model = ClinicalMLP  # big_vision-style alias: every model file exports Model.
