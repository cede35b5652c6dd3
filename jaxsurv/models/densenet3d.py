"""3D DenseNet (DenseNet-121 by default) image encoder, Flax Linen.

Architecture of Huang et al., "Densely Connected Convolutional Networks",
CVPR 2017, in the 3D form MONAI implements (``monai.networks.nets.DenseNet``)
and MMNN uses as its MRI branch (DigITs-AIML/MMNN_STS ``models/densenet.py``):

* stem: Conv 7^3 stride 2 (no bias) -> norm -> ReLU -> max-pool 3^3 stride 2;
* dense block i: ``block_config[i]`` dense layers, each
  norm -> ReLU -> Conv 1^3 (``bn_size * growth_rate`` channels) -> norm -> ReLU
  -> Conv 3^3 (``growth_rate`` channels) -> channel-wise dropout, whose output is
  concatenated onto the layer input;
* transition after every block but the last: norm -> ReLU -> Conv 1^3 (halves
  the channels) -> avg-pool 2^3 stride 2;
* final norm ("norm5"), ReLU, global average pool, Linear -> ``features``
  (12 in MMNN) embedding, dropout. No activation after the Linear (as MMNN).

Dropout inside the dense layers is channel-wise (a whole feature map is zeroed,
like ``torch.nn.Dropout3d``), because MONAI's dropout factory returns
``Dropout3d`` for 3 spatial dims.

Parameter count: DenseNet-121 with 2 input channels has 11,264,576 parameters
up to and including norm5 (the ``features`` module of MONAI's
``DenseNet121(spatial_dims=3, in_channels=2)`` has the same count); the
1024 -> 12 head adds 12,300, for 11,276,876 in total. Normalisation running
statistics are in the ``batch_stats`` collection, not in ``params``.

Inputs are channels-last, ``[batch, depth, height, width, channels]`` (XLA's
native layout for 3D convolutions).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxsurv.models.conv import Conv3D
from jaxsurv.models.pooling import max_pool

# PyTorch's default ``nn.Linear`` weight init for the head; MONAI zeroes the
# Linear bias.
from jaxsurv.models.common import torch_linear_init

# PyTorch ``kaiming_normal_`` defaults (fan_in, gain sqrt(2), untruncated
# normal), as MONAI's DenseNet applies to every convolution.
kaiming_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

NORMS = ("batch", "group")


def _group_count(channels: int, num_groups: int) -> int:
  """Number of GroupNorm groups for ``channels``: gcd(channels, num_groups).

  The gcd always divides ``channels`` and never exceeds ``num_groups``; for
  DenseNet-121 (channels 64 + 32k, 128, ...) and 32 groups it is always 32.
  """
  return math.gcd(channels, num_groups)


class _Norm(nn.Module):
  """BatchNorm or GroupNorm over the last (channel) axis.

  Attributes:
    kind: "batch" (running statistics in ``batch_stats``) or "group".
    num_groups: upper bound on GroupNorm groups (see ``_group_count``).
    dtype: computation dtype; statistics are reduced in float32 either way.
  """
  kind: str = "batch"  # "batch" or "group".
  num_groups: int = 32  # GroupNorm only.
  dtype: Any = None  # Computation dtype (None: follow the input).

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == "batch":
      # momentum 0.9 == PyTorch BatchNorm momentum 0.1; eps as in PyTorch.
      return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                          epsilon=1e-5, dtype=self.dtype, name="bn")(x)
    if self.kind == "group":
      return nn.GroupNorm(num_groups=_group_count(x.shape[-1], self.num_groups),
                          epsilon=1e-5, dtype=self.dtype, name="gn")(x)
    raise ValueError(f"norm must be one of {NORMS}, got {self.kind!r}")


class DenseLayer(nn.Module):
  """One dense layer: BN-ReLU-Conv1 -> BN-ReLU-Conv3 -> dropout, concatenated.

  ``[batch, d, h, w, c] -> [batch, d, h, w, c + growth_rate]``.
  ``train`` is positional so that ``nn.remat(..., static_argnums=(2,))`` can
  treat it as static.
  """
  growth_rate: int = 32  # Channels added by this layer.
  bn_size: int = 4  # Bottleneck width = bn_size * growth_rate.
  dropout_rate: float = 0.0  # Channel-wise (Dropout3d-like) dropout.
  norm: str = "batch"  # "batch" or "group".
  num_groups: int = 32  # GroupNorm only.
  dtype: Any = None  # Computation dtype.
  conv_impl: str = "auto"  # One of jaxsurv.models.conv.IMPLS.

  @nn.compact
  def __call__(self, x, train: bool):
    y = _Norm(self.norm, self.num_groups, self.dtype, name="norm1")(x, train)
    y = nn.relu(y)
    y = Conv3D(self.bn_size * self.growth_rate, (1, 1, 1), padding=((0, 0),) * 3,
               use_bias=False, kernel_init=kaiming_normal, dtype=self.dtype,
               impl=self.conv_impl, name="conv1")(y)
    y = _Norm(self.norm, self.num_groups, self.dtype, name="norm2")(y, train)
    y = nn.relu(y)
    y = Conv3D(self.growth_rate, (3, 3, 3), padding=((1, 1),) * 3,
               use_bias=False, kernel_init=kaiming_normal, dtype=self.dtype,
               impl=self.conv_impl, name="conv2")(y)
    if self.dropout_rate > 0:
      # Broadcast the mask over depth/height/width: whole channels drop out.
      y = nn.Dropout(self.dropout_rate, broadcast_dims=(1, 2, 3),
                     name="dropout")(y, deterministic=not train)
    return jnp.concatenate([x, y.astype(x.dtype)], axis=-1)


class DenseNet3D(nn.Module):
  """3D DenseNet image encoder returning an embedding (DenseNet-121 default).

  Attributes:
    init_features: stem output channels (64).
    growth_rate: channels added per dense layer (32).
    block_config: dense layers per block ((6, 12, 24, 16) = DenseNet-121).
    bn_size: bottleneck factor (4).
    dropout_rate: channel-wise dropout after each dense layer (0.2 in MMNN).
    features: embedding size of the Linear head (12 in MMNN).
    head_dropout_rate: dropout on the embedding (0.2 in MMNN).
    norm: "batch" (paper/MONAI/MMNN) or "group" (for tiny batches; no
      running statistics, no ``batch_stats`` collection).
    num_groups: GroupNorm groups, capped per layer at gcd(channels, groups).
    remat: rematerialise each dense layer in the backward pass
      (``nn.remat``): less activation memory, about one extra forward.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); params stay float32.
      The pooled features and the Linear head run in float32.
    perturb_last_block: add a zero ``perturbations`` variable named
      ``last_dense_block`` (``nn.Module.perturb``) so that ``jax.grad`` with
      respect to it gives d(output)/d(last dense block), for Grad-CAM. Off by
      default because ``init`` then also returns a batch-sized
      ``perturbations`` collection.
    conv_impl: how the convolutions run (``jaxsurv.models.conv.Conv3D``):
      ``"auto"`` (default: on CPU the 1^3 ones as matrix products, those
      with at most 2^3 output voxels as im2col products and the others as
      one 2D convolution over depth slices; cuDNN's 3D convolutions
      elsewhere), ``"native"``, ``"slices"``, ``"dot"`` or ``"cols"``. The
      stem's max-pool follows it (``jaxsurv.models.pooling.max_pool``:
      ``"native"`` keeps ``nn.max_pool``, any other value lets the backend
      choose). Same parameters and, up to float32 summation order, the same
      outputs and gradients either way.

  Call: ``embedding, intermediates = model.apply(variables, x, train=...)``.
  """
  init_features: int = 64  # Stem conv output channels.
  growth_rate: int = 32  # Channels added per dense layer.
  block_config: Sequence[int] = (6, 12, 24, 16)  # Dense layers per block.
  bn_size: int = 4  # Bottleneck factor.
  dropout_rate: float = 0.2  # Channel-wise dropout in dense layers.
  features: int = 12  # Embedding size.
  head_dropout_rate: float = 0.2  # Dropout on the embedding.
  norm: str = "batch"  # "batch" or "group".
  num_groups: int = 32  # GroupNorm only.
  remat: bool = False  # Rematerialise dense layers (saves memory).
  dtype: Any = None  # Computation dtype; None = float32 (input dtype).
  perturb_last_block: bool = False  # Grad-CAM hook, see docstring.
  conv_impl: str = "auto"  # Stem and dense-layer convolutions (see docstring).
  # Stem conv kernel (DenseNet-121: 7). A 3^3 stem is ~13x cheaper: XLA's CPU
  # convolutions with 2 input channels are slow, which the CPU configs avoid.
  stem_kernel: int = 7

  def __post_init__(self):
    # A list (e.g. from a JSON/YAML config) would make the module unhashable.
    if isinstance(self.block_config, list):
      object.__setattr__(self, "block_config", tuple(self.block_config))
    super().__post_init__()

  def min_input_size(self) -> int:
    """Smallest spatial size (per axis) that survives every downsampling."""
    n = 1
    for _ in range(len(self.block_config) - 1):
      n = 2 * n  # Inverse of the floor(n / 2) avg-pool.
    for _ in range(2):
      n = 2 * n - 1  # Inverse of floor((n - 1) / 2) + 1 (stem conv, max-pool).
    return n

  @nn.compact
  def __call__(self, x, *, train: bool):
    """Encodes a batch of volumes.

    Args:
      x: ``[batch, depth, height, width, channels]`` float volumes.
      train: enables dropout (needs a ``"dropout"`` rng when any rate > 0)
        and, with ``norm="batch"``, batch statistics (apply with
        ``mutable=["batch_stats"]`` to get the updated running averages).

    Returns:
      ``(embedding, intermediates)``: ``embedding`` is ``[batch, features]``
      float32. ``intermediates`` is a dict of arrays:

      * ``"stem"``: after the max-pool, ``[batch, D/4, H/4, W/4, init_features]``;
      * ``"block_1"`` ... ``"block_N"``: each dense block's output (before its
        transition), ``[batch, d_i, h_i, w_i, c_i]``;
      * ``"last_dense_block"``: the last dense block's output (before norm5),
        ``[batch, d, h, w, c_final]`` (2^3 x 1024 for DenseNet-121 at 64^3). Use
        this for Grad-CAM (the MMNN paper, Methods, "Model interpretation",
        takes its heat maps from the image subnetwork's final convolutional
        layer);
      * ``"feature_map"``: ReLU(norm5(last block)), the pre-pool map, same shape;
      * ``"pooled"``: global average pool, ``[batch, c_final]`` float32.

    Raises:
      ValueError: if ``x`` is not 5-D, ``norm`` is unknown, a size field is
        not positive, or a spatial size is smaller than ``min_input_size()``.
    """
    if x.ndim != 5:
      raise ValueError("DenseNet3D expects x of shape [batch, depth, height, "
                       f"width, channels], got shape {tuple(x.shape)}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    sizes = dict(init_features=self.init_features, growth_rate=self.growth_rate,
                 bn_size=self.bn_size, features=self.features)
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad or not self.block_config or min(self.block_config) < 1:
      raise ValueError("DenseNet3D sizes must be positive, got "
                       f"{bad or ''} block_config={tuple(self.block_config)}")
    min_size = self.min_input_size()
    if min(x.shape[1:4]) < min_size:
      raise ValueError(
          f"DenseNet3D with {len(self.block_config)} blocks needs spatial size "
          f">= {min_size} per axis, got (depth, height, width) = "
          f"{tuple(x.shape[1:4])}")

    out = {}
    if self.dtype is not None:
      x = x.astype(self.dtype)
    k = self.stem_kernel
    x = Conv3D(self.init_features, (k, k, k), strides=(2, 2, 2),
               padding=(((k - 1) // 2, k // 2),) * 3, use_bias=False, kernel_init=kaiming_normal,
               dtype=self.dtype, impl=self.conv_impl, name="conv0")(x)
    x = _Norm(self.norm, self.num_groups, self.dtype, name="norm0")(x, train)
    x = nn.relu(x)
    x = max_pool(x, (3, 3, 3), (2, 2, 2), ((1, 1),) * 3,
                 impl="native" if self.conv_impl == "native" else "auto")
    out["stem"] = x

    layer_cls = DenseLayer
    if self.remat:
      layer_cls = nn.remat(DenseLayer, static_argnums=(2,))  # 0 is self.
    channels = self.init_features
    n_blocks = len(self.block_config)
    for b, n_layers in enumerate(self.block_config):
      for l in range(n_layers):
        x = layer_cls(growth_rate=self.growth_rate, bn_size=self.bn_size,
                      dropout_rate=self.dropout_rate, norm=self.norm,
                      num_groups=self.num_groups, dtype=self.dtype,
                      conv_impl=self.conv_impl,
                      name=f"block{b + 1}_layer{l + 1}")(x, train)
      channels += n_layers * self.growth_rate
      out[f"block_{b + 1}"] = x
      if b != n_blocks - 1:
        x = _Norm(self.norm, self.num_groups, self.dtype,
                  name=f"transition{b + 1}_norm")(x, train)
        x = nn.relu(x)
        channels //= 2  # MONAI: int(in_channels // 2).
        x = Conv3D(channels, (1, 1, 1), padding=((0, 0),) * 3, use_bias=False,
                   kernel_init=kaiming_normal, dtype=self.dtype, impl=self.conv_impl,
                   name=f"transition{b + 1}_conv")(x)
        x = nn.avg_pool(x, (2, 2, 2), strides=(2, 2, 2))

    if self.perturb_last_block:
      x = self.perturb("last_dense_block", x)
    out["last_dense_block"] = x
    x = _Norm(self.norm, self.num_groups, self.dtype, name="norm5")(x, train)
    x = nn.relu(x)
    out["feature_map"] = x
    # Pool and head in float32: cheap, and keeps the embedding precise.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))
    out["pooled"] = x
    x = nn.Dense(self.features, kernel_init=torch_linear_init,
                 bias_init=nn.initializers.zeros, dtype=jnp.float32,
                 name="head")(x)
    if self.head_dropout_rate > 0:
      x = nn.Dropout(self.head_dropout_rate, name="head_dropout")(
          x, deterministic=not train)
    return x, out


Model = DenseNet3D  # big_vision-style alias: every model file exports Model.
