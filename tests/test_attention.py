"""Attention reports: tables and plots from hand-made attention arrays."""

import numpy as np
import pandas as pd
import pytest

from jaxsurv import attention


def _parts():
  # Two parts; bag weights with padding (0) and one patient without tiles.
  mil_val = np.array([[0.7, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
  mil_test = np.array([[0.0, 0.0, 0.0, 0.0]])
  feat_val = np.array([[0.6, 0.3, 0.1], [0.5, 0.1, 0.4]])
  feat_test = np.array([[0.2, 0.2, 0.6]])
  return {
      "val": {"patient_id": np.array(["p1", "p2"]),
              "pred": {"mil_attention": {"wsi": mil_val},
                       "healnet_attention": {"omic": feat_val, "wsi": mil_val},
                       "modality_attention": np.array([[0.5, 0.5], [0.9, 0.1]])}},
      "test": {"patient_id": np.array(["p3"]),
               "pred": {"mil_attention": {"wsi": mil_test},
                        "healnet_attention": {"omic": feat_test, "wsi": mil_test},
                        "modality_attention": np.array([[1.0, 0.0]])}},
  }


MODALITIES = (("omic", "tabular"), ("wsi", "bag"))
NAMES = {"omic": ["TP53", "ESR1", "ERBB2"]}


def test_bag_summary_by_hand():
  s = attention.bag_summary(np.array([[0.7, 0.2, 0.1, 0.0], [0.25] * 4, [0.0] * 4]))
  np.testing.assert_array_equal(s["n_tiles"], [3, 4, 0])
  np.testing.assert_array_equal(s["top_tile"], [0, 0, -1])
  h = -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.1 * np.log(0.1))
  np.testing.assert_allclose(s["entropy"], [h, np.log(4), 0.0])
  # Uniform weights over n tiles: n effective tiles; no tiles: 0.
  np.testing.assert_allclose(s["effective_tiles"], [np.exp(h), 4.0, 0.0])


def test_tables_name_features_and_keep_patients_and_parts():
  tables = attention.attention_tables(_parts(), MODALITIES, NAMES)
  omic = tables["healnet_attention_omic.csv"]
  assert list(omic.columns) == ["patient_id", "split", "TP53", "ESR1", "ERBB2"]
  assert omic["patient_id"].tolist() == ["p1", "p2", "p3"]
  assert omic["split"].tolist() == ["val", "val", "test"]
  np.testing.assert_allclose(omic["ERBB2"], [0.1, 0.4, 0.6])
  w = tables["modality_attention.csv"]
  np.testing.assert_allclose(w["weight_omic"], [0.5, 0.9, 1.0])
  assert tables["mil_attention_wsi.csv"]["n_tiles"].tolist() == [3, 4, 0]


def test_tile_weight_table_has_one_row_per_real_tile_ranked():
  tiles = attention.tile_weight_table(_parts(), "mil_attention", "wsi")
  assert len(tiles) == 3 + 4  # p3 has no tiles, padding is dropped
  p1 = tiles[tiles.patient_id == "p1"].sort_values("tile")
  np.testing.assert_allclose(p1["weight"], [0.7, 0.2, 0.1])
  assert p1["rank"].tolist() == [0, 1, 2]
  np.testing.assert_allclose(tiles.groupby("patient_id")["weight"].sum(), 1.0)
  assert attention.tile_weight_table(_parts(), "absent", "wsi").empty


def test_feature_plot_orders_features_by_mean_attention(tmp_path):
  tables = attention.attention_tables(_parts(), MODALITIES, NAMES)
  top = attention.plot_feature_attention(tmp_path / "f.png", tables["healnet_attention_omic.csv"],
                                         title="t", top_k=2)
  # Means: TP53 0.433, ESR1 0.2, ERBB2 0.367.
  assert top == ["TP53", "ERBB2"]
  assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no feature columns"):
    attention.plot_feature_attention(tmp_path / "g.png", pd.DataFrame({"patient_id": ["a"]}),
                                     title="t")


def test_write_attention_reports_writes_every_table_and_plot(tmp_path):
  written = attention.write_attention_reports(tmp_path, _parts(), MODALITIES, NAMES)
  expected = {"healnet_attention_omic.csv", "healnet_attention_omic_features.png",
              "healnet_attention_wsi.csv", "modality_attention.csv", "modality_attention.png",
              "mil_attention_wsi.csv", "mil_attention_tiles_wsi.csv", "mil_attention_tiles_wsi.png",
              "healnet_attention_tiles_wsi.csv", "healnet_attention_tiles_wsi.png",
              "healnet_top_features_omic.csv", "healnet_feature_ranking_omic_val.csv",
              "healnet_feature_ranking_omic_test.csv", "healnet_top_tiles_wsi.csv"}
  assert set(written) == expected
  assert {p.name for p in tmp_path.iterdir()} == expected  # no temporary files left
  for name in expected:
    assert (tmp_path / name).stat().st_size > 0


def test_top_features_per_patient_by_hand():
  table = attention.attention_tables(_parts(), MODALITIES, NAMES)["healnet_attention_omic.csv"]
  top = attention.top_features(table, k=2)
  assert top[top.patient_id == "p1"]["feature"].tolist() == ["TP53", "ESR1"]
  assert top[top.patient_id == "p2"]["feature"].tolist() == ["TP53", "ERBB2"]
  assert top[top.patient_id == "p3"]["feature"].tolist() == ["ERBB2", "TP53"]  # tie: column order
  assert top["rank"].tolist() == [0, 1] * 3
  np.testing.assert_allclose(top[top.patient_id == "p2"]["weight"], [0.5, 0.4])
  # A patient without the modality (all weights 0) has no rows.
  absent = pd.concat([table, pd.DataFrame({"patient_id": ["p4"], "split": ["test"], "TP53": [0.0],
                                           "ESR1": [0.0], "ERBB2": [0.0]})])
  assert "p4" not in set(attention.top_features(absent)["patient_id"])
  with pytest.raises(ValueError, match="k must be"):
    attention.top_features(table, k=0)


def test_feature_ranking_by_hand_and_per_part():
  table = attention.attention_tables(_parts(), MODALITIES, NAMES)["healnet_attention_omic.csv"]
  r = attention.feature_ranking(table)
  assert r["feature"].tolist() == ["TP53", "ERBB2", "ESR1"]
  np.testing.assert_allclose(r["mean_attention"], [1.3 / 3, 1.1 / 3, 0.6 / 3])
  assert r["rank"].tolist() == [0, 1, 2] and (r["n_patients"] == 3).all()
  val = attention.feature_ranking(table, "val")
  np.testing.assert_allclose(val.set_index("feature").loc[["TP53", "ESR1", "ERBB2"],
                                                          "mean_attention"], [0.55, 0.2, 0.25])
  with pytest.raises(ValueError, match="no patient"):
    attention.feature_ranking(table, "train")


def _ranking(order):
  return pd.DataFrame({"feature": order, "mean_attention": np.linspace(0.5, 0.1, len(order)),
                       "rank": np.arange(len(order)), "n_patients": 10})


def test_ranking_stability_overlap_by_hand():
  folds = {0: _ranking(list("abcdef")), 1: _ranking(list("abdcef")), 2: _ranking(list("fedcba"))}
  combined, s = attention.ranking_stability(folds, top_k=2)
  assert s["pairwise_overlap"] == {"0-1": 1.0, "0-2": 0.0, "1-2": 0.0}
  assert s["mean_overlap"] == pytest.approx(1 / 3) and s["min_overlap"] == 0.0
  assert s["chance_overlap"] == pytest.approx(2 / 6) and s["in_all_folds"] == []
  a = combined.set_index("feature").loc["a"]
  assert a["top_k_folds"] == 2 and a["mean_rank"] == pytest.approx((0 + 0 + 5) / 3)
  assert a["rank_2"] == 5
  _, s3 = attention.ranking_stability(folds, top_k=3)
  assert s3["pairwise_overlap"]["0-1"] == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match=">= 2"):
    attention.ranking_stability({0: folds[0]})
  with pytest.raises(ValueError, match="other features"):
    attention.ranking_stability({0: folds[0], 1: _ranking(list("abcdeg"))})
  with pytest.raises(ValueError, match="top_k"):
    attention.ranking_stability(folds, top_k=7)


def test_top_tiles_keeps_the_k_highest_per_patient():
  tiles = attention.tile_weight_table(_parts(), "healnet_attention", "wsi")
  top = attention.top_tiles(tiles, k=1)
  assert top["patient_id"].tolist() == ["p1", "p2"] and top["tile"].tolist() == [0, 0]
  np.testing.assert_allclose(top["weight"], [0.7, 0.25])
