"""The CPU benchmark scripts' own logic at tiny shapes: the per-implementation
convolution timer (benchmarks/conv_benchmark.py), the pooling of interleaved
rounds in the train-step benchmark (benchmarks/train_step_benchmark.py) and
the encoder-by-depth rows (benchmarks/densenet_stage_benchmark.py)."""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # pylint: disable=wrong-import-position
import conv_benchmark  # pylint: disable=wrong-import-position
import densenet_stage_benchmark  # pylint: disable=wrong-import-position
import train_step_benchmark  # pylint: disable=wrong-import-position


def test_conv_benchmark_times_every_implementation_against_native():
  a = argparse.Namespace(batch=1, grid=3, in_channels=2, out=3, kernel=3, stride=1, reps=2,
                         impls=["native", "slices", "cols", "auto"], cpu_convs=["xla"])
  rows = conv_benchmark.jax_rows(a)
  assert [r["impl"] for r in rows] == a.impls
  assert rows[0]["max_rel_diff"] == 0.0
  for r in rows:
    assert r["max_rel_diff"] < 1e-5
    for part in ("fwd", "grads"):
      assert 0 < r[part]["p25_ms"] <= r[part]["median_ms"]
  table = conv_benchmark.table(rows)
  assert table.count("\n") == 1 + len(rows) and "| cols |" in table


def test_conv_benchmark_rows_per_cpu_convolution_library_and_stride():
  # 24 -> 20 channels: XLA's own choice is YNNPACK, "eigen" moves it to Eigen.
  a = argparse.Namespace(batch=1, grid=5, in_channels=24, out=20, kernel=3, stride=2, reps=2,
                         impls=["native", "slices"], cpu_convs=["xla", "eigen"])
  rows = conv_benchmark.jax_rows(a)
  assert [r["impl"] for r in rows] == ["native", "native, eigen", "slices", "slices, eigen"]
  assert all(r["max_rel_diff"] < 1e-5 for r in rows)


def test_conv_benchmark_gemm_row_has_the_convolutions_im2col_shape():
  a = argparse.Namespace(batch=2, grid=4, in_channels=3, out=5, kernel=3, stride=2, reps=2,
                         impls=["slices"], cpu_convs=["xla"], gemm=True)
  # Output 2^3 voxels per sample: M = 2 * 8, K = 27 taps * 3 channels, N = 5.
  assert conv_benchmark._gemm_shape(a) == (16, 81, 5)
  rows = conv_benchmark.jax_rows(a)
  assert [r["impl"] for r in rows] == ["slices", "im2col product alone (16, 81, 5)"]
  assert "max_rel_diff" not in rows[1] and rows[1]["grads"]["median_ms"] > 0
  assert "| im2col product alone (16, 81, 5) |" in conv_benchmark.table(rows)


def test_pool_rounds_pools_the_steps_and_keeps_the_cold_round():
  def result(times, compile_s):
    return {"spec": {"batch": 4}, "compile_s": compile_s, **train_step_benchmark._stats(times)}
  rounds = [result([0.3, 0.1, 0.2], 60.0), result([0.4, 0.5], 0.5), result([0.6], 0.4)]
  out = train_step_benchmark.pool_rounds(rounds)
  pooled = [0.3, 0.1, 0.2, 0.4, 0.5, 0.6]
  assert out["compile_s"] == 60.0 and out["rounds"] == 3 and out["timed_steps"] == 6
  assert out["step_s_median"] == pytest.approx(statistics.median(pooled))
  assert out["step_s_min"] == 0.1 and out["step_s_max"] == 0.6
  assert out["round_medians_s"] == [0.2, 0.45, 0.6]
  assert out["samples_per_s"] == pytest.approx(4 / statistics.median(pooled))
  failed = {"error": "jax worker timed out"}
  assert train_step_benchmark.pool_rounds([rounds[0], failed]) is failed


def test_stage_benchmark_prefixes_are_positive_layer_counts():
  assert densenet_stage_benchmark.parse_prefix("6,12") == (6, 12)
  for bad in ("", "6,", "0", "6,-1", "a"):
    with pytest.raises(ValueError, match="prefix"):
      densenet_stage_benchmark.parse_prefix(bad)


def test_stage_benchmark_pools_rounds_into_ratios_and_increments():
  a, b = (1,), (1, 1)
  jax_rounds = [{a: [0.010, 0.030], b: [0.040]}, {a: [0.020], b: [0.050, 0.060]}]
  torch_rounds = [{a: [0.010], b: [0.020]}, {a: [0.010], b: [0.030]}]
  rows = densenet_stage_benchmark.pooled_rows([a, b], jax_rounds, torch_rounds)
  assert rows[0]["jaxsurv"]["median_ms"] == pytest.approx(20.0)
  assert rows[0]["ratio"] == pytest.approx(2.0) and "increment_ms" not in rows[0]["jaxsurv"]
  assert rows[1]["jaxsurv"]["median_ms"] == pytest.approx(50.0)
  assert rows[1]["torch"]["median_ms"] == pytest.approx(25.0)
  assert rows[1]["jaxsurv"]["increment_ms"] == pytest.approx(30.0)
  assert rows[1]["torch"]["increment_ms"] == pytest.approx(15.0)
  assert rows[1]["increment_ratio"] == pytest.approx(2.0)
  # Without torch rounds: jaxsurv columns only.
  alone = densenet_stage_benchmark.pooled_rows([a, b], jax_rounds, [])
  assert "torch" not in alone[1] and "ratio" not in alone[1]
  text = densenet_stage_benchmark.table(rows + alone)
  assert text.count("\n") == 1 + 4 and "| 1,1 | 50.0 (40.0) | 25.0 (20.0) | 2.00 | +30.0 |" in text


def test_stage_benchmark_times_the_jaxsurv_encoder_per_prefix():
  small = dict(init_features=4, growth_rate=2, bn_size=2)
  prefixes = [(1,), (1, 1)]
  fns = densenet_stage_benchmark.jax_programs(prefixes, grid=9, batch=2, cpu_convs="eigen",
                                              model_kwargs=small)
  times = common.interleaved_s(fns, reps=2)
  assert set(times) == set(prefixes) and all(len(v) == 2 and min(v) > 0 for v in times.values())
  pytest.importorskip("torch")
  tfns = densenet_stage_benchmark.torch_programs(prefixes, grid=9, batch=2, model_kwargs=small)
  ttimes = common.interleaved_s(tfns, reps=2)
  rows = densenet_stage_benchmark.pooled_rows(prefixes, [times], [ttimes])
  assert all(r["ratio"] > 0 for r in rows)


def test_write_section_replaces_the_head_and_keeps_dated_subsections(tmp_path):
  path = tmp_path / "RESULTS.md"
  path.write_text("# Benchmark results\n\n## Before\n\nkeep me\n\n"
                  "## Train step\n\nold table\n\n### A dated record (2026-12-01)\n\nrecord A\n\n"
                  "### Generated\n\nold generated\n\n## After\n\nkeep me too\n")
  common.write_section(path, "Train step",
                       "## Train step\n\nnew table\n\n### Generated\n\nnew generated\n")
  text = path.read_text()
  assert "old table" not in text and "old generated" not in text
  assert text.index("new table") < text.index("new generated") < text.index("record A")
  assert text.index("## Before") < text.index("## Train step") < text.index("## After")
  assert "keep me\n" in text and "keep me too" in text
  assert not (tmp_path / "RESULTS.md.tmp").exists()
  common.write_section(path, "New", "## New\n\nappended\n")
  assert path.read_text().rstrip().endswith("appended")
