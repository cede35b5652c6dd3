"""Tests for jaxsurv.data.splits: patient-level, deterministic, stratified."""

import numpy as np
import pandas as pd
import pytest

from jaxsurv.data import public, splits


@pytest.fixture(scope="module")
def rotterdam():
  return public.load_cohort_table("rotterdam")


def _toy(n=100, event_rate=0.2, seed=0):
  rng = np.random.default_rng(seed)
  return pd.DataFrame({
      "patient_id": [f"p{i:03d}" for i in range(n)],
      "os_event": (np.arange(n) < round(n * event_rate)).astype(int),
      "age": rng.normal(60, 10, n),
      "site": rng.choice(["A", "B", "C", "D", "E", "F", "G"], n),
  })


def test_deterministic_and_order_independent(rotterdam):
  a = splits.train_val_test_split(rotterdam, seed=3)
  b = splits.train_val_test_split(rotterdam.sample(frac=1.0, random_state=1), seed=3)
  assert a == b
  c = splits.train_val_test_split(rotterdam, seed=4)
  assert set(a.test) != set(c.test) and set(a.val) != set(c.val)


def test_disjoint_cover_and_sizes(rotterdam):
  s = splits.train_val_test_split(rotterdam, stratify=("os_event", "dm_event", "age"), seed=0)
  parts = [set(s.train), set(s.val), set(s.test)]
  assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
  assert set().union(*parts) == set(rotterdam["patient_id"])
  n = len(rotterdam)
  assert s.sizes() == {"train": n - 2 * round(0.15 * n), "val": round(0.15 * n),
                       "test": round(0.15 * n)}
  assert s.meta["seed"] == 0 and s.meta["stratify"] == ["os_event", "dm_event", "age"]


def test_stratification_keeps_event_rates(rotterdam):
  s = splits.train_val_test_split(rotterdam, stratify=("os_event", "dm_event"), seed=7)
  idx = s.indices(rotterdam)
  for col in ("os_event", "dm_event"):
    overall = rotterdam[col].mean()
    for part, rows in idx.items():
      assert abs(rotterdam[col].iloc[rows].mean() - overall) < 0.005, (col, part)


def test_stratified_event_counts_are_tight_unstratified_are_not():
  # 100 patients, 20 events, 15 in test: stratified test sets hold exactly 3
  # events for every seed; unstratified ones spread (1..7 measured).
  df = _toy()
  strat, plain = [], []
  for seed in range(20):
    for out, strat_cols in ((strat, ("os_event",)), (plain, ())):
      s = splits.train_val_test_split(df, stratify=strat_cols, seed=seed)
      out.append(int(df.set_index("patient_id").loc[list(s.test), "os_event"].sum()))
  assert set(strat) == {3}
  assert max(plain) - min(plain) > max(strat) - min(strat)


def test_rare_strata_are_merged_not_fatal():
  df = _toy(n=40, event_rate=0.1)
  df["site"] = [f"s{i}" for i in range(40)]  # Every site is a singleton.
  s = splits.train_val_test_split(df, stratify=("os_event", "site", "age"), seed=0)
  assert sum(s.sizes().values()) == 40
  labels = splits.stratification_labels(df, ("os_event", "site"), min_count=3)
  counts = pd.Series(labels).value_counts()
  assert counts.min() >= 3
  folds = splits.kfold_with_holdout(df, n_folds=5, stratify=("os_event", "site"), seed=0)
  assert len(folds) == 5


def test_stratification_labels_bins_numeric_keeps_events():
  df = _toy(n=200, event_rate=0.5)
  labels = splits.stratification_labels(df, ("os_event", "age"), n_bins=4, min_count=2)
  assert len(set(labels)) == 8
  ev = np.array([l.startswith("os_event=1") for l in labels])
  np.testing.assert_array_equal(ev, df["os_event"].to_numpy() == 1)


def test_kfold_with_holdout(rotterdam):
  folds = splits.kfold_with_holdout(rotterdam, n_folds=5, test_fraction=0.15,
                                    stratify=("os_event", "size"), seed=11)
  assert len(folds) == 5
  test = set(folds[0].test)
  assert len(test) == round(0.15 * len(rotterdam))
  vals = [set(f.val) for f in folds]
  rest = set(rotterdam["patient_id"]) - test
  assert set().union(*vals) == rest and sum(len(v) for v in vals) == len(rest)
  for f in folds:
    assert set(f.test) == test
    assert set(f.train) | set(f.val) == rest and not set(f.train) & set(f.val)
  again = splits.kfold_with_holdout(rotterdam, n_folds=5, stratify=("os_event", "size"), seed=11)
  assert again == folds
  overall = rotterdam["os_event"].mean()
  ev = rotterdam.set_index("patient_id")["os_event"]
  for v in vals:
    assert abs(ev.loc[list(v)].mean() - overall) < 0.01


def test_save_load_round_trip(tmp_path, rotterdam):
  single = splits.train_val_test_split(rotterdam, seed=0)
  folds = splits.kfold_with_holdout(rotterdam, n_folds=3, seed=0)
  p1 = splits.save_splits(single, tmp_path / "single.json")
  p2 = splits.save_splits(folds, tmp_path / "sub" / "folds.json")
  assert splits.load_splits(p1) == single
  assert splits.load_splits(p2) == folds
  (tmp_path / "bad.json").write_text('{"format": "x"}')
  with pytest.raises(ValueError, match="not a jaxsurv splits file"):
    splits.load_splits(tmp_path / "bad.json")


def test_splits_from_column():
  df = _toy(n=6)
  df["split"] = ["train", "Train ", "val", "test", "train", "TEST"]
  s = splits.splits_from_column(df)
  assert s.train == ("p000", "p001", "p004") and s.val == ("p002",) and s.test == ("p003", "p005")
  df.loc[2, "split"] = "holdout"
  with pytest.raises(ValueError, match=r"'p002': 'holdout'"):
    splits.splits_from_column(df)


def test_duplicate_and_overlapping_ids_are_named():
  df = _toy(n=20)
  df.loc[5, "patient_id"] = "p001"
  with pytest.raises(ValueError, match=r"duplicate patient ids \['p001'\]"):
    splits.train_val_test_split(df, seed=0)
  with pytest.raises(ValueError, match=r"duplicate"):
    splits.kfold_with_holdout(df, seed=0)
  with pytest.raises(ValueError, match=r"both train and test: \['b'\]"):
    splits.Split(("a", "b"), (), ("b", "c"))


def test_argument_errors():
  df = _toy(n=20)
  with pytest.raises(ValueError, match=r"absent.*\['grade'\]"):
    splits.train_val_test_split(df, stratify=("os_event", "grade"), seed=0)
  with pytest.raises(ValueError, match="sum to 1"):
    splits.train_val_test_split(df, fractions=(0.7, 0.2, 0.2), seed=0)
  with pytest.raises(ValueError, match="n_folds"):
    splits.kfold_with_holdout(df, n_folds=1, seed=0)
  with pytest.raises(ValueError, match=r"no observed value: \['os_event'\].*dm_event"):
    splits.train_val_test_split(public.load_cohort_table("gbsg"), seed=0)
  s = splits.train_val_test_split(df, fractions=(0.8, 0.0, 0.2), seed=0)
  assert s.val == () and len(s.test) == 4
  with pytest.raises(ValueError, match="absent from the table"):
    s.indices(df.iloc[:10])
