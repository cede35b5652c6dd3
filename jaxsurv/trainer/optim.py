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
accumulation over ``grad_accum_steps`` batches (``Accumulate``, an
``optax.MultiSteps`` with its state and its arithmetic: the optimiser steps on
the mean gradient of every ``k`` batches; in between the parameters do not
move). ``apply_updates`` is the one place a step turns gradients into new
parameters: with accumulation it runs the optimiser and the parameter update
only on the ``k``-th batch (``lax.cond``), where ``optax.MultiSteps.update``
computes both on every batch and multiplies the result by zero.
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
    tx = Accumulate(tx, accum)
  return tx


class Accumulate(optax.MultiSteps):
  """``optax.MultiSteps(inner, every_k_schedule=k)`` with ``k`` kept (a fixed int).

  ``init`` and ``update`` are MultiSteps' own (the state is an
  ``optax.MultiStepsState``, so checkpoints are unchanged); ``apply_updates``
  uses ``k`` to skip the optimiser on the batches in between.
  """

  def __init__(self, inner: optax.GradientTransformation, k: int):
    super().__init__(inner, every_k_schedule=int(k))
    self.k = int(k)


def apply_updates(tx: optax.GradientTransformation, grads, opt_state, params, lr: jax.Array):
  """New ``(params, opt_state)`` from one batch's gradients: ``params - lr * direction``.

  For ``Accumulate`` (``grad_accum_steps`` = k > 1) the same values as
  ``optax.MultiSteps.update`` followed by that update: the running mean of the
  gradients, ``acc + (g - acc) / (n + 1)`` (MultiSteps' Welford form), and on
  the k-th batch the inner optimiser on that mean, the parameter update and a
  zeroed accumulator; on the other batches parameters and inner state are
  returned unchanged. ``lax.cond`` runs only the taken branch, so those
  batches cost one pass over the accumulator instead of a whole optimiser step.

  Args:
    tx: ``make_optimizer``'s transformation.
    grads, params: pytrees of the same structure.
    opt_state: ``tx``'s state.
    lr: scalar learning rate.

  Returns:
    ``(new_params, new_opt_state)``.
  """
  def descend(params, direction):
    return jax.tree.map(lambda p, u: p - lr * u, params, direction)

  if not isinstance(tx, Accumulate):
    direction, opt_state = tx.update(grads, opt_state, params)
    return descend(params, direction), opt_state
  n = opt_state.mini_step
  acc = jax.tree.map(lambda g, a: a + (g - a) / (n + 1), grads, opt_state.acc_grads)
  emit = n == tx.k - 1

  def step(operands):
    acc, inner, params = operands
    direction, inner = tx.inner_opt.update(acc, inner, params)
    return descend(params, direction), inner, jax.tree.map(jnp.zeros_like, acc)

  def keep(operands):
    acc, inner, params = operands
    return params, inner, acc

  params, inner, acc = jax.lax.cond(emit, step, keep, (acc, opt_state.inner_opt_state, params))
  return params, opt_state._replace(
      mini_step=optax.safe_increment(n) % tx.k,
      gradient_step=jnp.where(emit, optax.safe_increment(opt_state.gradient_step),
                              opt_state.gradient_step),
      inner_opt_state=inner, acc_grads=acc)


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
