"""Predict with a finished fusion-zoo run (HEALNet, CM-MMF, PORPOISE, baselines).

A run folder written by ``launch.py`` with a fusion config holds
``config.json`` (what was trained), ``transform.json`` (the training part's
standardisation and time bins, ``multimodal.FoldTransform``) and Orbax
checkpoints; ``load_run`` rebuilds the model through the shared trainer and
restores the selected checkpoint.

Label-free input is a folder with one file per modality, each optional per
patient (a patient missing from a modality's file, or whose row is empty, is
scored without that modality, as in training):

* ``<tabular modality>.csv``: ``patient_id`` plus exactly the run's feature
  columns (``transform.json`` lists them; raw values, the run's own
  standardisation is applied);
* ``<bag modality>.csv``: ``patient_id, path`` with one ``.npy`` or
  ``.safetensors`` bag of tile features ``[n_tiles, dim]`` per patient
  (relative paths are taken from the folder; ``jaxsurv.data.bags.load_bag``,
  no pickles).

``write_label_free_input`` writes such a folder for a run's own
validation or test patients (optionally removing modalities at random per
patient), so the whole path can be tried on the demo cohort.

``predict`` writes ``predictions.csv``: ``patient_id``, ``risk`` (higher =
earlier event; ``-sum_k S_k`` for time-bin models, the log-hazard for Cox
models), ``present_<m>`` (the presence the model saw), and for time-bin
models the survival at each bin's end ``surv_bin<k>_<end>d`` (days; the
last bin is open-ended: ``surv_bin<K-1>_open``) and at the
configured horizons ``surv_<h>y`` (``survival.discrete_survival_at``); plus
the attention tables of ``jaxsurv.attention``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
import pandas as pd

from jaxsurv import io as io_lib
from jaxsurv import attention, survival
from jaxsurv.data import bags as bags_lib
from jaxsurv.data import multimodal
from jaxsurv.errors import UserError

PathLike = str | pathlib.Path


@dataclasses.dataclass
class FusionRun:
  """A finished fusion run ready to score patients.

  Attributes:
    workdir: the run folder.
    config: its ``config.json``.
    transform: its ``transform.json``.
    trainer: ``fusion_train.FusionTrainer`` for the config.
    params: the selected checkpoint's parameters (replicated on the mesh).
    best_epoch: the selected epoch.
  """
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  transform: multimodal.FoldTransform
  trainer: Any
  params: Any
  best_epoch: int

  @property
  def modalities(self) -> tuple[tuple[str, str], ...]:
    return self.trainer.modalities


def _read_json(path: pathlib.Path, what: str):
  if not path.is_file():
    raise UserError(f"{path}: {what} not found; is {path.parent} a finished fusion run?")
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable {what} ({e})") from None


def is_fusion_run(workdir: PathLike) -> bool:
  """True if ``workdir`` holds a fusion-zoo run (its ``transform.json``)."""
  return (pathlib.Path(workdir) / "transform.json").is_file()


def load_run(workdir: PathLike) -> FusionRun:
  """Loads a finished fusion run for prediction.

  Raises:
    UserError: a file is missing or unreadable, the config does not build
      the model, or no checkpoint can be restored (names the file).
  """
  from jaxsurv import fusion_train as ft  # pylint: disable=import-outside-toplevel
  from jaxsurv.trainer import loop  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(_read_json(workdir / "config.json", "training config"))
  try:
    transform = multimodal.FoldTransform.from_dict(
        _read_json(workdir / "transform.json", "fitted transform"))
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{workdir / 'transform.json'}: not a fitted transform ({e})") from None
  modalities = (tuple((m, "tabular") for m in transform.tabular)
                + tuple((m, "bag") for m in transform.bags))
  try:
    trainer = ft.FusionTrainer(config, modalities)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise UserError(f"{workdir / 'config.json'}: does not build a fusion model "
                    f"({type(e).__name__}: {e})") from None
  ckpt = workdir / "checkpoints"
  if not ckpt.is_dir():
    raise UserError(f"{ckpt}: no checkpoints folder; was {workdir} trained with launch.py?")
  like = trainer.init_state(jax.random.key(0), _dummy_part(transform, trainer.config.batch_size))
  with loop.checkpoint_manager(ckpt, create=False) as mngr:
    best = mngr.best_step()
    if best is None:
      raise UserError(f"{ckpt}: holds no checkpoint")
    state, meta = loop.restore(mngr, best, like, trainer.repl)
  return FusionRun(workdir, config, transform, trainer, state.params,
                   int(meta.get("best_epoch", best)))


def _dummy_part(transform: multimodal.FoldTransform, n: int) -> dict:
  """Zero inputs of the transform's shapes (for the parameter tree only)."""
  inputs, presence = {}, {}
  for m, st in transform.tabular.items():
    inputs[m] = np.zeros((n, len(st["features"])), np.float32)
    presence[m] = np.ones(n, bool)
  for m, b in transform.bags.items():
    inputs[m] = np.zeros((n, b["max_tiles"], b["dim"]), np.float32)
    inputs[m + multimodal.TILE_MASK_SUFFIX] = np.ones((n, b["max_tiles"]), bool)
    presence[m] = np.ones(n, bool)
  return {"inputs": inputs, "presence": presence, "duration": np.ones(n, np.float32),
          "event": np.zeros(n, np.int32), "bin_index": np.zeros(n, np.int32)}


# ----------------------------------------------------------------------------
# Label-free input.
# ----------------------------------------------------------------------------


def _read_csv(path: pathlib.Path) -> pd.DataFrame:
  try:
    df = pd.read_csv(path, dtype={"patient_id": str})
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: unreadable CSV ({e})") from None
  if "patient_id" not in df.columns:
    raise UserError(f"{path}: no 'patient_id' column (columns: {list(df.columns)[:10]})")
  dup = df["patient_id"][df["patient_id"].duplicated()]
  if len(dup):
    raise UserError(f"{path}: patients listed twice: {sorted(set(dup))[:10]}")
  if df["patient_id"].isna().any():
    raise UserError(f"{path}: rows {list(np.flatnonzero(df['patient_id'].isna()))[:10]} have "
                    "no patient_id")
  return df


def read_input(run: FusionRun, input_dir: PathLike) -> multimodal.MultimodalCohort:
  """The label-free folder (module docstring) as a cohort with placeholder outcomes.

  Raises:
    UserError: no modality file, a file without ``patient_id`` or with other
      feature columns than the run's, non-numeric or non-finite values in a
      present row (names the file, patients and columns), an unreadable bag.
  """
  input_dir = pathlib.Path(input_dir)
  if not input_dir.is_dir():
    raise UserError(f"{input_dir}: input folder not found")
  names = [m for m, _ in run.modalities]
  files = {m: input_dir / f"{m}.csv" for m in names}
  found = {m: p for m, p in files.items() if p.is_file()}
  if not found:
    raise UserError(f"{input_dir}: no modality file; expected one or more of "
                    f"{[p.name for p in files.values()]}")
  tables = {m: _read_csv(p) for m, p in found.items()}
  ids = sorted(set().union(*(set(t["patient_id"]) for t in tables.values())))
  n = len(ids)
  if n == 0:
    raise UserError(f"{input_dir}: the modality files list no patients")
  pos = {p: i for i, p in enumerate(ids)}
  tabular, presence, feature_names = {}, {}, {}
  for m, st in run.transform.tabular.items():
    feats = list(st["features"])
    feature_names[m] = feats
    x = np.full((n, len(feats)), np.nan, np.float32)
    p = np.zeros(n, bool)
    if m in tables:
      t = tables[m]
      cols = [c for c in t.columns if c != "patient_id"]
      missing, extra = sorted(set(feats) - set(cols)), sorted(set(cols) - set(feats))
      if missing or extra:
        raise UserError(f"{found[m]}: columns differ from the run's {len(feats)} {m} features "
                        f"(missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                        f"unexpected {extra[:10]}{'...' if len(extra) > 10 else ''})")
      vals = t[feats].apply(pd.to_numeric, errors="coerce")
      bad = vals.isna() & t[feats].notna()
      if bad.to_numpy().any():
        r, c = np.nonzero(bad.to_numpy())
        raise UserError(f"{found[m]}: non-numeric values for patients "
                        f"{sorted({str(x) for x in t['patient_id'].iloc[r]})[:10]} in columns "
                        f"{sorted({feats[j] for j in c})[:10]}")
      arr = vals.to_numpy(np.float32)
      has = np.isfinite(arr).any(axis=1)  # An empty row: the modality is absent.
      partial = has & ~np.isfinite(arr).all(axis=1)
      if partial.any():
        rows = np.flatnonzero(partial)
        raise UserError(f"{found[m]}: patients {[str(x) for x in t['patient_id'].iloc[rows]][:10]} have "
                        "missing or non-finite values in some features (a modality is either "
                        "complete or absent)")
      rows = np.array([pos[p_] for p_ in t["patient_id"]], np.int64)
      x[rows[has]] = arr[has]
      p[rows[has]] = True
    tabular[m], presence[m] = x, p
  cohort = multimodal.MultimodalCohort(np.array(ids, object), tabular, {}, presence,
                                       np.ones(n), np.zeros(n, np.int64),
                                       pd.DataFrame(index=range(n)), feature_names)
  for m, b in run.transform.bags.items():
    bag_list: list = [None] * n
    if m in tables:
      t = tables[m]
      if "path" not in t.columns:
        raise UserError(f"{found[m]}: no 'path' column")
      for pid, path in zip(t["patient_id"], t["path"]):
        if isinstance(path, str) and path:
          full = pathlib.Path(path) if pathlib.Path(path).is_absolute() else input_dir / path
          bag = bags_lib.load_bag(full, patient_id=pid)
          if bag.shape[1:] != (b["dim"],):
            raise UserError(f"{full}: patient {pid}'s bag has tiles of dim {bag.shape[1:]}, the "
                            f"run's {m} tiles have dim {b['dim']}")
          bag_list[pos[pid]] = bag if len(bag) else None
    cohort = cohort.with_bags(m, bag_list, max_tiles=b["max_tiles"], dim=b["dim"],
                              rng=np.random.default_rng(0))
  return cohort


def write_label_free_input(workdir: PathLike, out_dir: PathLike, *, part: str = "test",
                           drop: Mapping[str, float] | None = None, seed: int = 0) -> pd.DataFrame:
  """Writes a run's own ``part`` patients as label-free input (no outcomes).

  Args:
    workdir: a finished fusion run on a cohort jaxsurv can load
      (``config.data.cohort``, e.g. ``tcga_brca``).
    out_dir: a new folder (refused if it exists, is or holds a run).
    part: ``"val"`` or ``"test"`` of the run's ``splits.json``.
    drop: ``{modality: probability}`` of removing that modality per patient
      (never all of a patient's modalities; ``multimodal.drop_modalities``).
    seed: RNG seed of ``drop``.

  Returns:
    The presence written, one row per patient (``patient_id``,
    ``present_<m>``).

  Raises:
    UserError: an unknown part or modality, an existing ``out_dir``.
  """
  from jaxsurv import fusion_train as ft  # pylint: disable=import-outside-toplevel
  from jaxsurv import runs  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import splits as splits_lib  # pylint: disable=import-outside-toplevel
  workdir, out_dir = pathlib.Path(workdir), pathlib.Path(out_dir)
  if part not in ("val", "test"):
    raise UserError(f"--part must be 'val' or 'test', got {part!r}")
  if out_dir.exists():
    raise UserError(f"{out_dir}: exists; choose a new folder")
  runs.refuse_output_near_runs(out_dir)
  config = ml_collections.ConfigDict(_read_json(workdir / "config.json", "training config"))
  split = splits_lib.load_splits(workdir / "splits.json")
  cohort = ft.load_cohort(config)
  ids = list(getattr(split, part))
  index = {p: i for i, p in enumerate(cohort.patient_ids)}
  absent = [p for p in ids if p not in index]
  if absent:
    raise UserError(f"{workdir / 'splits.json'}: patients {absent[:10]} are not in cohort "
                    f"{config.data.cohort!r}")
  sub = cohort.select(np.array([index[p] for p in ids], np.int64))
  presence = dict(sub.presence)
  if drop:
    unknown = sorted(set(drop) - set(presence))
    if unknown:
      raise UserError(f"--drop names modalities {unknown} the run does not have "
                      f"({sorted(presence)})")
    presence = multimodal.drop_modalities(presence, np.random.default_rng(seed),
                                          {m: float(p) for m, p in drop.items()})
  out_dir.mkdir(parents=True)
  for m, x in sub.tabular.items():
    keep = presence[m]
    df = pd.DataFrame(x[keep], columns=list(sub.feature_names[m]))
    df.insert(0, "patient_id", sub.patient_ids[keep])
    io_lib.write_csv_atomic(df, out_dir / f"{m}.csv")
  for m, (feats, mask) in sub.bags.items():
    (out_dir / m).mkdir()
    rows = []
    for i in np.flatnonzero(presence[m]):
      pid = sub.patient_ids[i]
      np.save(out_dir / m / f"{pid}.npy", feats[i][mask[i]], allow_pickle=False)
      rows.append({"patient_id": pid, "path": f"{m}/{pid}.npy"})
    io_lib.write_csv_atomic(pd.DataFrame(rows, columns=["patient_id", "path"]),
                              out_dir / f"{m}.csv")
  table = pd.DataFrame({"patient_id": sub.patient_ids,
                        **{f"present_{m}": p.astype(int) for m, p in presence.items()}})
  return table


def predict(workdir: PathLike, input_dir: PathLike, out: PathLike, *,
            horizons_years: Sequence[float] | None = None) -> pd.DataFrame:
  """Scores the label-free patients of ``input_dir`` with the run in ``workdir``.

  Writes ``out/predictions.csv`` and the attention tables (module
  docstring); ``out`` must not exist and must not be, lie in or hold a run.

  Returns:
    The predictions table.

  Raises:
    UserError: see ``load_run`` and ``read_input``; an existing ``out``.
  """
  from jaxsurv import runs  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(out)
  runs.refuse_output_near_runs(out)
  if out.exists():
    raise UserError(f"{out}: exists; choose a new folder")
  run = load_run(workdir)
  cohort = read_input(run, input_dir)
  data = run.transform.transform(cohort, np.arange(cohort.n_patients))
  pred = run.trainer.predict_part(run.params, data)
  risk = run.trainer.risk(pred["out"])
  cols: dict = {"patient_id": cohort.patient_ids, "risk": risk}
  for m, p in pred["presence"].items():
    cols[f"present_{m}"] = np.asarray(p).astype(int)
  if run.config.loss.name == "nll":
    bins = run.transform.time_bins
    s = survival.discrete_survival(pred["out"])
    ends = [f"{c:.0f}d" for c in bins.cuts] + ["open"]  # Bin k ends at cuts[k].
    for k in range(s.shape[1]):
      cols[f"surv_bin{k}_{ends[k]}"] = s[:, k]
    years = tuple(horizons_years or run.config.get("eval", {}).get("horizons_years", (2.0, 5.0)))
    at = survival.discrete_survival_at(pred["out"], bins, survival.horizons_in_days(years))
    for j, y in enumerate(years):
      cols[f"surv_{y:g}y"] = at[:, j]
  else:
    cols["log_hazard"] = pred["out"][:, 0]
  table = pd.DataFrame(cols)
  out.mkdir(parents=True)
  io_lib.write_csv_atomic(table, out / "predictions.csv")
  parts = {"input": dict(data, pred=pred, risk=risk, patient_id=cohort.patient_ids)}
  attention.write_attention_reports(out, parts, run.modalities, cohort.feature_names)
  return table
