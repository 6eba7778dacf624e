import pytest

from jaxaccel import bench


def test_train_suite_reports_consistent_ratios():
  report = bench.run_train_suite(dataset="digits", model_names=["mlp"], steps=4,
                                 repeats=1, torch_peer=False, progress=False)
  entry = report["models"]["mlp"]
  sps = entry["steps_per_second"]
  assert set(sps) == {"jaxaccel", "jaxaccel_unguarded", "plain_jax"}
  assert all(v > 0 for v in sps.values())
  # steps/s are reported rounded, the ratio from the unrounded values
  assert entry["ratio_vs_plain_jax"] == pytest.approx(sps["jaxaccel"] / sps["plain_jax"],
                                                      abs=2e-3)
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


def test_compress_suite_figures_follow_from_their_parts():
  report = bench.run_compress_suite(dataset="digits", model_names=["mlp"],
                                    epochs=2, distill_epochs=10, seeds=2,
                                    teacher_widths=(128, 128), latency_rounds=3,
                                    progress=False)
  m = report["mlp"]
  d = m["distill"]
  # the labels-only baseline is the best mean over its epoch budgets
  means = {int(e): sum(v) / len(v) for e, v in d["labels_only_by_epochs"].items()}
  assert set(means) == {2, 4, 8} and all(len(v) == 2 for v in
                                         d["labels_only_by_epochs"].values())
  assert d["labels_only_epochs"] == max(means, key=means.get)
  assert d["student_labels_only"] == pytest.approx(max(means.values()))
  # two teachers: the wide MLP (the target's, also the top-level figures)
  # and the dense LeNet-300-100
  assert d["teacher"] == "mlp_128_128"
  assert set(d["by_teacher"]) == {"mlp_128_128", "mlp_300_100"}
  assert d["by_teacher"]["mlp_300_100"]["teacher_accuracy"] == m["dense"]["accuracy"]
  assert d["by_teacher"]["mlp_128_128"]["teacher_size_bytes"] == 4 * (
      64 * 128 + 128 * 128 + 128 * 10 + 128 + 128 + 10)
  for name, t in d["by_teacher"].items():
    assert t["student_distilled"] == pytest.approx(sum(t["distilled_by_seed"]) / 2)
    gap = t["teacher_accuracy"] - d["student_labels_only"]
    if gap > 0:
      assert t["gap_closed"] == pytest.approx(
          (t["student_distilled"] - d["student_labels_only"]) / gap, abs=1e-3)
    assert t["student_distilled"] > 0.5   # digits, ten epochs: far above chance
  assert d["student_distilled"] == d["by_teacher"]["mlp_128_128"]["student_distilled"]
  q = m["int8"]
  assert q["speedup_batch_1024"] == pytest.approx(
      q["latency_ms_batch_1024"]["float32"] / q["latency_ms_batch_1024"]["int8"],
      rel=1e-2)
  assert len(q["speedup_batch_1024_by_round"]) == 3
  # over an odd number of rounds, a ratio of medians lies within the rounds' ratios
  assert (min(q["speedup_batch_1024_by_round"]) - 1e-3 <= q["speedup_batch_1024"]
          <= max(q["speedup_batch_1024_by_round"]) + 1e-3)
  assert 3.8 < q["ratio"] < 4.0   # int8 values plus a float32 scale per channel
  text = bench.format_compress_report(report)
  assert "mean of 2 seeds" in text and text.count("gap closed") == 2
  assert "from mlp_128_128" in text and "from mlp_300_100" in text
