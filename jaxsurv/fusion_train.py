"""Training of the fusion zoo (HEALNet, CM-MMF, PORPOISE, baselines) on one fold.

``train_and_evaluate(config, workdir)`` runs one train/validation/test split
(fold ``config.data.fold`` of ``multimodal.cv_folds``) end to end;
``jaxsurv.cv`` runs all folds and the comparison tables with the same
``FusionTrainer``, compiled once per model and reused for every fold.

1. Data: ``multimodal.load_tcga_brca`` (real clinical/omics + OS, optional
   synthetic WSI bags), patient-level folds with a validation part carved
   from each fold's training part, and a ``FoldTransform`` (standardisation,
   4 time bins, HEALNet's inverse-frequency bin weights) fitted on the
   training part only.
2. Training: ``train_step(state, batch, rng, lr, bin_weights)`` is pure and
   jitted with the state donated; the batch is a fixed-size global batch
   (padded with masked rows) sharded over a ``("data",)`` mesh. The learning
   rate and the bin weights are array arguments, so neither the schedule nor
   a new fold recompiles the step. The loss is the discrete-time NLL over the
   time bins (per-patient mean over the real rows; Zadeh & Schmid 2020) or the
   Cox partial likelihood over the global batch, plus ``l1 * sum|params|``
   added once per optimiser step (HEALNet's peer code adds it to ``loss / 16``
   and so applies 16x the configured strength, PEERS.md §4.10). Optional
   training-time augmentations inside the step: random whole-modality dropout
   per patient (never all of a patient's modalities) and Gaussian input noise
   (CM-MMF §3.4).
3. Selection (``config.selection``): the data loss (no L1; HEALNet's
   criterion) or Harrell's C on the whole validation part after every epoch,
   or simply the last epoch (PORPOISE; the validation part is then only
   monitored); the best parameters are copied to the host (a deep copy,
   unlike the peer's ``state_dict().copy()``), early stopping after
   ``patience`` epochs without improvement. The test part is never looked at
   before the end.
4. Evaluation of the best parameters on the validation and test parts:
   Harrell's C of the risk score (``-sum_k S_k`` for the time-bin models,
   PEERS.md §3.4; the log-hazard for Cox), ``results.json``,
   ``predictions.csv``, ``history.csv`` and the attention reports of
   ``jaxsurv.attention`` (per-patient CSVs and PNG plots of HEALNet
   cross-attention averaged over layers, heads and latents, CM-MMF modality
   weights and attention-MIL tile weights).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsurv import attention, evaluate, metrics, survival
from jaxsurv.data import multimodal
from jaxsurv.data import splits as splits_lib
from jaxsurv.losses import cox_ph_loss, discrete_time_nll
from jaxsurv.models import fusion as fusion_lib
from jaxsurv.models import healnet as healnet_lib
from jaxsurv.train import TrainingError, TrainState

log = logging.getLogger("jaxsurv")

MODEL_NAMES = ("healnet", "cmmmf", "concat", "mean", "bilinear", "porpoise", "early_fusion",
               "unimodal")
WSI_KINDS = ("pam50", "noise")
LOSSES = ("nll", "cox")
SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("adam", "adamw")
# Model selection / early stopping on the validation part: the data loss
# (HEALNet) or Harrell's C, or the last epoch (PORPOISE; the validation part
# is then only monitored). None of them looks at the test part.
SELECTIONS = ("val_loss", "val_cindex", "last")

# How each model treats a missing modality (documented for the tables).
MISSING_BEHAVIOUR = {
    "healnet": "skips the modality's latent update for that patient",
    "early_fusion": "zeros in the concatenated vector + a presence indicator",
    "cmmmf": "drops the modality from the softmax over modalities",
    "concat": "zero embedding + a presence indicator",
    "mean": "mean over the present embeddings only",
    "bilinear": "zero gated vector (the constant 1 keeps the other factor)",
    "porpoise": "zero gated vector (the constant 1 keeps the other factor)",
    "unimodal": "head bias only (no information)",
}


# ----------------------------------------------------------------------------
# Cohort, model, optimiser.
# ----------------------------------------------------------------------------


def load_cohort(config: ml_collections.ConfigDict) -> multimodal.MultimodalCohort:
  """The configured cohort (``config.data``).

  ``config.data.cohort`` must be ``"tcga_brca"`` (the only multimodal cohort
  with survival, DATA.md §2(b)); ``modalities`` a subset of
  ``multimodal.TCGA_BRCA_MODALITIES``; ``wsi`` None, ``"pam50"`` or
  ``"noise"`` adds the synthetic bag modality ``"wsi"`` with
  ``config.data.wsi_kwargs`` (``wsi_dim``, ``wsi_tiles``, ``wsi_max_tiles``,
  ...) passed to ``load_tcga_brca``.

  Raises:
    ValueError: another cohort, an unknown modality or WSI kind.
  """
  d = config.data
  if d.cohort != "tcga_brca":
    raise ValueError(f"config.data.cohort must be 'tcga_brca' for the fusion trainer, got "
                     f"{d.cohort!r}")
  wsi = d.get("wsi")
  if wsi is not None and wsi not in WSI_KINDS:
    raise ValueError(f"config.data.wsi must be None or one of {WSI_KINDS}, got {wsi!r}")
  kwargs = dict(d.get("wsi_kwargs", {}) or {}) if wsi is not None else {}
  for k in ("wsi_tiles",):
    if k in kwargs:
      kwargs[k] = tuple(kwargs[k])
  return multimodal.load_tcga_brca(modalities=tuple(d.modalities), wsi=wsi,
                                   seed=d.get("wsi_seed", 0), **kwargs)


def model_modalities(cohort: multimodal.MultimodalCohort) -> tuple[tuple[str, str], ...]:
  """``(name, kind)`` pairs of a cohort: tabular modalities, then bags."""
  return (tuple((m, "tabular") for m in cohort.tabular)
          + tuple((m, "bag") for m in cohort.bags))


def _plain(value):
  """ConfigDict / lists -> plain dicts and tuples (hashable model fields)."""
  if isinstance(value, (ml_collections.ConfigDict, Mapping)):
    return {k: _plain(v) for k, v in dict(value).items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def n_outputs(config) -> int:
  """Model outputs: ``config.data.n_bins`` time-bin logits (NLL) or 1 (Cox)."""
  if config.loss.name not in LOSSES:
    raise ValueError(f"config.loss.name must be one of {LOSSES}, got {config.loss.name!r}")
  return int(config.data.n_bins) if config.loss.name == "nll" else 1


def build_model(config: ml_collections.ConfigDict, modalities) -> nn.Module:
  """The model ``config.model_name`` with kwargs ``config.model``.

  Args:
    config: the run config.
    modalities: ``(name, kind)`` pairs (``model_modalities(cohort)``).

  Returns:
    A Flax module with ``__call__(inputs, presence, *, train) -> (out
    [batch, n_out], aux)``; ``n_out`` from ``n_outputs(config)``.

  Raises:
    ValueError: unknown model name, ``config.model`` setting ``modalities`` or
      ``n_out`` (both derived from the data and the loss), unknown kwargs,
      ``unimodal`` with more than one modality.
  """
  name = config.model_name
  if name not in MODEL_NAMES:
    raise ValueError(f"config.model_name must be one of {MODEL_NAMES}, got {name!r}")
  kwargs = _plain(config.get("model", {}) or {})
  for reserved in ("modalities", "n_out", "early_fusion"):
    if reserved in kwargs:
      raise ValueError(f"config.model.{reserved} is derived (from config.data, config.loss and "
                       f"config.model_name); remove it")
  kwargs.update(modalities=tuple(modalities), n_out=n_outputs(config))
  cls = {"healnet": healnet_lib.HEALNet, "early_fusion": healnet_lib.HEALNet,
         "cmmmf": fusion_lib.CMMMF, "concat": fusion_lib.ConcatFusion,
         "mean": fusion_lib.MeanFusion, "bilinear": fusion_lib.BilinearFusion,
         "porpoise": fusion_lib.PorpoiseGatedLateFusion, "unimodal": fusion_lib.Unimodal}[name]
  if name == "early_fusion":
    kwargs["early_fusion"] = True
  if name == "unimodal" and len(modalities) != 1:
    raise ValueError(f"model_name 'unimodal' needs exactly one modality, got "
                     f"{[m for m, _ in modalities]}")
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has fields unknown to {cls.__name__}: {unknown}")
  return cls(**kwargs)


def _optimizer_spec(config) -> tuple:
  """The hashable settings ``make_optimizer`` depends on."""
  o = config.optimizer
  if o.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name must be one of {OPTIMIZERS}, got {o.name!r}")
  return (o.name, float(o.weight_decay or 0.0), float(o.get("b1", 0.9)),
          float(o.get("b2", 0.999)), float(o.get("clip_norm") or 0.0))


def _optimizer_from_spec(spec: tuple) -> optax.GradientTransformation:
  name, wd, b1, b2, clip = spec
  parts = [optax.clip_by_global_norm(clip)] if clip else []
  if name == "adam":
    parts += ([optax.add_decayed_weights(wd)] if wd else []) + [optax.scale_by_adam(b1=b1, b2=b2)]
  else:
    parts += [optax.scale_by_adam(b1=b1, b2=b2)] + ([optax.add_decayed_weights(wd)] if wd else [])
  return optax.chain(*parts)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Optax direction without the learning rate (the step multiplies by ``-lr``).

  * ``"adam"``: PyTorch ``Adam(weight_decay=wd)``, i.e. L2 added to the
    gradient before the moments (PORPOISE, HEALNet);
  * ``"adamw"``: decoupled weight decay (Loshchilov & Hutter), as
    ``optax.adamw``: the update is ``-lr * (adam + wd * param)``.
  Optional global-norm gradient clipping (``config.optimizer.clip_norm``).

  Raises:
    ValueError: unknown optimiser name.
  """
  return _optimizer_from_spec(_optimizer_spec(config))


def lr_schedule(config: ml_collections.ConfigDict, total_steps: int) -> Callable[[int], float]:
  """Learning rate per optimiser step over ``total_steps`` (all epochs).

  * ``"onecycle"``: ``optax.cosine_onecycle_schedule`` (PyTorch OneCycleLR,
    as HEALNet): peak ``lr`` after ``pct_start`` of the steps, starting at
    ``lr / div_factor`` and ending at ``lr / (div_factor * final_div_factor)``;
  * ``"cosine"``: linear warm-up over ``warmup_epochs`` then cosine decay to
    ``lr * final_lr_fraction``;
  * ``"constant"``: ``lr``.

  Raises:
    ValueError: unknown schedule.
  """
  o = config.optimizer
  total = max(int(total_steps), 1)
  if o.schedule == "onecycle":
    return optax.cosine_onecycle_schedule(
        transition_steps=total, peak_value=o.lr, pct_start=o.pct_start,
        div_factor=o.div_factor, final_div_factor=o.final_div_factor)
  if o.schedule == "cosine":
    per_epoch = total / max(int(config.num_epochs), 1)
    warm = int(round(o.get("warmup_epochs", 0) * per_epoch))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else o.lr, peak_value=o.lr, warmup_steps=warm,
        decay_steps=max(total, warm + 1), end_value=o.lr * o.get("final_lr_fraction", 0.0))
  if o.schedule == "constant":
    return optax.constant_schedule(o.lr)
  raise ValueError(f"config.optimizer.schedule must be one of {SCHEDULES}, got "
                   f"{o.schedule!r}")


# ----------------------------------------------------------------------------
# The pure train step and the eval forward pass.
# ----------------------------------------------------------------------------


def drop_presence(rng: jax.Array, presence: Mapping[str, jax.Array], rate: float) -> dict:
  """Random whole-modality dropout per patient, inside jit.

  Each present (patient, modality) is dropped with probability ``rate``; a
  patient who would lose all of its modalities keeps one, chosen uniformly
  among those it had (the same rule as ``multimodal.drop_modalities``).

  Args:
    rng: a PRNG key.
    presence: ``{name: bool [batch]}``.
    rate: drop probability in ``[0, 1]`` (a Python float).

  Returns:
    ``{name: bool [batch]}``, a subset of ``presence``.
  """
  names = list(presence)
  had = jnp.stack([presence[n].astype(bool) for n in names], axis=1)  # [batch, M]
  r_drop, r_keep = jax.random.split(rng)
  keep = had & (jax.random.uniform(r_drop, had.shape) >= rate)
  lost_all = jnp.any(had, axis=1) & ~jnp.any(keep, axis=1)
  scores = jnp.where(had, jax.random.uniform(r_keep, had.shape), -1.0)
  restore = jax.nn.one_hot(jnp.argmax(scores, axis=1), len(names), dtype=bool)
  keep = keep | (lost_all[:, None] & restore)
  return {n: keep[:, j] for j, n in enumerate(names)}


def data_loss(out: jax.Array, batch: Mapping[str, jax.Array], bin_weights: jax.Array | None,
              *, loss: str, alpha: float, ties: str) -> jax.Array:
  """Survival loss of a (padded) batch, a scalar.

  Args:
    out: ``[batch, n_bins]`` hazard logits (``loss="nll"``) or ``[batch, 1]``
      log-hazards (``loss="cox"``).
    batch: ``bin_index [batch]`` int, ``event [batch]`` 0/1, ``duration
      [batch]`` days, ``mask [batch]`` bool (False = padding).
    bin_weights: ``[n_bins]`` HEALNet inverse-frequency weights or None.
    loss: ``"nll"`` (``jaxsurv.losses.discrete_time_nll``: mean over the real
      rows, so it decomposes over patients) or ``"cox"``
      (``jaxsurv.losses.cox_ph_loss``: Breslow/Efron partial likelihood over
      the global batch, mean per event).
    alpha: weight of the uncensored term (NLL only).
    ties: Cox ties method.
  """
  if loss == "nll":
    return discrete_time_nll(out.astype(jnp.float32), batch["bin_index"], batch["event"],
                             alpha=alpha, bin_weights=bin_weights, mask=batch["mask"])
  return cox_ph_loss(out[:, 0].astype(jnp.float32), batch["duration"], batch["event"],
                     ties=ties, mask=batch["mask"])


def train_step(state: TrainState, batch: Mapping[str, Any], rng: jax.Array, lr: jax.Array,
               bin_weights: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation,
               loss: str, alpha: float, use_bin_weights: bool, ties: str, l1: float,
               l1_include: str, modality_dropout: float, input_noise: float):
  """One optimisation step on a global batch (pure; jit with ``donate_argnums=0``).

  Args:
    state: ``TrainState`` (``batch_stats`` unused, ``{}``).
    batch: ``inputs`` (``{m: [batch, features]}`` or ``[batch, n_tiles, dim]``
      plus ``"<m>_tile_mask" [batch, n_tiles]``), ``presence {m: bool
      [batch]}``, ``bin_index``, ``event``, ``duration`` (days), ``mask``
      (all ``[batch]``).
    rng: a key, folded with the step for dropout / modality dropout / noise.
    lr: scalar learning rate of this step (host schedule; no recompiles).
    bin_weights: ``[n_bins]`` per-bin weights of this fold (array argument,
      so a new fold does not recompile); ignored unless ``use_bin_weights``.
    model, tx, loss, alpha, ties: see ``build_model``, ``make_optimizer``,
      ``data_loss``.
    l1: coefficient of ``healnet.l1_penalty(params, l1_include)``, added to
      the loss once (0 disables it).
    modality_dropout: per-patient whole-modality dropout rate (0 disables).
    input_noise: SD of Gaussian noise added to the present tabular features
      and valid tile features (0 disables).

  Returns:
    ``(new_state, measurements)``: ``loss`` (total), ``data_loss``, ``l1``,
    ``grad_norm``.
  """
  rng = jax.random.fold_in(rng, state.step)
  r_drop, r_noise, r_dropout = jax.random.split(rng, 3)
  presence = batch["presence"]
  if modality_dropout > 0:
    presence = drop_presence(r_drop, presence, modality_dropout)
  inputs = dict(batch["inputs"])
  if input_noise > 0:
    keys = jax.random.split(r_noise, len(presence))
    for k, m in zip(keys, presence):
      inputs[m] = inputs[m] + input_noise * jax.random.normal(k, inputs[m].shape,
                                                               inputs[m].dtype)
  bw = bin_weights if use_bin_weights else None

  def loss_fn(params):
    out, _ = model.apply({"params": params}, inputs, presence, train=True,
                         rngs={"dropout": r_dropout})
    d = data_loss(out, batch, bw, loss=loss, alpha=alpha, ties=ties)
    reg = l1 * healnet_lib.l1_penalty(params, l1_include) if l1 else jnp.zeros((), jnp.float32)
    return d + reg, (d, reg)

  (total, (d, reg)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  direction, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p - lr * u, state.params, direction)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, {"loss": total, "data_loss": d, "l1": reg,
                     "grad_norm": optax.tree.norm(grads)}


def predict_fn(params, inputs, presence, *, model: nn.Module) -> dict:
  """Eval-mode outputs and the attention summaries of one batch.

  Returns:
    ``{"out": [batch, n_out] float32, "presence": {m: [batch]}`` (effective,
    e.g. a bag without tiles is absent), plus when the model provides them
    ``"healnet_attention": {m: [batch, n_tokens]}`` (HEALNet cross-attention
    averaged over layers, heads and latents), ``"modality_attention":
    [batch, M]`` (CM-MMF), ``"mil_attention": {m: [batch, n_tiles]}``.
  """
  out, aux = model.apply({"params": params}, inputs, presence, train=False)
  res = {"out": out.astype(jnp.float32), "presence": aux["presence"]}
  if aux.get("attention"):
    per = {}
    for key, a in aux["attention"].items():
      m = key.split("/", 1)[1]
      if a.ndim == 4:  # [batch, heads, latents, tokens]
        a = jnp.mean(a, axis=(1, 2))
      per.setdefault(m, []).append(a)
    res["healnet_attention"] = {m: jnp.mean(jnp.stack(v), axis=0) for m, v in per.items()}
  if "modality_attention" in aux:
    res["modality_attention"] = aux["modality_attention"]
  if aux.get("mil_attention"):
    res["mil_attention"] = aux["mil_attention"]
  return res


# ----------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------


def marginal_hazard_logits(bin_index: np.ndarray, event: np.ndarray, n_bins: int) -> np.ndarray:
  """Logits of the training part's pooled discrete-time hazards ``[n_bins]``.

  The maximum-likelihood hazard of bin k without covariates under the NLL's
  convention (a patient censored in bin y survives bins 0..y, an event in
  bin y fails there): ``h_k = d_k / n_k`` with ``d_k`` events in bin k and
  ``n_k`` patients with bin >= k; clipped to ``[1e-3, 1 - 1e-3]``. Used to
  start the output bias at the marginal hazards, so the first epochs fit
  discrimination instead of the base rate (with ~9% events the validation
  loss otherwise swings with the calibration of the bias alone).
  """
  y = np.asarray(bin_index, np.int64)
  e = np.asarray(event).astype(bool)
  d = np.bincount(y[e], minlength=n_bins).astype(np.float64)
  at_risk = np.cumsum(np.bincount(y, minlength=n_bins)[::-1])[::-1].astype(np.float64)
  h = np.clip(d / np.maximum(at_risk, 1.0), 1e-3, 1 - 1e-3)
  return np.log(h) - np.log1p(-h)


# Names of the output layer in the zoo (fusion models, HEALNet, PORPOISE).
_HEAD_NAMES = ("head", "classifier_mm")


def _set_output_bias(params, bias: np.ndarray):
  """Returns ``params`` with the output Dense's bias replaced by ``bias``.

  Raises:
    ValueError: no output layer named as in ``_HEAD_NAMES`` with a bias of
      the right shape.
  """
  for name in _HEAD_NAMES:
    layer = params.get(name)
    if layer is not None and "bias" in layer and layer["bias"].shape == bias.shape:
      return {**params, name: {**layer, "bias": jnp.asarray(bias, layer["bias"].dtype)}}
  raise ValueError(f"no output layer {_HEAD_NAMES} with a bias of shape {bias.shape} in the "
                   f"parameters (top-level keys {sorted(params)})")


@functools.lru_cache(maxsize=64)
def _compiled(model: nn.Module, opt_spec: tuple, step_spec: tuple):
  """``(tx, jitted train step, jitted predict, jitted init)`` per static setting.

  Cached on the (hashable) model and settings, so trainers with the same
  model, optimiser and loss options share one compilation (e.g. the entries
  of ``jaxsurv.cv`` that differ only in epochs or selection).
  """
  tx = _optimizer_from_spec(opt_spec)
  step = functools.partial(train_step, model=model, tx=tx, **dict(step_spec))
  return (tx, jax.jit(step, donate_argnums=(0,)),
          jax.jit(functools.partial(predict_fn, model=model)),
          jax.jit(functools.partial(model.init, train=False)))


def _take(tree, idx):
  return jax.tree.map(lambda a: a[idx], tree)


@dataclasses.dataclass
class FoldRun:
  """The outcome of one fold: best parameters (host copy) and their history.

  Attributes:
    params: best parameters (numpy, deep copy).
    transform: the ``FoldTransform`` fitted on the fold's training part.
    idx: ``{"train", "val", "test": int64 [m]}`` cohort rows.
    best_epoch: epoch of the best validation loss.
    history: per-epoch records (train loss, val loss, val C-index, lr).
    seconds: wall time of the training loop.
  """
  params: Any
  transform: multimodal.FoldTransform
  idx: dict
  best_epoch: int
  history: list
  seconds: float


class FusionTrainer:
  """Compiled step / forward of one model config, reusable across folds.

  The jitted functions depend only on the model, the optimiser, the loss
  options and the batch shapes, so ``jaxsurv.cv`` builds one trainer per
  (model, modality set) and calls :meth:`fit` for every fold without
  recompiling.

  Args:
    config: the run config.
    modalities: ``(name, kind)`` pairs (``model_modalities(cohort)``).

  Raises:
    ValueError: bad config values (model, optimiser, loss, batch sizes not
      divisible by the number of devices).
  """

  def __init__(self, config: ml_collections.ConfigDict, modalities):
    self.config = config
    self.modalities = tuple(modalities)
    self.model = build_model(config, self.modalities)
    devices = jax.devices()
    self.mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self.repl = NamedSharding(self.mesh, P())
    self.data_sh = NamedSharding(self.mesh, P("data"))
    for name in ("batch_size", "eval_batch_size"):
      if config[name] < 1 or config[name] % len(devices):
        raise ValueError(f"config.{name}={config[name]} must be a positive multiple of the "
                         f"{len(devices)} devices")
    lc = config.loss
    if lc.name == "cox" and lc.get("bin_weights", False):
      raise ValueError("config.loss.bin_weights applies to the NLL loss only")
    rate = float(config.train.get("modality_dropout", 0.0))
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"config.train.modality_dropout must be in [0, 1], got {rate}")
    step_spec = (("loss", lc.name), ("alpha", float(lc.alpha)),
                 ("use_bin_weights", bool(lc.bin_weights)), ("ties", lc.get("ties", "breslow")),
                 ("l1", float(lc.l1)), ("l1_include", lc.get("l1_include", "all")),
                 ("modality_dropout", rate),
                 ("input_noise", float(config.train.get("input_noise", 0.0))))
    self.tx, self.train_step, self.predict, self._init = _compiled(
        self.model, _optimizer_spec(config), step_spec)

  # -- data ------------------------------------------------------------------

  def _part(self, transform, cohort, idx, presence=None) -> dict:
    """Model-ready host arrays of rows ``idx`` (``FoldTransform.transform``)."""
    return transform.transform(cohort, idx, presence=presence)

  def batch(self, part: Mapping, sel: np.ndarray, size: int) -> dict:
    """A fixed-size global batch of rows ``sel`` of ``part``, padded with
    masked copies of the first row, sharded over the ``("data",)`` mesh."""
    n = len(sel)
    if n == 0 or n > size:
      raise ValueError(f"batch of {n} rows for size {size}")
    full = np.concatenate([sel, np.repeat(sel[:1], size - n)])
    b = {k: _take(part[k], full) for k in ("inputs", "presence", "bin_index", "event",
                                          "duration")}
    b["mask"] = np.arange(size) < n
    return jax.device_put(b, self.data_sh)

  def init_state(self, rng: jax.Array, part: Mapping) -> TrainState:
    """Fresh parameters (from one batch's shapes) and optimiser state, replicated.

    With ``config.train.init_output_bias`` (NLL only) the output bias starts
    at the training part's marginal hazard logits
    (``marginal_hazard_logits``).
    """
    b = self.batch(part, np.arange(min(self.config.batch_size, len(part["event"]))),
                   self.config.batch_size)
    variables = self._init(rng, b["inputs"], b["presence"])
    params = variables["params"]
    if self.config.train.get("init_output_bias", False) and self.config.loss.name == "nll":
      params = _set_output_bias(params, marginal_hazard_logits(
          part["bin_index"], part["event"], int(self.config.data.n_bins)))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                       opt_state=self.tx.init(params))
    return jax.device_put(state, self.repl)

  def predict_part(self, params, part: Mapping) -> dict:
    """Eval-mode outputs over a whole part (host numpy; see ``predict_fn``)."""
    bs = self.config.eval_batch_size
    n = len(part["event"])
    chunks = []
    for start in range(0, n, bs):
      sel = np.arange(start, min(start + bs, n))
      b = self.batch(part, sel, bs)
      out = self.predict(params, b["inputs"], b["presence"])
      chunks.append(jax.tree.map(lambda a: np.asarray(a)[:len(sel)], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)

  def part_loss(self, out: np.ndarray, part: Mapping, bin_weights) -> float:
    """The data loss (no L1) over a whole part, as in training."""
    lc = self.config.loss
    b = {"bin_index": part["bin_index"], "event": part["event"], "duration": part["duration"],
         "mask": np.ones(len(part["event"]), bool)}
    bw = np.asarray(bin_weights, np.float32) if (lc.name == "nll" and lc.bin_weights) else None
    return float(data_loss(jnp.asarray(out), b, bw, loss=lc.name, alpha=float(lc.alpha),
                           ties=lc.get("ties", "breslow")))

  def risk(self, out: np.ndarray) -> np.ndarray:
    """Risk score ``[n]`` (higher = earlier event) from outputs ``[n, n_out]``."""
    if self.config.loss.name == "nll":
      return survival.discrete_risk(out)
    return np.asarray(out[:, 0], np.float64)

  # -- training --------------------------------------------------------------

  def fit(self, cohort: multimodal.MultimodalCohort, split: splits_lib.Split, *,
          seed: int | None = None, progress: bool | None = None) -> FoldRun:
    """Trains on ``split.train``, selects on ``split.val``; never reads ``split.test``.

    Args:
      cohort: the full cohort (``FoldTransform`` is fitted on the training
        rows only).
      split: patient-level split with non-empty train and val parts.
      seed: RNG seed (default ``config.seed``).
      progress: show a tqdm bar (default ``config.progress_bar``).

    Returns:
      :class:`FoldRun`.

    Raises:
      ValueError: a modality with no present patient in the training part
        (from ``FoldTransform.fit``, naming the modality and fold), an empty
        validation part, a training part smaller than one batch.
      TrainingError: a non-finite training or validation loss.
    """
    from tqdm.auto import tqdm
    c = self.config
    seed = c.seed if seed is None else seed
    idx = cohort.indices(split)
    if len(idx["val"]) == 0:
      raise ValueError("the split has no validation part; model selection needs one "
                       "(the test part is never used for it)")
    fold = split.meta.get("fold")
    transform = multimodal.FoldTransform.fit(cohort, idx["train"], n_bins=c.data.n_bins,
                                             fold=fold)
    if self.config.model_name == "unimodal":
      # A patient without the model's only modality carries no information.
      (m, _), = self.modalities
      keep = cohort.presence[m][idx["train"]]
      idx = dict(idx, train=idx["train"][keep])
    train = self._part(transform, cohort, idx["train"])
    val = self._part(transform, cohort, idx["val"])
    n_train = len(idx["train"])
    if n_train < c.batch_size:
      raise ValueError(f"the training part of fold {fold!r} has {n_train} patients, fewer "
                       f"than config.batch_size={c.batch_size}")
    steps_per_epoch = math.ceil(n_train / c.batch_size)
    schedule = lr_schedule(c, steps_per_epoch * c.num_epochs)
    bin_weights = jnp.asarray(transform.bin_weights, jnp.float32)

    rng_init, rng_loop = jax.random.split(jax.random.key(seed))
    state = self.init_state(rng_init, train)
    selection = c.get("selection", "val_loss")
    if selection not in SELECTIONS:
      raise ValueError(f"config.selection must be one of {SELECTIONS}, got {selection!r}")
    patience = int(c.early_stopping.patience)
    min_epochs = int(c.early_stopping.get("min_epochs", 0))
    best = (math.inf, -1, None)
    history = []
    show = c.get("progress_bar", True) if progress is None else progress
    bar = tqdm(total=c.num_epochs, desc=f"{c.model_name} fold {fold}", unit="epoch",
               dynamic_ncols=True, disable=not show, leave=False)
    t0 = time.time()
    for epoch in range(c.num_epochs):
      order = np.random.default_rng([seed, epoch]).permutation(n_train)
      sums = {}
      for s in range(steps_per_epoch):
        sel = order[s * c.batch_size:(s + 1) * c.batch_size]
        lr = float(schedule(int(state.step)))
        state, meas = self.train_step(state, self.batch(train, sel, c.batch_size), rng_loop,
                                      jnp.asarray(lr, jnp.float32), bin_weights)
        for k, v in meas.items():
          sums[k] = sums.get(k, 0.0) + v
      means = {k: float(v) / steps_per_epoch for k, v in sums.items()}
      if not all(math.isfinite(v) for v in means.values()):
        raise TrainingError(f"non-finite training loss in epoch {epoch} of fold {fold!r} "
                            f"({c.model_name}): {means}")
      out = self.predict_part(state.params, val)["out"]
      val_loss = self.part_loss(out, val, transform.bin_weights)
      if not math.isfinite(val_loss):
        raise TrainingError(f"non-finite validation loss after epoch {epoch} of fold {fold!r}")
      try:
        val_c = metrics.concordance_index(val["duration"], val["event"], self.risk(out))
      except ValueError:
        val_c = float("nan")
      rec = {"epoch": epoch, "train_loss": means["loss"], "train_data_loss": means["data_loss"],
             "train_l1": means["l1"], "grad_norm": means["grad_norm"], "val_loss": val_loss,
             "val_cindex": val_c, "lr": lr, "seconds": time.time() - t0}
      history.append(rec)
      if selection == "val_loss":
        score = val_loss
      elif selection == "val_cindex":
        score = -val_c if math.isfinite(val_c) else math.inf
      else:  # "last": every epoch replaces the previous one.
        score = -float(epoch)
      rec["selection_score"] = score
      if best[2] is None or score < best[0] - float(c.early_stopping.get("min_delta", 0.0)):
        # Deep host copy: the device buffers are donated to the next step.
        best = (score, epoch, jax.tree.map(lambda a: np.array(a, copy=True), state.params))
      bar.set_postfix(loss=f"{means['loss']:.3f}", val=f"{val_loss:.3f}", c=f"{val_c:.3f}")
      bar.update(1)
      if patience > 0 and epoch >= min_epochs and epoch - best[1] >= patience:
        break
    bar.close()
    return FoldRun(params=best[2], transform=transform, idx=idx, best_epoch=best[1],
                   history=history, seconds=time.time() - t0)

  # -- evaluation ------------------------------------------------------------

  def evaluate(self, run: FoldRun, cohort: multimodal.MultimodalCohort, part: str,
               presence: Mapping[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Outputs and metrics of the best parameters on ``part`` ("val"/"test").

    Args:
      presence: optional presence override ``{m: bool [n_part]}`` (e.g. from
        ``multimodal.drop_modalities``) for the missing-modality experiment.

    Returns:
      ``(metrics, arrays)``: ``{"n", "events", "cindex", "loss"}`` (a C-index
      that is undefined, e.g. no comparable pair, is None) and the transformed
      part plus ``"pred"`` (``predict_part``) and ``"risk"`` ``[n]``.
    """
    data = self._part(run.transform, cohort, run.idx[part], presence)
    pred = self.predict_part(jax.device_put(run.params, self.repl), data)
    risk = self.risk(pred["out"])
    try:
      c = metrics.concordance_index(data["duration"], data["event"], risk)
    except ValueError:
      c = None
    res = {"n": int(len(risk)), "events": int(data["event"].sum()), "cindex": c,
           "loss": self.part_loss(pred["out"], data, run.transform.bin_weights)}
    return res, dict(data, pred=pred, risk=risk)


# ----------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------


def prediction_table(parts: Mapping[str, dict], loss: str) -> pd.DataFrame:
  """``predictions.csv``: one row per patient of each evaluated part.

  Columns: ``patient_id, split, duration`` (days), ``event, bin_index, risk``
  (higher = earlier event), ``present_<m>`` (effective presence), then
  ``logit_k`` and ``surv_k`` (S at the end of bin k) for NLL models or
  ``log_hazard`` for Cox.
  """
  frames = []
  for part, d in parts.items():
    out = d["pred"]["out"]
    cols = {"patient_id": d["patient_id"], "split": part, "duration": d["duration"],
            "event": d["event"], "bin_index": d["bin_index"], "risk": d["risk"]}
    for m, p in d["pred"]["presence"].items():
      cols[f"present_{m}"] = np.asarray(p).astype(int)
    if loss == "nll":
      s = survival.discrete_survival(out)
      for k in range(out.shape[1]):
        cols[f"logit_{k}"] = out[:, k]
      for k in range(out.shape[1]):
        cols[f"surv_{k}"] = s[:, k]
    else:
      cols["log_hazard"] = out[:, 0]
    frames.append(pd.DataFrame(cols))
  return pd.concat(frames, ignore_index=True)


def fold_split(cohort: multimodal.MultimodalCohort, config) -> splits_lib.Split:
  """Fold ``config.data.fold`` of ``multimodal.cv_folds`` (seeded by ``fold_seed``)."""
  d = config.data
  folds = multimodal.cv_folds(cohort, d.n_folds, seed=d.fold_seed,
                              val_fraction=d.val_fraction, stratify=tuple(d.stratify))
  if not 0 <= d.fold < len(folds):
    raise ValueError(f"config.data.fold must be in [0, {len(folds)}), got {d.fold}")
  return folds[d.fold]


def run_fold(trainer: FusionTrainer, cohort: multimodal.MultimodalCohort,
             split: splits_lib.Split, workdir: str | pathlib.Path | None = None, *,
             progress: bool | None = None) -> tuple[dict, FoldRun]:
  """Fits one fold, evaluates val and test, writes the reports to ``workdir``.

  Returns:
    ``(results, run)``; ``results`` as written to ``results.json``.
  """
  run = trainer.fit(cohort, split, progress=progress)
  c = trainer.config
  results = {"model_name": c.model_name, "modalities": [m for m, _ in trainer.modalities],
             "loss": c.loss.name, "fold": split.meta.get("fold"),
             "best_epoch": run.best_epoch, "epochs_run": len(run.history),
             "n_params": fusion_lib.count_params(run.params), "seconds": run.seconds,
             "n_train": int(len(run.idx["train"])),
             "missing_modality_behaviour": MISSING_BEHAVIOUR[c.model_name]}
  parts = {}
  for part in ("val", "test"):
    res, data = trainer.evaluate(run, cohort, part)
    results[part] = res
    parts[part] = dict(data, patient_id=cohort.patient_ids[run.idx[part]])
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    splits_lib.save_splits(split, workdir / "splits.json")
    evaluate.write_json_atomic(run.transform.to_dict(), workdir / "transform.json")
    evaluate.write_csv_atomic(pd.DataFrame(run.history), workdir / "history.csv")
    evaluate.write_csv_atomic(prediction_table(parts, c.loss.name), workdir / "predictions.csv")
    attention.write_attention_reports(workdir, parts, trainer.modalities, cohort.feature_names)
    evaluate.write_json_atomic(results, workdir / "results.json")
  return results, run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs one fold of the configured fusion model end to end (see module doc).

  Writes to ``workdir``: ``config.json``, ``splits.json``, ``transform.json``
  (the training-part fit), ``history.csv``, ``predictions.csv``, attention
  CSVs and ``results.json``.

  Returns:
    The results dict: model, modalities, best epoch, parameter count, and
    ``{"val", "test": {"n", "events", "cindex", "loss"}}``.

  Raises:
    ValueError: bad config or data (see ``FusionTrainer``, ``load_cohort``).
    TrainingError: non-finite loss.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  evaluate.write_json_atomic(json.loads(config.to_json_best_effort()), workdir / "config.json")
  cohort = load_cohort(config)
  split = fold_split(cohort, config)
  trainer = FusionTrainer(config, model_modalities(cohort))
  log.info("%s on %s, fold %d: train %d, val %d, test %d", config.model_name,
           "+".join(cohort.modalities), config.data.fold, len(split.train), len(split.val),
           len(split.test))
  results, _ = run_fold(trainer, cohort, split, workdir)
  log.info("best epoch %d; val C %s, test C %s", results["best_epoch"],
           results["val"]["cindex"], results["test"]["cindex"])
  return results
