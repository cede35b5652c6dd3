r"""Predict and explain for new patients with a finished MMNN run.

  python -m jaxsurv.predict --workdir=runs/mmnn --manifest=new_patients.csv \
      --out=runs/mmnn_predict_new [--heatmaps] [--layer=last_dense_block] [--head=mm]
      [--sign=increasing|decreasing]

``--out`` must lie outside every run folder and hold none
(``jaxsurv.runs.refuse_output_near_runs``): the run's own folder, a folder
inside it, or its parent (which ``--overwrite`` would replace) is refused
before anything is read or written. Errors end as ``jaxsurv.cli`` describes:
one message and exit status 2 for bad input (``--debug``: the traceback).

What it does, in order (nothing is written until every step has succeeded):

1. Loads the run (``load_run``): ``config.json``, the fitted preprocessing of
   ``preprocess.json`` (MRI ``PreprocessConfig`` and ``ClinicalPreprocessor``),
   the Breslow baselines of ``baseline_hazard.json`` and the **best**
   checkpoint (the one ``jaxsurv.train`` selected on the validation loss).
   The checkpoint's parameter tree must match the model that ``config.json``
   builds (names and shapes), and the preprocessing fingerprint must match the
   current pipeline, else a ``RunLoadError`` names the file and the
   differences.
2. Validates the new patients' manifest (``check_manifest``): the run's
   channels, mask and clinical columns (outcome columns are not needed),
   readable files on matching grids, and the run's known categorical levels.
   Every problem of the cohort is reported at once, naming the patient, the
   column and the file (``InputError``). The MMNN image branch has no
   missing-image path, so a patient without an image is an error; a missing
   categorical value is an error unless training had missing values in that
   column; a missing numeric value is imputed with the training mean, as the
   fitted transform does (listed under ``warnings`` in ``summary.json``).
3. Preprocesses each patient exactly as in training
   (``jaxsurv.data.mri.preprocess_case`` with the run's ``PreprocessConfig``;
   the run's ``ClinicalPreprocessor``), predicts in eval mode with the same
   function as training (``jaxsurv.train.predict_fn``), and optionally
   computes Grad-CAM heat maps (``jaxsurv.gradcam.mmnn_grad_cam``).
4. Writes into a temporary folder next to ``--out`` and renames it to
   ``--out`` at the end (atomic on one file system); on any error the
   temporary folder is removed and ``--out`` is untouched.

Outputs (``OUT/``):

* ``predictions.csv``: one row per patient (manifest order): ``patient_id``;
  ``risk_<o>``: the log-hazard of outcome ``o`` from the multimodal head
  (higher = earlier event; the same column as the run's own
  ``predictions.csv``); ``surv_<o>_<h>y`` = S(h | x) and ``p_<o>_<h>y`` =
  P(T <= h | x) = 1 - S(h | x) at each horizon of ``config.eval.horizons_years``
  (365.25 days per year), from the run's Breslow baseline.
* ``survival_curves.csv``: long format ``patient_id, outcome, time_days,
  survival``: S(t | x) = exp(-H0(t) exp(risk)) every ``--step_days`` days
  from 0 to the last event time of the training split. The Breslow H0 is flat
  after that time, so later values would only repeat the last one.
* ``summary.json``: the run, checkpoint step, preprocessing fingerprint,
  outcomes, horizons, Grad-CAM settings, notes (e.g. a horizon beyond the
  last training event time: its probability is the flat Breslow
  extrapolation) and warnings.
* with ``--heatmaps``: ``heatmaps/<patient>/gradcam_<o>.nii.gz`` (the
  normalised Grad-CAM map of outcome ``o`` resampled onto the patient's
  original first-channel scan, same size, origin, spacing and direction: it
  overlays the scan in 3D Slicer or ITK-SNAP), ``gradcam_<o>.png`` (the three
  orthogonal slices through the tumour centre) and ``heatmaps/heatmaps.csv``
  (per patient and outcome: ``risk``, the explained head's log-hazard;
  ``peak``, the map's un-normalised maximum, 0 for an all-zero map; and
  ``heat_in_tumour``, the fraction of the map's mass inside the tumour mask
  on the model grid).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import uuid
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pandas as pd
from absl import app, flags

from jaxsurv import io as io_lib
from jaxsurv import cli, evaluate, gradcam, runs, survival
from jaxsurv.data import clinical as clinical_lib
from jaxsurv.data import manifest as mf
from jaxsurv.data import mri
from jaxsurv.errors import UserError

log = logging.getLogger("jaxsurv")

PathLike = str | os.PathLike


class RunLoadError(UserError):
  """A run's files are missing, unreadable or inconsistent (the message names the file)."""


class CheckpointMismatchError(RunLoadError):
  """The checkpoint does not hold the model that the run's config builds."""


class InputError(mf.CohortValidationError, UserError):
  """The new patients cannot be predicted; ``.problems`` names every patient, column and file."""


class OutputExistsError(UserError, FileExistsError):
  """``--out`` exists and is not an empty folder (and ``--overwrite`` was not given)."""


# ----------------------------------------------------------------------------
# Loading a finished run.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """Everything needed to predict with a finished ``jaxsurv.train`` run.

  Attributes:
    workdir: the run folder.
    config: the resolved training config (``config.json``).
    model: the ``MMNN`` built from it (``jaxsurv.train.build_model``).
    variables: ``{"params", "batch_stats"}`` of the best checkpoint (on the
      default device).
    clinical: the fitted ``ClinicalPreprocessor`` (unknown levels raise), or
      None when the run used no clinical columns.
    preprocess: the MRI ``PreprocessConfig`` of training, or None (no images).
    baselines: ``{outcome: BreslowBaseline}``; outcomes without events in the
      training split have none (risk only).
    head_baselines: ``{unimodal head: {outcome: BreslowBaseline}}`` of a
      multimodal run (``baseline_hazard_heads.json``), empty for runs made
      before it was written; with a ``"clinical"`` entry, a patient without
      MRI is scored by the clinical head.
    outcomes: outcome names, the model's output columns in order.
    modalities: the model's modalities, e.g. ``("image", "clinical")``.
    spec: ``CohortSpec`` a new manifest must satisfy (no outcome columns; the
      run's categorical levels as the known levels).
    best_step: the checkpoint step restored; best_epoch: its epoch.
    fingerprint: the ``PreprocessConfig`` fingerprint, or None.
  """
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  model: Any
  variables: Mapping[str, Any]
  clinical: clinical_lib.ClinicalPreprocessor | None
  preprocess: mri.PreprocessConfig | None
  baselines: Mapping[str, survival.BreslowBaseline]
  outcomes: tuple[str, ...]
  modalities: tuple[str, ...]
  spec: mf.CohortSpec
  best_step: int
  best_epoch: int | None
  fingerprint: str | None
  head_baselines: Mapping[str, Mapping[str, survival.BreslowBaseline]] = dataclasses.field(
      default_factory=dict)

  @property
  def can_score_without_image(self) -> bool:
    """A multimodal run whose clinical head (and its baselines) can score a patient alone."""
    return self.has_image and "clinical" in self.heads and "clinical" in self.head_baselines

  @property
  def has_image(self) -> bool:
    return "image" in self.modalities

  @property
  def heads(self) -> tuple[str, ...]:
    """The model's output heads, as in training (``jaxsurv.train.head_names``)."""
    from jaxsurv import train  # pylint: disable=import-outside-toplevel
    return train.head_names(self.config)

  @property
  def n_clinical_features(self) -> int:
    """Width of the clinical input (1 when the run has no clinical columns, as in training)."""
    return self.clinical.n_features if self.clinical is not None else 1

  @property
  def horizons_years(self) -> tuple[float, ...]:
    return tuple(float(h) for h in self.config.eval.horizons_years)


def _read_json(path: pathlib.Path, what: str):
  if not path.is_file():
    raise RunLoadError(f"{path}: {what} not found; is {path.parent} a finished jaxsurv.train run?")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunLoadError(f"{path}: not valid JSON ({e})") from None


def _flat_shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"a/b/c": (shape, dtype)}`` of a (metadata or abstract) tree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
    out[name] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
  return out


def _tree_differences(expected: Mapping, found: Mapping, limit: int = 12) -> list[str]:
  """Readable differences between two ``_flat_shapes`` dicts."""
  lines = []
  for k in sorted(set(expected) - set(found)):
    lines.append(f"missing from the checkpoint: {k} {expected[k][0]}")
  for k in sorted(set(found) - set(expected)):
    lines.append(f"not in the model: {k} {found[k][0]}")
  for k in sorted(set(expected) & set(found)):
    if expected[k] != found[k]:
      lines.append(f"{k}: model {expected[k][0]} {expected[k][1]}, checkpoint "
                   f"{found[k][0]} {found[k][1]}")
  if len(lines) > limit:
    lines = lines[:limit] + [f"... ({len(lines)} differences in all)"]
  return lines


def _checkpoint_manager(directory: pathlib.Path):
  """Read access to a run's checkpoints (the shared trainer's manager, same best-step rule)."""
  from jaxsurv.trainer import loop  # pylint: disable=import-outside-toplevel
  return loop.checkpoint_manager(directory, create=False)


def _restore_best(workdir: pathlib.Path, expected: Mapping[str, Any], config_path: pathlib.Path):
  """Restores params and batch_stats of the best checkpoint after checking its tree.

  Returns:
    ``(variables, best_step, best_epoch)``.

  Raises:
    RunLoadError: no checkpoint; CheckpointMismatchError: another model.
  """
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  directory = workdir / "checkpoints"
  if not directory.is_dir():
    raise RunLoadError(f"{directory}: no checkpoints folder; is {workdir} a jaxsurv.train run?")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with _checkpoint_manager(directory) as mngr:
    step = mngr.best_step()
    if step is None:
      raise RunLoadError(f"{directory}: holds no checkpoint")
    where = directory / str(step)
    try:
      meta_tree = mngr.item_metadata(step)["state"]
    except Exception as e:  # pylint: disable=broad-except
      raise RunLoadError(f"{where}: unreadable checkpoint metadata "
                         f"({type(e).__name__}: {e})") from None
    meta_tree = getattr(meta_tree, "tree", meta_tree)
    if not isinstance(meta_tree, Mapping) or "params" not in meta_tree:
      raise CheckpointMismatchError(f"{where}: not a jaxsurv.train state (no 'params' item)")
    found = {k: meta_tree.get(k) or {} for k in ("params", "batch_stats")}
    diff = _tree_differences(_flat_shapes(expected), _flat_shapes(found))
    if diff:
      raise CheckpointMismatchError(
          f"checkpoint {where} does not hold the model that {config_path} builds (a checkpoint "
          "from another model or config?):\n  " + "\n  ".join(diff))
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            meta_tree)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise RunLoadError(f"{where}: cannot restore the checkpoint "
                         f"({type(e).__name__}: {e})") from None
  state = restored["state"]
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  meta = restored.get("meta") or {}
  return variables, int(step), meta.get("epoch")


def load_run(workdir: PathLike) -> TrainedRun:
  """Loads a finished ``jaxsurv.train`` (MMNN) run for prediction.

  Args:
    workdir: the run folder (``config.json``, ``preprocess.json``,
      ``baseline_hazard.json``, ``checkpoints/``).

  Returns:
    ``TrainedRun`` with the best checkpoint's variables.

  Raises:
    RunLoadError: a file is missing or unreadable, the run is not an MMNN run
      (``config.model.name``), the preprocessing settings cannot be rebuilt or
      their fingerprint differs from the current pipeline's (preprocessing
      code changed since training), or the files disagree (outcomes, grid).
    CheckpointMismatchError: the checkpoint's parameter tree (names, shapes,
      dtypes) differs from the model ``config.json`` builds.
  """
  from jaxsurv import train  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  if not workdir.is_dir():
    raise RunLoadError(f"{workdir}: run folder not found")
  config_path = workdir / "config.json"
  config = ml_collections.ConfigDict(_read_json(config_path, "training config"))
  model_cfg = config.get("model", {})
  if (config.get("trainer", "train") == "train" and "name" not in model_cfg
      and "modalities" in model_cfg):
    # An MMNN run made before the one config schema (jaxsurv <= 6d0ca36): its
    # modalities sat in config.model and config.trainer (default "train")
    # named the loop.
    config.data.modalities = config.model.modalities
    del config.model["modalities"]
    if "trainer" in config:
      del config["trainer"]
    config.model.name = "mmnn"
  name = config.get("model", {}).get("name")
  if name != "mmnn":
    raise RunLoadError(f"{config_path}: model {name!r}; load_run handles MMNN runs (fusion "
                       "runs: jaxsurv.fusion_predict)")
  try:
    outcomes = tuple(str(o) for o in config.data.outcomes)
    modalities = tuple(str(m) for m in config.data.modalities)
    channels = tuple(str(c) for c in config.data.channels)
    mask_col = config.data.mask
    conf_grid = (tuple(int(g) for g in config.data.preprocess.grid)
                 if "image" in modalities else None)
    _ = (config.eval.horizons_years, config.eval_batch_size, config.dtype)
    model = train.build_model(config)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise RunLoadError(f"{config_path}: not a complete MMNN config "
                       f"({type(e).__name__}: {e})") from None

  pre_path = workdir / "preprocess.json"
  pre = _read_json(pre_path, "fitted preprocessing")
  if not isinstance(pre, Mapping):
    raise RunLoadError(f"{pre_path}: expected a JSON object")
  if list(pre.get("outcomes") or outcomes) != list(outcomes):
    raise RunLoadError(f"{pre_path}: outcomes {pre.get('outcomes')} differ from {config_path} "
                       f"{list(outcomes)}")
  clin = None
  if pre.get("clinical") is not None:
    try:
      clin = clinical_lib.ClinicalPreprocessor.from_dict(pre["clinical"])
    except (KeyError, TypeError, ValueError) as e:
      raise RunLoadError(f"{pre_path}: bad 'clinical' state ({e})") from None
    # Training encoded rare unseen levels as zeros; for a new patient an unseen
    # level is an error to report, not a silent all-zero encoding.
    clin.handle_unknown = "error"
  if "clinical" in modalities and clin is None:
    raise RunLoadError(f"{pre_path}: the model uses clinical data but no fitted clinical "
                       "preprocessing is stored")
  cfg = fingerprint = None
  if "image" in modalities:
    if not pre.get("preprocess"):
      raise RunLoadError(f"{pre_path}: the model uses images but no MRI preprocessing is stored")
    try:
      cfg = mri.PreprocessConfig(**{k: (tuple(v) if isinstance(v, list) else v)
                                    for k, v in pre["preprocess"].items()})
    except (TypeError, ValueError) as e:
      raise RunLoadError(f"{pre_path}: cannot rebuild the MRI PreprocessConfig ({e}); was the run "
                         "made with another jaxsurv version?") from None
    fingerprint = cfg.fingerprint()
    if pre.get("fingerprint") not in (None, fingerprint):
      raise RunLoadError(
          f"{pre_path}: preprocessing fingerprint {pre['fingerprint']} of training differs from "
          f"{fingerprint} of the same settings in this jaxsurv version: the MRI pipeline changed "
          "since training, so new patients would not be preprocessed as the training patients were")
    if conf_grid != cfg.grid:
      raise RunLoadError(f"{pre_path}: grid {cfg.grid} differs from {config_path} grid {conf_grid}")

  base_path = workdir / "baseline_hazard.json"
  raw = _read_json(base_path, "Breslow baseline hazards")
  try:
    baselines = {o: survival.BreslowBaseline.from_dict(d) for o, d in raw.items()}
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise RunLoadError(f"{base_path}: unreadable baseline ({e})") from None
  unknown = sorted(set(baselines) - set(outcomes))
  if unknown:
    raise RunLoadError(f"{base_path}: outcomes {unknown} are not the run's outcomes "
                       f"{list(outcomes)}")
  heads_path = workdir / "baseline_hazard_heads.json"
  head_baselines = {}
  if heads_path.is_file():
    try:
      head_baselines = {h: {o: survival.BreslowBaseline.from_dict(d) for o, d in per.items()}
                        for h, per in _read_json(heads_path, "head baselines").items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise RunLoadError(f"{heads_path}: unreadable baseline ({e})") from None

  image = (jax.ShapeDtypeStruct((1,) + cfg.grid + (len(channels),), jnp.float32)
           if cfg is not None else None)
  clinical = jax.ShapeDtypeStruct((1, clin.n_features if clin is not None else 1), jnp.float32)
  try:
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            image, clinical)
  except (TypeError, ValueError) as e:
    raise RunLoadError(f"{config_path}: the model cannot be built ({e})") from None
  expected = {k: shapes.get(k, {}) for k in ("params", "batch_stats")}
  variables, step, epoch = _restore_best(workdir, expected, config_path)

  levels = {}
  if clin is not None:
    levels = {c: tuple(s["levels"]) for c, s in clin.to_dict()["categories"].items()}
  use_clin = "clinical" in modalities and clin is not None
  spec = mf.CohortSpec(
      channels=channels if cfg is not None else (), mask=mask_col if cfg is not None else None,
      numeric=tuple(clin.numeric) if use_clin else (),
      categorical=tuple(clin.categorical) if use_clin else (), outcomes=(),
      categorical_levels=levels if use_clin else {},
      geometry_tol_mm=cfg.geometry_tol_mm if cfg is not None else 0.5,
      require_same_grid=cfg.require_same_grid if cfg is not None else True)
  return TrainedRun(workdir=workdir, config=config, model=model, variables=variables,
                    clinical=clin if use_clin else None, preprocess=cfg, baselines=baselines,
                    outcomes=outcomes, modalities=modalities, spec=spec, best_step=step,
                    best_epoch=epoch, fingerprint=fingerprint, head_baselines=head_baselines)


# ----------------------------------------------------------------------------
# The new patients.
# ----------------------------------------------------------------------------


def _blank(v) -> bool:
  if v is None or v is pd.NA:
    return True
  if isinstance(v, (float, np.floating)) and math.isnan(v):
    return True
  return isinstance(v, str) and not v.strip()


def check_manifest(run: TrainedRun, manifest: PathLike | pd.DataFrame, *,
                   check_images: bool | str = True) -> tuple[pd.DataFrame, list[mf.Problem]]:
  """Reads and validates a manifest of new patients against a run.

  Args:
    run: the loaded run (``load_run``).
    manifest: CSV path (``jaxsurv.data.manifest`` format; outcome columns are
      not needed and are ignored) or a DataFrame from ``read_manifest``.
    check_images: as in ``manifest.validate_cohort`` (True: headers and an
      O(1) integrity screen; "full": decompress every image).

  Returns:
    ``(table, warnings)``: the manifest with absolute paths, and findings
    that do not stop prediction (a missing numeric value, imputed with the
    training mean).

  Raises:
    FileNotFoundError: the manifest does not exist.
    InputError: every problem at once: missing columns (e.g. a channel the run
      was trained with), missing/unreadable/corrupt files, grids that differ,
      empty masks, patients without an image, unknown categorical levels,
      missing categorical values the run never saw, non-numeric values,
      duplicate ids.
  """
  spec = run.spec
  if isinstance(manifest, pd.DataFrame):
    df = manifest.reset_index(drop=True)
  else:
    df = mf.read_manifest(manifest, spec)
  source = df.attrs.get("manifest_path", str(manifest) if not isinstance(manifest, pd.DataFrame)
                        else "DataFrame")
  report = mf.validate_cohort(df, spec, require_outcomes=False, check_images=check_images)
  problems = list(report.problems)
  warnings = [w for w in report.warnings if w.kind != "partial_image"]
  cols = set(df.columns)
  absent = [c for c in spec.channels if c not in cols]
  if absent:
    given = [c for c in spec.channels if c in cols]
    problems.insert(0, mf.Problem(
        "channel_mismatch", f"the run was trained on {len(spec.channels)} image channels "
        f"{list(spec.channels)}; the manifest has {len(given)} of them {given} (columns "
        f"{list(df.columns)}). Give one path column per channel, in the run's channel names."))
  has_id = spec.id_column in cols
  for i in range(len(df)):
    row = df.iloc[i]
    where = dict(patient_id=(None if not has_id or _blank(row[spec.id_column])
                             else str(row[spec.id_column])), row=i)
    if spec.channels and not absent and (spec.mask is None or spec.mask in cols):
      empty = [c for c in spec.path_columns if _blank(row[c])]
      if len(empty) == len(spec.path_columns) and run.can_score_without_image:
        warnings.append(mf.Problem(
            "clinical_head", "no image: scored with the run's clinical head (risk_head "
            "'clinical' in predictions.csv)", **where))
      elif empty:
        problems.append(mf.Problem(
            "missing_image", f"no file given for {empty}: every patient needs "
            f"{list(spec.path_columns)}" + (
                " (a patient with none of them is scored by the clinical head)"
                if run.can_score_without_image else
                ": the run has no clinical head to score a patient without MRI"),
            column=empty[0], **where))
    if run.clinical is not None:
      cats = run.clinical.to_dict()["categories"]
      for c in spec.categorical:
        if c in cols and _blank(row[c]) and not cats[c]["missing_level"]:
          problems.append(mf.Problem(
              "missing_value", f"{c} is empty, and the run saw no missing {c} in training, so it "
              "has no encoding for it", column=c, **where))
      for c in spec.numeric:
        if c in cols and _blank(row[c]):
          warnings.append(mf.Problem("imputed", f"{c} is missing: imputed with the training mean",
                                     column=c, **where))
  if problems:
    order = {id(p): n for n, p in enumerate(problems)}
    problems.sort(key=lambda p: (p.row is not None, p.row if p.row is not None else -1,
                                 order[id(p)]))
    raise InputError(problems, source)
  return df, warnings


def clinical_features(run: TrainedRun, df: pd.DataFrame) -> np.ndarray:
  """The clinical input ``[n, features]`` float32, as in training.

  Without clinical data (image-only run) it is zeros ``[n, 1]``, as in training.

  Raises:
    ValueError: from ``ClinicalPreprocessor.transform`` (unknown levels,
      non-numeric values), naming patients and column.
  """
  if run.clinical is None:
    return np.zeros((len(df), 1), np.float32)
  return run.clinical.transform(df).astype(np.float32)


def preprocess_patient(run: TrainedRun, row: Mapping[str, Any]) -> mri.PreprocessedCase:
  """Preprocesses one manifest row's images with the run's ``PreprocessConfig``.

  Raises:
    mri.ImageFileError, mri.GeometryMismatchError, mri.EmptyMaskError,
    ValueError: as ``jaxsurv.data.mri.preprocess_case``.
  """
  spec = run.spec
  return mri.preprocess_case([row[c] for c in spec.channels], row[spec.mask], run.preprocess)


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------


def survival_curves(run: TrainedRun, patient_ids: Sequence[str], risk: np.ndarray,
                    step_days: float = 30.0) -> pd.DataFrame:
  """S(t | x) every ``step_days`` days from 0 to each outcome's last training event time.

  Args:
    run: the loaded run (Breslow baselines).
    patient_ids: ``[n]`` ids.
    risk: ``[n, outcomes]`` log-hazards (multimodal head).
    step_days: grid step (days, > 0).

  Returns:
    Long table ``patient_id, outcome, time_days, survival`` (outcomes without
    a baseline are left out).

  Raises:
    ValueError: if ``step_days`` is not positive.
  """
  if not step_days > 0:
    raise ValueError(f"step_days: must be > 0 days, got {step_days!r}")
  frames = []
  ids = np.asarray([str(p) for p in patient_ids])
  for j, o in enumerate(run.outcomes):
    base = run.baselines.get(o)
    if base is None:
      continue
    times = np.arange(0.0, float(base.times[-1]) + 1e-9, float(step_days))
    s = base.survival(risk[:, j], times)  # [n, m]
    frames.append(pd.DataFrame({"patient_id": np.repeat(ids, len(times)), "outcome": o,
                                "time_days": np.tile(times, len(ids)), "survival": s.ravel()}))
  if not frames:
    return pd.DataFrame(columns=["patient_id", "outcome", "time_days", "survival"])
  return pd.concat(frames, ignore_index=True)


def _safe_names(ids: Sequence[str]) -> list[str]:
  """File-system-safe, unique folder names for patient ids."""
  out, seen = [], set()
  for i, pid in enumerate(ids):
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(pid)).strip("._") or f"patient{i}"
    if name in seen:
      name = f"{name}-row{i}"
    seen.add(name)
    out.append(name)
  return out


def _check_out(out: pathlib.Path, overwrite: bool) -> None:
  """Raises OutputExistsError (a FileExistsError) unless ``out`` may be written."""
  if out.exists():
    if not out.is_dir():
      raise OutputExistsError(f"--out {out}: exists and is not a folder")
    if any(out.iterdir()) and not overwrite:
      raise OutputExistsError(f"--out {out}: folder exists and is not empty (pass --overwrite "
                              "to replace it)")


@contextlib.contextmanager
def _staging(out: pathlib.Path, overwrite: bool) -> Iterator[pathlib.Path]:
  """A temporary folder next to ``out``, renamed to ``out`` on success, removed on error."""
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  try:
    yield tmp
    _check_out(out, overwrite)  # Re-check: something may have appeared meanwhile.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; publish with normal rights.
    if out.exists():
      old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
      os.rename(out, old)
      os.rename(tmp, out)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
  """Pads axis 0 to ``size`` by repeating row 0 (fixed batch shape: one compilation).

  In eval mode a patient's outputs do not depend on the rest of the batch,
  so the padding rows only need to be valid inputs; callers drop them.
  """
  if len(x) >= size:
    return x
  return np.concatenate([x, np.repeat(x[:1], size - len(x), axis=0)])


# ----------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------


def predict(workdir: PathLike, manifest: PathLike, out: PathLike, *, heatmaps: bool = False,
            layer: str = gradcam.LAST_DENSE_BLOCK, head: str = "mm", sign: str = "increasing",
            step_days: float = 30.0,
            batch_size: int | None = None, overwrite: bool = False,
            check_images: bool | str = True, progress: bool = True) -> dict:
  """Predicts (and optionally explains) new patients with a finished MMNN run.

  See the module docstring for the steps and the files written.

  Args:
    workdir: the finished run's folder.
    manifest: CSV of the new patients (outcome columns not needed).
    out: output folder (created; must not exist or be empty unless
      ``overwrite``).
    heatmaps: also write Grad-CAM heat maps (NIfTI on the original scan, PNG).
    layer: Grad-CAM layer (``gradcam.mmnn_grad_cam``; default the last dense
      block's output).
    head: Grad-CAM head: ``"mm"`` (multimodal, the prediction) or ``"image"``.
    sign: ``"increasing"`` (Grad-CAM as published: the evidence that raises
      the log-hazard) or ``"decreasing"`` (the gradient of minus the
      log-hazard: what lowers it; a low-risk patient's increasing map is
      often empty). Written into every PNG title and ``heatmaps.csv``.
    step_days: survival curve grid step (days).
    batch_size: patients per forward pass (default ``config.eval_batch_size``).
    overwrite: replace a non-empty ``out`` (never a run folder, nor a folder
      holding or inside one: ``runs.refuse_output_near_runs``).
    check_images: manifest image check mode (``manifest.validate_cohort``).
    progress: show a progress bar.

  Returns:
    The summary dict (also ``OUT/summary.json``).

  Raises:
    RunLoadError / CheckpointMismatchError: see ``load_run``.
    InputError: see ``check_manifest``; also a patient whose preprocessing
      fails (every such patient is listed).
    UserError: ``out`` is, lies inside or contains a run folder
      (``runs.refuse_output_near_runs``), checked before anything else.
    FileNotFoundError: the manifest is missing. OutputExistsError (a
      FileExistsError): ``out`` is not empty. UserError (a ValueError):
      Grad-CAM asked of a model without images, an unknown layer or head, a
      bad ``step_days`` or ``batch_size``.
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  from jaxsurv import train  # pylint: disable=import-outside-toplevel
  from jaxsurv.trainer import loop  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(out)
  runs.refuse_output_near_runs(out)
  if not step_days > 0:
    raise UserError(f"step_days: must be > 0 days, got {step_days!r}")
  _check_out(out, overwrite)
  run = load_run(workdir)
  bs = int(batch_size or run.config.eval_batch_size)
  if bs < 1:
    raise UserError(f"batch_size: must be >= 1, got {bs}")
  # The trainer's XLA options (CPU convolution library), so predictions match its own.
  jit = functools.partial(jax.jit, compiler_options=loop.compiler_options(run.config) or None)
  predict_jit = jit(functools.partial(train.predict_fn, model=run.model))
  cam_jit = None
  if heatmaps:
    if not run.has_image:
      raise UserError(f"--heatmaps: the run's model has no image branch (modalities "
                      f"{list(run.modalities)})")
    if head not in run.heads:
      raise UserError(f"--head: {head!r} is not an output of this model; available: "
                      f"{list(run.heads)}")
    if sign not in gradcam.SIGNS:
      raise UserError(f"--sign: expected one of {list(gradcam.SIGNS)}, got {sign!r}")
    cam_jit = jit(functools.partial(gradcam.mmnn_grad_cam, run.model, layer=layer, head=head,
                                    sign=sign))
    # Fails now (not after preprocessing) on an unknown layer.
    try:
      jax.eval_shape(cam_jit, run.variables,
                     jax.ShapeDtypeStruct((1,) + run.preprocess.grid + (len(run.spec.channels),),
                                          jnp.float32),
                     jax.ShapeDtypeStruct((1, run.n_clinical_features), jnp.float32))
    except ValueError as e:  # gradcam's errors for a layer that is not in the encoder.
      raise UserError(f"--layer {layer!r}: {e}") from e

  df, warnings = check_manifest(run, manifest, check_images=check_images)
  n = len(df)
  if n == 0:
    raise InputError([mf.Problem("empty_manifest", "the manifest has no patients")],
                     str(manifest))
  ids = df[run.spec.id_column].astype(str).str.strip().tolist()
  # Patients without MRI (allowed by check_manifest only when the clinical
  # head can score them): zeros in the image batch, the clinical head's risk.
  no_image = ({i for i in range(n) if all(_blank(df.iloc[i][c]) for c in run.spec.path_columns)}
              if run.has_image else set())
  clin = clinical_features(run, df)
  names = _safe_names(ids)
  risk = {h: np.zeros((n, len(run.outcomes)), np.float32) for h in run.heads}
  cam_rows = []
  failures: list[mf.Problem] = []

  with _staging(out, overwrite) as tmp:
    bar = tqdm(total=n, desc="predict", unit="patient", disable=not progress, dynamic_ncols=True)
    for start in range(0, n, bs):
      rows = list(range(start, min(start + bs, n)))
      cases = {}
      if run.has_image:
        for i in rows:
          if i in no_image:
            continue
          try:
            cases[i] = preprocess_patient(run, df.iloc[i])
          # mri's errors are ValueErrors; ITK itself raises RuntimeError.
          except (ValueError, RuntimeError) as e:
            failures.append(mf.Problem("preprocessing_failed", f"{type(e).__name__}: {e}",
                                       patient_id=ids[i], row=i))
        bar.update(len(rows))
        if failures:
          continue  # Keep checking the other patients, report them all.
        shape = run.preprocess.grid + (len(run.spec.channels),)
        image = pad_batch(np.stack([cases[i].volume if i in cases else np.zeros(shape, np.float32)
                               for i in rows]), bs)
      else:
        bar.update(len(rows))
        image = None
      clinical = pad_batch(clin[rows], bs)
      outs = predict_jit(run.variables.get("params"), run.variables.get("batch_stats", {}),
                         image, clinical)
      for h in run.heads:
        risk[h][rows] = np.asarray(outs[h])[:len(rows)]
      if cam_jit is not None:
        res = jax.device_get(cam_jit(run.variables, image, clinical))
        for r, i in enumerate(rows):
          if i in cases:  # No heat map without an image.
            cam_rows += _write_patient_heatmaps(run, cases[i], res, r, ids[i], names[i],
                                                tmp / "heatmaps", layer, head, sign)
    bar.close()
    if failures:
      raise InputError(failures, str(manifest))
    risk_head = ["clinical" if i in no_image else "mm" for i in range(n)]
    summary = _write_outputs(run, tmp, ids, risk, risk_head, cam_rows, warnings, step_days,
                             manifest, heatmaps, layer, head, sign)
  log.info("wrote predictions for %d patients to %s", n, out)
  return summary


def _write_patient_heatmaps(run: TrainedRun, case: mri.PreprocessedCase, res: gradcam.GradCAM,
                            r: int, pid: str, name: str, folder: pathlib.Path, layer: str,
                            head: str, sign: str = "increasing") -> list[dict]:
  """NIfTI (original space) + PNG per outcome for batch row ``r``; returns heatmaps.csv rows."""
  import SimpleITK as sitk  # pylint: disable=import-outside-toplevel
  scan = mri.read_image(case.image_paths[0], check=False)
  # The mask adopts the scan's geometry (within tolerance), as in preprocessing.
  mask = mri.Geometry.of(scan).apply_to(sitk.Cast(sitk.NotEqual(
      mri.read_image(case.mask_path, check=False), 0.0), sitk.sitkUInt8))
  inside = case.mask > 0
  rows = []
  for k, o in enumerate(run.outcomes):
    cam = np.asarray(res.cam[r, k], np.float32)
    nii = folder / name / f"gradcam_{o}.nii.gz"
    heat = gradcam.save_heatmap_nifti(cam, case, nii)
    png = gradcam.save_overlay_png(
        scan, heat, folder / name / f"gradcam_{o}.png", mask=mask,
        title=f"{pid}: risk-{sign} Grad-CAM of {o.upper()} log-hazard ({head} head, {layer}); "
              f"risk {float(res.scores[r, k]):.3f}")
    total = float(cam.sum())
    rows.append({"patient_id": pid, "outcome": o, "head": head, "layer": layer, "sign": sign,
                 "risk": float(res.scores[r, k]), "peak": float(res.peak[r, k]),
                 "heat_in_tumour": float(cam[inside].sum() / total) if total > 0 else float("nan"),
                 "nifti": str(nii.relative_to(folder.parent)),
                 "png": str(png.relative_to(folder.parent))})
  return rows


def _write_outputs(run: TrainedRun, tmp: pathlib.Path, ids: list[str],
                   risk: Mapping[str, np.ndarray], risk_head: Sequence[str],
                   cam_rows: list[dict], warnings: list[mf.Problem], step_days: float,
                   manifest: PathLike, heatmaps: bool, layer: str, head: str,
                   sign: str = "increasing") -> dict:
  """Writes predictions.csv, survival_curves.csv, heatmaps.csv and summary.json into ``tmp``.

  ``risk_head[i]`` is the head that scores patient ``i``: ``"mm"`` (the
  model's prediction) or ``"clinical"`` (a patient without MRI), each with
  its own Breslow baselines.
  """
  horizons = run.horizons_years
  heads = np.asarray(risk_head)
  groups = {h: np.flatnonzero(heads == h) for h in ("mm", "clinical") if (heads == h).any()}
  baselines = {"mm": run.baselines, **run.head_baselines}
  frames, curves = [], []
  notes = []
  for h, rows in groups.items():
    r = risk[h][rows]
    cols: dict[str, Any] = {"patient_id": np.asarray(ids)[rows], "risk_head": h}
    for j, o in enumerate(run.outcomes):
      cols[f"risk_{o}"] = r[:, j]
      base = baselines[h].get(o)
      if base is None:
        if h == "mm":
          notes.append(f"{o}: no Breslow baseline (no events in the training split): risk only")
        continue
      cols.update(evaluate.survival_columns(o, base, r[:, j], horizons))
      last = float(base.times[-1])
      for y, days in zip(horizons, survival.horizons_in_days(horizons)):
        if days > last and h == "mm":
          notes.append(f"{o}: horizon {y:g}y ({days:.0f} days) is beyond the last training "
                       f"event time ({last:.0f} days); its probability is the flat Breslow "
                       "extrapolation")
    frames.append(pd.DataFrame(cols, index=rows))
    curves.append(survival_curves(dataclasses.replace(run, baselines=baselines[h]),
                                  list(np.asarray(ids)[rows]), r, step_days))
  if "clinical" in groups:
    notes.append(f"{len(groups['clinical'])} patients without MRI were scored by the clinical "
                 "head (risk_head 'clinical'), with that head's own Breslow baseline")
  io_lib.write_csv_atomic(pd.concat(frames).sort_index(), tmp / "predictions.csv")
  io_lib.write_csv_atomic(pd.concat(curves, ignore_index=True), tmp / "survival_curves.csv")
  if heatmaps:
    io_lib.write_csv_atomic(pd.DataFrame(cam_rows), tmp / "heatmaps" / "heatmaps.csv")
  summary = {
      "workdir": str(run.workdir.resolve()), "manifest": str(pathlib.Path(manifest).resolve()),
      "n_patients": len(ids), "best_step": run.best_step, "best_epoch": run.best_epoch,
      "outcomes": list(run.outcomes), "horizons_years": list(horizons),
      "modalities": list(run.modalities),
      "risk_head": {h: int(len(rows)) for h, rows in groups.items()},
      "preprocess_fingerprint": run.fingerprint,
      "survival_grid": {o: {"step_days": float(step_days), "last_event_days": float(b.times[-1])}
                        for o, b in run.baselines.items()},
      "heatmaps": ({"layer": layer, "head": head, "sign": sign, "normalisation": "per patient and outcome, "
                    "divided by the map's maximum (0 = no positive evidence)"}
                   if heatmaps else None),
      "notes": notes, "warnings": [str(w) for w in warnings]}
  for w in warnings:
    log.warning("%s", w)
  io_lib.write_json_atomic(summary, tmp / "summary.json")
  return summary


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def define_flags(fv: flags.FlagValues, argv: Sequence[str] | None = None) -> None:
  """Defines the command's absl flags on ``fv`` (``jaxsurv.cli.run`` / ``cli.call``)."""
  del argv
  flags.DEFINE_string("workdir", None, "finished run folder (any model)", flag_values=fv)
  flags.DEFINE_string("manifest", None, "MMNN runs: CSV of the new patients (no outcomes "
                      "needed)", flag_values=fv)
  flags.DEFINE_string("input", None, "fusion runs: folder of label-free modality files "
                      "(<modality>.csv; see jaxsurv.fusion_predict)", flag_values=fv)
  flags.DEFINE_string("out", None, "output folder (written atomically; outside every run folder)",
                      flag_values=fv)
  flags.DEFINE_boolean("heatmaps", False, "write Grad-CAM heat maps (NIfTI + PNG)",
                       flag_values=fv)
  flags.DEFINE_string("layer", gradcam.LAST_DENSE_BLOCK,
                      "Grad-CAM layer: last_dense_block (default), block_<i>, or a module path "
                      "inside the image encoder (e.g. norm5)", flag_values=fv)
  flags.DEFINE_enum("sign", "increasing", ["increasing", "decreasing"],
                    "Grad-CAM sign: increasing (what raises the log-hazard, as published) or "
                    "decreasing (what lowers it)", flag_values=fv)
  flags.DEFINE_enum("head", "mm", ["mm", "image"],
                    "head whose log-hazard Grad-CAM explains (default: mm, the prediction)",
                    flag_values=fv)
  flags.DEFINE_float("step_days", 30.0, "survival curve grid step (days)", flag_values=fv)
  flags.DEFINE_integer("batch_size", None,
                       "patients per forward pass (default: the run's eval_batch_size)",
                       flag_values=fv)
  flags.DEFINE_enum("check_images", "header", ["header", "full"],
                    "manifest image check: header + O(1) integrity screen, or full decompression",
                    flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "replace a non-empty --out folder (never a run)",
                       flag_values=fv)
  flags.DEFINE_boolean("no_progress", False, "no progress bar", flag_values=fv)
  flags.mark_flags_as_required(["workdir", "out"], flag_values=fv)


def _main(argv: Sequence[str], fv: flags.FlagValues) -> int:
  """Runs the command on parsed flags ``fv``; returns 0 (errors raise, see ``predict``).

  Raises:
    absl.app.UsageError: positional arguments were given.
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {list(argv[1:])}; every option is a --flag")
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  log.setLevel(logging.INFO)
  from jaxsurv import fusion_predict  # pylint: disable=import-outside-toplevel
  if fusion_predict.is_fusion_run(fv.workdir):
    mmnn_only = [f"--{n}" for n in ("manifest", "heatmaps") if fv[n].present]
    if fv.input is None or mmnn_only:
      raise UserError(f"{fv.workdir} is a fusion run: give --input=FOLDER (label-free modality "
                      f"files), not {mmnn_only or '--manifest'}")
    table = fusion_predict.predict(fv.workdir, fv.input, fv.out)
    print(f"{len(table)} patients -> {pathlib.Path(fv.out).resolve()}")
    return 0
  if fv.manifest is None or fv.input is not None:
    raise UserError(f"{fv.workdir} is an MMNN run: give --manifest=CSV (not --input)")
  summary = predict(fv.workdir, fv.manifest, fv.out, heatmaps=fv.heatmaps, layer=fv.layer,
                    head=fv.head, sign=fv.sign, step_days=fv.step_days, batch_size=fv.batch_size,
                    overwrite=fv.overwrite, check_images=fv.check_images,
                    progress=not fv.no_progress)
  print(f"{summary['n_patients']} patients -> {pathlib.Path(fv.out).resolve()}")
  for note in summary["notes"]:
    print(f"note: {note}")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """In-process entry point: ``argv`` without the program name; returns the exit status.

  Ends as ``jaxsurv.cli.call`` does: 0 on success; 2 with one message on
  stderr for bad input (a run that cannot be loaded, an invalid manifest, an
  ``--out`` near a run or not empty, a missing file).

  Raises:
    Exceptions that are bugs (see ``jaxsurv.cli``).
  """
  return cli.call(_main, define_flags, sys.argv[1:] if argv is None else argv,
                  prog="python -m jaxsurv.predict")


if __name__ == "__main__":
  cli.run(_main, define_flags=define_flags)
