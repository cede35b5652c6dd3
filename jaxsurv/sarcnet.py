"""SarcNet's experiment: federated training across sites and its comparators.

``train_and_evaluate(config, workdir)`` (what ``launch.py
--config=configs/sarcnet.py`` runs):

1. loads the sites (``jaxsurv.data.sites``) and checks every one of them
   against the config (columns, events in each training part, tile-feature
   dimension) before anything is written; ``runs.open_run`` then creates the
   run or accepts it again (another config or cohort is refused);
2. writes one folder per site under ``workdir/sites`` (what each simulated
   SuperNode reads) and runs the federated experiment in Flower's simulation
   engine (``jaxsurv.federated``), checkpointing the global model after every
   round (a killed run resumes after the last completed round);
3. trains the comparators through the same trainer (``Trainer.fit``, with
   checkpoints, so they resume too): the same model pooled (all sites'
   training patients, one scaler) and on each site alone, each for
   ``rounds x local_epochs`` epochs with the same optimiser, the last epoch
   kept (as for the federated model, which is the last round's); a Cox
   model on nomogram-style variables (``config.compare.nomogram``, refit on
   the pooled training patients); and grade alone (the risk score is the
   grade);
4. scores every model on every site's test patients and on all test
   patients together: Harrell's C and the 5-year AUC two ways, *binary*
   (cases: an event by 5 years; controls: followed beyond; patients censored
   before 5 years left out) and *cumulative/dynamic* with IPCW (Uno et al.
   2007; censoring from the pooled training patients), each with a
   patient-level bootstrap 95% CI (percentile) and a paired bootstrap
   p-value against grade (two-sided, the same resamples for every model);
5. writes ``results.json``, ``table.md`` / ``table.csv`` (laid out like the
   SarcNet abstract: model, AUC (95% CI), P vs grade), ``predictions.csv``,
   ``rounds.csv`` and ``rounds.png`` (per-round validation C-index and 5-year
   AUC per site).

Each model is evaluated with the scalers of the data it was trained on: the
federated model with each site's own (site-local standardisation), the
pooled model with the pooled training part's, a single-site model with its
site's.
"""

from __future__ import annotations

import logging
import math
import pathlib
import time
from typing import Mapping, Sequence

import ml_collections
import numpy as np
import pandas as pd

from jaxsurv import federated, io as io_lib, metrics, runs
from jaxsurv.data import sites as sites_lib
from jaxsurv.errors import UserError

log = logging.getLogger("jaxsurv")

HORIZON_DAYS = federated.HORIZON_DAYS


# ----------------------------------------------------------------------------
# Metrics.
# ----------------------------------------------------------------------------


def binary_auc(duration, event, risk, horizon: float = HORIZON_DAYS) -> float:
  """5-year AUC of the binary status (``survival.horizon_labels``): NaN
  without a case or a control."""
  from sklearn.metrics import roc_auc_score  # pylint: disable=import-outside-toplevel
  from jaxsurv import survival  # pylint: disable=import-outside-toplevel
  label, known = survival.horizon_labels(duration, event, horizon)
  y = label[known]
  if y.size == 0 or y.min() == y.max():
    return float("nan")
  return float(roc_auc_score(y, np.asarray(risk)[known]))


def cd_auc(train_duration, train_event, duration, event, risk,
           horizon: float = HORIZON_DAYS) -> float:
  """Cumulative/dynamic AUC at the horizon (IPCW; NaN where undefined)."""
  try:
    auc, _ = metrics.cumulative_dynamic_auc(train_duration, train_event, duration, event, risk,
                                            [horizon])
    return float(np.ravel(auc)[0])
  except ValueError:
    return float("nan")


def _ci(values: np.ndarray) -> tuple[float, float]:
  v = values[np.isfinite(values)]
  if v.size < 10:
    return float("nan"), float("nan")
  lo, hi = np.percentile(v, [2.5, 97.5])
  return float(lo), float(hi)


def _p_paired(a: np.ndarray, b: np.ndarray) -> float:
  """Two-sided paired bootstrap p-value of ``a - b`` (resamples where both are finite)."""
  ok = np.isfinite(a) & np.isfinite(b)
  if ok.sum() < 10:
    return float("nan")
  d = a[ok] - b[ok]
  return float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))


def score_models(risks: Mapping[str, np.ndarray], duration, event, train_duration, train_event,
                 *, n_boot: int, seed: int, reference: str) -> dict:
  """Harrell's C, binary and cumulative/dynamic 5-year AUC of every model on
  one set of patients, with bootstrap CIs and paired p-values vs ``reference``.

  Args:
    risks: ``{model: [n] risk scores}`` (higher = earlier event).
    duration, event: ``[n]`` the patients' days and event indicators.
    train_duration, train_event: the training patients (IPCW censoring).
    n_boot: bootstrap resamples (the same for every model: paired).
    seed: the resamples' seed.
    reference: the model the p-values compare against (grade).

  Returns:
    ``{model: {"cindex", "auc5_binary", "auc5_cd": {"estimate", "ci_low",
    "ci_high", "p_vs_<reference>"}}}``.
  """
  d, e = np.asarray(duration, np.float64), np.asarray(event, np.int64)
  td, te = np.asarray(train_duration, np.float64), np.asarray(train_event, np.int64)
  w = metrics.bootstrap_weights(len(d), n_boot, seed)
  idx = [np.repeat(np.arange(len(d)), wb) for wb in w]
  reps, est = {}, {}
  for name, r in risks.items():
    r = np.asarray(r, np.float64)
    try:
      c = float(metrics.concordance_index(d, e, r))
      c_reps = np.asarray(metrics.weighted_concordance_index(d, e, r, w), np.float64)
    except ValueError:
      c, c_reps = float("nan"), np.full(n_boot, np.nan)
    est[name] = {"cindex": c, "auc5_binary": binary_auc(d, e, r),
                 "auc5_cd": cd_auc(td, te, d, e, r)}
    reps[name] = {"cindex": c_reps,
                  "auc5_binary": np.array([binary_auc(d[i], e[i], r[i]) for i in idx]),
                  "auc5_cd": np.array([cd_auc(td, te, d[i], e[i], r[i]) for i in idx])}
  out = {}
  for name in risks:
    out[name] = {}
    for k in ("cindex", "auc5_binary", "auc5_cd"):
      lo, hi = _ci(reps[name][k])
      out[name][k] = {"estimate": est[name][k], "ci_low": lo, "ci_high": hi,
                      f"p_vs_{reference}": (float("nan") if name == reference else
                                            _p_paired(reps[name][k], reps[reference][k]))}
  return out


# ----------------------------------------------------------------------------
# The experiment.
# ----------------------------------------------------------------------------


def _fit_centralised(config, data: federated.SiteData, folder: pathlib.Path, desc: str):
  """The same model trained centrally on ``data`` (shared trainer, checkpoints)."""
  t = federated.trainer(config, federated=False)
  res = t.fit(data.parts["train"], data.parts["val"], checkpoint_dir=folder / "checkpoints",
              desc=desc)
  return res.params


def _nomogram_risk(config, sites: Sequence[sites_lib.Site]) -> dict:
  """Cox on the nomogram-style variables, refit on the pooled training
  patients: ``{site: test risk [n]}`` and its coefficients."""
  from jaxsurv import compare  # pylint: disable=import-outside-toplevel
  cols = list(config.compare.nomogram)
  train = pd.concat([s.table.iloc[s.part("train")] for s in sites])
  x = train[cols].to_numpy(np.float64)
  mean, sd = x.mean(0), x.std(0)
  sd = np.where(sd > 0, sd, 1.0)
  model = compare.fit_classical("coxph", (x - mean) / sd, train["duration"].to_numpy(),
                                train["event"].to_numpy(), seed=config.seed)
  out = {s.name: model.predict((s.table.iloc[s.part("test")][cols].to_numpy(np.float64) - mean)
                               / sd) for s in sites}
  return out, dict(zip(cols, np.asarray(model.coef_, float).tolist()))


def _model_names(site_names: Sequence[str], reference: str) -> list[str]:
  return (["SarcNet federated", "SarcNet pooled"]
          + [f"SarcNet {s} only" for s in site_names] + ["Cox, nomogram variables", reference])


def reference_name(config) -> str:
  """The grade row's name (``config.compare.grade_label``, default "Grade alone")."""
  return config.compare.get("grade_label") or "Grade alone"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_changed_config: bool = False) -> dict:
  """Runs the federated experiment and its comparisons (module docstring).

  Returns:
    The results dict (``results.json``): sites, rounds, wall times, bytes per
    round, and ``metrics[eval set][model][metric]`` with CIs and p-values.

  Raises:
    UserError: bad config or site data (named), a workdir of another run.
    TrainingError: a non-finite loss.
  """
  workdir = pathlib.Path(workdir)
  federated.check_config(config)
  sites = sites_lib.load_sites(config)
  sites_lib.check_sites(sites, tuple(config.data.columns),
                        bag_dim=config.data.get("wsi_dim") or None)
  for c in list(config.compare.nomogram) + [config.compare.grade]:
    missing = [s.name for s in sites if c not in s.table.columns]
    if missing:
      raise UserError(f"config.compare column {c!r} is missing at sites {missing}")
  data = {s.name: federated.site_data(s, config) for s in sites}
  names = [s.name for s in sites]
  runs.open_run(workdir, runs.config_to_dict(config), sites_lib.fingerprint(sites),
                allow_changed=allow_changed_config)
  site_dirs = []
  for s in sites:
    folder = workdir / "sites" / s.name
    if not (folder / sites_lib.TABLE_FILE).is_file():
      sites_lib.write_site(s, folder)
    site_dirs.append((s.name, str(folder)))
  io_lib.write_json_atomic(sites_lib.summary(sites), workdir / "sites.json")
  for row in sites_lib.summary(sites):
    log.info("site %s", row)

  like = federated.template_params(config)
  done = federated.load_round(workdir, like)
  sim_seconds = None
  if done is None or done[0] < int(config.federated.rounds):
    log.info("federated: %d rounds x %d local epochs over %d sites (%s)", config.federated.rounds,
             config.federated.local_epochs, len(sites), config.federated.strategy)
    sim_seconds = federated.simulate(config, workdir, site_dirs)
    done = federated.load_round(workdir, like)
  if done is None or done[0] < int(config.federated.rounds):
    raise UserError(f"the federated run stopped after round {0 if done is None else done[0]} "
                    f"of {config.federated.rounds}; run the same command again to resume")
  _, fed_params, meta = done
  history = meta["history"]

  # Comparators through the same trainer.
  t0 = time.time()
  pooled = federated.pooled_data(list(data.values()), config)
  params = {"SarcNet federated": fed_params,
            "SarcNet pooled": _fit_centralised(config, pooled, workdir / "pooled", "pooled")}
  for s in names:
    params[f"SarcNet {s} only"] = _fit_centralised(config, data[s], workdir / "single" / s,
                                                   f"{s} only")
  comparator_seconds = time.time() - t0
  nomo, coef = _nomogram_risk(config, sites)

  ref = reference_name(config)
  # Test risk scores per site, each model with its own training data's scalers.
  risks: dict[str, dict[str, np.ndarray]] = {s: {} for s in names}
  for s in names:
    site = data[s].site
    test = lambda transform: federated.site_data(site, config, transform).parts["test"]  # noqa
    risks[s]["SarcNet federated"] = federated.risk_scores(config, fed_params, data[s].parts["test"])
    risks[s]["SarcNet pooled"] = federated.risk_scores(config, params["SarcNet pooled"],
                                                       test(pooled.transform))
    for o in names:
      risks[s][f"SarcNet {o} only"] = federated.risk_scores(
          config, params[f"SarcNet {o} only"], test(data[o].transform))
    risks[s]["Cox, nomogram variables"] = np.asarray(nomo[s], np.float64)
    risks[s][ref] = site.table.iloc[site.part("test")][
        config.compare.grade].to_numpy(np.float64)

  train_d = np.concatenate([data[s].site.table["duration"].to_numpy()[data[s].site.part("train")]
                            for s in names])
  train_e = np.concatenate([data[s].site.table["event"].to_numpy()[data[s].site.part("train")]
                            for s in names])
  rows, scores = [], {}
  eval_sets = [(s, [s]) for s in names] + [("all sites", names)]
  for label, members in eval_sets:
    d = np.concatenate([data[s].site.table["duration"].to_numpy()[data[s].site.part("test")]
                        for s in members])
    e = np.concatenate([data[s].site.table["event"].to_numpy()[data[s].site.part("test")]
                        for s in members])
    r = {m: np.concatenate([risks[s][m] for s in members]) for m in _model_names(names, ref)}
    scores[label] = score_models(r, d, e, train_d, train_e, n_boot=int(config.compare.n_boot),
                                 seed=config.seed, reference=ref)
    scores[label]["_patients"] = {"n": int(len(d)), "events": int(e.sum()),
                                  "events_by_5y": int(((d <= HORIZON_DAYS) & (e == 1)).sum()),
                                  "known_at_5y": int((((d <= HORIZON_DAYS) & (e == 1))
                                                      | (d > HORIZON_DAYS)).sum())}
  for s in names:
    site = data[s].site
    tt = site.table.iloc[site.part("test")]
    for i, pid in enumerate(tt["patient_id"]):
      rows.append({"site": s, "patient_id": pid, "duration": tt["duration"].iloc[i],
                   "event": int(tt["event"].iloc[i]),
                   **{m: float(risks[s][m][i]) for m in _model_names(names, ref)}})
  io_lib.write_csv_atomic(pd.DataFrame(rows), workdir / "predictions.csv")

  param_bytes = int(sum(a.nbytes for a in federated.flatten(fed_params)))
  results = {
      "cohort": config.data.cohort, "sites": sites_lib.summary(sites),
      "strategy": config.federated.strategy, "rounds": int(config.federated.rounds),
      "local_epochs": int(config.federated.local_epochs),
      "objective": ("site-stratified Cox partial likelihood (local risk sets)"
                    if config.loss.name == "cox" else "discrete-time NLL (decomposes over sites)"),
      "scalers": "site-local (each site's training part)",
      "parameter_bytes": param_bytes,
      "bytes_per_round": {"down": int(history[-1]["bytes_down"]),
                          "up": int(history[-1]["bytes_up"])},
      "federated_seconds": sim_seconds, "comparator_seconds": comparator_seconds,
      "nomogram_coefficients": coef, "horizon_days": HORIZON_DAYS, "reference": ref,
      "metrics": scores,
  }
  io_lib.write_json_atomic(results, workdir / "results.json")
  write_tables(scores, workdir, names, ref)
  write_rounds(history, workdir, names)
  return results


def write_tables(scores: Mapping, workdir: pathlib.Path, names: Sequence[str],
                 reference: str) -> None:
  """``table.md`` and ``table.csv``: per evaluation set, model, AUC (95% CI), P vs grade."""
  rows, md = [], []
  f = lambda x: "n/a" if not math.isfinite(x) else f"{x:.3f}"  # noqa: E731
  fp = lambda p: "" if not math.isfinite(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")  # noqa
  pkey = f"p_vs_{reference}"
  for label, per in scores.items():
    pat = per["_patients"]
    md += [f"### Test patients: {label} (n={pat['n']}, {pat['events']} events, "
           f"{pat['events_by_5y']} by 5 years, {pat['known_at_5y']} with known 5-year status)", "",
           f"| Model | 5-y AUC, binary (95% CI) | P vs {reference} | 5-y AUC, C/D IPCW (95% CI) | "
           f"P vs {reference} | Harrell's C (95% CI) |", "|---|---|---|---|---|---|"]
    for m in _model_names(names, reference):
      s = per[m]
      cell = lambda k: f"{f(s[k]['estimate'])} ({f(s[k]['ci_low'])}-{f(s[k]['ci_high'])})"  # noqa
      md.append(f"| {m} | {cell('auc5_binary')} | {fp(s['auc5_binary'][pkey])} | "
                f"{cell('auc5_cd')} | {fp(s['auc5_cd'][pkey])} | "
                f"{cell('cindex')} |")
      for k in ("auc5_binary", "auc5_cd", "cindex"):
        rows.append({"test_patients": label, "model": m, "metric": k, **s[k]})
    md.append("")
  (workdir / "table.md").write_text("\n".join(md))
  io_lib.write_csv_atomic(pd.DataFrame(rows), workdir / "table.csv")


def write_rounds(history: Sequence[Mapping], workdir: pathlib.Path, names: Sequence[str]) -> None:
  """``rounds.csv`` and ``rounds.png``: per-round validation metrics per site."""
  df = pd.DataFrame(list(history))
  io_lib.write_csv_atomic(df, workdir / "rounds.csv")
  plt = io_lib.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for ax, key, title in ((axes[0], "val_cindex", "validation Harrell's C"),
                         (axes[1], "val_auc5", "validation 5-year AUC (C/D)")):
    for s in names:
      col = f"{s}/{key}"
      if col in df:
        ax.plot(df["round"], df[col], marker="o", label=s)
    ax.set_xlabel("round")
    ax.set_title(title)
    ax.legend()
  fig.tight_layout()
  io_lib.save_png_atomic(fig, workdir / "rounds.png")
  plt.close(fig)

