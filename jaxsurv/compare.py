r"""MMNN's model comparison (the MMNN paper, Table 3), one command.

  python -m jaxsurv.compare mmnn --config=configs/mmnn.py:local --out=DIR [--seeds=3]
      [--rows=sarculator_coxph,...] [--config.num_epochs=...]

Every row is fitted on the same patient-level train/val/test split of the
configured cohort (``jaxsurv.train.make_splits``) and scored on the same
test patients:

* ``sarculator_coxph`` / ``sarculator_rsf``: the Sarculator nomogram's
  variables (age, tumour size, grade, histology: Callegaro et al., Lancet
  Oncol 2016), as far as the cohort has them (``config.compare.sarculator``),
  with scikit-survival's ``CoxPHSurvivalAnalysis`` and
  ``RandomSurvivalForest``;
* ``clinical_rsf``: the larger clinical model (the MMNN clinical variables,
  ``config.compare.clinical``) with a random survival forest;
* ``radiomics_rsf``, ``radiomics_clinical_rsf``, ``radiomics_clinical_coxnet``:
  the 200 PyRadiomics features of the preprocessed, masked volumes the
  networks see (``jaxsurv.radiomics``: 14 shape + 93 intensity/texture per
  channel, extracted once per cohort and cached), alone with a forest, and
  with the clinical variables with a forest and with an elastic-net Cox model
  whose alpha and l1_ratio are chosen by 5-fold CV on Harrell's C inside the
  training part (``fit_coxnet_cv``, ``config.compare.coxnet``);
* ``densenet``: the image-only network (``modalities=image``);
* ``mmnn_noblend``: the multimodal network with gradient blending off
  (fixed, equal head weights);
* ``mmnn``: the multimodal network as configured;
* ``oracle``: on a synthetic cohort with the true linear predictor
  (``eta_<outcome>`` columns, e.g. ``sarcoma_phantom``), its C-index on the
  same test patients: the ceiling of any model.

The classical rows take the variables from the cohort table (tumour size and
grade too, even where the networks' clinical table leaves them to the image:
the table says which rows saw them), standardised / one-hot encoded on the
training part (``jaxsurv.data.clinical.ClinicalPreprocessor``), one model
per outcome. The network rows train through the shared trainer
(``jaxsurv.train.train_and_evaluate``), once per seed (``--seeds``, seed =
``config.seed + k``), each in ``DIR/runs/<row>/seed_<k>`` (a killed run
resumes from its checkpoint; a finished one is reused).

Metrics per row and outcome (``jaxsurv.evaluate.evaluate_outcome``):
Harrell's C with its bootstrap SD, the integrated Brier score and the
cumulative/dynamic AUC at 5 years (Cox rows: Breslow baseline on the
training risks; forests: their own survival functions). The table says
whether each network's image branch started pretrained
(``model.image.init_from``) or from scratch. Network rows also
give the mean and SD of C over seeds, their trainable parameters and the
GFLOP of one patient's forward pass (XLA's cost analysis). Paired comparison: on the same
bootstrap resamples of the test patients (``metrics.bootstrap_weights``),
the seed-mean C of MMNN minus the seed-mean C of the row, with its 95%
percentile interval; "MMNN better" when the interval lies above 0.

Outputs: ``DIR/table3.csv``, ``DIR/table3.md`` (with a paragraph saying
whether MMNN beats each row, and links to the figures),
``DIR/figures/fig2_<outcome>.png`` (the paper's Fig. 2: 5-year ROC with
binormal smoothing and calibration per quintile against Kaplan-Meier, every
row with 5-year probabilities, ``jaxsurv.figures``; the numbers beside it as
CSV), ``DIR/localisation/<row>_<layer>.json`` / ``.md`` (where each network
row's Grad-CAM maps put their mass against chance, ``jaxsurv.localisation``;
the paper's Fig. 3 claim, measured; summarised in ``table3.md``),
``DIR/rows/<row>.json`` (finished rows, reused on a rerun) and
``DIR/compare.json`` (the config: a DIR made with another config is
refused).
"""

from __future__ import annotations

import copy
import json
import logging
import pathlib
import sys
import time
from typing import Mapping, Sequence

import ml_collections
import numpy as np
import pandas as pd
from absl import app
from absl import flags
from ml_collections import config_flags

from jaxsurv import cli
from jaxsurv import evaluate
from jaxsurv import io as io_lib
from jaxsurv.errors import UserError


CLASSICAL = ("sarculator_coxph", "sarculator_rsf", "clinical_rsf")
RADIOMICS = ("radiomics_rsf", "radiomics_clinical_rsf", "radiomics_clinical_coxnet")
NETWORKS = ("densenet", "mmnn_noblend", "mmnn")
ORACLE = "oracle"
ROWS = CLASSICAL + RADIOMICS + NETWORKS + (ORACLE,)
LABELS = {
    "sarculator_coxph": "Sarculator variables, CoxPH",
    "sarculator_rsf": "Sarculator variables, RSF",
    "clinical_rsf": "Clinical variables, RSF",
    "radiomics_rsf": "Radiomics, RSF",
    "radiomics_clinical_rsf": "Radiomics + clinical, RSF",
    "radiomics_clinical_coxnet": "Radiomics + clinical, elastic-net Cox",
    "densenet": "Unimodal DenseNet (image)",
    "mmnn_noblend": "MMNN without gradient blending",
    "mmnn": "MMNN",
    "oracle": "Oracle (true linear predictor)",
}
HORIZON_YEARS = 5.0


# ----------------------------------------------------------------------------
# Classical rows.
# ----------------------------------------------------------------------------


def split_variables(table: pd.DataFrame, names: Sequence[str]) -> tuple[list, list, list]:
  """``(numeric, categorical, missing)`` columns of ``names`` in ``table``.

  A column is numeric when its dtype is a number or bool, categorical
  otherwise (e.g. a size band ``"20-50"``).
  """
  numeric, categorical, missing = [], [], []
  for n in names:
    if n not in table.columns:
      missing.append(n)
    elif pd.api.types.is_numeric_dtype(table[n]) or pd.api.types.is_bool_dtype(table[n]):
      numeric.append(n)
    else:
      categorical.append(n)
  return numeric, categorical, missing


def design_matrices(table: pd.DataFrame, part_ids: Mapping[str, np.ndarray],
                    numeric: Sequence[str], categorical: Sequence[str]):
  """``({part: X [n, features]}, feature names)``, preprocessing fitted on ``train``.

  Numerics standardised and categoricals one-hot encoded on the training
  part, missing values imputed and flagged
  (``jaxsurv.data.clinical.ClinicalPreprocessor``); a level seen only outside
  training is all zeros.
  """
  from jaxsurv.data import clinical as clinical_lib  # pylint: disable=import-outside-toplevel
  by_id = table.set_index(table["patient_id"].astype(str))
  pre = clinical_lib.ClinicalPreprocessor(numeric=numeric, categorical=categorical,
                                          handle_unknown="ignore")
  pre.fit(by_id.loc[part_ids["train"]].reset_index(drop=True))
  xs = {p: pre.transform(by_id.loc[ids].reset_index(drop=True)).astype(np.float64)
        for p, ids in part_ids.items()}
  return xs, list(pre.feature_names)


def fit_classical(kind: str, x_train: np.ndarray, duration: np.ndarray, event: np.ndarray,
                  *, seed: int, rsf: Mapping | None = None, coxnet: Mapping | None = None):
  """A fitted scikit-survival model: ``"coxph"``, ``"rsf"`` or ``"coxnet"``.

  Args:
    kind: ``"coxph"`` (``CoxPHSurvivalAnalysis``, Breslow ties, a tiny ridge
      ``alpha=1e-4`` for collinear one-hot columns) or ``"rsf"``
      (``RandomSurvivalForest(**rsf, random_state=seed)``) or ``"coxnet"``
      (``fit_coxnet_cv(..., **coxnet)``).
    x_train: ``[n, features]``. duration: ``[n]`` days. event: ``[n]`` 0/1.

  Raises:
    ValueError: an unknown ``kind``.
  """
  from sksurv.util import Surv  # pylint: disable=import-outside-toplevel
  y = Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(duration, float))
  if kind == "coxph":
    from sksurv.linear_model import CoxPHSurvivalAnalysis  # pylint: disable=import-outside-toplevel
    return CoxPHSurvivalAnalysis(alpha=1e-4, ties="breslow").fit(x_train, y)
  if kind == "rsf":
    from sksurv.ensemble import RandomSurvivalForest  # pylint: disable=import-outside-toplevel
    return RandomSurvivalForest(**dict(rsf or {}), random_state=seed).fit(x_train, y)
  if kind == "coxnet":
    return fit_coxnet_cv(x_train, y, seed=seed, **dict(coxnet or {}))
  raise ValueError(f"kind must be 'coxph', 'rsf' or 'coxnet', got {kind!r}")


def _coxnet_path(x: np.ndarray, y, l1_ratio: float, alphas: np.ndarray | None, **kw):
  """A fitted ``CoxnetSurvivalAnalysis`` path, shortened from its small-alpha end on failure.

  PyRadiomics features are many and collinear, so the path can fail
  numerically at its smallest alphas (scikit-survival's ``ArithmeticError``:
  "weights are too large"); the path is then refitted down to a larger
  smallest alpha, halving the list each time. Returns ``(model, alphas
  fitted)``, or ``(None, [])`` when even the largest alpha fails. Without
  ``alphas``, the automatic path (``n_alphas``, ``alpha_min_ratio``) is
  tried with ``alpha_min_ratio`` raised to 0.05, 0.2, 0.5 in turn.
  """
  from sksurv.linear_model import CoxnetSurvivalAnalysis  # pylint: disable=import-outside-toplevel
  if alphas is None:  # The automatic path, its smallest alpha raised until it fits.
    ratio = float(kw.pop("alpha_min_ratio"))
    for r in (ratio, 0.05, 0.2, 0.5):
      if r < ratio:
        continue
      try:
        m = CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, alpha_min_ratio=r, **kw).fit(x, y)
        return m, np.asarray(m.alphas_, float)
      except ArithmeticError:
        pass
    return None, np.zeros(0)
  alphas = np.asarray(alphas, float)
  while len(alphas):
    try:
      return CoxnetSurvivalAnalysis(l1_ratio=l1_ratio, alphas=alphas).fit(x, y), alphas
    except ArithmeticError:
      alphas = alphas[: len(alphas) // 2]
  return None, alphas


def fit_coxnet_cv(x_train: np.ndarray, y, *, seed: int, l1_ratios=(0.1, 0.5, 0.9, 1.0),
                  n_alphas: int = 20, alpha_min_ratio: float = 0.01, folds: int = 5):
  """Elastic-net Cox with ``alpha`` and ``l1_ratio`` chosen by K-fold CV on Harrell's C.

  For each ``l1_ratio`` the candidate alphas are the regularisation path that
  ``sksurv.linear_model.CoxnetSurvivalAnalysis`` computes on the whole
  training part (``n_alphas``, down to ``alpha_min_ratio`` of the largest).
  On each of ``folds`` shuffled folds (``sklearn.model_selection.KFold``,
  ``random_state=seed``) the whole path is fitted once on the other folds
  (warm-started along the path) and every alpha scores Harrell's C on the
  held-out fold, as glmnet's ``cv.glmnet`` does (Friedman, Hastie &
  Tibshirani, J Stat Softw 33(1), 2010, Sec. 2.5); an alpha a fold could not
  fit scores NaN. The (alpha, l1_ratio) of the best mean C over folds is
  refitted on the whole training part, along the path down to that alpha (the
  MMNN paper, Methods, "Radiomics models": "5-fold CV and optimizing the
  concordance index").

  Args:
    x_train: ``[n, features]``, standardised. y: scikit-survival's structured
      array (``sksurv.util.Surv``).

  Returns:
    The refitted ``CoxnetSurvivalAnalysis`` (its ``predict`` uses the chosen
    alpha, the last of its path), with ``cv_best_`` = ``{"alpha",
    "l1_ratio", "cv_cindex"}``.

  Raises:
    ValueError: no (alpha, l1_ratio) could be fitted on every fold.
  """
  import warnings  # pylint: disable=import-outside-toplevel
  from sklearn.exceptions import ConvergenceWarning  # pylint: disable=import-outside-toplevel
  from sklearn.model_selection import KFold  # pylint: disable=import-outside-toplevel
  from sksurv.metrics import concordance_index_censored  # pylint: disable=import-outside-toplevel
  best = None
  event, time_ = y[y.dtype.names[0]], y[y.dtype.names[1]]
  splits = list(KFold(int(folds), shuffle=True, random_state=seed).split(x_train))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", (ConvergenceWarning, UserWarning))
    for l1 in l1_ratios:
      _, alphas = _coxnet_path(x_train, y, float(l1), None, n_alphas=int(n_alphas),
                               alpha_min_ratio=float(alpha_min_ratio))
      if not len(alphas):
        continue
      scores = np.full((len(splits), len(alphas)), np.nan)
      for f, (fit_idx, val_idx) in enumerate(splits):
        model, fitted = _coxnet_path(x_train[fit_idx], y[fit_idx], float(l1), alphas)
        for k, a in enumerate(fitted):
          try:
            scores[f, k] = concordance_index_censored(
                event[val_idx], time_[val_idx], model.predict(x_train[val_idx], alpha=a))[0]
          except ValueError:  # No comparable pair in this fold.
            pass
      mean = scores.mean(axis=0)  # NaN where any fold failed.
      if not np.isfinite(mean).any():
        continue
      k = int(np.nanargmax(mean))
      if best is None or mean[k] > best["cv_cindex"]:
        best = {"alpha": float(alphas[k]), "l1_ratio": float(l1), "cv_cindex": float(mean[k]),
                "path": alphas[: k + 1]}
    if best is None:
      raise ValueError("elastic-net Cox: no (alpha, l1_ratio) could be fitted on every CV fold")
    model, fitted = _coxnet_path(x_train, y, best["l1_ratio"], best.pop("path"))
    if model is None or not np.isclose(fitted[-1], best["alpha"]):
      raise ValueError(f"elastic-net Cox: the refit on the whole training part failed at alpha "
                       f"{best['alpha']:.4g}")
  model.cv_best_ = best
  return model


def _forest_survival(model, x: np.ndarray):
  """``survival_fn(times [T] days) -> [n, T]``: the forest's own step functions.

  ``S(t)`` is the forest's survival at the last of its event times ``<= t``
  (1 before the first).
  """
  surv = model.predict_survival_function(x, return_array=True)  # [n, unique event times]
  grid = np.asarray(model.unique_times_, float)
  surv = np.concatenate([np.ones((surv.shape[0], 1)), surv], axis=1)

  def fn(times):
    idx = np.searchsorted(grid, np.asarray(times, float), side="right")
    return surv[:, idx]
  return fn


def _targets(table: pd.DataFrame, ids: np.ndarray, outcomes: Sequence[str]):
  """``train.outcome_arrays`` of the patients ``ids``, in that order."""
  from jaxsurv import train  # pylint: disable=import-outside-toplevel
  return train.outcome_arrays(table.set_index(table["patient_id"].astype(str)).loc[ids],
                              outcomes)


ROW_SPECS = {
    # row: (variable list of config.compare, uses radiomics, model kind)
    "sarculator_coxph": ("sarculator", False, "coxph"),
    "sarculator_rsf": ("sarculator", False, "rsf"),
    "clinical_rsf": ("clinical", False, "rsf"),
    "radiomics_rsf": (None, True, "rsf"),
    "radiomics_clinical_rsf": ("clinical", True, "rsf"),
    "radiomics_clinical_coxnet": ("clinical", True, "coxnet"),
}


def _plain(c):
  return c.to_dict() if hasattr(c, "to_dict") else dict(c or {})


def _one_radiomics_flag(xs: Mapping[str, np.ndarray], features: Sequence[str]):
  """Keeps one ``__missing`` indicator for the radiomics features (where they agree).

  A patient without radiomics features lacks all of them, so the
  preprocessor's per-column indicators (``radiomics:<f>__missing``) are
  identical; one column, ``radiomics__missing``, says the same without
  giving a forest 200 copies of it to sample.
  """
  flags = [i for i, f in enumerate(features)
           if f.startswith("radiomics:") and f.endswith("__missing")]
  same = [i for i in flags[1:]
           if all(np.array_equal(x[:, i], x[:, flags[0]]) for x in xs.values())]
  if not same:
    return xs, list(features)
  keep = [i for i in range(len(features)) if i not in set(same)]
  names = [features[i] for i in keep]
  names[keep.index(flags[0])] = "radiomics__missing"
  return {p: x[:, keep] for p, x in xs.items()}, names


def classical_row(row: str, table: pd.DataFrame, part_ids: Mapping[str, np.ndarray],
                  config, radiomics_features: pd.DataFrame | None = None) -> dict:
  """Fits and evaluates one classical or radiomics row; ``{"skipped": reason}`` when it cannot run.

  Args:
    row: a key of :data:`ROW_SPECS`.
    table: the cohort table (``patient_id`` + variables + outcomes).
    part_ids: ``{"train"|"val"|"test": patient ids}``.
    config: the MMNN config (``config.compare``, ``config.data.outcomes``).
    radiomics_features: ``[patients, features]`` indexed by ``patient_id``
      (``jaxsurv.radiomics.cohort_features``) for the radiomics rows; a
      patient without features (NaN) is imputed and flagged like a missing
      clinical value.

  Returns:
    ``{"variables", "missing_variables", "features", "outcomes": {o: metrics},
    "test_risk": {o: [n_test]}, "test_p5y": {o: [n_test]}, ...}`` (NaN where the
    outcome is missing).
  """
  c = config.compare
  var_list, uses_radiomics, kind = ROW_SPECS[row]
  names = tuple(getattr(c, var_list)) if var_list else ()
  numeric, categorical, missing = split_variables(table, names)
  variables = numeric + categorical
  if uses_radiomics:
    if radiomics_features is None:
      return {"skipped": "the cohort has no images (no radiomics features)"}
    feats = radiomics_features.reindex(table["patient_id"].astype(str))
    table = pd.concat([table.reset_index(drop=True),
                       feats.reset_index(drop=True).add_prefix("radiomics:")], axis=1)
    numeric = numeric + [f"radiomics:{f}" for f in radiomics_features.columns]
    lacking = int(feats.isna().all(axis=1).sum())
    variables = [f"radiomics ({radiomics_features.shape[1]}"
                 + (f"; {lacking} patients without, imputed)" if lacking else ")")] + variables
  if not numeric and not categorical:
    return {"skipped": f"the cohort has none of the variables {list(names)}"}
  from jaxsurv import survival  # pylint: disable=import-outside-toplevel
  xs, features = design_matrices(table, part_ids, numeric, categorical)
  if uses_radiomics:
    xs, features = _one_radiomics_flag(xs, features)
  outcomes = tuple(config.data.outcomes)
  targets = {p: _targets(table, ids, outcomes) for p, ids in part_ids.items()}
  d_tr, e_tr, m_tr = targets["train"]
  h = float(survival.horizons_in_days([HORIZON_YEARS])[0])
  out = {"variables": variables, "missing_variables": missing, "features": len(features),
         "outcomes": {}, "test_risk": {}, "test_p5y": {}}
  for j, o in enumerate(outcomes):
    mt = m_tr[:, j]
    model = fit_classical(kind, xs["train"][mt], d_tr[mt, j], e_tr[mt, j], seed=config.seed,
                          rsf=_plain(c.rsf), coxnet=_plain(c.get("coxnet")))
    d, e, m = targets["test"]
    risk_test = model.predict(xs["test"][m[:, j]])
    risk_train = model.predict(xs["train"][mt])
    if kind == "rsf":
      fn = _forest_survival(model, xs["test"][m[:, j]])
    else:
      baseline = survival.BreslowBaseline.fit(risk_train, d_tr[mt, j], e_tr[mt, j])
      fn = lambda t, b=baseline, r=risk_test: b.survival(r, t)
    out["outcomes"][o] = evaluate.evaluate_outcome(
        risk=risk_test, duration=d[m[:, j], j], event=e[m[:, j], j], train_risk=risk_train,
        train_duration=d_tr[mt, j], train_event=e_tr[mt, j], horizons_years=(HORIZON_YEARS,),
        bootstrap_resamples=config.eval.bootstrap_resamples, seed=config.seed, survival_fn=fn)
    if kind == "coxnet":
      out["outcomes"][o]["cv_best"] = model.cv_best_
      out["outcomes"][o]["nonzero_coefficients"] = int(np.sum(np.abs(model.coef_[:, -1]) > 0))
    for key, values in (("test_risk", risk_test),
                        ("test_p5y", survival.event_probability(fn(np.array([h]))[:, 0]))):
      full = np.full(len(part_ids["test"]), np.nan)
      full[m[:, j]] = values
      out[key][o] = full.tolist()
  out["n_params"] = None
  return out


def oracle_row(table: pd.DataFrame, test_ids: np.ndarray, outcomes: Sequence[str],
               config) -> dict:
  """Harrell's C (bootstrap SD) of the cohort's true linear predictor on the test patients."""
  from jaxsurv import metrics  # pylint: disable=import-outside-toplevel
  cols = [f"eta_{o}" for o in outcomes]
  if not any(c in table.columns for c in cols):
    return {"skipped": f"the cohort has no true linear predictor ({', '.join(cols)})"}
  by_id = table.set_index(table["patient_id"].astype(str)).loc[test_ids]
  d, e, m = _targets(table, test_ids, outcomes)
  res = {"outcomes": {}, "variables": ["true linear predictor"]}
  for j, o in enumerate(outcomes):
    if f"eta_{o}" not in by_id.columns:
      continue
    eta = by_id[f"eta_{o}"].to_numpy(float)[m[:, j]]
    b = metrics.bootstrap_cindex(d[m[:, j], j], e[m[:, j], j], eta,
                                 n_resamples=max(2, int(config.eval.bootstrap_resamples)),
                                 seed=config.seed)
    res["outcomes"][o] = {"cindex": float(b.estimate), "cindex_sd": float(b.sd)}
  return res


# ----------------------------------------------------------------------------
# Network rows.
# ----------------------------------------------------------------------------


def network_config(row: str, config, seed_index: int) -> ml_collections.ConfigDict:
  """The config of a network row at seed ``config.seed + seed_index``."""
  c = copy.deepcopy(config)
  c.seed = int(config.seed) + int(seed_index)
  if row == "densenet":
    c.data.modalities = ("image",)
    c.blend.enabled = False
  elif row == "mmnn_noblend":
    c.data.modalities = ("image", "clinical")
    c.blend.enabled = False
  elif row == "mmnn":
    c.data.modalities = ("image", "clinical")
  else:
    raise ValueError(f"not a network row: {row!r}")
  c.progress_bar = False
  return c


def _network_seed(row: str, config, k: int, out: pathlib.Path) -> tuple[dict, pd.DataFrame]:
  from jaxsurv import train  # pylint: disable=import-outside-toplevel
  workdir = out / "runs" / row / f"seed_{k}"
  results_path = workdir / "results.json"
  if not results_path.exists():
    train.train_and_evaluate(network_config(row, config, k), str(workdir))
  results = json.loads(results_path.read_text())
  preds = pd.read_csv(workdir / "predictions.csv", dtype={"patient_id": str})
  return results, preds[preds["split"] == "test"].set_index("patient_id")


def network_row(row: str, config, seeds: int, out: pathlib.Path,
                test_ids: np.ndarray) -> dict:
  """Trains (or reuses) the row's runs, one per seed; its metrics from the first seed."""
  outcomes = tuple(config.data.outcomes)
  per_seed = [_network_seed(row, config, k, out) for k in range(seeds)]
  first = per_seed[0][0]
  first_config = network_config(row, config, 0)
  res = {"outcomes": {}, "test_risk": {}, "seeds": seeds,
         "variables": list(first_config.data.modalities),
         "pretrained": bool(first_config.model.image.get("init_from", ""))}
  for o in outcomes:
    if o not in first.get("test", {}):
      continue
    res["outcomes"][o] = dict(first["test"][o])
    cs = [r["test"][o]["cindex"] for r, _ in per_seed if r["test"].get(o, {}).get("cindex")
          is not None]
    res["outcomes"][o]["cindex_seed_mean"] = float(np.mean(cs))
    res["outcomes"][o]["cindex_seed_sd"] = float(np.std(cs, ddof=1)) if len(cs) > 1 else None
    res["test_risk"][o] = [p.reindex(test_ids)[f"risk_{o}"].to_numpy(float).tolist()
                           for _, p in per_seed]
    p5 = f"p_{o}_{HORIZON_YEARS:g}y"
    if p5 in per_seed[0][1].columns:
      res.setdefault("test_p5y", {})[o] = per_seed[0][1].reindex(test_ids)[p5].to_numpy(
          float).tolist()
  res["n_params"], res["gflops_per_sample"] = network_size(
      first_config, out / "runs" / row / "seed_0" / "preprocess.json")
  return res


def network_size(config, preprocess_json: pathlib.Path) -> tuple[int, float]:
  """``(trainable parameters, GFLOP of one patient's forward pass)`` of a network row.

  FLOPs from XLA's cost analysis of the eval-mode forward at batch 1 as
  lowered (a multiply-add counts 2); shapes only, nothing is computed. The
  MMNN paper's DenseNet-121 at 2 x 128^3 gives 94.0 here (the paper: 97.5).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from jaxsurv import train  # pylint: disable=import-outside-toplevel
  from jaxsurv.data import clinical as clinical_lib  # pylint: disable=import-outside-toplevel
  state = json.loads(preprocess_json.read_text()).get("clinical")
  n_clin = (len(clinical_lib.ClinicalPreprocessor.from_dict(state).feature_names)
            if state else 1)
  model = train.build_model(config)
  image = jax.ShapeDtypeStruct((1, *tuple(config.data.preprocess.grid),
                                len(config.data.channels)), np.float32)
  clin = jax.ShapeDtypeStruct((1, n_clin), np.float32)
  shapes = jax.eval_shape(lambda i, c: model.init(jax.random.key(0), i, c, train=False),
                          image, clin)
  n_params = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])))
  lowered = jax.jit(lambda v, i, c: model.apply(v, i, c, train=False)).lower(shapes, image, clin)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return n_params, float(cost["flops"]) / 1e9


# ----------------------------------------------------------------------------
# Paired comparison and the table.
# ----------------------------------------------------------------------------


def paired_difference(duration: np.ndarray, event: np.ndarray, risks_a: Sequence[np.ndarray],
                      risks_b: Sequence[np.ndarray], *, n_resamples: int, seed: int) -> dict:
  """Seed-mean C of ``a`` minus that of ``b`` on the same bootstrap resamples.

  Args:
    duration, event: ``[n]`` test patients (days; 0/1).
    risks_a, risks_b: one ``[n]`` risk score per seed (higher = earlier event).

  Returns:
    ``{"diff", "ci": [lo, hi], "sd", "n_resamples"}`` (95% percentile interval).
  """
  from jaxsurv import metrics  # pylint: disable=import-outside-toplevel
  w = metrics.bootstrap_weights(len(duration), n_resamples, seed)

  def mean_c(risks, weights):
    return np.mean([metrics.weighted_concordance_index(duration, event, r, weights)
                    for r in risks], axis=0)

  full = np.ones((1, len(duration)))
  diff = float(mean_c(risks_a, full)[0] - mean_c(risks_b, full)[0])
  reps = mean_c(risks_a, w) - mean_c(risks_b, w)
  reps = reps[np.isfinite(reps)]
  return {"diff": diff, "ci": [float(np.percentile(reps, 2.5)), float(np.percentile(reps, 97.5))],
          "sd": float(np.std(reps, ddof=1)), "n_resamples": int(n_resamples)}


def _fmt(x, nd=3):
  return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def build_table(rows: Mapping[str, dict], outcomes: Sequence[str]) -> pd.DataFrame:
  """One line per row (the Table 3 layout), ``rows`` as ``run_compare`` collects them."""
  lines = []
  for name in ROWS:
    if name not in rows:
      continue
    r = rows[name]
    line = {"row": name, "model": LABELS[name], "variables": "+".join(r.get("variables", [])),
            "saw_size_grade": r.get("saw_size_grade"), "pretrained": r.get("pretrained"),
            "n_params": r.get("n_params"), "gflops_per_sample": r.get("gflops_per_sample"),
            "seeds": r.get("seeds"),
            "wall_s": r.get("wall_s"), "skipped": r.get("skipped", "")}
    for o in outcomes:
      m = r.get("outcomes", {}).get(o, {})
      line[f"cindex_{o}"] = m.get("cindex")
      line[f"cindex_sd_{o}"] = m.get("cindex_sd")
      line[f"cindex_seed_mean_{o}"] = m.get("cindex_seed_mean")
      line[f"cindex_seed_sd_{o}"] = m.get("cindex_seed_sd")
      line[f"ibs_{o}"] = m.get("ibs")
      line[f"auc_5y_{o}"] = (m.get("auc") or {}).get("5y")
      p = r.get("paired", {}).get(o)
      line[f"mmnn_minus_row_{o}"] = None if p is None else p["diff"]
      line[f"mmnn_minus_row_ci_{o}"] = None if p is None else p["ci"]
    lines.append(line)
  return pd.DataFrame(lines)


def table_markdown(df: pd.DataFrame, outcomes: Sequence[str], meta: Mapping) -> str:
  head = ["Model", "Variables", "Size/grade seen", "Image init", "Params", "GFLOP/patient"]
  for o in outcomes:
    head += [f"C {o.upper()} (SD)", f"C {o.upper()} seeds", f"IBS {o.upper()}",
             f"AUC 5y {o.upper()}", f"MMNN - row, {o.upper()} [95% CI]"]
  head += ["Wall s", "Note"]
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for _, r in df.iterrows():
    init = r.get("pretrained")
    cells = [r["model"], r["variables"] or "–", r["saw_size_grade"] or "–",
             "–" if init is None or pd.isna(init) else "pretrained" if init else "from scratch",
             "–" if pd.isna(r["n_params"]) else f"{int(r['n_params']):,}",
             "–" if pd.isna(r["gflops_per_sample"]) else f"{r['gflops_per_sample']:.4g}"]
    for o in outcomes:
      c, sd = r[f"cindex_{o}"], r[f"cindex_sd_{o}"]
      cells.append("–" if c is None or pd.isna(c) else f"{c:.3f} ({_fmt(sd)})")
      mean, ssd = r[f"cindex_seed_mean_{o}"], r[f"cindex_seed_sd_{o}"]
      cells.append("–" if mean is None or pd.isna(mean) else
                   f"{mean:.3f} ± {_fmt(ssd)} (n={int(r['seeds'])})")
      cells.append(_fmt(r[f"ibs_{o}"]))
      cells.append(_fmt(r[f"auc_5y_{o}"]))
      d, ci = r[f"mmnn_minus_row_{o}"], r[f"mmnn_minus_row_ci_{o}"]
      cells.append("–" if d is None or (isinstance(d, float) and pd.isna(d))
                   else f"{d:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]")
    cells += [_fmt(r["wall_s"], 0), r["skipped"] or ""]
    out.append("| " + " | ".join(str(x) for x in cells) + " |")
  lines = [f"# MMNN comparison (Table 3 layout): {meta['cohort']}", "",
           f"Test split: {meta['n_test']} patients (train {meta['n_train']}, val "
           f"{meta['n_val']}). Config: `{meta['config']}`; seeds {meta['seeds']}.", "",
           "\n".join(out), "", verdict(df, outcomes)]
  figs = [f"![{f}]({f})" for f in meta.get("figures", [])]
  if figs or meta.get("fig1"):
    lines += ["", "Figures: Fig. 2 (5-year ROC and calibration, per outcome; data beside each "
              "PNG as CSV)" + ("; Fig. 1 (gradient-blending weights of the MMNN row's first "
                               f"seed): [{meta['fig1']}]({meta['fig1']})" if meta.get("fig1")
                               else "") + ".", ""] + figs
  return "\n".join(lines) + "\n"


def verdict(df: pd.DataFrame, outcomes: Sequence[str]) -> str:
  """A plain paragraph: does MMNN beat each row (paired 95% CI above 0)?"""
  parts = []
  for _, r in df.iterrows():
    if r["row"] in ("mmnn", ORACLE) or r["skipped"]:
      continue
    says = []
    for o in outcomes:
      d, ci = r[f"mmnn_minus_row_{o}"], r[f"mmnn_minus_row_ci_{o}"]
      if d is None or (isinstance(d, float) and pd.isna(d)):
        continue
      if ci[0] > 0:
        says.append(f"better on {o.upper()} ({d:+.3f}, CI above 0)")
      elif ci[1] < 0:
        says.append(f"worse on {o.upper()} ({d:+.3f}, CI below 0)")
      else:
        says.append(f"not distinguishable on {o.upper()} ({d:+.3f}, CI [{ci[0]:+.3f}, "
                    f"{ci[1]:+.3f}] includes 0)")
    if says:
      parts.append(f"against {r['model']}: MMNN is " + "; ".join(says))
  if not parts:
    return "No paired comparison with MMNN (its row did not run)."
  return ("Paired bootstrap of the test C-index (MMNN minus row, same resamples): "
          + ". ".join(parts) + ".")


def _check_out(out: pathlib.Path, config) -> None:
  """Refuses a DIR made with another config; records this one otherwise."""
  from jaxsurv import runs  # pylint: disable=import-outside-toplevel
  record = out / "compare.json"
  mine = runs.config_to_dict(config)
  if record.exists():
    theirs = json.loads(record.read_text()).get("config")
    if theirs != json.loads(json.dumps(mine)):
      raise UserError(f"{out} holds a comparison made with another config ({record}); use a new "
                      "--out (finished rows are reused only with the same config)")
    return
  out.mkdir(parents=True, exist_ok=True)
  io_lib.write_json_atomic({"config": mine}, record)


def run_compare(config, out: str | pathlib.Path, *, seeds: int = 3,
                rows: Sequence[str] | None = None) -> pd.DataFrame:
  """Fits (or reuses) every row; writes ``table3.csv`` / ``table3.md``; returns the table.

  Raises:
    UserError: an unknown row, ``seeds < 1``, a DIR made with another config,
      or a cohort/config error (from ``jaxsurv.train``).
  """
  from jaxsurv import train  # pylint: disable=import-outside-toplevel
  out = pathlib.Path(out)
  rows = list(rows or ROWS)
  unknown = [r for r in rows if r not in ROWS]
  if unknown:
    raise UserError(f"--rows: unknown rows {unknown}; known: {list(ROWS)}")
  if seeds < 1:
    raise UserError(f"--seeds must be >= 1, got {seeds}")
  if "compare" not in config:
    raise UserError("the config has no 'compare' block (configs/mmnn.py declares the "
                    "Sarculator and clinical variable lists there)")
  prepared = train.load_cohort(config)
  table = prepared.table.reset_index(drop=True)
  split = train.make_splits(table, config, None)
  _check_out(out, config)
  part_ids = {p: np.asarray(getattr(split, p), str) for p in ("train", "val", "test")}
  outcomes = tuple(config.data.outcomes)
  size_grade = set(config.compare.get("size_grade", ()))
  results: dict[str, dict] = {}
  features = None
  (out / "rows").mkdir(exist_ok=True)
  for name in rows:
    path = out / "rows" / f"{name}.json"
    if path.exists():
      results[name] = json.loads(path.read_text())
      continue
    t0 = time.time()
    if name == ORACLE:
      res = oracle_row(table, part_ids["test"], outcomes, config)
    elif name in ROW_SPECS:
      if name in RADIOMICS and features is None and prepared.images is not None:
        features = radiomics_features(prepared, config, out)
      res = classical_row(name, table, part_ids, config, features)
      if "skipped" not in res:
        seen = set(res["variables"]) & size_grade
        res["saw_size_grade"] = ("yes" if seen else "image only" if name in RADIOMICS else "no")
    else:
      res = network_row(name, config, seeds, out, part_ids["test"])
      mods = network_config(name, config, 0).data.modalities
      in_table = size_grade & set(config.data.numeric) | size_grade & set(config.data.categorical)
      res["saw_size_grade"] = ("yes" if "clinical" in mods and in_table
                               else "image only" if "image" in mods else "no")
    res["wall_s"] = time.time() - t0
    io_lib.write_json_atomic(res, path)
    results[name] = res
  d, e, m = _targets(table, part_ids["test"], outcomes)
  if "mmnn" in results and "skipped" not in results["mmnn"]:
    for name, res in results.items():
      if name == "mmnn" or "skipped" in res or "test_risk" not in res:
        continue
      res["paired"] = {}
      for j, o in enumerate(outcomes):
        if o not in res["test_risk"] or o not in results["mmnn"]["test_risk"]:
          continue
        as_list = lambda v: v if isinstance(v[0], list) else [v]
        ra = [np.asarray(v, float) for v in as_list(results["mmnn"]["test_risk"][o])]
        rb = [np.asarray(v, float) for v in as_list(res["test_risk"][o])]
        keep = m[:, j] & np.all([np.isfinite(r) for r in ra + rb], axis=0)
        res["paired"][o] = paired_difference(
            d[keep, j], e[keep, j], [r[keep] for r in ra], [r[keep] for r in rb],
            n_resamples=max(200, int(config.eval.bootstrap_resamples)), seed=config.seed)
  df = build_table(results, outcomes)
  io_lib.write_csv_atomic(df, out / "table3.csv")
  figures = write_figures(results, table, part_ids, outcomes, out / "figures", config)
  localisation = localisation_rows(results, prepared, part_ids["test"], out)
  meta = {"cohort": str(config.data.cohort), "n_test": len(part_ids["test"]),
          "n_train": len(part_ids["train"]), "n_val": len(part_ids["val"]), "seeds": seeds,
          "config": " ".join(sys.argv[1:]) or "(in-process)"}
  meta["figures"] = figures
  if (out / "runs" / "mmnn" / "seed_0" / "blend_weights.png").exists():
    meta["fig1"] = "runs/mmnn/seed_0/blend_weights.png"
  text = table_markdown(df, outcomes, meta)
  if localisation:
    text += "\n" + localisation_markdown(localisation)
  (out / "table3.md").write_text(text)
  return df


LOCALISATION_LAYERS = ("last_dense_block", "block_1")


def localisation_rows(results: Mapping[str, dict], prepared, test_ids: np.ndarray,
                      out: pathlib.Path) -> dict:
  """Grad-CAM localisation (``jaxsurv.localisation``) of every network row's first seed.

  On the test patients, for both signs (risk-increasing and risk-decreasing
  maps) and two layers: the last dense block (the Grad-CAM layer of
  ``predict --heatmaps``) and the first dense block (4x finer at the local
  config), to tell the layer's resolution from what the model uses. Each
  summary is written to ``DIR/localisation/<row>_<layer>.json`` (+ ``.md``)
  and reused on a rerun.

  Returns:
    ``{(row, layer): summary}``.
  """
  from jaxsurv import localisation, predict  # pylint: disable=import-outside-toplevel
  done = {}
  if prepared.images is None:
    return done
  folder = out / "localisation"
  for name in NETWORKS:
    if name not in results or "skipped" in results[name]:
      continue
    run = None  # Loaded once for both layers, and only if one is missing.
    for layer in LOCALISATION_LAYERS:
      path = folder / f"{name}_{layer}.json"
      if path.exists():
        done[(name, layer)] = json.loads(path.read_text())
        continue
      t0 = time.time()
      if run is None:
        run = predict.load_run(out / "runs" / name / "seed_0")
      summary = localisation.localisation_summary(run, prepared, list(test_ids), layer=layer)
      summary["wall_s"] = time.time() - t0
      folder.mkdir(parents=True, exist_ok=True)
      (folder / f"{name}_{layer}.md").write_text(localisation.markdown(summary))
      io_lib.write_json_atomic(summary, path)
      done[(name, layer)] = summary
  return done


def localisation_markdown(summaries: Mapping[tuple, dict]) -> str:
  """The Grad-CAM section of ``table3.md``: per row, layer, sign and outcome, all test patients."""
  phantom = any(s.get("phantom") for s in summaries.values())
  head = ["Model", "Layer", "Maps", "Outcome", "All zero", "Tumour (x chance, > chance)",
          "Tumour + periphery (x chance)"]
  if phantom:
    head += ["Core (x chance)", "Oedema (x chance)", "rho core x chance vs necrosis",
             "rho oedema x chance vs width"]
  ratio = lambda r: "–" if r is None or r.get("median_ratio") is None else (
      f"{r['median_ratio']:.2f}x")
  lines = ["## Grad-CAM localisation (test patients, first seed)", "",
           "Median over maps of the fraction of map mass in the region divided by the region's "
           "share of the grid (1 = a uniform map); \"> chance\": share of maps above chance. "
           "Risk-increasing maps are Grad-CAM as the paper shows it (ReLU of the risk score's "
           "evidence); risk-decreasing maps use the gradient of minus the risk score. Full "
           "tables per risk group: `localisation/<row>_<layer>.md`."
           + (" rho: Spearman correlation, over patients, of the region's mass relative to "
              "chance with the phantom's latent necrotic fraction / oedema width (relative to "
              "chance, since a larger region takes more of any map's mass)." if phantom else ""),
           "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (name, layer), s in summaries.items():
    if "skipped" in s:
      continue
    for sign, per in s["results"].items():
      for o, res in per.items():
        g = res["groups"]["all"]
        share = g["tumour"].get("share_above_chance")
        cells = [LABELS[name], layer, sign, o.upper(), f"{g['n_all_zero']} of {g['n_maps']}",
                 ratio(g["tumour"]) + ("" if share is None else f", {100 * share:.0f}%"),
                 ratio(g["tumour_periphery"])]
        if phantom:
          sp = g.get("spearman", {})
          rho = lambda k: "–" if sp.get(k, {}).get("rho") is None else f"{sp[k]['rho']:+.2f}"
          cells += [ratio(g.get("core")), ratio(g.get("oedema")),
                    rho("core_ratio_vs_latent_necrosis"), rho("oedema_ratio_vs_latent_oedema_mm")]
        lines.append("| " + " | ".join(cells) + " |")
  statements = [f"{LABELS[n]}, {layer}: {s.get('statement', '')}"
                for (n, layer), s in summaries.items() if "skipped" not in s]
  return "\n".join(lines) + "\n\n" + "\n\n".join(statements) + "\n"


def radiomics_features(prepared, config, out: pathlib.Path) -> pd.DataFrame:
  """The cohort's radiomics features (``jaxsurv.radiomics``), extracted once and cached."""
  from jaxsurv import radiomics  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  feats = radiomics.cohort_features(prepared, tuple(config.data.channels),
                                    progress=bool(config.get("progress_bar", True)),
                                    unfeaturisable="skip")
  skipped = feats.attrs.get("skipped", {})
  io_lib.write_json_atomic({"features": int(feats.shape[1]), "patients": int(feats.shape[0]),
                            "without_features": len(skipped), "skipped": skipped,
                            "settings": feats.attrs.get("settings"),
                            "pyradiomics_version": feats.attrs.get("pyradiomics_version"),
                            "wall_s": time.time() - t0}, out / "rows" / "radiomics_features.json")
  if skipped:
    logging.warning("radiomics: %d of %d patients without features (imputed and flagged in the "
                    "radiomics rows), e.g. %s", len(skipped), feats.shape[0],
                    next(iter(skipped.items())))
  return feats


def write_figures(results: Mapping[str, dict], table: pd.DataFrame,
                  part_ids: Mapping[str, np.ndarray], outcomes: Sequence[str],
                  folder: pathlib.Path, config) -> list[str]:
  """The paper's Fig. 2 per outcome: ``folder/fig2_<outcome>.png`` (+ ``.csv``).

  Every row with 5-year event probabilities on the test patients (first seed
  of a network row) is drawn; returns the written PNGs' names.
  """
  from jaxsurv import figures, survival  # pylint: disable=import-outside-toplevel
  d, e, m = _targets(table, part_ids["test"], outcomes)
  d_tr, e_tr, m_tr = _targets(table, part_ids["train"], outcomes)
  h = float(survival.horizons_in_days([HORIZON_YEARS])[0])
  written = []
  for j, o in enumerate(outcomes):
    curves = {}
    for name in ROWS:
      p = results.get(name, {}).get("test_p5y", {}).get(o)
      if p is None:
        continue
      p = np.asarray(p, float)
      keep = m[:, j] & np.isfinite(p)
      try:
        curves[LABELS[name]] = figures.model_curves(
            train_duration=d_tr[m_tr[:, j], j], train_event=e_tr[m_tr[:, j], j],
            duration=d[keep, j], event=e[keep, j], probability=np.clip(p[keep], 0.0, 1.0),
            horizon_days=h)
      except ValueError as err:
        logging.warning("figure 2, %s, %s: %s", o, name, err)
    if curves:
      folder.mkdir(parents=True, exist_ok=True)
      path = folder / f"fig2_{o}.png"
      figures.plot_roc_calibration(
          path, curves, title=f"{o.upper()} at {HORIZON_YEARS:g} years, test split "
          f"({str(config.data.cohort)})")
      written.append(f"figures/{path.name}")
  return written


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def define_flags(fv: flags.FlagValues, argv: Sequence[str]) -> None:
  """The command's flags on ``fv``; ``argv`` carries ``--config.x=y`` overrides."""
  f = dict(flag_values=fv)
  config_flags.DEFINE_config_file("config", None, "MMNN config file[:arg]; --config.key=value "
                                  "overrides its fields", lock_config=False,
                                  sys_argv=list(argv), **f)
  flags.DEFINE_string("out", None, "output folder (table3.csv, table3.md, rows/, runs/)", **f)
  flags.DEFINE_integer("seeds", 3, "seeds of each network row", lower_bound=1, **f)
  flags.DEFINE_list("rows", None, "rows to fit (default: all): " + ",".join(ROWS), **f)
  flags.mark_flags_as_required(["config", "out"], flag_values=fv)


def _main(argv: Sequence[str], fv: flags.FlagValues) -> int:
  rest = list(argv[1:])
  if rest != ["mmnn"]:
    raise app.UsageError(f"expected one command, mmnn; got {rest}")
  logging.basicConfig(level=logging.WARNING)
  config = cli.config_value(fv["config"])
  run_compare(config, fv.out, seeds=fv.seeds, rows=fv.rows)
  print((pathlib.Path(fv.out) / "table3.md").read_text())
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """In-process entry point (``jaxsurv.cli.call``): ``argv`` without the program name."""
  return cli.call(_main, define_flags, sys.argv[1:] if argv is None else argv,
                  prog="python -m jaxsurv.compare")


if __name__ == "__main__":
  cli.run(_main, define_flags=define_flags)
