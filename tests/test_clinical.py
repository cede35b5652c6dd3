"""Tests for jaxsurv.data.clinical.ClinicalPreprocessor.

References: hand computation with numpy, and scikit-learn's StandardScaler /
OneHotEncoder / SimpleImputer / MissingIndicator on the same data.
"""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.impute import MissingIndicator, SimpleImputer
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from jaxsurv.data import public
from jaxsurv.data.clinical import ClinicalPreprocessor, level_key


def _tables():
  train = pd.DataFrame({
      "patient_id": ["a", "b", "c", "d", "e"],
      "age": [50.0, 60.0, 70.0, 40.0, 55.0],
      "nodes": [0.0, np.nan, 3.0, 1.0, np.nan],
      "const": [7.0] * 5,
      "stage": ["II", "I", "II", "III", None],
      "er": [1, 0, 1, 1, 0],
  })
  test = pd.DataFrame({
      "patient_id": ["t1", "t2", "t3"],
      "age": [1000.0, 45.0, np.nan],  # t1 is a test-only outlier.
      "nodes": [2.0, np.nan, 5.0],
      "const": [7.0, 8.0, 7.0],
      "stage": ["I", "III", np.nan],
      "er": [0.0, 1.0, 1.0],  # Floats vs train's ints: same levels.
  })
  return train, test


def _pre(**kw):
  return ClinicalPreprocessor(["age", "nodes", "const"], ["stage", "er"], **kw)


def test_fit_uses_train_statistics_only():
  train, test = _tables()
  pre = _pre().fit(train)
  both = _pre().fit(pd.concat([train, test]))
  state = pre.to_dict()["numeric_stats"]
  assert state["age"]["mean"] == pytest.approx(np.mean(train["age"]))
  assert state["age"]["mean"] != pytest.approx(both.to_dict()["numeric_stats"]["age"]["mean"])
  # Refitting on train after seeing test gives the same transform of test.
  np.testing.assert_array_equal(pre.transform(test), _pre().fit(train).transform(test))


def test_transform_matches_manual_and_sklearn():
  train, test = _tables()
  pre = _pre().fit(train)
  x = pre.transform(test)
  assert x.dtype == np.float32 and x.shape == (3, pre.n_features)
  assert pre.feature_names == ["age", "nodes", "const", "nodes__missing",
                               "stage=I", "stage=II", "stage=III", "stage=__missing__",
                               "er=0", "er=1"]
  # Manual: (x - train mean) / train population sd; missing -> mean -> 0.
  age_mu, age_sd = train["age"].mean(), train["age"].std(ddof=0)
  nod = train["nodes"].dropna()
  expected_age = (np.array([1000.0, 45.0, age_mu]) - age_mu) / age_sd
  expected_nodes = (np.array([2.0, nod.mean(), 5.0]) - nod.mean()) / nod.std(ddof=0)
  np.testing.assert_allclose(x[:, 0], expected_age, rtol=1e-6)
  np.testing.assert_allclose(x[:, 1], expected_nodes, rtol=1e-6)
  np.testing.assert_array_equal(x[:, 2], [0.0, 1.0, 0.0])  # sd = 0 -> scale 1.
  np.testing.assert_array_equal(x[:, 3], [0.0, 1.0, 0.0])
  np.testing.assert_array_equal(x[:, 4:8], [[1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
  np.testing.assert_array_equal(x[:, 8:], [[1, 0], [0, 1], [0, 1]])

  # scikit-learn reference for the numeric block: mean-impute then scale,
  # plus a missing-indicator for the columns with missing values in train.
  num = ["age", "nodes", "const"]
  imp = SimpleImputer(strategy="mean").fit(train[num])
  sc = StandardScaler().fit(imp.transform(train[num]))
  # sklearn scales the *imputed* train column (sd shrinks), so compare only
  # the columns without missing values in train, and the indicator.
  ref = sc.transform(imp.transform(test[num]))
  np.testing.assert_allclose(x[:, [0, 2]], ref[:, [0, 2]], rtol=1e-6)
  mi = MissingIndicator(features="missing-only", error_on_new=False).fit(train[num])
  np.testing.assert_array_equal(x[:, 3:4], mi.transform(test[num]).astype(float))
  enc = OneHotEncoder(handle_unknown="ignore").fit(train[["er"]].astype(str))
  np.testing.assert_array_equal(x[:, 8:], enc.transform(test[["er"]].astype(int).astype(str)).toarray())


def test_train_output_is_standardised_on_real_cohort():
  table = public.load_cohort_table("rotterdam")
  info = public.COHORTS["rotterdam"]
  train = table.iloc[:2000]
  pre = ClinicalPreprocessor(info.numeric, info.categorical).fit(train)
  x = pre.transform(train)
  assert np.isfinite(x).all()
  np.testing.assert_allclose(x[:, :len(info.numeric)].mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(x[:, :len(info.numeric)].std(0), 1, atol=1e-4)
  assert pre.feature_names[-3:] == ["size=<=20", "size=20-50", "size=>50"]
  np.testing.assert_array_equal(x[:, -3:].sum(1), 1)


def test_unknown_level_error_names_patient_column_level():
  train, test = _tables()
  test = test.copy()
  test.loc[1, "stage"] = "IV"
  pre = ClinicalPreprocessor(["age"], ["stage"]).fit(train)
  with pytest.raises(ValueError) as err:
    pre.transform(test)
  msg = str(err.value)
  assert "'t2'" in msg and "'stage'" in msg and "'IV'" in msg
  ignore = ClinicalPreprocessor(["age"], ["stage"], handle_unknown="ignore").fit(train)
  x = ignore.transform(test)
  np.testing.assert_array_equal(x[1, 1:], 0.0)
  assert x[0, 1:].sum() == 1.0


def test_missing_category_unseen_in_train_is_unknown():
  train, test = _tables()
  pre = ClinicalPreprocessor([], ["er"]).fit(train)
  test = test.copy()
  test["er"] = [1.0, np.nan, 0.0]
  with pytest.raises(ValueError, match=r"patient 't2': level '__missing__'"):
    pre.transform(test)


def test_round_trip_through_json():
  train, test = _tables()
  for handle in ("error", "ignore"):
    pre = _pre(handle_unknown=handle).fit(train)
    state = json.loads(json.dumps(pre.to_dict()))
    back = ClinicalPreprocessor.from_dict(state)
    assert back.feature_names == pre.feature_names
    assert back.handle_unknown == handle
    np.testing.assert_array_equal(back.transform(test), pre.transform(test))
    np.testing.assert_array_equal(back.transform(train), pre.transform(train))
  unfitted = ClinicalPreprocessor.from_dict(_pre().to_dict())
  assert not unfitted.fitted
  with pytest.raises(ValueError, match="format"):
    ClinicalPreprocessor.from_dict({"format": "other"})


def test_round_trip_on_real_cohort_with_ordered_categories():
  table = public.load_cohort_table("breast_cancer")
  info = public.COHORTS["breast_cancer"]
  pre = ClinicalPreprocessor(info.numeric, info.categorical).fit(table.iloc[:150])
  back = ClinicalPreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
  np.testing.assert_array_equal(back.transform(table.iloc[150:]), pre.transform(table.iloc[150:]))
  assert [f for f in pre.feature_names if f.startswith("grade=")] == [
      "grade=well differentiated", "grade=intermediate", "grade=poorly differentiated",
      "grade=__missing__"]


def test_absent_columns_are_listed():
  train, _ = _tables()
  pre = ClinicalPreprocessor(["age", "weight"], ["stage", "site"])
  with pytest.raises(ValueError, match=r"\['weight', 'site'\].*available.*'age'"):
    pre.fit(train)


def test_bad_numeric_values_name_patients():
  train, _ = _tables()
  bad = train.assign(age=["50", "sixty", "70", "40", "55"])
  with pytest.raises(ValueError, match=r"'age'.*'sixty'.*'b'"):
    ClinicalPreprocessor(["age"]).fit(bad)
  inf = train.assign(age=[50.0, np.inf, 70.0, 40.0, 55.0])
  with pytest.raises(ValueError, match=r"infinite.*'b'"):
    ClinicalPreprocessor(["age"]).fit(inf)


def test_config_errors_and_unfitted():
  with pytest.raises(ValueError, match="no numeric or categorical"):
    ClinicalPreprocessor()
  with pytest.raises(ValueError, match="more than once"):
    ClinicalPreprocessor(["age"], ["age"])
  with pytest.raises(ValueError, match="handle_unknown"):
    ClinicalPreprocessor(["age"], handle_unknown="zero")
  train, _ = _tables()
  with pytest.raises(ValueError, match="not fitted"):
    ClinicalPreprocessor(["age"]).transform(train)
  all_missing = train.assign(age=np.nan)
  with pytest.raises(ValueError, match="no observed value"):
    ClinicalPreprocessor(["age"]).fit(all_missing)


def test_level_key():
  assert level_key(2) == level_key(2.0) == level_key("2") == level_key(np.int64(2)) == "2"
  assert level_key(np.nan) is None and level_key(None) is None and level_key(pd.NA) is None
  assert level_key(True) == "True" and level_key(0.5) == "0.5"
