"""Attention reports of the fusion models: per-patient CSV tables and plots.

What each model exposes (``jaxsurv.fusion_train.predict_fn``):

* HEALNet (Hemker et al. 2023, Eq. 3 and "easy inspection"): the cross-attention of the shared
  latent array over each modality's tokens, averaged over layers, heads and
  latents -> ``{modality: [batch, n_tokens]}``. A tabular modality encoded
  per feature has one token per feature (its weights rank the omic or
  clinical features of each patient); encoded as a whole vector it has one
  token (weight 1). A bag modality has one token per tile.
* CM-MMF (cross-modality attention fusion, §2.2): softmax weights over the
  modalities -> ``[batch, n_modalities]``, summing to 1 over the present ones.
* Gated attention-MIL (Ilse et al. 2018; CM-MMF §2.1): tile weights per bag ->
  ``{modality: [batch, n_tiles]}``, 0 on padded tiles, summing to 1.

``attention_tables`` turns these into CSV tables (one row per patient; bags
summarised: number of tiles, max weight, top tile, entropy, effective number
of tiles), ``tile_weight_table`` into a long table with one row per real
tile, and ``write_attention_plots`` draws them (matplotlib, Agg backend).

HEALNet's inspection (Hemker et al., "Inspections and explanations" and
Fig. 3: "the mean modality-specific attention weights across layers ... to
inspect high-attention omic features" and the highest-attention patches):
``top_features`` lists each patient's highest-attention features,
``top_tiles`` each patient's highest-attention tiles, ``feature_ranking``
ranks a modality's features by their mean attention over a part's patients,
and ``ranking_stability`` compares the rankings of the cross-validation
folds (overlap of their top-k sets). The plots:

* ``<table>_features.png``: the features with the highest mean attention
  over the patients (bars, with the interquartile range), and a
  patient x feature heat map of those features;
* ``modality_attention.png``: the distribution of each modality's weight
  over the patients (box plot);
* ``<table>_tiles.png``: each patient's tile weights sorted in decreasing
  order against the uniform weight 1/n_tiles, for the patients with the most
  concentrated attention, and the histogram of the effective number of
  tiles / n_tiles.
"""

from __future__ import annotations

import pathlib
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from jaxsurv import io as io_lib
from jaxsurv import evaluate

ID_COLUMNS = ("patient_id", "split")
BAG_SUMMARY = ("n_tiles", "max_weight", "top_tile", "entropy", "effective_tiles")


def bag_summary(att: np.ndarray) -> dict:
  """Per-patient summary of tile weights.

  Args:
    att: ``[n_patients, n_tiles]`` weights, 0 on padding, each row summing to
      1 over the real tiles (or all 0 for a patient without tiles).

  Returns:
    ``{"n_tiles", "max_weight", "top_tile" (-1 without tiles), "entropy"
    (nats), "effective_tiles" (exp(entropy): 1 = all weight on one tile,
    n_tiles = uniform; 0 without tiles)}``, each ``[n_patients]``.
  """
  att = np.asarray(att, np.float64)
  n_tiles = (att > 0).sum(axis=1)
  safe = np.where(att > 0, att, 1.0)
  entropy = -(att * np.log(safe)).sum(axis=1)
  return {"n_tiles": n_tiles, "max_weight": att.max(axis=1),
          "top_tile": np.where(n_tiles > 0, att.argmax(axis=1), -1),
          "entropy": entropy,
          "effective_tiles": np.where(n_tiles > 0, np.exp(entropy), 0.0)}


def _tabular_columns(m: str, att: np.ndarray, names: Sequence[str]) -> dict:
  names = list(names)
  if len(names) != att.shape[1]:
    names = [m] if att.shape[1] == 1 else [f"{m}_token{j}" for j in range(att.shape[1])]
  return dict(zip(names, att.T))


def attention_tables(parts: Mapping[str, dict], modalities, feature_names: Mapping) -> dict:
  """Per-patient attention CSV tables from evaluated parts.

  Args:
    parts: ``{part name: {"patient_id": [n], "pred": predict_fn output}}``.
    modalities: ``(name, kind)`` pairs, kind ``"tabular"`` or ``"bag"``.
    feature_names: ``{tabular modality: [features]}``.

  Returns:
    ``{file name: DataFrame}`` with columns ``patient_id, split, ...``:
    ``healnet_attention_<m>.csv`` (one column per token: feature names for
    per-feature tokens, the modality name for a whole-vector token, the
    ``bag_summary`` columns for bags), ``modality_attention.csv``
    (``weight_<m>``, CM-MMF) and ``mil_attention_<m>.csv`` (``bag_summary``).
  """
  kinds = dict(modalities)
  tables: dict = {}

  def add(fname, ids, part, cols):
    df = pd.DataFrame({"patient_id": ids, "split": part, **cols})
    tables[fname] = pd.concat([tables[fname], df], ignore_index=True) if fname in tables else df

  for part, d in parts.items():
    pred, ids = d["pred"], d["patient_id"]
    for m, att in pred.get("healnet_attention", {}).items():
      att = np.asarray(att)
      cols = (bag_summary(att) if kinds.get(m) == "bag"
              else _tabular_columns(m, att, feature_names.get(m, [])))
      add(f"healnet_attention_{m}.csv", ids, part, cols)
    if "modality_attention" in pred:
      w = np.asarray(pred["modality_attention"])
      add("modality_attention.csv", ids, part,
          {f"weight_{m}": w[:, j] for j, (m, _) in enumerate(modalities)})
    for m, att in pred.get("mil_attention", {}).items():
      add(f"mil_attention_{m}.csv", ids, part, bag_summary(np.asarray(att)))
  return tables


def top_features(table: pd.DataFrame, k: int = 10) -> pd.DataFrame:
  """Each patient's ``k`` highest-attention features (Fig. 3, per patient).

  Args:
    table: a ``healnet_attention_<m>.csv`` table of a per-feature tabular
      modality (``patient_id, split`` and one weight column per feature).
    k: features per patient (all if fewer).

  Returns:
    Long table ``patient_id, split, rank`` (0 = highest), ``feature``,
    ``weight``; ties keep the column order. Patients whose weights are all 0
    (the modality was missing for them) have no rows.

  Raises:
    ValueError: the table has no feature columns, or ``k < 1``.
  """
  feats = _feature_columns(table)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  w = table[feats].to_numpy(np.float64)
  order = np.argsort(-w, axis=1, kind="stable")[:, :k]
  rows = []
  for i, present in enumerate(w.sum(axis=1) > 0):
    if not present:
      continue
    for r, j in enumerate(order[i]):
      rows.append((table["patient_id"].iloc[i], table["split"].iloc[i], r, feats[j], w[i, j]))
  return pd.DataFrame(rows, columns=["patient_id", "split", "rank", "feature", "weight"])


def top_tiles(tiles: pd.DataFrame, k: int = 5) -> pd.DataFrame:
  """Each patient's ``k`` highest-attention tiles (Fig. 3's patches).

  Args:
    tiles: ``tile_weight_table`` output.
    k: tiles per patient.

  Returns:
    The rows of ``tiles`` with ``rank < k``, by patient and rank.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  top = tiles[tiles["rank"] < k]
  return top.sort_values(["split", "patient_id", "rank"], kind="stable").reset_index(drop=True)


def _feature_columns(table: pd.DataFrame) -> list[str]:
  feats = [c for c in table.columns if c not in ID_COLUMNS]
  if not feats:
    raise ValueError("the attention table has no feature columns")
  return feats


def feature_ranking(table: pd.DataFrame, split: str | None = None) -> pd.DataFrame:
  """Features ranked by mean attention over the patients who have the modality.

  Args:
    table: a ``healnet_attention_<m>.csv`` table (per-feature tokens).
    split: average over this part's patients only (``"test"``), or all.

  Returns:
    ``feature, mean_attention, rank`` (0 = highest; ties keep the column
    order), ``n_patients``; sorted by rank.

  Raises:
    ValueError: no feature columns, or no patient with the modality in
      ``split``.
  """
  feats = _feature_columns(table)
  sel = table if split is None else table[table["split"] == split]
  w = sel[feats].to_numpy(np.float64)
  w = w[w.sum(axis=1) > 0]
  if len(w) == 0:
    raise ValueError(f"no patient with attention weights in split {split!r}")
  mean = w.mean(axis=0)
  order = np.argsort(-mean, kind="stable")
  return pd.DataFrame({"feature": [feats[j] for j in order], "mean_attention": mean[order],
                       "rank": np.arange(len(feats)), "n_patients": len(w)})


def ranking_stability(rankings: Mapping, top_k: int = 20) -> tuple[pd.DataFrame, dict]:
  """Agreement of the feature rankings of several folds (or seeds).

  Args:
    rankings: ``{fold: feature_ranking output}``, at least two, over the same
      features.
    top_k: size of the top sets compared (at most the number of features).

  Returns:
    ``(combined, summary)``. ``combined``: one row per feature with
    ``mean_attention`` (mean over folds of the fold's mean attention),
    ``mean_rank``, ``top_k_folds`` (folds that put it in their top k) and
    ``rank_<fold>`` per fold, sorted by ``mean_attention``. ``summary``:
    ``top_k``, ``n_folds``, ``n_features``, ``pairwise_overlap`` (``{"a-b":
    |top_a & top_b| / k}``), its ``mean_overlap`` and ``min_overlap``, and
    ``chance_overlap`` = ``k / n_features`` (the expected overlap of two
    random top-k sets), and ``in_all_folds`` (features in every fold's top k).

  Raises:
    ValueError: fewer than two rankings, different feature sets, or
      ``top_k`` out of range.
  """
  folds = list(rankings)
  if len(folds) < 2:
    raise ValueError(f"ranking stability needs >= 2 rankings, got {len(folds)}")
  feats = sorted(rankings[folds[0]]["feature"])
  for f in folds[1:]:
    if sorted(rankings[f]["feature"]) != feats:
      raise ValueError(f"ranking of fold {f} has other features than fold {folds[0]}")
  if not 1 <= top_k <= len(feats):
    raise ValueError(f"top_k must be in [1, {len(feats)}], got {top_k}")
  by = {f: rankings[f].set_index("feature") for f in folds}
  tops = {f: set(by[f].index[by[f]["rank"] < top_k]) for f in folds}
  combined = pd.DataFrame({"feature": feats})
  for f in folds:
    combined[f"rank_{f}"] = by[f].loc[feats, "rank"].to_numpy()
  att = np.stack([by[f].loc[feats, "mean_attention"].to_numpy(np.float64) for f in folds])
  combined.insert(1, "mean_attention", att.mean(axis=0))
  combined.insert(2, "mean_rank", combined[[f"rank_{f}" for f in folds]].mean(axis=1))
  combined.insert(3, "top_k_folds", [sum(x in tops[f] for f in folds) for x in feats])
  combined = combined.sort_values("mean_attention", ascending=False, kind="stable")
  pairs = {f"{a}-{b}": len(tops[a] & tops[b]) / top_k
           for i, a in enumerate(folds) for b in folds[i + 1:]}
  summary = {"top_k": top_k, "n_folds": len(folds), "n_features": len(feats),
             "pairwise_overlap": pairs, "mean_overlap": float(np.mean(list(pairs.values()))),
             "min_overlap": float(min(pairs.values())),
             "chance_overlap": top_k / len(feats),
             "in_all_folds": [x for x in combined["feature"] if all(x in tops[f] for f in folds)]}
  return combined.reset_index(drop=True), summary


def tile_weight_table(parts: Mapping[str, dict], key: str, modality: str) -> pd.DataFrame:
  """Long table of the tile weights of one bag modality: one row per real tile.

  Args:
    parts: as for ``attention_tables``.
    key: ``"mil_attention"`` (attention-MIL) or ``"healnet_attention"``.
    modality: the bag modality.

  Returns:
    Columns ``patient_id, split, tile`` (index in the patient's bag, the
    order of the tile files/rows), ``weight`` (sums to 1 per patient) and
    ``rank`` (0 = the patient's highest weight). Patients without tiles have
    no rows.
  """
  frames = []
  for part, d in parts.items():
    att = d["pred"].get(key, {}).get(modality)
    if att is None:
      continue
    att = np.asarray(att, np.float64)
    rows, tiles = np.nonzero(att > 0)
    w = att[rows, tiles]
    df = pd.DataFrame({"patient_id": np.asarray(d["patient_id"])[rows], "split": part,
                       "tile": tiles, "weight": w})
    df["rank"] = df.groupby("patient_id")["weight"].rank(ascending=False, method="first")
    df["rank"] = df["rank"].astype(int) - 1
    frames.append(df)
  if not frames:
    return pd.DataFrame(columns=["patient_id", "split", "tile", "weight", "rank"])
  return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------


def plot_feature_attention(path, table: pd.DataFrame, *, title: str, top_k: int = 20,
                           max_patients: int = 40) -> list[str]:
  """Top features by mean attention (bars) and a patient x feature heat map.

  Args:
    path: PNG file.
    table: a ``healnet_attention_<m>.csv`` table of a tabular modality
      (``patient_id, split`` and one weight column per feature).
    title: figure title.
    top_k: features shown.
    max_patients: patients in the heat map (the first ones of the table).

  Returns:
    The plotted features, highest mean attention first.

  Raises:
    ValueError: the table has no feature columns.
  """
  try:
    feats = _feature_columns(table)
  except ValueError as e:
    raise ValueError(f"{title}: {e}") from None
  w = table[feats].to_numpy(np.float64)
  order = np.argsort(-w.mean(axis=0), kind="stable")[:top_k]
  top = [feats[j] for j in order]
  plt = io_lib.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(12, max(3.0, 0.25 * len(top) + 1.5)),
                           gridspec_kw={"width_ratios": [1, 2]})
  y = np.arange(len(top))
  q1, q3 = np.percentile(w[:, order], [25, 75], axis=0)
  mean = w[:, order].mean(axis=0)
  axes[0].barh(y, mean, xerr=[np.maximum(mean - q1, 0), np.maximum(q3 - mean, 0)],
               color="tab:blue", ecolor="0.4")
  axes[0].set_yticks(y, top, fontsize=7)
  axes[0].invert_yaxis()
  axes[0].axvline(1.0 / len(feats), color="0.5", ls="--", lw=1, label="uniform")
  axes[0].set_xlabel("attention (mean, IQR over patients)")
  axes[0].legend(fontsize=7)
  sub = w[:max_patients][:, order]
  im = axes[1].imshow(sub.T, aspect="auto", cmap="viridis", interpolation="nearest")
  axes[1].set_yticks(y, top, fontsize=7)
  ids = table["patient_id"].astype(str).to_numpy()[:max_patients]
  axes[1].set_xticks(np.arange(len(ids)), ids, rotation=90, fontsize=5)
  axes[1].set_xlabel("patient")
  fig.colorbar(im, ax=axes[1], label="attention")
  fig.suptitle(title)
  fig.tight_layout()
  io_lib.save_png_atomic(fig, path)
  plt.close(fig)
  return top


def plot_modality_weights(path, table: pd.DataFrame, *, title: str) -> None:
  """Box plot of each modality's weight over the patients.

  Args:
    path: PNG file.
    table: ``modality_attention.csv`` (``weight_<m>`` columns).
    title: figure title.
  """
  cols = [c for c in table.columns if c.startswith("weight_")]
  if not cols:
    raise ValueError(f"{title}: the table has no weight_<modality> columns")
  plt = io_lib.pyplot()
  fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 3.5))
  ax.boxplot([table[c].to_numpy(np.float64) for c in cols])
  ax.set_xticks(np.arange(1, len(cols) + 1), [c[len("weight_"):] for c in cols])
  ax.axhline(1.0 / len(cols), color="0.5", ls="--", lw=1, label="uniform")
  ax.set_ylabel("modality weight")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  ax.set_title(title)
  fig.tight_layout()
  io_lib.save_png_atomic(fig, path)
  plt.close(fig)


def plot_tile_weights(path, tiles: pd.DataFrame, *, title: str, n_patients: int = 8) -> None:
  """Sorted tile weights of the most focused patients, and the spread of focus.

  Args:
    path: PNG file.
    tiles: ``tile_weight_table`` output.
    title: figure title.
    n_patients: patients drawn in the left panel (lowest effective number of
      tiles relative to their bag size, i.e. the most concentrated attention).

  Raises:
    ValueError: no tiles.
  """
  if tiles.empty:
    raise ValueError(f"{title}: no tiles to plot")
  w = tiles["weight"].astype(np.float64)
  by_patient = (-w * np.log(w)).groupby(tiles["patient_id"])
  frac = np.exp(by_patient.sum()) / by_patient.size()  # effective tiles / tiles
  plt = io_lib.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for pid in frac.sort_values(kind="stable").index[:n_patients]:
    ws = np.sort(tiles.loc[tiles["patient_id"] == pid, "weight"].to_numpy())[::-1]
    line, = axes[0].plot(np.arange(1, len(ws) + 1), ws, lw=1, label=str(pid))
    axes[0].axhline(1.0 / len(ws), color=line.get_color(), ls=":", lw=0.8)
  axes[0].set_xscale("log")
  axes[0].set_yscale("log")
  axes[0].set_xlabel("tile rank")
  axes[0].set_ylabel("tile weight (dotted: uniform 1/n)")
  axes[0].legend(fontsize=6)
  axes[1].hist(frac.to_numpy(), bins=20, range=(0, 1), color="tab:blue")
  axes[1].set_xlabel("effective tiles / tiles (1 = uniform)")
  axes[1].set_ylabel("patients")
  fig.suptitle(title)
  fig.tight_layout()
  io_lib.save_png_atomic(fig, path)
  plt.close(fig)


def write_attention_reports(workdir, parts: Mapping[str, dict], modalities,
                            feature_names: Mapping) -> list[str]:
  """Writes every attention table and plot of the evaluated parts to ``workdir``.

  Args:
    workdir: output folder.
    parts: as for ``attention_tables``.
    modalities: ``(name, kind)`` pairs.
    feature_names: ``{tabular modality: [features]}``.

  Returns:
    The written file names: the ``attention_tables`` CSVs, one
    ``<key>_tiles_<m>.csv`` per bag modality with tile weights, the PNGs
    described in the module docstring and, for HEALNet, per tabular
    modality with per-feature tokens ``healnet_top_features_<m>.csv``
    (:func:`top_features`) and ``healnet_feature_ranking_<m>_<part>.csv``
    per part (:func:`feature_ranking`), per bag modality
    ``healnet_top_tiles_<m>.csv`` (:func:`top_tiles`).
  """
  workdir = pathlib.Path(workdir)
  kinds = dict(modalities)
  written = []
  for fname, df in attention_tables(parts, modalities, feature_names).items():
    io_lib.write_csv_atomic(df, workdir / fname)
    written.append(fname)
    stem = fname[:-len(".csv")]
    if fname == "modality_attention.csv":
      plot_modality_weights(workdir / f"{stem}.png", df, title="CM-MMF modality weights")
      written.append(f"{stem}.png")
    elif stem.startswith("healnet_attention_"):
      m = stem[len("healnet_attention_"):]
      n_tokens = len([c for c in df.columns if c not in ID_COLUMNS])
      if kinds.get(m) != "bag" and n_tokens > 1:
        plot_feature_attention(workdir / f"{stem}_features.png", df,
                               title=f"HEALNet cross-attention over {m} features")
        io_lib.write_csv_atomic(top_features(df), workdir / f"healnet_top_features_{m}.csv")
        written += [f"{stem}_features.png", f"healnet_top_features_{m}.csv"]
        for split in dict.fromkeys(df["split"]):
          try:
            ranking = feature_ranking(df, split)
          except ValueError:  # No patient of this part has the modality.
            continue
          name = f"healnet_feature_ranking_{m}_{split}.csv"
          io_lib.write_csv_atomic(ranking, workdir / name)
          written.append(name)
  for key, label in (("healnet_attention", "HEALNet"), ("mil_attention", "attention-MIL")):
    for m, kind in modalities:
      if kind != "bag":
        continue
      tiles = tile_weight_table(parts, key, m)
      if tiles.empty:
        continue
      io_lib.write_csv_atomic(tiles, workdir / f"{key}_tiles_{m}.csv")
      plot_tile_weights(workdir / f"{key}_tiles_{m}.png", tiles,
                        title=f"{label} tile weights ({m})")
      written += [f"{key}_tiles_{m}.csv", f"{key}_tiles_{m}.png"]
      if key == "healnet_attention":
        io_lib.write_csv_atomic(top_tiles(tiles), workdir / f"healnet_top_tiles_{m}.csv")
        written.append(f"healnet_top_tiles_{m}.csv")
  return written
