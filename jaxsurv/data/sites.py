"""Multi-site cohorts for federated training: one table (and tile bags) per site.

A *site* is a hospital that keeps its patients: ``Site(name, table, bags)``
where ``table`` has one row per patient with ``patient_id``, ``split``
(``train``/``val``/``test``, drawn within the site), ``duration`` (days),
``event`` (1 = event, 0 = censored) and the raw clinical columns, and
``bags`` is ``(features float32 [n, tiles, dim], tile_mask bool [n, tiles])``
or None. On disk a site is a folder with ``clinical.csv`` and optionally
``tiles.safetensors`` (``write_site`` / ``read_site``); a Flower SuperNode
reads only its own site's folder.

Real multi-site cohorts shipped by packages:

* ``rotterdam_gbsg``: two institutions, the Rotterdam tumour bank (R
  ``survival::rotterdam``, 2982 patients) and the German Breast Cancer Study
  Group trial (R ``survival::gbsg``, 686). The endpoint is recurrence-free
  survival (first of recurrence or death; GBSG's ``rfstime``/``status``; for
  Rotterdam ``rtime`` if ``recur`` else ``dtime``, the definition of the R
  ``survival`` package's "validate" vignette), the metastasis-free-survival
  analogue. Harmonised clinical variables: age, menopausal status, size band
  (``<=20``, ``20-50``, ``>50`` mm, Rotterdam's coding), grade, positive
  nodes, progesterone and oestrogen receptors (fmol/l), hormonal therapy.
* ``tcga_brca``: TCGA-BRCA (739 patients, OS) split by tissue source site,
  the two characters after ``TCGA-`` in the barcode, grouped into regions as
  FLamby's Fed-TCGA-BRCA does (Ogier du Terrail et al., "FLamby: Datasets
  and Benchmarks for Cross-Silo Federated Learning in Realistic Healthcare
  Settings", NeurIPS 2022 Datasets and Benchmarks; the TSS codes are the
  GDC's code table). Clinical variables are the cohort's 20 clinical
  columns; the tile bags are jaxsurv's PAM50-driven **synthetic** bags
  (``jaxsurv.data.bags.synthetic_bags``), the only WSI-like modality
  available with survival. Patients of TSS outside the six regions
  (Nigeria, Pakistan, Brazil, Australia: "Other" in FLamby) are left out.

Raises everywhere: :class:`jaxsurv.errors.UserError` naming the site, file,
column or patients for bad input.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import numpy as np
import pandas as pd

from jaxsurv.data import bags as bags_lib
from jaxsurv.data import splits as splits_lib
from jaxsurv.data.multimodal import MultimodalCohort
from jaxsurv.errors import UserError

TABLE_FILE = "clinical.csv"
BAGS_FILE = "tiles.safetensors"
BAG = "wsi"
PARTS = ("train", "val", "test")
COHORTS = ("rotterdam_gbsg", "tcga_brca", "folders")

# TCGA tissue source site -> region (FLamby Fed-TCGA-BRCA's six regions),
# for the TSS codes present in the 739 patients.
TCGA_REGIONS = {
    "Northeast": ("BH", "E2", "AO", "S3", "LD", "3C", "PE", "OK", "UL"),
    "South": ("EW", "A7", "B6", "GM", "LL", "AQ", "5T", "V7", "UU", "W8"),
    "West": ("A2", "AC", "A1", "AN", "Z7", "4H"),
    "Midwest": ("AR", "E9", "OL", "WT", "GI", "XX", "LQ", "MS"),
    "Europe": ("D8", "A8"),
    "Canada": ("C8", "HN"),
}
TCGA_OTHER = ("PL", "5L", "JL", "TM")  # Nigeria, Brazil, Pakistan, Australia.

ROTTERDAM_GBSG_NUMERIC = ("age", "meno", "size_band", "grade", "nodes", "pgr", "er", "hormon")
SIZE_BANDS = ("<=20", "20-50", ">50")


@dataclasses.dataclass
class Site:
  """One site's patients (module docstring).

  Attributes:
    name: the site's name (letters, digits, ``_`` and ``-``).
    table: ``patient_id``, ``split``, ``duration`` (days), ``event`` and the
      raw clinical columns, one row per patient.
    bags: ``(features float32 [n, tiles, dim], tile_mask bool [n, tiles])``
      in ``table`` row order, or None (no slides at this site).
  """
  name: str
  table: pd.DataFrame
  bags: tuple[np.ndarray, np.ndarray] | None = None

  @property
  def n(self) -> int:
    return len(self.table)

  def part(self, name: str) -> np.ndarray:
    """Row positions of the patients of one split part."""
    return np.flatnonzero(self.table["split"].to_numpy() == name)


# ----------------------------------------------------------------------------
# Cohorts.
# ----------------------------------------------------------------------------


def _with_split(name: str, table: pd.DataFrame, *, seed: int, fractions) -> pd.DataFrame:
  """Adds a ``split`` column: a stratified train/val/test split within the site."""
  try:
    split = splits_lib.train_val_test_split(table, fractions=tuple(fractions),
                                            stratify=("event",), seed=seed)
  except ValueError as e:
    raise UserError(f"site {name!r}: cannot split its {len(table)} patients: {e}") from e
  part = {}
  for p in PARTS:
    part.update({i: p for i in getattr(split, p)})
  table = table.copy()
  table.insert(1, "split", table["patient_id"].map(part).to_numpy())
  return table


def rotterdam_gbsg(*, seed: int = 0, fractions=(0.7, 0.15, 0.15)) -> list[Site]:
  """Rotterdam and GBSG as two sites, recurrence-free survival (module docstring)."""
  from jaxsurv.data import public  # pylint: disable=import-outside-toplevel
  out = []
  for name in ("rotterdam", "gbsg"):
    t = public.load_cohort_table(name)
    if name == "rotterdam":
      recur = t["dm_event"].to_numpy() == 1
      event = (recur | (t["os_event"].to_numpy() == 1)).astype(np.int64)
      duration = np.where(recur, t["dm_time"], t["os_time"]).astype(np.float64)
    else:
      event, duration = t["dm_event"].to_numpy(np.int64), t["dm_time"].to_numpy(np.float64)
    band = pd.Series(t["size"].astype(str)).map({b: i for i, b in enumerate(SIZE_BANDS)})
    table = pd.DataFrame({"patient_id": t["patient_id"].astype(str), "duration": duration,
                          "event": event,
                          **{c: t[c].to_numpy(np.float64) for c in ROTTERDAM_GBSG_NUMERIC
                             if c != "size_band"},
                          "size_band": band.to_numpy(np.float64)})
    out.append(Site(name, _with_split(name, table, seed=seed, fractions=fractions)))
  return out


def tcga_region(barcode: str) -> str | None:
  """The FLamby region of a TCGA barcode's tissue source site (None: "Other").

  Raises:
    UserError: not a ``TCGA-XX-...`` barcode, or a TSS code outside the table.
  """
  parts = str(barcode).split("-")
  if len(parts) < 3 or parts[0] != "TCGA" or len(parts[1]) != 2:
    raise UserError(f"patient {barcode!r}: not a TCGA barcode (TCGA-XX-XXXX)")
  for region, codes in TCGA_REGIONS.items():
    if parts[1] in codes:
      return region
  if parts[1] in TCGA_OTHER:
    return None
  raise UserError(f"patient {barcode!r}: tissue source site {parts[1]!r} is not in jaxsurv's "
                  "TCGA region table")


def tcga_brca(*, seed: int = 0, fractions=(0.7, 0.15, 0.15), wsi_kwargs=None,
              regions: Sequence[str] | None = None) -> list[Site]:
  """TCGA-BRCA by region of tissue source site (module docstring).

  Args:
    seed: seed of the splits and of the synthetic bags.
    fractions: train/val/test fractions within each site.
    wsi_kwargs: ``load_tcga_brca``'s ``wsi_*`` arguments (``wsi_dim``,
      ``wsi_tiles``, ``wsi_max_tiles``).
    regions: the regions to keep (default: all six).
  """
  from jaxsurv.data import multimodal  # pylint: disable=import-outside-toplevel
  kw = dict(wsi_kwargs or {})
  if "wsi_tiles" in kw:
    kw["wsi_tiles"] = tuple(kw["wsi_tiles"])
  cohort = multimodal.load_tcga_brca(modalities=("clinical",), wsi="pam50", seed=seed, **kw)
  region = np.array([tcga_region(p) for p in cohort.patient_ids], dtype=object)
  feats, mask = cohort.bags[BAG]
  names = cohort.feature_names["clinical"]
  wanted = list(TCGA_REGIONS) if regions is None else list(regions)
  unknown = sorted(set(wanted) - set(TCGA_REGIONS))
  if unknown:
    raise UserError(f"config.data.regions: unknown regions {unknown}; known: "
                    f"{list(TCGA_REGIONS)}")
  out = []
  for r in wanted:
    idx = np.flatnonzero(region == r)
    table = pd.DataFrame({"patient_id": cohort.patient_ids[idx],
                          "duration": cohort.duration[idx], "event": cohort.event[idx]})
    x = cohort.tabular["clinical"][idx]
    for j, c in enumerate(names):
      table[c.removeprefix("clinical__")] = x[:, j].astype(np.float64)
    out.append(Site(r, _with_split(r, table, seed=seed, fractions=fractions),
                    (feats[idx], mask[idx])))
  return out


def tcga_clinical_columns() -> tuple[str, ...]:
  """The 20 TCGA-BRCA clinical columns as site tables name them."""
  from jaxsurv.data import public  # pylint: disable=import-outside-toplevel
  return tuple(c.removeprefix("clinical__") for c in public.COHORTS["tcga_brca"].modalities[
      "clinical"])


# ----------------------------------------------------------------------------
# Checks, encoding and files.
# ----------------------------------------------------------------------------


def check_sites(sites: Sequence[Site], columns: Sequence[str], *, bag_dim: int | None) -> None:
  """Checks every site before round 1; each error names the site.

  Raises:
    UserError: duplicate site names; a site missing a column (named) or
      with non-numeric / missing values in one (patients named); bad
      durations or events; a part without patients; a site with no event
      in its training part; tile features missing, or of another dimension
      than ``bag_dim`` (and the other sites).
  """
  names = [s.name for s in sites]
  if len(set(names)) != len(names) or not sites:
    raise UserError(f"site names must be unique and non-empty, got {names}")
  dims = {}
  for s in sites:
    t = s.table
    need = ["patient_id", "split", "duration", "event", *columns]
    missing = [c for c in need if c not in t.columns]
    if missing:
      raise UserError(f"site {s.name!r}: missing columns {missing} (its table has "
                      f"{list(t.columns)})")
    bad_split = sorted(set(t["split"].astype(str)) - set(PARTS))
    if bad_split:
      raise UserError(f"site {s.name!r}: column 'split' has values {bad_split}; allowed "
                      f"{list(PARTS)}")
    for c in ("duration", "event", *columns):
      v = pd.to_numeric(t[c], errors="coerce").to_numpy(np.float64)
      bad = ~np.isfinite(v)
      if bad.any():
        raise UserError(f"site {s.name!r}: column {c!r} is missing or not a number for "
                        f"patients {list(t['patient_id'][bad][:5])}"
                        f"{' ...' if bad.sum() > 5 else ''} ({int(bad.sum())} rows)")
    d, e = t["duration"].to_numpy(np.float64), t["event"].to_numpy(np.float64)
    if (d < 0).any() or not np.isin(e, (0, 1)).all():
      raise UserError(f"site {s.name!r}: durations must be >= 0 days and events 0/1")
    for p in PARTS:
      if not len(s.part(p)):
        raise UserError(f"site {s.name!r}: no patient in its {p} part")
    n_ev = int(e[s.part("train")].sum())
    if n_ev == 0:
      raise UserError(f"site {s.name!r}: no event in its training part "
                      f"({len(s.part('train'))} patients); the Cox partial likelihood is "
                      "undefined there. Drop the site or merge it with another")
    if bag_dim is not None:
      if s.bags is None:
        raise UserError(f"site {s.name!r}: no tile features, but the model has a tile-bag "
                        "branch (a site without slides needs all-False tile masks)")
      feats, mask = s.bags
      dims[s.name] = int(feats.shape[-1])
      if feats.ndim != 3 or feats.shape[0] != s.n or mask.shape != feats.shape[:2]:
        raise UserError(f"site {s.name!r}: tile features must be [{s.n}, tiles, dim] with a "
                        f"[{s.n}, tiles] mask, got {feats.shape} and {mask.shape}")
  if bag_dim is not None:
    off = {k: v for k, v in dims.items() if v != bag_dim}
    if off:
      raise UserError(f"tile-feature dimension differs between sites: "
                      f"{', '.join(f'site {k!r} has {v}' for k, v in off.items())}, the "
                      f"config and the other sites have {bag_dim} (config.data.wsi_dim)")


def encode(site: Site, columns: Sequence[str], log1p: Sequence[str] = ()) -> np.ndarray:
  """The site's clinical design matrix ``float32 [n, len(columns)]``.

  ``log1p`` columns (skewed counts and concentrations) are ``log(1 + x)``;
  the model's standardisation is fitted later on the training part.

  Raises:
    UserError: a negative value in a ``log1p`` column (site, column named).
  """
  x = np.stack([pd.to_numeric(site.table[c]).to_numpy(np.float64) for c in columns], axis=1)
  for j, c in enumerate(columns):
    if c in log1p:
      if (x[:, j] < 0).any():
        raise UserError(f"site {site.name!r}: column {c!r} has negative values, but "
                        "config.data.log1p transforms it")
      x[:, j] = np.log1p(x[:, j])
  return x.astype(np.float32)


def to_cohort(site: Site, columns: Sequence[str], log1p: Sequence[str] = (), *,
              with_bags: bool) -> MultimodalCohort:
  """The site as a ``MultimodalCohort`` (``clinical`` and optionally ``wsi``)."""
  t = site.table
  bags = {BAG: site.bags} if with_bags else {}
  return MultimodalCohort(t["patient_id"].astype(str).to_numpy(),
                          {"clinical": encode(site, columns, log1p)}, bags, {},
                          t["duration"].to_numpy(np.float64), t["event"].to_numpy(np.int64),
                          t[["split"]].reset_index(drop=True),
                          {"clinical": list(columns)})


def write_site(site: Site, folder: pathlib.Path) -> None:
  """Writes ``clinical.csv`` (and ``tiles.safetensors``) into ``folder`` (atomically)."""
  from jaxsurv import io as io_lib  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if site.bags is not None:
    feats, mask = site.bags
    bags_lib.write_safetensors(folder / BAGS_FILE, {"features": np.asarray(feats, np.float32),
                                                    "tile_mask": np.asarray(mask, bool)},
                               metadata={"site": site.name})
  io_lib.write_csv_atomic(site.table, folder / TABLE_FILE)


def read_site(folder: pathlib.Path, name: str | None = None) -> Site:
  """Reads a site folder (``write_site``'s layout); the name defaults to the folder's.

  Raises:
    UserError: no ``clinical.csv``; an unreadable file; a tile file whose
      rows differ from the table's.
  """
  folder = pathlib.Path(folder)
  name = name or folder.name
  path = folder / TABLE_FILE
  if not path.is_file():
    raise UserError(f"site {name!r}: {path} does not exist (a site folder holds {TABLE_FILE} "
                    f"and optionally {BAGS_FILE})")
  try:
    table = pd.read_csv(path, dtype={"patient_id": str, "split": str})
  except (ValueError, OSError) as e:
    raise UserError(f"site {name!r}: cannot read {path}: {e}") from e
  bags = None
  if (folder / BAGS_FILE).is_file():
    try:
      tensors, _ = bags_lib.read_safetensors(folder / BAGS_FILE)
      bags = (tensors["features"], tensors["tile_mask"].astype(bool))
    except (ValueError, KeyError, OSError) as e:
      raise UserError(f"site {name!r}: cannot read {folder / BAGS_FILE}: {e}") from e
    if len(bags[0]) != len(table):
      raise UserError(f"site {name!r}: {BAGS_FILE} has {len(bags[0])} patients, "
                      f"{TABLE_FILE} {len(table)}")
  return Site(name, table, bags)


def load_sites(config) -> list[Site]:
  """The sites of ``config.data`` (``cohort``: ``rotterdam_gbsg``, ``tcga_brca``,
  or ``folders`` with ``site_dirs`` ``"A=/path/a,B=/path/b"``).

  Raises:
    UserError: an unknown cohort or a malformed ``site_dirs``.
  """
  d = config.data
  if d.cohort == "rotterdam_gbsg":
    return rotterdam_gbsg(seed=d.split_seed, fractions=tuple(d.fractions))
  if d.cohort == "tcga_brca":
    regions = d.get("regions") or None
    return tcga_brca(seed=d.split_seed, fractions=tuple(d.fractions),
                     wsi_kwargs={"wsi_dim": d.wsi_dim, "wsi_tiles": tuple(d.wsi_tiles),
                                 "wsi_max_tiles": d.wsi_max_tiles},
                     regions=None if regions is None else tuple(regions.split("+")))
  if d.cohort == "folders":
    out = []
    for item in str(d.get("site_dirs", "")).split(","):
      if "=" not in item:
        raise UserError(f"config.data.site_dirs must be 'NAME=FOLDER,...', got "
                        f"{d.get('site_dirs')!r}")
      name, folder = item.split("=", 1)
      out.append(read_site(pathlib.Path(folder), name.strip()))
    return out
  raise UserError(f"config.data.cohort must be one of {COHORTS} for SarcNet, got {d.cohort!r}")


def fingerprint(sites: Sequence[Site]) -> str:
  """A sha256 over every site's table and tile arrays (the run's cohort identity)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  for s in sites:
    h.update(s.name.encode())
    h.update(pd.util.hash_pandas_object(s.table, index=False).to_numpy().tobytes())
    if s.bags is not None:
      h.update(np.ascontiguousarray(s.bags[0]).tobytes())
      h.update(np.ascontiguousarray(s.bags[1]).tobytes())
  return h.hexdigest()


def summary(sites: Sequence[Site]) -> list[dict[str, Any]]:
  """Per site and part: patients and events (JSON-compatible)."""
  rows = []
  for s in sites:
    e = s.table["event"].to_numpy()
    rows.append({"site": s.name, **{f"n_{p}": int(len(s.part(p))) for p in PARTS},
                 **{f"events_{p}": int(e[s.part(p)].sum()) for p in PARTS}})
  return rows

