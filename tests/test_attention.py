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
              "healnet_attention_tiles_wsi.csv", "healnet_attention_tiles_wsi.png"}
  assert set(written) == expected
  assert {p.name for p in tmp_path.iterdir()} == expected  # no temporary files left
  for name in expected:
    assert (tmp_path / name).stat().st_size > 0
