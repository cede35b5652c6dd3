r"""Cross-validation driver: the fusion-zoo comparison tables on TCGA-BRCA.

Two experiments, laid out like HEALNet (Hemker et al., NeurIPS 2024) Tables 1
and 2 and CM-MMF (Deng et al.) Table 1:

* ``table``: 5 patient-level folds (``multimodal.cv_folds``: event-stratified,
  each fold's validation part carved from its training part); every entry
  (model, modality set) is trained on each fold's training part, selected on
  its validation part and scored on its test part (Harrell's C). A
  scikit-survival ``CoxnetSurvivalAnalysis`` baseline (elastic-net Cox,
  ``l1_ratio`` 0.5, standardisation fitted on the training part, the penalty
  ``alpha`` chosen by the validation C-index) runs on the same folds and
  features. Output: mean and SD over folds of the test C-index, rows =
  models, columns = modality sets (``table.md``, ``summary.csv``), each
  model's per-fold difference to Coxnet on the same modality set
  (``paired.csv``) and the per-fold long table (``folds.csv``).
* ``missing``: HEALNet Table 2. Each model is trained on all modalities, then
  its test part is scored with whole modalities dropped per patient at
  random (``multimodal.drop_modalities`` with probability p; ``p = 1`` keeps
  exactly one modality per patient, chosen uniformly: HEALNet's "50% omic +
  50% WSI" setting). Each model handles a missing modality as it is built
  to (``fusion_train.MISSING_BEHAVIOUR``: HEALNet skips the modality's
  update, CM-MMF renormalises its modality attention, concatenation sees a
  zero embedding and a presence flag, ...). A late-fusion row averages the
  unimodal models' risks over the modalities each patient has (HEALNet's
  "best uni-modal" XOR gate when one modality is left). The same random
  masks are used for every model.

Commands (run from the repository root)::

  python -m jaxsurv.cv table --out=runs/cv_table
  python -m jaxsurv.cv table --config=configs/healnet.py:local --out=runs/cv_healnet
  python -m jaxsurv.cv table --entries=cmmmf@clinical+rna+wsi,coxnet@clinical+rna+wsi \
      --out=runs/cv_wsi
  python -m jaxsurv.cv missing --out=runs/missing

Entries are ``model[:variant]@modalities`` (models:
``fusion_train.MODEL_NAMES`` and ``coxnet``; modalities '+'-joined from
clinical, rna, mirna, methylation, wsi); each uses ``configs/<model>.py``
(HEALNet, CM-MMF, PORPOISE) or ``configs/fusion.py:model=<model>``, in the
CPU-sized ``local`` variant unless ``--paper``, or in the named variant of a
config file that declares ``VARIANTS`` (``healnet:paper@clinical+rna``,
``healnet:released@clinical+rna``: the rows "HEALNet (paper)" and "HEALNet
(released)"; ``--models`` of ``missing`` takes the same names). ``--set key=value`` overrides a config field for every
entry (e.g. ``--set num_epochs=10``; repeatable), parsed as
``--config.key=value`` would be (``ml_collections.config_flags``: by the
field's type). ``table --config=FILE.py[:arg]`` runs one config file as an
entry (alone, or added to ``--entries``), with ``--config.key=value``
overrides of its own. A fold whose ``results.json`` exists with the same
config is reused (``--no-resume`` retrains). The flags are absl flags
(``--flag=value`` or ``--flag value``; lists comma-separated, e.g.
``--folds=0,1``); errors end as ``jaxsurv.cli`` describes.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import pathlib
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import ml_collections
import numpy as np
import pandas as pd
from absl import app, flags
from ml_collections import config_flags

from jaxsurv import io as io_lib
from jaxsurv import cli, evaluate, metrics
from jaxsurv import fusion_train as ft
from jaxsurv.data import multimodal
from jaxsurv.data import splits as splits_lib
from jaxsurv.errors import UserError

log = logging.getLogger("jaxsurv")

# The default `table` entries: the brief's list (unimodal clinical and RNA,
# concatenation, CM-MMF, HEALNet, PORPOISE and Coxnet on clinical + RNA).
# HEALNet appears three times: ``local`` (CPU-tuned), the authors' released
# settings and the paper's (configs/healnet.py).
TABLE_ENTRIES = (
    "unimodal@clinical", "unimodal@rna", "concat@clinical+rna", "cmmmf@clinical+rna",
    "healnet@clinical+rna", "healnet:released@clinical+rna", "healnet:paper@clinical+rna",
    "porpoise@clinical+rna",
    "coxnet@clinical", "coxnet@rna", "coxnet@clinical+rna",
)
# Added by --with-wsi: the synthetic PAM50-driven WSI bags.
WSI_ENTRIES = ("cmmmf@clinical+rna+wsi", "healnet@clinical+rna+wsi",
               "healnet:released@clinical+rna+wsi", "healnet:paper@clinical+rna+wsi",
               "porpoise@rna+wsi", "unimodal@wsi", "coxnet@clinical+rna+wsi")
MISSING_MODELS = ("healnet", "healnet:released", "healnet:paper", "cmmmf", "concat", "mean",
                  "porpoise", "early_fusion")
COXNET = "coxnet"

# Row labels and fusion designs (CM-MMF Table 1 style).
MODEL_LABELS = {
    "unimodal": ("Unimodal", "SNN (tabular) / AMIL (WSI)", "None"),
    "concat": ("Concatenation", "SNN / AMIL", "Concatenation"),
    "mean": ("Mean vector", "SNN / AMIL", "Mean-vector"),
    "bilinear": ("Bilinear", "SNN / AMIL", "Gated Kronecker"),
    "porpoise": ("PORPOISE", "SNN / AMIL", "Gated bilinear (late)"),
    "cmmmf": ("CM-MMF", "SNN / AMIL", "Cross-modality attention"),
    "healnet": ("HEALNet", "HEALNet", "Hybrid early fusion"),
    "early_fusion": ("Early fusion", "HEALNet", "Concatenated input"),
    COXNET: ("Coxnet", "Elastic-net Cox (sksurv)", "Concatenated features"),
    "late_unimodal": ("Unimodal late fusion", "SNN per modality", "Mean risk of present"),
}


def split_variant(name: str) -> tuple[str, str]:
  """``"healnet:paper"`` -> ``("healnet", "paper")``; ``"concat"`` -> ``("concat", "")``."""
  model, _, variant = name.partition(":")
  return model, variant


def model_label(name: str) -> tuple[str, str, str]:
  """``(row label, backbone, fusion)`` of a table model name, e.g. ``"HEALNet (paper)"``."""
  model, variant = split_variant(name)
  label, backbone, fusion = MODEL_LABELS.get(model, (model, "", ""))
  return (f"{label} ({variant})" if variant else label), backbone, fusion


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]):
  """Applies ``"a.b=value"`` overrides as ``--config.a.b=value`` would (a new config).

  Values are parsed by ``ml_collections.config_flags`` from the field's type
  (int, float, bool, str; a tuple as a Python literal, e.g.
  ``data.stratify="('event', 'pam50')"``); a new field is
  allowed under ``model`` only (``config.model`` holds model kwargs; any
  field of the model class may be added and ``build_model`` rejects unknown
  ones), where its value is parsed as a Python literal.

  Raises:
    UserError: malformed override, unknown field, or a value the field's
      type cannot take.
  """
  config = ml_collections.ConfigDict(config.copy_and_resolve_references())
  pairs: dict[str, str] = {}
  for item in overrides:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
      raise UserError(f"override {item!r} must be key=value")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UserError(f"override {item!r}: unknown config field {'.'.join(parents[:i + 1])!r}")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or (leaf not in node
                                                           and parents != ["model"]):
      raise UserError(f"override {item!r}: unknown config field {key!r}")
    pairs.pop(key, None)
    pairs[key] = raw
  if not pairs:
    return config
  argv = ["jaxsurv.cv"] + [f"--set.{k}={v}" for k, v in pairs.items()]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_dict("set", config, flag_values=fv, lock_config=False,
                                  accept_new_attributes=True, sys_argv=argv)
  try:
    fv(argv)
  except (flags.Error, ValueError, TypeError) as e:
    raise UserError(f"--set {', '.join(f'{k}={v}' for k, v in pairs.items())}: {e}") from e
  return fv["set"].value


def _config_module(name: str):
  """``configs.<name>`` (the repository's config package; run from the repository root)."""
  try:
    return importlib.import_module(f"configs.{name}")
  except ModuleNotFoundError as e:
    if e.name not in ("configs", f"configs.{name}"):
      raise
    raise UserError(f"cannot import configs.{name}: run from the repository root (or put it on "
                    "PYTHONPATH)") from e


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row/column cell of the table: a model on a modality set.

  ``model`` is the table's model name: a model of ``fusion_train.MODEL_NAMES``
  or ``coxnet``, optionally with a config variant (``"healnet:paper"``).
  """
  model: str
  modalities: str  # '+'-joined, e.g. "clinical+rna+wsi"
  config: Any = None  # ml_collections.ConfigDict (None for Coxnet)

  @property
  def key(self) -> str:
    return f"{self.model.replace(':', '-')}__{self.modalities.replace('+', '-')}"


def modality_label(config) -> str:
  """'+'-joined modality set of a config (``wsi`` last when bags are on)."""
  mods = list(config.data.modalities)
  if config.data.get("wsi") is not None:
    mods.append("wsi")
  return "+".join(mods)


# Models with a config file of their own (configs/<model>.py); the others use configs/fusion.py.
OWN_CONFIGS = ("healnet", "cmmmf", "porpoise")


def entry_config(model: str, modalities: str, *, paper: bool = False,
                 overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config of ``model[:variant]@modalities``.

  ``configs/<model>.py`` (HEALNet, CM-MMF, PORPOISE) or
  ``configs/fusion.py:model=<model>``: the named variant if ``model`` has one
  (``"healnet:paper"``; the config file must list it in ``VARIANTS``), else
  ``local`` unless ``paper``.

  Raises:
    UserError: an unknown variant, bad modalities (the config's
      ``get_config`` rejects them) or a bad override (:func:`apply_overrides`).
  """
  model, named = split_variant(model)
  if named:
    known = getattr(_config_module(model), "VARIANTS", ()) if model in OWN_CONFIGS else ()
    if named not in known:
      raise UserError(f"{model}:{named}@{modalities}: unknown variant {named!r}; "
                      f"configs/{model}.py has {tuple(known) or 'none'}")
    variant = f",{named}"
  else:
    variant = "" if paper else ",local"
  if model in OWN_CONFIGS:
    module, arg = _config_module(model), f"modalities={modalities}{variant}"
  else:
    module, arg = _config_module("fusion"), f"model={model},modalities={modalities}{variant}"
  try:
    config = module.get_config(arg)
  except ValueError as e:
    raise UserError(f"{model}@{modalities}: {e}") from e
  return apply_overrides(config, overrides)


def parse_entries(specs: Sequence[str], *, paper: bool = False,
                  overrides: Sequence[str] = ()) -> list[Entry]:
  """``["healnet@clinical+rna", "coxnet@clinical"]`` -> entries with configs.

  Raises:
    UserError (a ValueError): a malformed entry, unknown model or modality,
      or a bad override.
  """
  out = []
  for spec in specs:
    model, sep, mods = spec.partition("@")
    if not sep or not mods:
      raise UserError(f"entry {spec!r} must be model@modalities, e.g. healnet@clinical+rna")
    if model == COXNET:
      out.append(Entry(model, mods, None))
      continue
    if split_variant(model)[0] not in ft.MODEL_NAMES:
      raise UserError(f"entry {spec!r}: unknown model {model!r}; known: "
                      f"{ft.MODEL_NAMES + (COXNET,)}")
    out.append(Entry(model, mods, entry_config(model, mods, paper=paper, overrides=overrides)))
  return out


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


class CohortCache:
  """Loads each modality set's cohort once; the folds once for all of them.

  The folds depend only on the patients and their events, so every modality
  set of TCGA-BRCA (same 739 patients) gets the same folds.
  """

  def __init__(self, n_folds: int = 5, fold_seed: int = 0, val_fraction: float = 0.15,
               stratify: Sequence[str] = ("event",), wsi_kwargs: Mapping | None = None,
               loader=None):
    """Args: fold settings (``multimodal.cv_folds``); ``wsi_kwargs`` for
    cohorts named by a modality string; ``loader(modalities=..., wsi=...,
    seed=..., **wsi_kwargs)`` builds a cohort (default
    ``multimodal.load_tcga_brca``; tests pass a synthetic one)."""
    self.n_folds, self.fold_seed, self.val_fraction = n_folds, fold_seed, val_fraction
    self.stratify = tuple(stratify)
    self.wsi_kwargs = dict(wsi_kwargs or {})
    self.loader = loader or multimodal.load_tcga_brca
    self._cohorts: dict = {}
    self._folds = None

  def cohort(self, config_or_modalities) -> multimodal.MultimodalCohort:
    """The cohort of a config (its ``data``) or of a '+'-joined modality set."""
    if isinstance(config_or_modalities, str):
      try:
        tab, with_wsi = _config_module("fusion").parse_modalities(config_or_modalities)
      except ValueError as e:
        raise UserError(str(e)) from e
      wsi, wsi_kwargs, seed = ("pam50" if with_wsi else None), self.wsi_kwargs, 0
    else:
      d = config_or_modalities.data
      tab, wsi, seed = tuple(d.modalities), d.get("wsi"), d.get("wsi_seed", 0)
      wsi_kwargs = dict(d.get("wsi_kwargs", {}) or {}) if wsi is not None else {}
    wsi_kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in wsi_kwargs.items()}
    key = (tab, wsi, seed, json.dumps(wsi_kwargs, sort_keys=True, default=str))
    if key not in self._cohorts:
      self._cohorts[key] = self.loader(modalities=tab, wsi=wsi, seed=seed,
                                       **(wsi_kwargs if wsi else {}))
    return self._cohorts[key]

  def folds(self, cohort: multimodal.MultimodalCohort) -> list[splits_lib.Split]:
    if self._folds is None:
      self._folds = multimodal.cv_folds(cohort, self.n_folds, seed=self.fold_seed,
                                        val_fraction=self.val_fraction,
                                        stratify=self.stratify)
    ids = set(cohort.patient_ids)
    if any(set(f.test) - ids for f in self._folds):
      raise ValueError("the cached folds name patients absent from this cohort")
    return self._folds


# ----------------------------------------------------------------------------
# Coxnet baseline.
# ----------------------------------------------------------------------------


def coxnet_features(data: Mapping, modalities) -> np.ndarray:
  """``[n, features]`` design matrix from a transformed part.

  Tabular modalities are already standardised on the training part (0 where
  absent, i.e. mean imputation); a bag modality contributes the mean of its
  valid tiles (0 if absent).
  """
  cols = []
  for m, kind in modalities:
    x = np.asarray(data["inputs"][m], np.float64)
    if kind == "bag":
      mask = np.asarray(data["inputs"][m + multimodal.TILE_MASK_SUFFIX], bool)
      x = (x * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    cols.append(x)
  return np.concatenate(cols, axis=1)


def coxnet_fold(cohort: multimodal.MultimodalCohort, split: splits_lib.Split, *,
                l1_ratio: float = 0.5, n_alphas: int = 50, alpha_min_ratio: float = 0.01,
                max_iter: int = 100_000) -> dict:
  """Elastic-net Cox (scikit-survival) on one fold; alpha chosen on val.

  Features are the fold's ``FoldTransform`` (fitted on the training part:
  training mean/SD standardisation; bags as mean tile features). The
  regularisation path is fitted on the training part only; the validation
  C-index picks ``alpha`` (ties go to the larger, i.e. sparser, model); the
  test C-index is reported for that alpha.

  Returns:
    ``{"val": {"cindex", "n", "events"}, "test": {...}, "alpha",
    "n_nonzero", "n_features", "seconds", "test_risk" [n_test]}``.

  Raises:
    ValueError: from ``FoldTransform.fit`` (a modality with no present
      training patient) or no validation part.
  """
  from sksurv.linear_model import CoxnetSurvivalAnalysis
  from sksurv.util import Surv
  t0 = time.time()
  idx = cohort.indices(split)
  if len(idx["val"]) == 0:
    raise ValueError("Coxnet needs a validation part to choose alpha")
  transform = multimodal.FoldTransform.fit(cohort, idx["train"], fold=split.meta.get("fold"))
  mods = ft.model_modalities(cohort)
  parts = {p: transform.transform(cohort, idx[p]) for p in ("train", "val", "test")}
  x = {p: coxnet_features(d, mods) for p, d in parts.items()}
  y = Surv.from_arrays(parts["train"]["event"].astype(bool), parts["train"]["duration"])
  model = CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, n_alphas=n_alphas,
                                 alpha_min_ratio=alpha_min_ratio, max_iter=max_iter,
                                 fit_baseline_model=False)
  model.fit(x["train"], y)
  val = parts["val"]
  best = (-np.inf, None)
  for a in model.alphas_:  # Descending: sparser models first win ties.
    r = model.predict(x["val"], alpha=a)
    try:
      c = metrics.concordance_index(val["duration"], val["event"], r)
    except ValueError:
      continue
    if c > best[0] + 1e-12:
      best = (c, a)
  alpha = best[1] if best[1] is not None else model.alphas_[0]
  out = {"alpha": float(alpha), "n_features": int(x["train"].shape[1])}
  coef = model.coef_[:, int(np.argmin(np.abs(model.alphas_ - alpha)))]
  out["n_nonzero"] = int(np.sum(coef != 0))
  for p in ("val", "test"):
    r = model.predict(x[p], alpha=alpha)
    try:
      c = metrics.concordance_index(parts[p]["duration"], parts[p]["event"], r)
    except ValueError:
      c = None
    out[p] = {"cindex": c, "n": int(len(r)), "events": int(parts[p]["event"].sum())}
    out[f"{p}_risk"] = r
  out["seconds"] = time.time() - t0
  return out


# ----------------------------------------------------------------------------
# The comparison table.
# ----------------------------------------------------------------------------


def _config_json(config) -> str:
  d = json.loads(config.to_json_best_effort())
  d.pop("progress_bar", None)
  return json.dumps(d, sort_keys=True)


def _row(entry: Entry, fold: int, res: Mapping) -> dict:
  return {"model": entry.model, "modalities": entry.modalities, "fold": fold,
          "val_cindex": res["val"]["cindex"], "test_cindex": res["test"]["cindex"],
          "val_loss": res["val"].get("loss"), "test_loss": res["test"].get("loss"),
          "best_epoch": res.get("best_epoch"), "epochs_run": res.get("epochs_run"),
          "n_params": res.get("n_params"), "alpha": res.get("alpha"),
          "n_nonzero": res.get("n_nonzero"), "n_train": res.get("n_train"),
          "n_test": res["test"]["n"], "test_events": res["test"]["events"],
          "seconds": res.get("seconds")}


def run_table(entries: Sequence[Entry], out: str | pathlib.Path, *,
              folds: Sequence[int] | None = None, cache: CohortCache | None = None,
              resume: bool = True, progress: bool = True, verbose: bool = False,
              coxnet_kwargs: Mapping | None = None) -> pd.DataFrame:
  """Runs every entry on every fold; writes per-fold outputs and the tables.

  Args:
    entries: from :func:`parse_entries`.
    out: output folder: ``runs/<entry>/fold<k>/`` (``results.json``,
      ``predictions.csv``, attention CSVs), ``folds.csv``, ``summary.csv``,
      ``table.md``.
    folds: fold numbers to run (default all).
    cache: cohorts and folds (default: 5 folds, seed 0, 15% validation).
    resume: reuse a fold whose ``results.json`` has the same config.
    progress: outer tqdm bar over (entry, fold); ``verbose`` adds the
      per-epoch bars.
    coxnet_kwargs: passed to :func:`coxnet_fold`.

  Returns:
    The long per-fold DataFrame (also ``folds.csv``).
  """
  from tqdm.auto import tqdm
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cache = cache or CohortCache()
  rows, stability = [], []
  first = cache.cohort(entries[0].config if entries[0].config is not None
                       else entries[0].modalities)
  all_folds = cache.folds(first)
  fold_ids = list(range(len(all_folds))) if folds is None else list(folds)
  bar = tqdm(total=len(entries) * len(fold_ids), desc="cv", unit="fold", dynamic_ncols=True,
             disable=not progress)
  for entry in entries:
    cohort = cache.cohort(entry.config if entry.config is not None else entry.modalities)
    fsplits = cache.folds(cohort)
    trainer = None
    for k in fold_ids:
      wd = out / "runs" / entry.key / f"fold{k}"
      bar.set_postfix(entry=f"{entry.model}@{entry.modalities}", fold=k)
      if entry.model == COXNET:
        res = coxnet_fold(cohort, fsplits[k], **(coxnet_kwargs or {}))
        wd.mkdir(parents=True, exist_ok=True)
        io_lib.write_json_atomic({k2: v for k2, v in res.items() if not k2.endswith("_risk")},
                                   wd / "results.json")
      else:
        cfg_json = _config_json(entry.config)
        done = wd / "results.json"
        if resume and done.exists() and (wd / "config.json").exists() \
            and (wd / "config.json").read_text() == cfg_json:
          res = json.loads(done.read_text())
        else:
          if trainer is None:
            trainer = ft.FusionTrainer(entry.config, ft.model_modalities(cohort))
          res, _ = ft.run_fold(trainer, cohort, fsplits[k], wd, progress=verbose)
          (wd / "config.json").write_text(cfg_json)
      rows.append(_row(entry, k, res))
      bar.update(1)
      pd.DataFrame(rows).to_csv(out / "folds.csv", index=False)
    if entry.model != COXNET:
      stability += attention_stability(out, entry, fold_ids)
  bar.close()
  df = pd.DataFrame(rows)
  write_table(df, out, stability=pd.DataFrame(stability))
  return df


# Top-k size of the fold-stability comparison: 20 (HEALNet Fig. 3 scale) or a
# quarter of the modality's features when it has fewer than 80.
STABILITY_TOP_K = 20


def stability_top_k(n_features: int) -> int:
  """``min(20, max(1, n_features // 4))``: the top-k compared between folds."""
  return min(STABILITY_TOP_K, max(1, n_features // 4))


def attention_stability(out: pathlib.Path, entry: Entry, fold_ids: Sequence[int]) -> list[dict]:
  """HEALNet per-feature attention ranking across the folds of one entry.

  Reads each fold's ``healnet_feature_ranking_<m>_test.csv`` (written by
  ``attention.write_attention_reports`` for per-feature tokens: features
  ranked by mean attention over the fold's test patients), and writes, for
  every modality ranked in at least two folds,
  ``attention/<entry>/feature_ranking_<m>.csv`` (the combined ranking of
  ``attention.ranking_stability``) and ``stability_<m>.json`` (the pairwise
  top-k overlaps, their mean and minimum, and the chance level k / features).

  Returns:
    One summary row per modality ranked (empty for models without
    per-feature attention).
  """
  from jaxsurv import attention as attention_lib
  prefix, suffix = "healnet_feature_ranking_", "_test.csv"
  found: dict = {}
  for k in fold_ids:
    wd = out / "runs" / entry.key / f"fold{k}"
    for f in sorted(wd.glob(f"{prefix}*{suffix}")):
      found.setdefault(f.name[len(prefix):-len(suffix)], {})[k] = pd.read_csv(f)
  rows = []
  for m, rankings in found.items():
    if len(rankings) < 2:
      continue
    n = len(next(iter(rankings.values())))
    combined, summary = attention_lib.ranking_stability(rankings, top_k=stability_top_k(n))
    dest = out / "attention" / entry.key
    dest.mkdir(parents=True, exist_ok=True)
    io_lib.write_csv_atomic(combined, dest / f"feature_ranking_{m}.csv")
    io_lib.write_json_atomic(summary, dest / f"stability_{m}.json")
    top = ", ".join(combined["feature"].astype(str).head(5))
    rows.append({"Model": model_label(entry.model)[0], "modalities": entry.modalities,
                 "attention over": m, "features": n, "top k": summary["top_k"],
                 "mean overlap": f"{summary['mean_overlap']:.2f}",
                 "min overlap": f"{summary['min_overlap']:.2f}",
                 "chance": f"{summary['chance_overlap']:.2f}",
                 "in every fold's top k": len(summary["in_all_folds"]),
                 "highest mean attention": top})
  return rows


def _fmt(values: Sequence[float]) -> str:
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  if v.size == 0:
    return "–"
  sd = v.std(ddof=1) if v.size > 1 else float("nan")
  return f"{v.mean():.3f} ± {sd:.3f}" if v.size > 1 else f"{v.mean():.3f}"


def summary_table(df: pd.DataFrame, value: str = "test_cindex") -> pd.DataFrame:
  """Rows = models, columns = modality sets; cells "mean ± SD" over folds.

  Leading columns ``Model``, ``Backbone``, ``Fusion`` (CM-MMF Table 1
  style); models and modality sets keep their first-appearance order.
  """
  models = list(dict.fromkeys(df["model"]))
  mods = list(dict.fromkeys(df["modalities"]))
  rows = []
  for m in models:
    label, backbone, fusion = model_label(m)
    row = {"Model": label, "Backbone": backbone, "Fusion": fusion}
    for s in mods:
      sel = df[(df["model"] == m) & (df["modalities"] == s)]
      row[s] = _fmt(sel[value].tolist()) if len(sel) else "–"
    rows.append(row)
  return pd.DataFrame(rows)


def paired_table(df: pd.DataFrame, reference: str = COXNET,
                 value: str = "test_cindex") -> pd.DataFrame:
  """Per-fold differences to a reference model on the same modality set.

  The folds are shared, so the difference ``C(model) - C(reference)`` per
  fold removes the fold-to-fold variation that dominates the SDs of
  :func:`summary_table` (on TCGA-BRCA, test parts of ~150 patients and ~14
  events).

  Args:
    df: the long per-fold table (``folds.csv``).
    reference: the model every other model is compared with.
    value: the per-fold column compared.

  Returns:
    One row per (model, modality set) that the reference also ran, with
    ``Model``, ``modalities``, ``folds`` (folds where both are defined),
    ``difference`` ("mean ± SD", ddof=1), ``better`` ("k/n": folds where the
    model is above the reference); empty if the reference did not run.
  """
  ref = df[df["model"] == reference].set_index(["modalities", "fold"])[value]
  rows = []
  for (m, mods), sel in df[df["model"] != reference].groupby(["model", "modalities"],
                                                              sort=False):
    pairs = [(v, ref.get((mods, f))) for f, v in zip(sel["fold"], sel[value])]
    d = np.asarray([a - b for a, b in pairs
                    if a is not None and b is not None and np.isfinite(a) and np.isfinite(b)])
    if d.size == 0:
      continue
    rows.append({"Model": model_label(m)[0], "modalities": mods, "folds": d.size,
                 "difference": _fmt(d.tolist()), "better": f"{int((d > 0).sum())}/{d.size}"})
  return pd.DataFrame(rows, columns=["Model", "modalities", "folds", "difference", "better"])


def to_markdown(table: pd.DataFrame) -> str:
  """A GitHub-Markdown table of a DataFrame of strings."""
  cols = list(table.columns)
  lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  for _, r in table.iterrows():
    lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
  return "\n".join(lines)


def write_table(df: pd.DataFrame, out: pathlib.Path,
                stability: pd.DataFrame | None = None) -> None:
  """Writes ``summary.csv`` (test), ``summary_val.csv``, ``paired.csv``
  (:func:`paired_table`, when Coxnet ran), ``attention_stability.csv`` (the
  rows of :func:`attention_stability`, when given) and ``table.md``."""
  test = summary_table(df, "test_cindex")
  val = summary_table(df, "val_cindex")
  test.to_csv(out / "summary.csv", index=False)
  val.to_csv(out / "summary_val.csv", index=False)
  n_folds = df["fold"].nunique()
  text = [f"Test C-index (Harrell), mean ± SD (ddof=1) over {n_folds} patient-level folds",
          "", to_markdown(test), "",
          "Validation C-index of the selected models (each config's ``selection``; Coxnet: "
          "the best validation C-index over the alpha path; a maximum over epochs or alphas "
          "is optimistic):", "", to_markdown(val), ""]
  paired = paired_table(df)
  (out / "paired.csv").unlink(missing_ok=True)  # No stale comparison from an earlier run.
  if len(paired):
    paired.to_csv(out / "paired.csv", index=False)
    text += ["Test C-index minus Coxnet's on the same folds and modality set (mean ± SD over "
             "folds; better = folds above Coxnet):", "", to_markdown(paired), ""]
  (out / "attention_stability.csv").unlink(missing_ok=True)
  if stability is not None and len(stability):
    stability.to_csv(out / "attention_stability.csv", index=False)
    text += ["HEALNet per-feature attention (mean over layers, heads, latents and each fold's "
             "test patients): overlap of the folds' top-k features, |top_a & top_b| / k, "
             "mean and minimum over fold pairs; chance = k / features "
             "(attention/<entry>/feature_ranking_<m>.csv has the combined ranking):", "",
             to_markdown(stability), ""]
  (out / "table.md").write_text("\n".join(text))


# ----------------------------------------------------------------------------
# Missing modalities at test time.
# ----------------------------------------------------------------------------


def missing_masks(presence: Mapping[str, np.ndarray], p: float, *, seed: int, fold: int,
                  repeat: int) -> dict:
  """The random test-time presence of one (p, fold, repeat), shared by all models."""
  key = [int(seed), int(fold), int(repeat), int(round(p * 1000))]
  return multimodal.drop_modalities(presence, np.random.default_rng(key), p)


def run_missing(models: Sequence[str], modalities: str, out: str | pathlib.Path, *,
                ps: Sequence[float] = (0.0, 0.25, 0.5, 1.0), repeats: int = 5,
                late_unimodal: bool = True, paper: bool = False,
                overrides: Sequence[str] = (), folds: Sequence[int] | None = None,
                cache: CohortCache | None = None, seed: int = 0, progress: bool = True,
                verbose: bool = False) -> pd.DataFrame:
  """HEALNet Table 2 style experiment (see the module docstring).

  Args:
    models: fusion model names trained on all of ``modalities``.
    modalities: '+'-joined modality set (at least two).
    out: output folder (``missing_folds.csv``, ``missing.csv``,
      ``missing.md``).
    ps: per-(patient, modality) drop probabilities at test time.
    repeats: random masks per (fold, p); the fold's C-index is their mean.
    late_unimodal: also train one unimodal model per modality and score the
      mean of the present modalities' risks.
    paper, overrides: config variant and ``key=value`` overrides.
    folds, cache, seed, progress, verbose: as :func:`run_table`.

  Returns:
    The long per-fold DataFrame (model, p, fold, test_cindex, ...).

  Raises:
    UserError (a ValueError): fewer than two modalities, p outside [0, 1].
  """
  from tqdm.auto import tqdm
  if len(modalities.split("+")) < 2:
    raise UserError(f"the missing-modality experiment needs >= 2 modalities, got "
                    f"{modalities!r}")
  if any(not 0 <= p <= 1 for p in ps):
    raise UserError(f"drop probabilities must be in [0, 1], got {list(ps)}")
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  cache = cache or CohortCache()
  mods = modalities.split("+")
  jobs = [(m, modalities) for m in models]
  if late_unimodal:
    jobs += [("unimodal", m) for m in mods]
  configs = {job: entry_config(job[0], job[1], paper=paper, overrides=overrides)
             for job in jobs}
  full = cache.cohort(configs[jobs[0]])
  fsplits = cache.folds(full)
  fold_ids = list(range(len(fsplits))) if folds is None else list(folds)
  rows = []
  unimodal_risk: dict = {}  # (fold, modality) -> {patient_id: risk}
  bar = tqdm(total=len(jobs) * len(fold_ids), desc="missing", unit="fold", dynamic_ncols=True,
             disable=not progress)
  for job in jobs:
    model, mset = job
    cfg = configs[job]
    cohort = cache.cohort(cfg)
    trainer = ft.FusionTrainer(cfg, ft.model_modalities(cohort))
    for k in fold_ids:
      bar.set_postfix(model=f"{model}@{mset}", fold=k)
      wd = out / "runs" / Entry(model, mset).key / f"fold{k}"
      res, run = ft.run_fold(trainer, cohort, fsplits[k], wd, progress=verbose)
      if model == "unimodal":
        test_ids = cohort.patient_ids[run.idx["test"]]
        _, data = trainer.evaluate(run, cohort, "test")
        unimodal_risk[k, mset] = dict(zip(test_ids, data["risk"]))
      else:
        test_idx = run.idx["test"]
        base = {m: cohort.presence[m][test_idx] for m in cohort.modalities}
        for p in ps:
          cs, kept = [], []
          for r in range(repeats if p > 0 else 1):
            pres = missing_masks(base, p, seed=seed, fold=k, repeat=r)
            res_p, _ = trainer.evaluate(run, cohort, "test", presence=pres)
            cs.append(res_p["cindex"])
            kept.append(np.mean([pres[m].mean() for m in pres]))
          rows.append({"model": model, "modalities": mset, "p": p, "fold": k,
                       "test_cindex": float(np.mean([c for c in cs if c is not None])),
                       "present_fraction": float(np.mean(kept)),
                       "val_cindex": res["val"]["cindex"], "best_epoch": res["best_epoch"]})
      bar.update(1)
  bar.close()
  if late_unimodal:
    for k in fold_ids:
      split = fsplits[k]
      idx = full.indices(split)["test"]
      ids = full.patient_ids[idx]
      base = {m: full.presence[m][idx] for m in full.modalities}
      risks = np.stack([[unimodal_risk[k, m][i] for i in ids] for m in mods], axis=1)
      event, duration = full.event[idx], full.duration[idx]
      for p in ps:
        cs, kept = [], []
        for r in range(repeats if p > 0 else 1):
          pres = missing_masks(base, p, seed=seed, fold=k, repeat=r)
          have = np.stack([pres[m] for m in mods], axis=1)
          risk = np.where(have, risks, 0.0).sum(1) / np.maximum(have.sum(1), 1)
          cs.append(metrics.concordance_index(duration, event, risk))
          kept.append(have.mean())
        rows.append({"model": "late_unimodal", "modalities": modalities, "p": p, "fold": k,
                     "test_cindex": float(np.mean(cs)), "present_fraction": float(np.mean(kept)),
                     "val_cindex": None, "best_epoch": None})
  df = pd.DataFrame(rows)
  df.to_csv(out / "missing_folds.csv", index=False)
  write_missing_table(df, out, repeats=repeats)
  return df


def _p_label(p: float) -> str:
  if p == 0:
    return "all present (p=0)"
  if p == 1:
    return "one modality each (p=1)"
  return f"p={p:g}"


def write_missing_table(df: pd.DataFrame, out: pathlib.Path, *, repeats: int) -> pd.DataFrame:
  """Rows = models, columns = drop probabilities; ``missing.csv``/``missing.md``."""
  rows = []
  for m in dict.fromkeys(df["model"]):
    label = model_label(m)[0]
    row = {"Model": label,
           "Missing modality handling": ft.MISSING_BEHAVIOUR.get(
               split_variant(m)[0], "mean of the unimodal risks of the present modalities")}
    for p in sorted(df["p"].unique()):
      sel = df[(df["model"] == m) & (df["p"] == p)]
      row[_p_label(p)] = _fmt(sel["test_cindex"].tolist())
    rows.append(row)
  table = pd.DataFrame(rows)
  table.to_csv(out / "missing.csv", index=False)
  frac = df.groupby("p")["present_fraction"].mean()
  notes = ", ".join(f"p={p:g}: {f:.2f}" for p, f in frac.items())
  text = [f"Test C-index, mean ± SD over {df['fold'].nunique()} folds; each fold's value is "
          f"the mean over {repeats} random test-time masks (p > 0). Models trained with all "
          f"modalities present. Fraction of (patient, modality) pairs kept: {notes}.", "",
          to_markdown(table), ""]
  (out / "missing.md").write_text("\n".join(text))
  return table


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


COMMANDS = ("table", "missing")
_COMMON_FLAGS = ("out", "paper", "set", "folds", "n-folds", "fold-seed", "quiet", "verbose")
_COMMAND_FLAGS = {
    "table": ("entries", "config", "with-wsi", "no-coxnet", "no-resume", "l1-ratio"),
    "missing": ("models", "modalities", "p", "repeats", "no-late-unimodal"),
}


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """Defines the command's absl flags on ``fv``; ``argv`` carries ``--config.x=y`` overrides."""
  f = dict(flag_values=fv)
  flags.DEFINE_string("out", None, "output folder", **f)
  flags.DEFINE_boolean("paper", False, "paper settings (default: local)", **f)
  flags.DEFINE_multi_string("set", [], "KEY=VALUE config override for every entry (repeatable)",
                            **f)
  flags.DEFINE_list("folds", None, "folds to run, e.g. 0,1 (default: all)", **f)
  flags.DEFINE_integer("n-folds", 5, "number of folds", lower_bound=2, **f)
  flags.DEFINE_integer("fold-seed", 0, "seed of the folds", **f)
  flags.DEFINE_boolean("quiet", False, "no progress bar", **f)
  flags.DEFINE_boolean("verbose", False, "per-epoch progress bars", **f)
  # table
  flags.DEFINE_list("entries", None,
                    "table: model@modalities,... (default: " + ",".join(TABLE_ENTRIES) + ")", **f)
  config_flags.DEFINE_config_file(
      "config", None, "table: config file[:arg] to run as an entry (replaces the default "
      "entries unless --entries is given); --config.key=value overrides its fields",
      lock_config=False, sys_argv=list(argv), **f)
  flags.DEFINE_boolean("with-wsi", False, "table: add " + ",".join(WSI_ENTRIES), **f)
  flags.DEFINE_boolean("no-coxnet", False, "table: drop the Coxnet entries", **f)
  flags.DEFINE_boolean("no-resume", False, "table: retrain folds that have results", **f)
  flags.DEFINE_float("l1-ratio", 0.5, "table: Coxnet elastic-net mixing", **f)
  # missing
  flags.DEFINE_list("models", list(MISSING_MODELS), "missing: models trained on all modalities",
                    **f)
  flags.DEFINE_string("modalities", "clinical+rna", "missing: '+'-joined modality set", **f)
  flags.DEFINE_list("p", ["0.0", "0.25", "0.5", "1.0"],
                    "missing: test-time drop probabilities", **f)
  flags.DEFINE_integer("repeats", 5, "missing: random masks per fold and p", lower_bound=1, **f)
  flags.DEFINE_boolean("no-late-unimodal", False, "missing: no unimodal late-fusion row", **f)
  flags.mark_flag_as_required("out", flag_values=fv)


def _command(argv: Sequence[str], fv: flags.FlagValues) -> str:
  """The subcommand of ``argv``; UsageError for none, another, or a flag of the other one."""
  rest = list(argv[1:])
  if len(rest) != 1 or rest[0] not in COMMANDS:
    raise app.UsageError(f"expected one command, {' or '.join(COMMANDS)}; got {rest}")
  command = rest[0]
  other = [n for c, names in _COMMAND_FLAGS.items() if c != command for n in names
           if fv[n].present]
  if other:
    raise app.UsageError(f"{command}: {', '.join('--' + n for n in other)} "
                         f"belong{'s' if len(other) == 1 else ''} to the other command")
  return command


def _ints(values: Sequence[str] | None, flag: str) -> list[int] | None:
  try:
    return None if values is None else [int(v) for v in values]
  except ValueError:
    raise UserError(f"--{flag}: expected comma-separated integers, got {','.join(values)}") from None


def _main(argv: Sequence[str], fv: flags.FlagValues) -> int:
  """Runs ``table`` or ``missing`` on parsed flags; returns 0.

  Raises:
    absl.app.UsageError: no or an unknown command, or a flag of the other one.
    UserError: bad entries, overrides, folds or drop probabilities.
  """
  command = _command(argv, fv)
  logging.basicConfig(level=logging.WARNING)
  # The persistent compilation cache is set up by jaxsurv.cli.run (--compilation_cache).
  out = pathlib.Path(fv.out)
  overrides = list(fv.set)
  folds = _ints(fv.folds, "folds")
  # Coxnet entries name only a modality set: their WSI bags are those of the
  # deep models' configs (the local variant keeps at most 64 tiles).
  wsi_kwargs = dict(_config_module("fusion").base_config(
      "concat", "wsi", local=not fv.paper).data.wsi_kwargs)
  cache = CohortCache(n_folds=fv["n-folds"].value, fold_seed=fv["fold-seed"].value,
                      wsi_kwargs=wsi_kwargs)
  t0 = time.time()
  if command == "table":
    entries = []
    if fv["entries"].value is not None or not fv["config"].present:
      specs = list(fv["entries"].value or TABLE_ENTRIES)
      if fv["with-wsi"].value:
        specs += [e for e in WSI_ENTRIES if e not in specs]
      entries = parse_entries(specs, paper=fv.paper, overrides=overrides)
    if fv["config"].present:
      cfg = apply_overrides(cli.config_value(fv["config"]), overrides)
      entries.append(Entry(cfg.model.name, modality_label(cfg), cfg))
    if fv["no-coxnet"].value:
      entries = [e for e in entries if e.model != COXNET]
    if not entries:
      raise UserError("no entries left to run")
    run_table(entries, out, folds=folds, cache=cache, resume=not fv["no-resume"].value,
              progress=not fv.quiet, verbose=fv.verbose,
              coxnet_kwargs={"l1_ratio": fv["l1-ratio"].value})
    print((out / "table.md").read_text())
  else:
    try:
      ps = [float(x) for x in fv.p]
    except ValueError:
      raise UserError(f"--p: expected comma-separated numbers, got {','.join(fv.p)}") from None
    run_missing(list(fv.models), fv.modalities, out, ps=ps, repeats=fv.repeats,
                late_unimodal=not fv["no-late-unimodal"].value, paper=fv.paper,
                overrides=overrides, folds=folds, cache=cache, progress=not fv.quiet,
                verbose=fv.verbose)
    print((out / "missing.md").read_text())
  print(f"total {time.time() - t0:.0f} s")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """In-process entry point: ``argv`` without the program name; returns the exit status.

  Ends as ``jaxsurv.cli.call`` does (0; 2 with one message on stderr for a
  user or environment error; 1 for a usage or flag error).

  Raises:
    Exceptions that are bugs (see ``jaxsurv.cli``).
  """
  return cli.call(_main, define_flags, sys.argv[1:] if argv is None else argv,
                  prog="python -m jaxsurv.cv")


if __name__ == "__main__":
  cli.run(_main, define_flags=define_flags)
