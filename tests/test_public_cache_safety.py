"""The table cache of jaxsurv.data.public: exact Parquet round trip, never unpickled.

Every test points ``JAXSURV_CACHE`` at a tmp folder. References are the
uncached builders' tables (``public._BUILDERS``), compared with
``pandas.testing.assert_frame_equal`` (dtypes, categories and their order,
NaN positions and values exactly).
"""

import os
import pickle

import numpy as np
import pandas as pd
import pytest

from jaxsurv.data import public


class _Payload:
  """Unpickling this creates a folder: proof that a pickle was loaded."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSURV_CACHE", str(tmp_path / "cache"))
  return tmp_path / "cache" / "tables"


def _no_rebuild(monkeypatch, name):
  def fail():
    raise AssertionError(f"{name} was rebuilt instead of read from the cache")
  monkeypatch.setitem(public._BUILDERS, name, fail)  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["rotterdam", "gbsg", "breast_cancer"])
def test_cache_round_trips_exactly(cache, monkeypatch, name):
  built = public._BUILDERS[name]()  # pylint: disable=protected-access
  first = public.load_cohort_table(name)
  files = sorted(p.name for p in cache.iterdir())
  assert len(files) == 1 and files[0].endswith(".parquet"), files
  with open(cache / files[0], "rb") as f:
    assert f.read(4) == b"PAR1"
  _no_rebuild(monkeypatch, name)
  cached = public.load_cohort_table(name)
  for table in (first, cached):
    pd.testing.assert_frame_equal(table, built, check_exact=True)
    assert table.dtypes.to_dict() == built.dtypes.to_dict()
  for col in public.COHORTS[name].categorical:
    if isinstance(built[col].dtype, pd.CategoricalDtype):
      assert cached[col].cat.ordered == built[col].cat.ordered
      assert list(cached[col].cat.categories) == list(built[col].cat.categories)
  assert cached["patient_id"].map(type).eq(str).all()


def test_cache_keeps_edge_dtypes(tmp_path):
  """tcga_brca-like columns plus the edge cases: unused categories, None, NaN."""
  table = pd.DataFrame({
      "patient_id": pd.Series(["TCGA-A1-0001", "TCGA-A1-0002", "TCGA-A1-0003"], dtype=object),
      "rna__BRCA1": [0.25, np.nan, -1.5],
      "pam50": pd.Series(["0", "4", "2"], dtype=object),
      "grade": pd.Categorical(["low", None, "low"], categories=["low", "mid", "high"],
                              ordered=True),
      "er": pd.Series(["positive", None, "negative"], dtype=object),
      "nodes": np.array([0, 3, 12], np.int64),
      "os_time": [10.5, 2000.0, 12345.0002],
      "os_event": np.array([1, 0, 1], np.int64),
      "dm_time": np.full(3, np.nan),
      "dm_event": np.full(3, np.nan),
  })
  path = tmp_path / "t.parquet"
  public._write_cache(table, path)  # pylint: disable=protected-access
  back = public._read_cache(path)  # pylint: disable=protected-access
  pd.testing.assert_frame_equal(back, table, check_exact=True)
  assert list(back["grade"].cat.categories) == ["low", "mid", "high"]
  assert back["er"].tolist() == ["positive", None, "negative"]
  assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]  # No temporary file left.


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
  import pyarrow.parquet as pq

  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(pq, "write_table", boom)
  with pytest.raises(OSError, match="disk full"):
    public._write_cache(pd.DataFrame({"a": [1]}),  # pylint: disable=protected-access
                        tmp_path / "t.parquet")
  assert list(tmp_path.iterdir()) == []


def test_planted_pickles_are_never_loaded(cache, monkeypatch, tmp_path):
  marker = tmp_path / "pickle_was_loaded"
  payload = pickle.dumps(_Payload(marker))
  # Positive control: the payload does run when unpickled.
  pickle.loads(payload)
  assert marker.is_dir()
  marker.rmdir()

  reference = public.load_cohort_table("gbsg")  # Fills the Parquet cache.
  # Caches of the pickle era, and pickles under any name in the folder.
  for fname in (f"gbsg-v2-pandas{pd.__version__}.pkl", f"gbsg-v3-pandas{pd.__version__}.pkl",
                "gbsg.pkl", "rotterdam-v2-pandas2.3.3.pkl"):
    (cache / fname).write_bytes(payload)
  calls = []
  monkeypatch.setattr(pd, "read_pickle", lambda *a, **k: calls.append(a))
  monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
  monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
  _no_rebuild(monkeypatch, "gbsg")
  pd.testing.assert_frame_equal(public.load_cohort_table("gbsg"), reference, check_exact=True)
  assert calls == [] and not marker.exists()


def test_pickle_planted_at_the_cache_path_is_rebuilt_not_loaded(cache, tmp_path):
  marker = tmp_path / "pickle_was_loaded"
  reference = public.load_cohort_table("gbsg")
  (parquet,) = cache.glob("gbsg-*.parquet")
  parquet.write_bytes(pickle.dumps(_Payload(marker)))
  pd.testing.assert_frame_equal(public.load_cohort_table("gbsg"), reference, check_exact=True)
  assert not marker.exists()
  with open(parquet, "rb") as f:  # The bad file was replaced by a rebuilt table.
    assert f.read(4) == b"PAR1"
