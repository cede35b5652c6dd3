"""Optimisers and learning-rate schedules of every jaxsurv run.

``make_optimizer`` returns the optimiser's *direction* (no learning rate):
the train step applies ``params - lr * direction`` with ``lr`` from
``lr_schedule`` passed as an array argument, so neither a schedule nor a new
fold recompiles the step. Each name means one thing:

* ``"sgd"``: SGD with (Nesterov) momentum and coupled weight decay
  (``grad += wd * param``, PyTorch ``SGD(weight_decay=wd)``; the MMNN paper);
* ``"adam"``: Adam with coupled L2 (``grad += wd * param`` before the
  moments, PyTorch ``Adam(weight_decay=wd)``; PORPOISE, HEALNet);
* ``"adamw"``: Adam with decoupled weight decay (Loshchilov & Hutter, ICLR
  2019; ``optax.adamw``): the update is ``-lr * (adam + wd * param)``.

Optional global-norm gradient clipping (``optimizer.clip_norm``) and gradient
accumulation over ``grad_accum_steps`` batches (``optax.MultiSteps``: the
optimiser steps on the mean gradient of every ``k`` batches; in between the
direction is zero, so the parameters do not move).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxsurv.errors import UserError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("onecycle", "cosine", "constant")


def optimizer_spec(config: ml_collections.ConfigDict) -> tuple:
  """The hashable settings ``make_optimizer`` depends on.

  Raises:
    UserError: unknown ``config.optimizer.name`` or a bad ``grad_accum_steps``.
  """
  o = config.optimizer
  if o.name not in OPTIMIZERS:
    raise UserError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {o.name!r}")
  accum = int(config.get("grad_accum_steps", 1))
  if accum < 1:
    raise UserError(f"config.grad_accum_steps must be >= 1, got {accum}")
  return (o.name, float(o.get("weight_decay", 0.0) or 0.0), float(o.get("b1", 0.9)),
          float(o.get("b2", 0.999)), float(o.get("momentum", 0.9)),
          bool(o.get("nesterov", False)), float(o.get("clip_norm", 0.0) or 0.0), accum,
          float(o.get("proximal_mu", 0.0) or 0.0))


class ProximalState(NamedTuple):
  """The anchor of the proximal term: the parameters the optimiser was started at."""
  anchor: Any


def add_proximal_term(mu: float) -> optax.GradientTransformation:
  """FedProx's proximal term as a gradient transform: ``g + mu (w - w0)``.

  FedProx (Li et al., "Federated Optimization in Heterogeneous Networks",
  MLSys 2020, eq. 2) minimises ``F_k(w) + mu/2 ||w - w^t||^2`` locally,
  ``w^t`` the global model of the round. The anchor ``w0`` is the
  parameters passed to ``init``; a federated client starts a fresh optimiser
  from the global parameters every round (``Trainer.state_from``), so the
  anchor is ``w^t``. First in the chain, so clipping, weight decay and Adam
  see the gradient of the proximal objective.
  """
  def init(params):
    return ProximalState(anchor=jax.tree.map(jnp.asarray, params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("add_proximal_term needs the parameters in update()")
    return jax.tree.map(lambda g, w, a: g + mu * (w - a), updates, params, state.anchor), state

  return optax.GradientTransformation(init, update)


def optimizer_from_spec(spec: tuple) -> optax.GradientTransformation:
  """``make_optimizer`` from ``optimizer_spec`` (hashable, for caching)."""
  name, wd, b1, b2, momentum, nesterov, clip, accum, mu = spec
  parts = [add_proximal_term(mu)] if mu else []
  parts += [optax.clip_by_global_norm(clip)] if clip else []
  decay = [optax.add_decayed_weights(wd)] if wd else []
  if name == "sgd":
    parts += decay + ([optax.trace(decay=momentum, nesterov=nesterov)] if momentum else [])
  elif name == "adam":
    parts += decay + [optax.scale_by_adam(b1=b1, b2=b2)]
  else:
    parts += [optax.scale_by_adam(b1=b1, b2=b2)] + decay
  tx = optax.chain(*parts) if parts else optax.identity()
  if accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accum)
  return tx


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimiser direction (no learning rate) of ``config.optimizer``.

  Fields: ``name`` (``sgd``, ``adam``, ``adamw``), ``weight_decay``,
  ``momentum`` and ``nesterov`` (SGD), ``b1`` and ``b2`` (Adam),
  ``clip_norm`` (0: off); ``config.grad_accum_steps`` (default 1).

  Raises:
    UserError: unknown optimiser name.
  """
  return optimizer_from_spec(optimizer_spec(config))


def total_updates(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Optimiser updates over the whole run (after gradient accumulation)."""
  accum = int(config.get("grad_accum_steps", 1))
  return max(1, int(steps_per_epoch) * int(config.num_epochs) // accum)


def lr_schedule(config: ml_collections.ConfigDict,
                steps_per_epoch: int) -> Callable[[int], float]:
  """Learning rate per optimiser update (the step passes ``step // grad_accum``).

  * ``"onecycle"``: ``optax.cosine_onecycle_schedule`` (PyTorch OneCycleLR;
    Smith & Topin 2019): peak ``lr`` after ``pct_start`` of the updates,
    starting at ``lr / div_factor`` and ending at
    ``lr / (div_factor * final_div_factor)``;
  * ``"cosine"``: linear warm-up over ``warmup_epochs`` then cosine decay to
    ``lr * final_lr_fraction``;
  * ``"constant"``: ``lr``.

  Raises:
    UserError: unknown schedule.
  """
  o = config.optimizer
  total = total_updates(config, steps_per_epoch)
  schedule = o.get("schedule", "onecycle")
  if schedule == "onecycle":
    return optax.cosine_onecycle_schedule(
        transition_steps=total, peak_value=o.lr, pct_start=o.pct_start,
        div_factor=o.div_factor, final_div_factor=o.final_div_factor)
  if schedule == "cosine":
    per_epoch = total / max(int(config.num_epochs), 1)
    warm = int(round(o.get("warmup_epochs", 0) * per_epoch))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else o.lr, peak_value=o.lr, warmup_steps=warm,
        decay_steps=max(total, warm + 1), end_value=o.lr * o.get("final_lr_fraction", 0.0))
  if schedule == "constant":
    return optax.constant_schedule(o.lr)
  raise UserError(f"config.optimizer.schedule must be one of {SCHEDULES}, got {schedule!r}")
