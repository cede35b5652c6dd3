"""MMNN training: one jitted, data-parallel train step; selection; evaluation.

``train_and_evaluate(config, workdir)`` runs the whole job:

1. Data: the cohort is prepared once (``jaxsurv.data.prepare``), split per
   patient (saved to ``WORKDIR/splits.json``), the clinical preprocessing is
   fitted on the training split only (``WORKDIR/preprocess.json``).
2. Training: ``train_step(state, batch, rng, blend_weights)`` is jitted with
   the state donated, the batch sharded over a ``("data",)`` mesh of all
   devices. The Cox partial likelihood is computed over the **global** batch:
   the mesh only shards the computation, the risk set is never one device's
   slice. Blend weights are an array argument, so updating them never
   recompiles. Augmentation runs inside the step.
3. Gradient blending (Wang et al. 2020) every ``blend.every_epochs`` epochs,
   from eval-mode losses on the training part and on a held-out part carved
   from the training split.
4. Selection: the unweighted multimodal-head Cox loss on the **whole**
   validation split, every epoch. Orbax keeps the latest checkpoint (resume)
   and the best one.
5. Evaluation of the best checkpoint on the validation and test splits:
   ``WORKDIR/results.json``, ``predictions.csv`` and PNG plots.

Resume order: a checkpoint in the workdir, else scratch. A run killed and
restarted with the same command continues from the last completed epoch and
ends with the same metrics as an uninterrupted run (the data order and RNG of
every epoch derive from the seed and the epoch number).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import time
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pandas as pd
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsurv import augment as augment_lib
from jaxsurv import blending, evaluate, survival
from jaxsurv.errors import TrainingError  # pylint: disable=unused-import
from jaxsurv.data import clinical as clinical_lib
from jaxsurv.data import splits as splits_lib
from jaxsurv.losses import cox_ph_loss
from jaxsurv.models import MMNN

log = logging.getLogger("jaxsurv")


# ----------------------------------------------------------------------------
# State.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Explicit training state: step counter, parameters, BN statistics, optimiser."""
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """Optax chain: SGD+Nesterov (paper) or AdamW, one-cycle schedule, accumulation.

  Returns ``(tx, schedule)``; the schedule counts optimiser updates (after
  gradient accumulation).
  """
  o = config.optimizer
  total_updates = max(1, steps_per_epoch * config.num_epochs // config.grad_accum_steps)
  schedule = optax.cosine_onecycle_schedule(
      transition_steps=total_updates, peak_value=o.lr, pct_start=o.pct_start,
      div_factor=o.div_factor, final_div_factor=o.final_div_factor)
  if o.name == "sgd":
    # PyTorch-style coupled weight decay (grad += wd * param), as in the paper.
    tx = optax.chain(optax.add_decayed_weights(o.weight_decay),
                     optax.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov))
  elif o.name == "adam":
    tx = optax.adamw(schedule, weight_decay=o.weight_decay)
  else:
    raise ValueError(f"config.optimizer.name must be 'sgd' or 'adam', got {o.name!r}")
  if config.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accum_steps)
  return tx, schedule


def build_model(config: ml_collections.ConfigDict) -> MMNN:
  """MMNN from ``config.model`` (bf16 compute if ``config.dtype == 'bfloat16'``)."""
  dtype = {"float32": None, "bfloat16": jnp.bfloat16}[config.dtype]
  image = dict(config.model.image)
  clinical = dict(config.model.clinical)
  if dtype is not None:
    image["dtype"] = dtype
    clinical["dtype"] = dtype
  return MMNN(n_outcomes=len(config.data.outcomes), modalities=tuple(config.model.modalities),
              image_kwargs=image, clinical_kwargs=clinical)


def head_names(config) -> tuple[str, ...]:
  mods = tuple(config.model.modalities)
  return ("mm",) + mods if len(mods) > 1 else ("mm",)


# ----------------------------------------------------------------------------
# The train step (pure) and the eval forward pass.
# ----------------------------------------------------------------------------


def _variables(params, batch_stats):
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def cox_head_losses(outputs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array],
                    heads, ties: str) -> dict:
  """Per head: sum over outcomes of the mean-per-event Cox loss over the batch.

  ``batch["outcome_mask"]`` ``[batch, outcomes]`` drops a patient from one
  outcome (missing endpoint); ``batch["mask"]`` ``[batch]`` drops padding.
  """
  mask = jnp.logical_and(batch["outcome_mask"], batch["mask"][:, None])
  return {k: jnp.sum(cox_ph_loss(outputs[k].astype(jnp.float32), batch["duration"],
                                 batch["event"], ties=ties, mask=mask))
          for k in heads}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array,
               blend_weights: jax.Array, *, model: nn.Module, tx, heads, ties: str,
               augment_cfg: Mapping[str, Any] | None):
  """One optimisation step on a global batch.

  Args:
    state: the TrainState (donated).
    batch: ``image [batch, depth, height, width, channels]``, ``clinical
      [batch, features]``, ``duration [batch, outcomes]`` (days), ``event
      [batch, outcomes]``, ``outcome_mask [batch, outcomes]``, ``mask [batch]``.
    rng: a key; folded with the step for augmentation and dropout.
    blend_weights: ``[len(heads)]`` loss weights of the heads (array input:
      changing them does not recompile).

  Returns:
    ``(new_state, measurements)`` with the blended loss and each head's loss.
  """
  rng = jax.random.fold_in(rng, state.step)
  rng_aug, rng_dropout = jax.random.split(rng)
  image = batch["image"]
  if augment_cfg is not None and image is not None:
    image = augment_lib.augment_batch(rng_aug, image, **augment_cfg)

  def loss_fn(params):
    (outputs, _), updates = model.apply(
        _variables(params, state.batch_stats), image, batch["clinical"], train=True,
        rngs={"dropout": rng_dropout}, mutable=["batch_stats"])
    losses = cox_head_losses(outputs, batch, heads, ties)
    total = sum(blend_weights[i] * losses[k] for i, k in enumerate(heads))
    return total, (losses, updates)

  (total, (losses, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  upd, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, upd)
  new_state = state.replace(step=state.step + 1, params=params,
                            batch_stats=updates.get("batch_stats", state.batch_stats),
                            opt_state=opt_state)
  measurements = {"loss": total, **{f"loss_{k}": v for k, v in losses.items()},
                  "grad_norm": optax.global_norm(grads)}
  return new_state, measurements


def predict_fn(params, batch_stats, image, clinical, *, model):
  """Eval-mode log-hazards per head, each ``[batch, outcomes]`` float32."""
  outputs, _ = model.apply(_variables(params, batch_stats), image, clinical, train=False)
  return {k: v.astype(jnp.float32) for k, v in outputs.items()}


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class CohortArrays:
  """Model inputs and outcomes of all patients, aligned with ``patient_ids``."""
  patient_ids: np.ndarray
  image: np.ndarray | None  # [n, D, H, W, C] float32
  clinical: np.ndarray  # [n, features] float32
  duration: np.ndarray  # [n, outcomes] float32 (days)
  event: np.ndarray  # [n, outcomes] int32
  outcome_mask: np.ndarray  # [n, outcomes] bool
  table: pd.DataFrame

  def take(self, idx: np.ndarray) -> dict:
    return {"image": None if self.image is None else self.image[idx],
            "clinical": self.clinical[idx], "duration": self.duration[idx],
            "event": self.event[idx], "outcome_mask": self.outcome_mask[idx]}


def _check_columns(table: pd.DataFrame, config) -> None:
  """Fails before training if the config names columns the cohort lacks."""
  needed = list(config.data.numeric) + list(config.data.categorical)
  needed += [f"{o}_{s}" for o in config.data.outcomes for s in ("time", "event")]
  missing = [c for c in needed if c not in table.columns]
  if missing:
    raise ValueError(f"config names columns missing from cohort {config.data.cohort!r}: "
                     f"{missing}; available columns: {sorted(map(str, table.columns))}")
  if ("clinical" in config.model.modalities
      and not (config.data.numeric or config.data.categorical)):
    raise ValueError("model.modalities includes 'clinical' but config.data.numeric and "
                     "config.data.categorical are empty")


def load_cohort(config):
  """Prepares (once) and loads the configured cohort: ``PreparedCohort``."""
  from jaxsurv.data import manifest as manifest_lib
  from jaxsurv.data import mri
  from jaxsurv.data import prepare
  pre = mri.PreprocessConfig(**{k: (tuple(v) if isinstance(v, (list, tuple)) else v)
                                for k, v in config.data.preprocess.items()})
  spec = manifest_lib.CohortSpec(channels=tuple(config.data.channels), mask=config.data.mask,
                                 numeric=tuple(config.data.numeric),
                                 categorical=tuple(config.data.categorical),
                                 outcomes=tuple(config.data.outcomes))
  cohort = config.data.cohort
  is_manifest = str(cohort).endswith(".csv")
  prepared = prepare.prepare_cohort(cohort, spec=spec if is_manifest else None, preprocess=pre,
                                    n_patients=config.data.get("n_patients"),
                                    seed=config.data.cohort_seed,
                                    workers=config.data.get("prepare_workers", 1))
  if "image" in config.model.modalities and prepared.images is None:
    raise ValueError(f"model.modalities includes 'image' but cohort {cohort!r} has no images")
  return prepared


def make_splits(table: pd.DataFrame, config, workdir: pathlib.Path) -> splits_lib.Split:
  """Patient-level split; reused from ``WORKDIR/splits.json`` on resume."""
  path = workdir / "splits.json"
  if path.exists():
    return splits_lib.load_splits(path)
  if "split" in table.columns and table["split"].notna().all():
    split = splits_lib.splits_from_column(table)
  else:
    split = splits_lib.train_val_test_split(table, fractions=tuple(config.data.fractions),
                                            stratify=tuple(config.data.stratify),
                                            seed=config.data.split_seed)
  splits_lib.save_splits(split, path)
  return split


def build_arrays(prepared, config, train_ids) -> tuple[CohortArrays, clinical_lib.ClinicalPreprocessor]:
  """Fits the clinical preprocessing on the training ids and builds arrays."""
  table = prepared.table.reset_index(drop=True)
  _check_columns(table, config)
  # A level seen only outside the training split (a rare category) cannot
  # have a learned weight: it is encoded as all zeros, and reported.
  pre = clinical_lib.ClinicalPreprocessor(numeric=tuple(config.data.numeric),
                                          categorical=tuple(config.data.categorical),
                                          handle_unknown="ignore")
  is_train = table["patient_id"].isin(set(train_ids)).to_numpy()
  for col in config.data.categorical:
    seen = set(table.loc[is_train, col].dropna().map(clinical_lib.level_key))
    unseen = table.loc[~is_train, col].dropna().map(clinical_lib.level_key)
    unseen = unseen[~unseen.isin(seen)]
    if len(unseen):
      log.warning("column %r: %d non-training patients have levels absent from the training "
                  "split (%s); they are encoded as all zeros", col, len(unseen),
                  sorted(set(unseen)))
  if pre.numeric or pre.categorical:
    pre.fit(table[is_train])
    clin = pre.transform(table).astype(np.float32)
  else:
    clin = np.zeros((len(table), 1), np.float32)
  outs = config.data.outcomes
  duration = np.stack([table[f"{o}_time"].to_numpy(float) for o in outs], 1)
  event = np.stack([table[f"{o}_event"].to_numpy(float) for o in outs], 1)
  omask = np.isfinite(duration) & np.isfinite(event)
  arrays = CohortArrays(
      patient_ids=table["patient_id"].astype(str).to_numpy(),
      image=None if prepared.images is None else prepared.images.astype(np.float32),
      clinical=clin,
      duration=np.where(omask, duration, 0.0).astype(np.float32),
      event=np.where(omask, event, 0).astype(np.int32),
      outcome_mask=omask, table=table)
  return arrays, pre


def _holdout(ids: np.ndarray, table: pd.DataFrame, fraction: float, seed: int):
  """Splits training ids into (fit, held-out) for gradient blending, stratified by events."""
  if fraction <= 0:
    return ids, ids[:0]
  sub = table.set_index("patient_id").loc[ids]
  ev = sub.filter(like="_event").fillna(0).astype(int).astype(str).agg("".join, axis=1).to_numpy()
  rng = np.random.default_rng([seed, 7])
  held = []
  for level in np.unique(ev):
    members = ids[ev == level]
    k = int(round(fraction * len(members)))
    held.extend(rng.choice(members, size=k, replace=False).tolist())
  held = np.array(sorted(held), dtype=ids.dtype)
  return np.setdiff1d(ids, held), held


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


def checkpoint_manager(directory: pathlib.Path, *, create: bool = True) -> ocp.CheckpointManager:
  """The run's Orbax manager: keeps the latest checkpoint and the best one.

  "Best" is the lowest ``val_loss`` (the unweighted multimodal-head Cox loss
  over the whole validation split). Items: ``state`` (TrainState) and
  ``meta`` (JSON). ``jaxsurv.predict`` opens runs with ``create=False``.
  A relative ``directory`` is taken from the current directory (Orbax itself
  accepts only absolute paths).
  """
  directory = pathlib.Path(directory).absolute()
  from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
  metric = lambda m: m["val_loss"]
  options = ocp.CheckpointManagerOptions(
      best_fn=metric, best_mode="min", create=create,
      preservation_policy=pp.AnyPreservationPolicy(
          [pp.LatestN(n=1), pp.BestN(get_metric_fn=metric, reverse=True, n=1)]),
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def _abstract(tree, sharding):
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                      if hasattr(a, "shape") else a, tree)


# ----------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------


class Trainer:
  """Holds the compiled functions and device arrays of one run."""

  def __init__(self, config, arrays: CohortArrays, split: splits_lib.Split):
    self.config = config
    self.arrays = arrays
    self.heads = head_names(config)
    self.model = build_model(config)
    self.mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    self.repl = NamedSharding(self.mesh, P())
    self.data_sh = NamedSharding(self.mesh, P("data"))
    n_dev = len(jax.devices())
    for name in ("batch_size", "eval_batch_size"):
      if config[name] % n_dev:
        raise ValueError(f"config.{name}={config[name]} must be divisible by the {n_dev} devices")
    index = {pid: i for i, pid in enumerate(arrays.patient_ids)}
    self.idx = {name: np.array([index[p] for p in getattr(split, name)], np.int64)
                for name in ("train", "val", "test")}
    fit_ids, held_ids = (np.asarray(split.train), np.asarray(split.train[:0]))
    if config.blend.enabled:
      fit_ids, held_ids = _holdout(np.asarray(split.train), arrays.table,
                                   config.blend.holdout_fraction, config.seed)
    self.idx["fit"] = np.array([index[p] for p in fit_ids], np.int64)
    self.idx["heldout"] = np.array([index[p] for p in held_ids], np.int64)
    if len(self.idx["fit"]) < config.batch_size:
      raise ValueError(f"the training part has {len(self.idx['fit'])} patients, fewer than "
                       f"config.batch_size={config.batch_size}")
    self.steps_per_epoch = len(self.idx["fit"]) // config.batch_size
    self.tx, self.schedule = make_optimizer(config, self.steps_per_epoch)
    aug = config.augment
    augment_cfg = (dict(flip_prob=aug.flip_prob, max_rotation_deg=aug.max_rotation_deg,
                        zoom_range=tuple(aug.zoom_range))
                   if aug.enabled and "image" in config.model.modalities else None)
    step = functools.partial(train_step, model=self.model, tx=self.tx, heads=self.heads,
                             ties=config.loss.ties, augment_cfg=augment_cfg)
    self.train_step = jax.jit(step, donate_argnums=(0,))
    self.predict = jax.jit(functools.partial(predict_fn, model=self.model))

  def init_state(self, rng) -> TrainState:
    a = self.arrays
    image = None if a.image is None else jnp.zeros((1,) + a.image.shape[1:], jnp.float32)
    clinical = jnp.zeros((1, a.clinical.shape[1]), jnp.float32)
    variables = jax.jit(functools.partial(self.model.init, train=False))(rng, image, clinical)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                       opt_state=self.tx.init(params))
    return jax.device_put(state, self.repl)

  def batch(self, idx: np.ndarray, size: int) -> dict:
    """A fixed-size global batch (padded with masked rows), sharded over devices."""
    n = len(idx)
    pad = size - n
    full = np.concatenate([idx, np.repeat(idx[:1], pad)]) if pad > 0 else idx
    b = self.arrays.take(full)
    b["mask"] = np.arange(size) < n
    return jax.device_put(b, self.data_sh)  # A None image stays None.

  def predict_split(self, state: TrainState, idx: np.ndarray) -> dict:
    """Eval-mode log-hazards of every head over ``idx``: ``{head: [n, outcomes]}``."""
    bs = self.config.eval_batch_size
    chunks = []
    for start in range(0, len(idx), bs):
      sel = idx[start:start + bs]
      b = self.batch(sel, bs)
      out = self.predict(state.params, state.batch_stats, b["image"], b["clinical"])
      chunks.append({k: np.asarray(v)[:len(sel)] for k, v in out.items()})
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

  def split_losses(self, preds: Mapping[str, np.ndarray], idx: np.ndarray) -> dict:
    """Per head, the Cox loss (sum over outcomes) over a whole split."""
    a = self.arrays
    return {k: float(jnp.sum(cox_ph_loss(v, a.duration[idx], a.event[idx],
                                         ties=self.config.loss.ties,
                                         mask=a.outcome_mask[idx])))
            for k, v in preds.items()}


def _epoch_order(seed: int, epoch: int, idx: np.ndarray) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(idx)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the MMNN job end to end; returns the results dict (also in results.json)."""
  from tqdm.auto import tqdm
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  evaluate.write_json_atomic(json.loads(config.to_json_best_effort()), workdir / "config.json")

  prepared = load_cohort(config)
  split = make_splits(prepared.table, config, workdir)
  arrays, clin_pre = build_arrays(prepared, config, split.train)
  evaluate.write_json_atomic({"clinical": clin_pre.to_dict() if clin_pre.fitted else None,
                              "preprocess": dataclasses.asdict(prepared.preprocess)
                              if prepared.preprocess is not None else None,
                              "fingerprint": prepared.fingerprint,
                              "cohort": str(config.data.cohort),
                              "outcomes": list(config.data.outcomes)},
                             workdir / "preprocess.json")
  trainer = Trainer(config, arrays, split)
  log.info("patients: train %d (fit %d, blend hold-out %d), val %d, test %d; %d steps/epoch",
           len(split.train), len(trainer.idx["fit"]), len(trainer.idx["heldout"]),
           len(split.val), len(split.test), trainer.steps_per_epoch)

  rng = jax.random.key(config.seed)
  rng_init, rng_loop = jax.random.split(rng)
  state = trainer.init_state(rng_init)
  heads = trainer.heads
  blender = blending.GradientBlender(heads, mode=config.blend.mode)
  weights = np.full(len(heads), 1.0 / len(heads), np.float32)
  history: list[dict] = []
  start_epoch = 0

  with checkpoint_manager(workdir / "checkpoints") as mngr:
    latest = mngr.latest_step()
    if latest is not None:
      restored = mngr.restore(latest, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(state, trainer.repl)),
          meta=ocp.args.JsonRestore()))
      state = restored["state"]
      meta = restored["meta"]
      start_epoch = meta["epoch"] + 1
      weights = np.asarray(meta["blend_weights"], np.float32)
      blender = blending.GradientBlender.from_dict(meta["blender"])
      history = meta["history"]
      log.info("resumed from epoch %d (step %d)", meta["epoch"], int(state.step))

    total_steps = trainer.steps_per_epoch * config.num_epochs
    bar = tqdm(total=total_steps, initial=start_epoch * trainer.steps_per_epoch,
               desc="train", unit="step", dynamic_ncols=True,
               disable=not config.get("progress_bar", True))
    t0 = time.time()
    for epoch in range(start_epoch, config.num_epochs):
      order = _epoch_order(config.seed, epoch, trainer.idx["fit"])
      sums = {}
      for s in range(trainer.steps_per_epoch):
        sel = order[s * config.batch_size:(s + 1) * config.batch_size]
        state, meas = trainer.train_step(state, trainer.batch(sel, config.batch_size), rng_loop,
                                         jnp.asarray(weights))
        for k, v in meas.items():
          sums[k] = sums.get(k, 0.0) + v
        if (s + 1) % config.log_every_steps == 0 or s + 1 == trainer.steps_per_epoch:
          loss = float(meas["loss"])
          if not math.isfinite(loss):
            raise TrainingError(
                f"non-finite training loss {loss} at step {int(state.step)} (epoch {epoch}); "
                f"the last good checkpoint (epoch {epoch - 1}) is kept in {workdir / 'checkpoints'}")
          bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
        bar.update(1)
      train_means = {k: float(v) / trainer.steps_per_epoch for k, v in sums.items()}
      if not all(math.isfinite(v) for v in train_means.values()):
        raise TrainingError(f"non-finite training loss in epoch {epoch} (step {int(state.step)}); "
                            f"the last good checkpoint is kept in {workdir / 'checkpoints'}")

      val_pred = trainer.predict_split(state, trainer.idx["val"])
      val_losses = trainer.split_losses(val_pred, trainer.idx["val"])
      record = {"epoch": epoch, "step": int(state.step), "train_loss": train_means["loss"],
                "val_loss": val_losses["mm"], "blend_weights": weights.tolist(),
                "lr": float(trainer.schedule(int(state.step) // config.grad_accum_steps)),
                "seconds": time.time() - t0}
      for j, o in enumerate(config.data.outcomes):
        a = trainer.arrays
        sel = trainer.idx["val"][a.outcome_mask[trainer.idx["val"], j]]
        try:
          from jaxsurv import metrics
          record[f"val_cindex_{o}"] = metrics.concordance_index(
              a.duration[sel, j], a.event[sel, j], val_pred["mm"][a.outcome_mask[trainer.idx["val"], j], j])
        except ValueError:
          record[f"val_cindex_{o}"] = float("nan")
      if not math.isfinite(record["val_loss"]):
        raise TrainingError(f"non-finite validation loss after epoch {epoch} (step {int(state.step)})")

      if config.blend.enabled and (epoch + 1) % config.blend.every_epochs == 0:
        fit_pred = trainer.predict_split(state, trainer.idx["fit"])
        held_pred = trainer.predict_split(state, trainer.idx["heldout"])
        weights = np.asarray(blender.update(
            epoch, trainer.split_losses(fit_pred, trainer.idx["fit"]),
            trainer.split_losses(held_pred, trainer.idx["heldout"])), np.float32)
        record["blend_update"] = weights.tolist()
      history.append(record)
      log.info("epoch %d: %s", epoch, {k: (round(v, 4) if isinstance(v, float) else v)
                                       for k, v in record.items() if k != "blend_weights"})
      meta = {"epoch": epoch, "blend_weights": weights.tolist(), "blender": blender.to_dict(),
              "history": history}
      mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)),
                metrics={"val_loss": record["val_loss"]})
      mngr.wait_until_finished()
    bar.close()
    best = mngr.best_step()
    restored = mngr.restore(best, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_abstract(state, trainer.repl)),
        meta=ocp.args.JsonRestore()))
    best_state = restored["state"]

  results = report(trainer, best_state, config, workdir, history, blender, best_epoch=best)
  return results


def report(trainer: Trainer, state: TrainState, config, workdir: pathlib.Path, history,
           blender, *, best_epoch: int) -> dict:
  """Evaluates ``state`` on val and test; writes results, predictions and plots."""
  a = trainer.arrays
  horizons = tuple(config.eval.horizons_years)
  preds = {name: trainer.predict_split(state, trainer.idx[name]) for name in ("train", "val", "test")}
  results: dict = {"best_epoch": int(best_epoch), "heads": list(trainer.heads)}
  rows = []
  baselines = {}
  for j, o in enumerate(config.data.outcomes):
    tr = trainer.idx["train"]
    tm = a.outcome_mask[tr, j]
    if not tm.any() or not a.event[tr[tm], j].any():
      continue
    baselines[o] = survival.BreslowBaseline.fit(preds["train"]["mm"][tm, j],
                                                a.duration[tr[tm], j], a.event[tr[tm], j])
  for name in ("val", "test"):
    idx = trainer.idx[name]
    results[name] = {}
    for j, o in enumerate(config.data.outcomes):
      if o not in baselines:
        continue
      tr = trainer.idx["train"]
      tm = a.outcome_mask[tr, j]
      m = a.outcome_mask[idx, j]
      results[name][o] = evaluate.evaluate_outcome(
          risk=preds[name]["mm"][m, j], duration=a.duration[idx[m], j], event=a.event[idx[m], j],
          train_risk=preds["train"]["mm"][tm, j], train_duration=a.duration[tr[tm], j],
          train_event=a.event[tr[tm], j], horizons_years=horizons,
          bootstrap_resamples=config.eval.bootstrap_resamples, seed=config.seed)
      oracle = f"eta_{o}"
      if oracle in a.table.columns:
        from jaxsurv import metrics
        eta = a.table[oracle].to_numpy(float)[idx[m]]
        results[name][o]["oracle_cindex"] = metrics.concordance_index(
            a.duration[idx[m], j], a.event[idx[m], j], eta)
  for name in ("train", "val", "test"):
    idx = trainer.idx[name]
    cols = {"patient_id": a.patient_ids[idx], "split": name}
    for j, o in enumerate(config.data.outcomes):
      cols[f"risk_{o}"] = preds[name]["mm"][:, j]
      if o in baselines:
        cols.update(evaluate.survival_columns(o, baselines[o], preds[name]["mm"][:, j], horizons))
    rows.append(pd.DataFrame(cols))
  evaluate.write_csv_atomic(pd.concat(rows, ignore_index=True), workdir / "predictions.csv")
  evaluate.write_json_atomic(results, workdir / "results.json")
  evaluate.write_json_atomic(
      {o: b.to_dict() for o, b in baselines.items()}, workdir / "baseline_hazard.json")
  # Plots.
  evaluate.plot_training_curves(workdir / "training_curves.png", history)
  if len(trainer.heads) > 1 and blender.history:
    blender.to_csv(workdir / "blend_weights.csv")
    blending.plot_history(blender.history, workdir / "blend_weights.png")
  for j, o in enumerate(config.data.outcomes):
    if o not in baselines:
      continue
    tr = trainer.idx["train"]
    threshold = float(np.median(preds["train"]["mm"][a.outcome_mask[tr, j], j]))
    idx = trainer.idx["test"]
    m = a.outcome_mask[idx, j]
    evaluate.plot_km_by_risk_group(workdir / f"km_test_{o}.png", risk=preds["test"]["mm"][m, j],
                                   duration=a.duration[idx[m], j], event=a.event[idx[m], j],
                                   threshold=threshold,
                                   title=f"{o.upper()}: test split by training-median risk")
  return results
