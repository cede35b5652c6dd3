"""The pure, jitted train step and eval forward pass shared by every model.

One function for every family (MMNN, the fusion zoo, SarcNet): the model
family is a ``call`` adapter (``jaxsurv.models.registry``), the meaning of
the outputs a task (``jaxsurv.tasks``), training-time input transforms an
``augment`` callable. All three are static (hashable) arguments; the
learning rate and the task arguments (gradient-blending weights, time-bin
weights) are arrays, so changing them never recompiles.

Sharding: the trainer jits this step with the state replicated and the batch
sharded over a ``("data",)`` mesh of all devices. The loss is computed over
the **global** batch (XLA inserts the collectives), so the Cox risk set is
never one device's slice.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from jaxsurv.models.healnet import l1_penalty
from jaxsurv.trainer import optim


@flax.struct.dataclass
class TrainState:
  """Explicit training state: step counter, parameters, BN statistics, optimiser.

  ``step`` counts batches (not optimiser updates, which are fewer with
  gradient accumulation); ``batch_stats`` is ``{}`` for models without
  batch normalisation.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def variables(params, batch_stats) -> dict:
  """Flax variables of a state: ``params`` plus ``batch_stats`` if any."""
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def train_step(state: TrainState, batch: Mapping[str, Any], rng: jax.Array, lr: jax.Array,
               task_args: jax.Array, *, model, call: Callable, tx: optax.GradientTransformation,
               task, augment: Callable | None, l1: float, l1_include: str):
  """One optimisation step on a global batch (pure; jit with ``donate_argnums=0``).

  Args:
    state: the ``TrainState`` (donated).
    batch: ``inputs {modality: [batch, ...]}``, ``presence {modality: bool
      [batch]}``, ``mask [batch]`` (False = padding row) and the task's
      targets (e.g. ``duration`` in days, ``event``).
    rng: a key; folded with ``state.step``, then split into
      ``call.n_input_keys`` keys for ``augment`` and one for dropout.
    lr: scalar learning rate of this step (host schedule).
    task_args: the task's array argument (blend weights ``[heads]``, time-bin
      weights ``[n_bins]``).
    model, call: the Flax module and its adapter
      (``jaxsurv.models.registry.Adapter``): ``call.apply(model, variables,
      inputs, presence, train=, rngs=, mutable=) -> ((outputs, aux), updates)``.
    tx: the optimiser direction (``jaxsurv.trainer.optim.make_optimizer``).
    task: ``loss(outputs, batch, task_args) -> (scalar, measurements)``.
    augment: ``augment(keys, inputs, presence) -> (inputs, presence)`` or None.
    l1: coefficient of ``l1_penalty(params, l1_include)`` added once to the
      loss (0 disables it).

  Returns:
    ``(new_state, measurements)``: ``loss`` (data loss + L1), ``data_loss``,
    ``l1``, ``grad_norm`` and the task's own measurements.
  """
  rng = jax.random.fold_in(rng, state.step)
  keys = jax.random.split(rng, call.n_input_keys + 1)
  r_dropout = keys[-1]
  inputs, presence = batch["inputs"], batch["presence"]
  if augment is not None:
    inputs, presence = augment(keys[:-1], inputs, presence)

  def loss_fn(params):
    (outputs, _), updates = call.apply(model, variables(params, state.batch_stats), inputs,
                                       presence, train=True, rngs={"dropout": r_dropout},
                                       mutable=["batch_stats"])
    data, meas = task.loss(outputs, batch, task_args)
    reg = l1 * l1_penalty(params, l1_include) if l1 else jnp.zeros((), jnp.float32)
    return data + reg, (data, reg, meas, updates)

  (total, (data, reg, meas, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  params, opt_state = optim.apply_updates(tx, grads, state.opt_state, state.params, lr)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=updates.get("batch_stats", state.batch_stats),
                            opt_state=opt_state)
  return new_state, {"loss": total, "data_loss": data, "l1": reg,
                     "grad_norm": optax.tree.norm(grads), **meas}


def predict_fn(params, batch_stats, inputs, presence, *, model, call: Callable,
               summarize: Callable | None) -> dict:
  """Eval-mode outputs of one batch: ``{output name: array}`` (float32) plus
  ``summarize(aux)`` (e.g. effective presence, attention maps), if given."""
  outputs, aux = call.apply(model, variables(params, batch_stats), inputs, presence, train=False)
  res = {k: v.astype(jnp.float32) for k, v in outputs.items()}
  if summarize is not None:
    res.update(summarize(aux))
  return res
