import pytest

from jaxaccel import bench


def test_train_suite_reports_consistent_ratios():
  report = bench.run_train_suite(dataset="digits", model_names=["mlp"], steps=4,
                                 repeats=1, torch_peer=False, progress=False)
  entry = report["models"]["mlp"]
  sps = entry["steps_per_second"]
  assert set(sps) == {"jaxaccel", "jaxaccel_unguarded", "plain_jax"}
  assert all(v > 0 for v in sps.values())
  assert entry["ratio_vs_plain_jax"] == round(sps["jaxaccel"] / sps["plain_jax"], 3)
  # MLP 64-300-100-10 on 8x8 digits: 50,200 multiply-adds per example, so
  # 12.9 MFLOP forward at batch 128; the backward pass adds two matmuls per
  # layer but the first layer's input gradient: 33.6 MFLOP, plus Adam.
  assert 0.0336 <= entry["gflop_per_step"] < 0.037
  assert report["matmul_gflops"] > 0
  assert "jaxaccel" in bench.format_train_report(report)


def test_sweep_suite_reports_both_sides_of_the_same_configurations():
  report = bench.run_sweep_suite(learning_rates=(1e-3, 1e-2), seeds=2, epochs=3,
                                 progress=False)
  assert report["configurations"] == 4
  assert report["speedup_end_to_end"] == pytest.approx(
      report["sequential_seconds"] / report["vmapped_seconds"], abs=1e-3)
  assert report["speedup_compile_excluded"] == pytest.approx(
      report["sequential_steady_seconds"] / report["vmapped_steady_seconds"],
      abs=1e-3)
  assert 0 < report["vmapped_steady_seconds"] < report["vmapped_seconds"]
  # Same configurations: both sides find a model well above chance (0.1).
  assert min(report["best_val_accuracy"].values()) > 0.5
  assert "compile excluded" in bench.format_sweep_report(report)
