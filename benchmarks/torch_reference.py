"""PyTorch reference of jaxsurv's MMNN train step, for side-by-side timing only.

Written from the architecture description (Huang et al., CVPR 2017, 3D form;
MMNN as described in its paper's Fig. 4 and ``jaxsurv/models/mmnn.py``), not
from any MONAI or MMNN source. It mirrors ``jaxsurv.train.train_step`` layer
for layer so that both frameworks do the same work:

* image branch: 3D DenseNet. Stem Conv k^3 stride 2 (no bias; k = 7 in
  DenseNet-121, 3 in jaxsurv's local config; "same"-style padding
  ((k-1)//2 before, k//2 after, as jaxsurv) -> BatchNorm ->
  ReLU -> MaxPool 3^3 stride 2 pad 1; dense blocks of layers
  BN -> ReLU -> Conv 1^3 (``bn_size * growth`` channels) -> BN -> ReLU ->
  Conv 3^3 (``growth`` channels) -> Dropout3d, concatenated onto the input;
  transitions BN -> ReLU -> Conv 1^3 (half the channels) -> AvgPool 2^3;
  final BN -> ReLU -> global average pool -> Linear(-> features) -> Dropout;
* clinical branch: Linear -> BatchNorm1d -> ReLU -> Dropout per layer,
  the embedding layer included;
* concatenation fusion and three Linear log-hazard heads (``mm`` on the
  fused 2*features vector, ``image`` and ``clinical`` on each embedding);
* loss: per head, the Breslow Cox negative log partial likelihood per
  outcome (sort by duration descending + ``torch.logcumsumexp``, mean per
  event, no tie correction: durations are continuous here), summed over
  outcomes, heads weighted by the blend weights;
* optional on-the-fly augmentation inside the step: one random affine per
  patient (flips, rotation, isotropic zoom) applied with ``affine_grid`` +
  trilinear ``grid_sample`` (border padding), like ``jaxsurv.augment``.

The parameter count equals jaxsurv's for the same settings (the benchmark
checks it), which is the cheap evidence that the two networks match.

Layout: NCDHW (PyTorch's default, contiguous) unless ``channels_last=True``
(``torch.channels_last_3d``).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class DenseLayer(nn.Module):
  """BN-ReLU-Conv1 -> BN-ReLU-Conv3 -> Dropout3d; ``[B, C, D, H, W] -> [B, C + growth, ...]``."""

  def __init__(self, in_channels: int, growth_rate: int, bn_size: int, dropout_rate: float):
    super().__init__()
    width = bn_size * growth_rate
    self.norm1 = nn.BatchNorm3d(in_channels)
    self.conv1 = nn.Conv3d(in_channels, width, 1, bias=False)
    self.norm2 = nn.BatchNorm3d(width)
    self.conv2 = nn.Conv3d(width, growth_rate, 3, padding=1, bias=False)
    # Dropout3d zeroes whole channels per sample, as jaxsurv's broadcast dropout.
    self.dropout = nn.Dropout3d(dropout_rate) if dropout_rate > 0 else nn.Identity()

  def forward(self, x):
    y = self.conv1(F.relu(self.norm1(x)))
    y = self.conv2(F.relu(self.norm2(y)))
    return torch.cat([x, self.dropout(y)], dim=1)


class DenseNet3D(nn.Module):
  """3D DenseNet encoder: ``[B, in_channels, D, H, W] -> [B, features]``."""

  def __init__(self, in_channels: int = 2, init_features: int = 64, growth_rate: int = 32,
               block_config: Sequence[int] = (6, 12, 24, 16), bn_size: int = 4,
               dropout_rate: float = 0.2, features: int = 12, head_dropout_rate: float = 0.2,
               stem_kernel: int = 7):
    super().__init__()
    if stem_kernel < 1:
      raise ValueError(f"stem_kernel must be >= 1, got {stem_kernel}")
    k = stem_kernel
    # (left, right) padding per axis; ConstantPad3d lists the last axis first.
    pad = [nn.ConstantPad3d(((k - 1) // 2, k // 2) * 3, 0.0)] if k % 2 == 0 else []
    layers = pad + [nn.Conv3d(in_channels, init_features, k, stride=2,
                              padding=0 if pad else k // 2, bias=False),
                    nn.BatchNorm3d(init_features), nn.ReLU(),
                    nn.MaxPool3d(3, stride=2, padding=1)]
    channels = init_features
    for b, n_layers in enumerate(block_config):
      for _ in range(n_layers):
        layers.append(DenseLayer(channels, growth_rate, bn_size, dropout_rate))
        channels += growth_rate
      if b != len(block_config) - 1:
        layers += [nn.BatchNorm3d(channels), nn.ReLU(),
                   nn.Conv3d(channels, channels // 2, 1, bias=False), nn.AvgPool3d(2, stride=2)]
        channels //= 2
    layers += [nn.BatchNorm3d(channels), nn.ReLU()]
    self.features = nn.Sequential(*layers)
    self.head = nn.Linear(channels, features)
    self.head_dropout = nn.Dropout(head_dropout_rate) if head_dropout_rate > 0 else nn.Identity()
    for m in self.modules():
      if isinstance(m, nn.Conv3d):
        nn.init.kaiming_normal_(m.weight)
    nn.init.zeros_(self.head.bias)

  def forward(self, x):
    x = self.features(x)
    # Pool in float32 (as jaxsurv), also under autocast.
    x = x.float().mean(dim=(2, 3, 4))
    return self.head_dropout(self.head(x))


class ClinicalMLP(nn.Module):
  """Linear -> BatchNorm1d -> ReLU -> Dropout per layer: ``[B, n_clinical] -> [B, features]``."""

  def __init__(self, in_features: int, hidden_sizes: Sequence[int] = (32, 16, 8, 8, 8),
               features: int = 12, dropout_rate: float = 0.2):
    super().__init__()
    layers = []
    width = in_features
    for out in (*hidden_sizes, features):
      layers += [nn.Linear(width, out), nn.BatchNorm1d(out), nn.ReLU()]
      if dropout_rate > 0:
        layers.append(nn.Dropout(dropout_rate))
      width = out
    self.net = nn.Sequential(*layers)

  def forward(self, x):
    return self.net(x).float()


class MMNN(nn.Module):
  """Image + clinical model with ``mm``, ``image`` and ``clinical`` log-hazard heads."""

  def __init__(self, n_clinical: int, n_outcomes: int = 2, in_channels: int = 2,
               image_kwargs: Mapping | None = None, clinical_kwargs: Mapping | None = None):
    super().__init__()
    image_kwargs = dict(image_kwargs or {})
    clinical_kwargs = dict(clinical_kwargs or {})
    self.image_encoder = DenseNet3D(in_channels=in_channels, **image_kwargs)
    self.clinical_encoder = ClinicalMLP(n_clinical, **clinical_kwargs)
    f_img = self.image_encoder.head.out_features
    f_clin = clinical_kwargs.get("features", 12)
    self.image_head = nn.Linear(f_img, n_outcomes)
    self.clinical_head = nn.Linear(f_clin, n_outcomes)
    self.mm_head = nn.Linear(f_img + f_clin, n_outcomes)

  def forward(self, image, clinical) -> dict:
    e_img = self.image_encoder(image)
    e_clin = self.clinical_encoder(clinical)
    return {"mm": self.mm_head(torch.cat([e_img, e_clin], dim=1)),
            "image": self.image_head(e_img), "clinical": self.clinical_head(e_clin)}


def cox_breslow_loss(risk: torch.Tensor, duration: torch.Tensor, event: torch.Tensor):
  """Mean-per-event Breslow Cox NLL per outcome, ``[B, K] -> [K]`` (no tie correction).

  -l_k = -sum_i e_ik (eta_ik - log sum_{j: T_jk >= T_ik} exp(eta_jk)) / max(sum_i e_ik, 1);
  the risk-set log-sum-exp is a reverse cumulative ``logcumsumexp`` after
  sorting by duration, descending.
  """
  order = torch.argsort(duration, dim=0, descending=True)
  eta = torch.gather(risk, 0, order)
  ev = torch.gather(event, 0, order)
  log_risk_set = torch.logcumsumexp(eta, dim=0)
  return -((eta - log_risk_set) * ev).sum(0) / ev.sum(0).clamp_min(1.0)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
  """``[B, 3] -> [B, 3, 3]``: rotations about the three axes, composed."""
  c, s = torch.cos(angles), torch.sin(angles)
  one, zero = torch.ones_like(c[:, 0]), torch.zeros_like(c[:, 0])
  rx = torch.stack([one, zero, zero, zero, c[:, 0], -s[:, 0], zero, s[:, 0], c[:, 0]], 1)
  ry = torch.stack([c[:, 1], zero, s[:, 1], zero, one, zero, -s[:, 1], zero, c[:, 1]], 1)
  rz = torch.stack([c[:, 2], -s[:, 2], zero, s[:, 2], c[:, 2], zero, zero, zero, one], 1)
  return rx.view(-1, 3, 3) @ ry.view(-1, 3, 3) @ rz.view(-1, 3, 3)


def augment_batch(images: torch.Tensor, *, flip_prob: float = 0.5, max_rotation_deg: float = 15.0,
                  zoom_range: tuple[float, float] = (0.9, 1.1)) -> torch.Tensor:
  """Random flips + rotation + zoom per patient, trilinear resampling: ``[B, C, D, H, W]``."""
  b, dev = images.shape[0], images.device
  flips = torch.where(torch.rand(b, 3, device=dev) < flip_prob, -1.0, 1.0)
  angles = math.radians(max_rotation_deg) * (2.0 * torch.rand(b, 3, device=dev) - 1.0)
  lo, hi = zoom_range
  zoom = lo + (hi - lo) * torch.rand(b, 1, 1, device=dev)
  mat = _rotation(angles) @ torch.diag_embed(flips) / zoom
  theta = torch.cat([mat, torch.zeros(b, 3, 1, device=dev)], dim=2)
  grid = F.affine_grid(theta, list(images.shape), align_corners=True)
  return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                       align_corners=True).to(images.dtype)


class TrainStep:
  """One optimisation step, as ``jaxsurv.train.train_step`` (forward, loss, backward, update).

  With ``grad_accum_steps > 1`` gradients accumulate in ``.grad`` and the
  optimiser steps every k-th call (what ``optax.MultiSteps`` does).
  """

  def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
               heads: Sequence[str], blend_weights: torch.Tensor, augment: Mapping | None,
               grad_accum_steps: int = 1, autocast_dtype: torch.dtype | None = None,
               channels_last: bool = False):
    self.model, self.opt = model, optimizer
    self.heads = tuple(heads)
    self.w = blend_weights
    self.augment = augment
    self.k = grad_accum_steps
    self.autocast_dtype = autocast_dtype
    self.channels_last = channels_last
    self.calls = 0

  def __call__(self, batch: Mapping[str, torch.Tensor]) -> dict:
    self.model.train()
    image = batch["image"]
    if self.augment is not None:
      image = augment_batch(image, **self.augment)
      if self.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    dev_type = image.device.type
    with torch.autocast(dev_type, dtype=self.autocast_dtype or torch.float32,
                        enabled=self.autocast_dtype is not None):
      outputs = self.model(image, batch["clinical"])
    losses = {k: cox_breslow_loss(outputs[k].float(), batch["duration"], batch["event"]).sum()
              for k in self.heads}
    total = sum(self.w[i] * losses[k] for i, k in enumerate(self.heads))
    total.backward()
    self.calls += 1
    # The JAX step also returns the global gradient norm.
    grad_norm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.model.parameters()
                               if p.grad is not None))
    if self.calls % self.k == 0:
      self.opt.step()
      self.opt.zero_grad(set_to_none=True)
    return {"loss": total.detach(), "grad_norm": grad_norm.detach(),
            **{f"loss_{k}": v.detach() for k, v in losses.items()}}


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                   momentum: float = 0.9, nesterov: bool = True) -> torch.optim.Optimizer:
  """SGD + Nesterov with coupled weight decay (paper config) or AdamW (local config).

  The names mean what they mean in ``jaxsurv.trainer.optim``: ``"adamw"`` is
  decoupled weight decay; ``"adam"`` (coupled L2) is not part of the
  reference and is refused.
  """
  if name == "sgd":
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                           weight_decay=weight_decay)
  if name == "adamw":
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
  raise ValueError(f"optimizer name must be 'sgd' or 'adamw', got {name!r}")


def count_params(model: nn.Module) -> int:
  """Trainable parameters (BatchNorm running statistics are buffers, not counted)."""
  return sum(p.numel() for p in model.parameters())
