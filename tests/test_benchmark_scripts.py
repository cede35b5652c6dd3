"""The CPU benchmark scripts' own logic at tiny shapes: the per-implementation
convolution timer (benchmarks/conv_benchmark.py) and the pooling of interleaved
rounds in the train-step benchmark (benchmarks/train_step_benchmark.py)."""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import conv_benchmark  # pylint: disable=wrong-import-position
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
