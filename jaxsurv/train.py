"""MMNN runs on the shared trainer: data, gradient blending, reports.

``train_and_evaluate(config, workdir)`` runs the whole MMNN job; the loop,
the jitted data-parallel step, selection, checkpoints and resume are
``jaxsurv.trainer``'s, the same for every model family:

1. Data: the cohort is prepared once (``jaxsurv.data.prepare``), split per
   patient (saved to ``WORKDIR/splits.json``), the clinical preprocessing is
   fitted on the training split only (``WORKDIR/preprocess.json``).
2. Training: the model is ``config.model.name == "mmnn"`` (3D DenseNet +
   clinical MLP), the task ``jaxsurv.tasks.CoxHeads``: the Cox partial
   likelihood of every head over the **global** batch (the mesh only shards
   the computation, the risk set is never one device's slice), weighted by
   the blend weights, an array argument (updating them never recompiles).
   Augmentation (flips, rotations, zoom; ``jaxsurv.augment``) runs inside the
   step.
3. Gradient blending (Wang, Tran & Feiszli, CVPR 2020) every
   ``blend.every_epochs`` epochs, from eval-mode losses on the training part
   and on a held-out part carved from the training split (``BlendController``).
4. Selection: the unweighted multimodal-head Cox loss on the **whole**
   validation split, every epoch. Orbax keeps the latest checkpoint (resume)
   and the selected one.
5. Evaluation of the selected checkpoint on the validation and test splits
   (``evaluate.report_outcomes``): ``WORKDIR/results.json``,
   ``predictions.csv`` and PNG plots.

A run killed and restarted with the same command continues from the last
completed epoch and ends with the same metrics as an uninterrupted run (the
data order and RNG of every epoch derive from the seed and the epoch number).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd

from jaxsurv import io as io_lib
from jaxsurv import augment as augment_lib
from jaxsurv import blending, distributed, evaluate, tasks
from jaxsurv.data import clinical as clinical_lib
from jaxsurv.data import splits as splits_lib
from jaxsurv.errors import TrainingError, UserError  # pylint: disable=unused-import
from jaxsurv.models import MMNN, pretrained, registry
from jaxsurv.trainer import loop
from jaxsurv.trainer.step import variables

log = logging.getLogger("jaxsurv")


# ----------------------------------------------------------------------------
# Model, task, augmentation.
# ----------------------------------------------------------------------------


def build_model(config: ml_collections.ConfigDict) -> MMNN:
  """MMNN from ``config.model`` (bf16 compute if ``config.dtype == 'bfloat16'``)."""
  dtype = {"float32": None, "bfloat16": jnp.bfloat16}[config.dtype]
  image = pretrained.densenet_kwargs(config.model.image)  # Less init_from & co.
  clinical = dict(config.model.clinical)
  if dtype is not None:
    image["dtype"] = dtype
    clinical["dtype"] = dtype
  return MMNN(n_outcomes=len(config.data.outcomes), modalities=tuple(config.data.modalities),
              image_kwargs=image, clinical_kwargs=clinical)


def head_names(config) -> tuple[str, ...]:
  """``("mm", "image", "clinical")`` for the multimodal model, else ``("mm",)``."""
  mods = tuple(config.data.modalities)
  return ("mm",) + mods if len(mods) > 1 else ("mm",)


def make_task(config) -> tasks.CoxHeads:
  return tasks.CoxHeads(heads=head_names(config), outcomes=tuple(config.data.outcomes),
                        ties=config.loss.ties)


@dataclasses.dataclass(frozen=True)
class ImageAugment:
  """Random 3D flips, rotations and zoom of ``inputs["image"]`` inside the step
  (``jaxsurv.augment.augment_batch``; MMNN paper, Methods)."""
  flip_prob: float
  max_rotation_deg: float
  zoom_range: tuple

  def __call__(self, keys, inputs, presence):
    if inputs.get("image") is None:
      return inputs, presence
    image = augment_lib.augment_batch(keys[0], inputs["image"], flip_prob=self.flip_prob,
                                      max_rotation_deg=self.max_rotation_deg,
                                      zoom_range=self.zoom_range)
    return dict(inputs, image=image), presence


def make_augment(config) -> ImageAugment | None:
  aug = config.augment
  if not aug.enabled or "image" not in config.data.modalities:
    return None
  return ImageAugment(float(aug.flip_prob), float(aug.max_rotation_deg),
                      tuple(float(z) for z in aug.zoom_range))


def make_trainer(config) -> loop.Trainer:
  """The shared trainer for an MMNN config."""
  return loop.Trainer(config, build_model(config), registry.get("mmnn").adapter,
                      make_task(config), augment=make_augment(config))


def predict_fn(params, batch_stats, image, clinical, *, model):
  """Eval-mode log-hazards per head, each ``[batch, outcomes]`` float32."""
  outputs, _ = model.apply(variables(params, batch_stats), image, clinical, train=False)
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
  if ("clinical" in config.data.modalities
      and not (config.data.numeric or config.data.categorical)):
    raise ValueError("data.modalities includes 'clinical' but config.data.numeric and "
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
  # Multi-process: process 0 prepares (and caches), the others then load.
  prepared = distributed.primary_first(lambda: prepare.prepare_cohort(
      cohort, spec=spec if is_manifest else None, preprocess=pre,
      n_patients=config.data.get("n_patients"), seed=config.data.cohort_seed,
      workers=config.data.get("prepare_workers", 1)), "jaxsurv.train.load_cohort")
  if "image" in config.data.modalities and prepared.images is None:
    raise ValueError(f"data.modalities includes 'image' but cohort {cohort!r} has no images")
  return prepared


def make_splits(table: pd.DataFrame, config, workdir: pathlib.Path | None, *,
                save: bool = True) -> splits_lib.Split:
  """Patient-level split; reused from ``WORKDIR/splits.json`` on resume.

  With ``workdir`` None the split is computed from the cohort and config
  only, and nothing is read or written; with ``save=False`` an existing
  ``splits.json`` is read (and checked) but a new split is not written.

  Raises:
    UserError: ``WORKDIR/splits.json`` names patients absent from the cohort
      (a run continued on another cohort).
    ValueError: from ``splits_lib`` (a bad split column or stratification).
  """
  path = None if workdir is None else workdir / "splits.json"
  if path is not None and path.exists():
    split = splits_lib.load_splits(path)
    known = set(table["patient_id"].astype(str))
    absent = sorted({p for part in splits_lib.PARTS for p in getattr(split, part)} - known)
    if absent:
      raise UserError(f"{path} names {len(absent)} patients absent from cohort "
                      f"{config.data.cohort!r} (e.g. {absent[:5]}): the run was started on "
                      "another cohort, and its split cannot be reused; use a new --workdir")
    return split
  if "split" in table.columns and table["split"].notna().all():
    split = splits_lib.splits_from_column(table)
  else:
    split = splits_lib.train_val_test_split(table, fractions=tuple(config.data.fractions),
                                            stratify=tuple(config.data.stratify),
                                            seed=config.data.split_seed)
  if path is not None and save:
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
  duration, event, omask = outcome_arrays(table, config.data.outcomes)
  arrays = CohortArrays(
      patient_ids=table["patient_id"].astype(str).to_numpy(),
      image=None if prepared.images is None else prepared.images.astype(np.float32),
      clinical=clin, duration=duration.astype(np.float32), event=event.astype(np.int32),
      outcome_mask=omask, table=table)
  return arrays, pre


def outcome_arrays(table: pd.DataFrame, outcomes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(duration [n, k] days, event [n, k] 0/1, outcome_mask [n, k])`` from the
  ``<outcome>_time`` / ``<outcome>_event`` columns; a missing value masks the
  outcome (its duration and event are 0)."""
  duration = np.stack([table[f"{o}_time"].to_numpy(float) for o in outcomes], 1)
  event = np.stack([table[f"{o}_event"].to_numpy(float) for o in outcomes], 1)
  mask = np.isfinite(duration) & np.isfinite(event)
  return np.where(mask, duration, 0.0), np.where(mask, event, 0).astype(int), mask


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


def check_holdout(fit_ids: np.ndarray, held_ids: np.ndarray, table: pd.DataFrame, config) -> None:
  """Fails before training if the blending hold-out cannot estimate the losses.

  The held-out part needs patients and at least one event: a part without
  events has a Cox loss of 0 for every head, and so no estimate of the
  generalisation gap. An outcome without a held-out event only adds 0 to
  every head's held-out loss (a warning says so).

  Raises:
    UserError: naming the (event pattern) strata and their training counts.
  """
  sub = table.set_index("patient_id").loc[np.concatenate([fit_ids, held_ids])]
  held = sub.index.isin(set(held_ids))
  outs = list(config.data.outcomes)
  missing = [o for o in outs if not np.nansum(sub.loc[held, f"{o}_event"].to_numpy(float)) > 0]
  if len(held_ids) and len(missing) < len(outs):
    if missing:
      log.warning("the gradient-blending hold-out (%d patients) has no events for %s; their "
                  "held-out losses are 0", len(held_ids), missing)
    return
  ev = sub[[f"{o}_event" for o in outs]].fillna(0).astype(int).astype(str).agg("".join, axis=1)
  counts = ", ".join(f"{'/'.join(outs)}={k}: {v}" for k, v in sorted(ev.value_counts().items()))
  what = "no patients" if not len(held_ids) else f"no events for {missing}"
  raise UserError(
      f"the gradient-blending hold-out ({config.blend.holdout_fraction:.0%} of each event "
      f"stratum of the {len(sub)} training patients) has {what}; training patients per "
      f"stratum: {counts}. Use a larger cohort, raise --config.blend.holdout_fraction, or turn "
      "blending off with --config.blend.enabled=False")


class BlendController:
  """Gradient-blending weights between epochs (the ``CoxHeads`` task argument).

  Every ``every_epochs`` epochs the per-head losses on the training part and
  on the held-out part give new weights (``blending.GradientBlender``);
  otherwise the weights stay. With blending off the weights stay uniform.
  """

  def __init__(self, task: tasks.CoxHeads, config, fit: loop.Part, heldout: loop.Part):
    self.task, self.fit, self.heldout = task, fit, heldout
    self.enabled = bool(config.blend.enabled)
    self.every = int(config.blend.every_epochs)
    self.blender = blending.GradientBlender(task.heads, mode=config.blend.mode)
    self.weights = np.full(len(task.heads), 1.0 / len(task.heads), np.float32)

  def args(self) -> np.ndarray:
    return self.weights

  def end_epoch(self, epoch: int, predict) -> dict:
    rec = {"blend_weights": self.weights.tolist()}
    if self.enabled and (epoch + 1) % self.every == 0:
      self.weights = np.asarray(self.blender.update(
          epoch, self.task.part_losses(predict(self.fit), self.fit),
          self.task.part_losses(predict(self.heldout), self.heldout)), np.float32)
      rec["blend_update"] = self.weights.tolist()
    return rec

  def state_dict(self) -> dict:
    return {"blend_weights": self.weights.tolist(), "blender": self.blender.to_dict()}

  def load_state_dict(self, d: Mapping) -> None:
    self.weights = np.asarray(d["blend_weights"], np.float32)
    self.blender = blending.GradientBlender.from_dict(d["blender"])


def _parts(arrays: CohortArrays, split: splits_lib.Split, config) -> dict[str, loop.Part]:
  """``train``, ``val``, ``test``, ``fit`` and ``heldout`` views of the cohort."""
  full = {"inputs": {"clinical": arrays.clinical}, "presence": {},
          "duration": arrays.duration, "event": arrays.event, "outcome_mask": arrays.outcome_mask}
  if arrays.image is not None and "image" in config.data.modalities:
    full["inputs"]["image"] = arrays.image
  index = {pid: i for i, pid in enumerate(arrays.patient_ids)}
  rows = lambda ids: np.array([index[p] for p in ids], np.int64)
  fit_ids, held_ids = np.asarray(split.train), np.asarray(split.train[:0])
  if config.blend.enabled:
    fit_ids, held_ids = _holdout(np.asarray(split.train), arrays.table,
                                 config.blend.holdout_fraction, config.seed)
    check_holdout(fit_ids, held_ids, arrays.table, config)
  ids = {"train": split.train, "val": split.val, "test": split.test, "fit": fit_ids,
         "heldout": held_ids}
  return {k: loop.Part(full, rows(v)) for k, v in ids.items()}


# ----------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_changed_config: bool = False) -> dict:
  """Runs the MMNN job end to end; returns the results dict (also in results.json).

  The cohort is loaded, split and checked before ``workdir`` is touched; then
  ``runs.open_run`` creates the run (``run.json``, ``config.json``) or
  accepts it again, and training resumes from its checkpoint.

  Raises:
    UserError: a bad ``model.image.init_from`` (``pretrained.check_config``); from ``runs.open_run`` (a workdir holding another run, config
      or cohort, unless ``allow_changed_config``; foreign files; not
      writable) or ``make_splits`` (a continued run's ``splits.json`` names
      patients the cohort lacks).
    ValueError, FileNotFoundError: bad config or cohort (``load_cohort``,
      ``build_arrays``, ``_parts``).
    TrainingError: a non-finite loss.
  """
  from jaxsurv import runs  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  pretrained.check_config(config)  # A bad init_from fails before any work.
  loop.compiler_options(config)  # So does a bad xla_cpu_convolutions.
  prepared = load_cohort(config)
  split = make_splits(prepared.table, config, None)  # Checks; reads and writes nothing.
  arrays, clin_pre = build_arrays(prepared, config, split.train)
  parts = _parts(arrays, split, config)
  if allow_changed_config:  # A continued run keeps its splits.json: check it before open_run.
    make_splits(prepared.table, config, workdir, save=False)
  runs.open_run(workdir, runs.config_to_dict(config),
                runs.prepared_cohort_fingerprint(prepared, config.data.cohort),
                allow_changed=allow_changed_config)
  saved = make_splits(prepared.table, config, workdir)  # WORKDIR/splits.json on resume.
  if (saved.train, saved.val, saved.test) != (split.train, split.val, split.test):
    # A run continued with another config keeps the split it was trained on
    # (a new split would move training patients into val/test).
    log.warning("keeping the split of %s (the current config splits differently)",
                workdir / "splits.json")
    split = saved
    arrays, clin_pre = build_arrays(prepared, config, split.train)
    parts = _parts(arrays, split, config)
  io_lib.write_json_atomic({"clinical": clin_pre.to_dict() if clin_pre.fitted else None,
                              "preprocess": dataclasses.asdict(prepared.preprocess)
                              if prepared.preprocess is not None else None,
                              "fingerprint": prepared.fingerprint,
                              "cohort": str(config.data.cohort),
                              "outcomes": list(config.data.outcomes)},
                             workdir / "preprocess.json")
  trainer = make_trainer(config)
  log.info("patients: train %d (fit %d, blend hold-out %d), val %d, test %d; %d steps/epoch",
           len(split.train), len(parts["fit"]), len(parts["heldout"]), len(split.val),
           len(split.test), trainer.steps_per_epoch(len(parts["fit"])))
  controller = BlendController(trainer.task, config, parts["fit"], parts["heldout"])
  res = trainer.fit(parts["fit"], parts["val"], controller=controller,
                    checkpoint_dir=workdir / "checkpoints")
  return report(trainer, res, parts, arrays, config, workdir, controller.blender)


def report(trainer: loop.Trainer, res: loop.FitResult, parts: Mapping[str, loop.Part],
           arrays: CohortArrays, config, workdir: pathlib.Path, blender) -> dict:
  """Evaluates the selected epoch on val and test; writes results, predictions, plots."""
  from jaxsurv import metrics  # pylint: disable=import-outside-toplevel
  task = trainer.task
  horizons = tuple(config.eval.horizons_years)
  params = jax.device_put(res.params, trainer.repl)
  batch_stats = jax.device_put(res.batch_stats, trainer.repl)
  names = ("train", "val", "test")
  preds = {n: trainer.predict_part(params, batch_stats, parts[n]) for n in names}
  risk = {n: task.risk(preds[n]) for n in names}
  targets = {n: task.targets(parts[n]) for n in names}
  rep, baselines = evaluate.report_outcomes(
      task.outcomes, risk, targets, horizons_years=horizons,
      bootstrap_resamples=config.eval.bootstrap_resamples, seed=config.seed)
  results: dict = {"best_epoch": int(res.best_epoch), "heads": list(task.heads), **rep}
  for name in ("val", "test"):
    d, e, m = targets[name]
    for j, o in enumerate(task.outcomes):
      oracle = f"eta_{o}"
      if o in results[name] and oracle in arrays.table.columns:
        eta = arrays.table[oracle].to_numpy(float)[parts[name].rows[m[:, j]]]
        results[name][o]["oracle_cindex"] = metrics.concordance_index(d[m[:, j], j],
                                                                      e[m[:, j], j], eta)
  rows = []
  for name in names:
    cols = {"patient_id": arrays.patient_ids[parts[name].rows], "split": name}
    for j, o in enumerate(task.outcomes):
      cols[f"risk_{o}"] = risk[name][:, j]
      if o in baselines:
        cols.update(evaluate.survival_columns(o, baselines[o], risk[name][:, j], horizons))
    rows.append(pd.DataFrame(cols))
  io_lib.write_csv_atomic(pd.concat(rows, ignore_index=True), workdir / "predictions.csv")
  io_lib.write_json_atomic(results, workdir / "results.json")
  io_lib.write_json_atomic(
      {o: b.to_dict() for o, b in baselines.items()}, workdir / "baseline_hazard.json")
  if len(task.heads) > 1:
    # Each unimodal head's own Breslow baseline (training split), so predict
    # can score a patient without MRI with the clinical head.
    from jaxsurv import survival  # pylint: disable=import-outside-toplevel
    d, e, m = targets["train"]
    heads = {h: {o: survival.BreslowBaseline.fit(np.asarray(preds["train"][h][m[:, j], j],
                                                            np.float64),
                                                 d[m[:, j], j], e[m[:, j], j]).to_dict()
                 for j, o in enumerate(task.outcomes) if o in baselines}
             for h in task.heads[1:]}
    io_lib.write_json_atomic(heads, workdir / "baseline_hazard_heads.json")
  evaluate.plot_training_curves(workdir / "training_curves.png", res.history)
  if len(task.heads) > 1 and blender.history:
    blender.to_csv(workdir / "blend_weights.csv")
    blending.plot_history(blender.history, workdir / "blend_weights.png")
  for j, o in enumerate(task.outcomes):
    if o not in baselines:
      continue
    _, _, m_tr = targets["train"]
    threshold = float(np.median(risk["train"][m_tr[:, j], j]))
    d, e, m = targets["test"]
    evaluate.plot_km_by_risk_group(workdir / f"km_test_{o}.png", risk=risk["test"][m[:, j], j],
                                   duration=d[m[:, j], j], event=e[m[:, j], j],
                                   threshold=threshold,
                                   title=f"{o.upper()}: test split by training-median risk")
  return results
