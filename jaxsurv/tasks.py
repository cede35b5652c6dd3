"""Tasks: what a model's outputs mean, how they are scored and turned into risks.

A task is a frozen (hashable) dataclass, so it can be a static argument of
the jitted step. Every task has:

* ``loss(outputs, batch, task_args) -> (scalar, measurements)``, pure and
  jit-able, over the **global** (padded) batch: padding rows carry
  ``batch["mask"] == False`` and are removed, from the Cox risk sets too;
* ``part_loss(outputs, part, task_args) -> float``: the same data loss over a
  whole part (all patients at once), used for model selection;
* ``risk(outputs) -> [n, outcomes]``: the risk score per outcome, higher =
  higher hazard (earlier event), the one convention of jaxsurv;
* ``targets(part) -> (duration [n, outcomes] days, event [n, outcomes],
  outcome_mask [n, outcomes])`` for the metrics.

Two tasks exist:

* :class:`CoxHeads` (MMNN; Navarro et al. 2024 §2.4): one log-hazard per
  outcome per head (``mm`` and the unimodal heads), the sum over outcomes of
  the Cox partial likelihood (Breslow or Efron ties, mean per event) per
  head, the heads weighted by gradient-blending weights (Wang et al., CVPR
  2020), an array argument;
* :class:`SingleOutcome` (the fusion zoo): one outcome, either the
  discrete-time negative log-likelihood over time bins (Zadeh & Schmid,
  IEEE TPAMI 2021; the time-bin weights of HEALNet, Hemker et al. 2024, are
  the array argument) with risk ``-sum_k S_k`` (the PORPOISE / HEALNet
  convention), or the Cox partial likelihood of a single log-hazard.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurv import survival
from jaxsurv.errors import UserError
from jaxsurv.losses import cox_ph_loss, discrete_time_nll

LOSSES = ("nll", "cox")


@dataclasses.dataclass(frozen=True)
class CoxHeads:
  """Cox heads with gradient-blending weights (MMNN).

  Attributes:
    heads: output names, ``("mm",)`` or ``("mm", "image", "clinical")``;
      the first is the multimodal head (selection, risk).
    outcomes: outcome names, e.g. ``("os", "dm")``.
    ties: ``"breslow"`` or ``"efron"``.

  Batch / part fields: ``duration [n, outcomes]`` (days), ``event [n,
  outcomes]`` (0/1), ``outcome_mask [n, outcomes]`` (False: endpoint
  missing for that patient), ``mask [n]``. Outputs: ``{head: [n,
  outcomes]}`` log-hazards.
  """
  heads: tuple
  outcomes: tuple
  ties: str = "breslow"

  def head_losses(self, outputs: Mapping[str, jax.Array], duration, event, mask) -> dict:
    """Per head, the sum over outcomes of the mean-per-event Cox loss."""
    return {k: jnp.sum(cox_ph_loss(outputs[k].astype(jnp.float32), duration, event,
                                   ties=self.ties, mask=mask))
            for k in self.heads}

  def loss(self, outputs, batch, task_args):
    """Blended loss ``sum_i w_i L_i`` (``task_args``: weights ``[heads]``)."""
    mask = jnp.logical_and(batch["outcome_mask"], batch["mask"][:, None])
    losses = self.head_losses(outputs, batch["duration"], batch["event"], mask)
    total = sum(task_args[i] * losses[k] for i, k in enumerate(self.heads))
    return total, {f"loss_{k}": v for k, v in losses.items()}

  def part_losses(self, outputs, part) -> dict:
    """Per head, the unweighted Cox loss over a whole part (floats)."""
    losses = self.head_losses({k: jnp.asarray(outputs[k]) for k in self.heads},
                              part["duration"], part["event"], part["outcome_mask"])
    return {k: float(v) for k, v in losses.items()}

  def part_loss(self, outputs, part, task_args) -> float:
    """Selection loss: the unweighted multimodal-head loss over the part."""
    del task_args
    return self.part_losses(outputs, part)[self.heads[0]]

  def risk(self, outputs) -> np.ndarray:
    return np.asarray(outputs[self.heads[0]], np.float64)

  def targets(self, part):
    return (np.asarray(part["duration"], np.float64), np.asarray(part["event"], np.int64),
            np.asarray(part["outcome_mask"], bool))


@dataclasses.dataclass(frozen=True)
class SingleOutcome:
  """One outcome: discrete-time NLL over time bins, or a Cox log-hazard.

  Attributes:
    loss_name: ``"nll"`` (outputs ``out [n, n_bins]`` hazard logits) or
      ``"cox"`` (``out [n, 1]`` log-hazard).
    alpha: weight of the uncensored term of the NLL (Zadeh & Schmid).
    use_bin_weights: weight the NLL's bins by ``task_args`` (HEALNet's
      inverse-frequency weights fitted on the training part).
    ties: Cox ties method.
    outcome: the outcome's name (``"os"``).
    horizon_weight: with the Cox loss, the weight of a binary cross-entropy
      on ``out[:, 1]``, the logit of an event by ``horizon_days`` (SarcNet's
      optional 5-year head); patients censored before the horizon have an
      unknown label and are left out of that term. 0 disables it.
    horizon_days: the binary head's horizon (default 5 years, 1826.25 days).

  Batch / part fields: ``duration [n]`` (days), ``event [n]``, ``bin_index
  [n]`` (int, NLL), ``mask [n]``.
  """
  loss_name: str = "nll"
  alpha: float = 0.0
  use_bin_weights: bool = False
  ties: str = "breslow"
  outcome: str = "os"
  horizon_weight: float = 0.0
  horizon_days: float = 1826.25

  def __post_init__(self):
    if self.loss_name not in LOSSES:
      raise UserError(f"config.loss.name must be one of {LOSSES}, got {self.loss_name!r}")
    if self.horizon_weight and self.loss_name != "cox":
      raise UserError("config.loss.horizon_weight (the binary horizon head) needs the Cox loss")

  @property
  def outcomes(self) -> tuple:
    return (self.outcome,)

  def data_loss(self, out, batch, bin_weights):
    """The survival loss of a (padded) batch, a scalar (see the class doc)."""
    if self.loss_name == "nll":
      bw = bin_weights if self.use_bin_weights else None
      return discrete_time_nll(out.astype(jnp.float32), batch["bin_index"], batch["event"],
                               alpha=self.alpha, bin_weights=bw, mask=batch["mask"])
    loss = cox_ph_loss(out[:, 0].astype(jnp.float32), batch["duration"], batch["event"],
                       ties=self.ties, mask=batch["mask"])
    if self.horizon_weight:
      label, known = survival.horizon_labels(batch["duration"], batch["event"],
                                             self.horizon_days, xp=jnp)
      known = known & batch["mask"].astype(bool)
      logit = out[:, 1].astype(jnp.float32)
      bce = jnp.maximum(logit, 0) - logit * label + jnp.log1p(jnp.exp(-jnp.abs(logit)))
      loss = loss + self.horizon_weight * (jnp.sum(jnp.where(known, bce, 0.0))
                                           / jnp.maximum(jnp.sum(known), 1))
    return loss

  def loss(self, outputs, batch, task_args):
    return self.data_loss(outputs["out"], batch, task_args), {}

  def part_loss(self, outputs, part, task_args) -> float:
    """The data loss (no L1) over a whole part, as in training."""
    b = {"bin_index": part["bin_index"], "event": part["event"], "duration": part["duration"],
         "mask": np.ones(len(part["event"]), bool)}
    bw = jnp.asarray(task_args, jnp.float32) if self.use_bin_weights else None
    return float(self.data_loss(jnp.asarray(outputs["out"]), b, bw))

  def risk(self, outputs) -> np.ndarray:
    out = np.asarray(outputs["out"])
    if self.loss_name == "nll":
      return survival.discrete_risk(out)[:, None]
    return np.asarray(out[:, :1], np.float64)

  def targets(self, part):
    d = np.asarray(part["duration"], np.float64)[:, None]
    return d, np.asarray(part["event"], np.int64)[:, None], np.ones(d.shape, bool)
