import pytest

from jaxaccel import bench


def test_train_suite_sides_train_the_same_model():
  """jaxaccel's fit, with and without its non-finite guard, and the
  hand-written jit + scan loop start from the same variables and take the
  same batches: if one timed other work (another model, fewer steps, a
  different order), their losses would part."""
  report = bench.run_train_suite(dataset="digits", model_names=["mlp"], steps=4,
                                 repeats=1, batch_sizes=(64, 128),
                                 torch_peer=False, progress=False)
  entry = report["models"]["mlp"]
  losses = entry["train_loss"]
  assert set(losses) == {"jaxaccel", "jaxaccel_unguarded", "plain_jax"}
  assert losses["jaxaccel"] == pytest.approx(losses["plain_jax"], rel=1e-5)
  assert losses["jaxaccel_unguarded"] == pytest.approx(losses["plain_jax"], rel=1e-5)
  assert 0.5 < losses["plain_jax"] < 2.3     # trained: below chance's 2.30
  # MLP 64-300-100-10 on 8x8 digits: 50,200 multiply-adds per example, so
  # 12.9 MFLOP forward at batch 128; the backward pass adds two matmuls per
  # layer but the first layer's input gradient: 33.6 MFLOP, plus Adam.
  assert 0.0336 <= entry["gflop_per_step"] < 0.037
  assert set(entry["batch_scaling"]) == {"64", "128"}
  text = bench.format_train_report(report)
  assert "jaxaccel" in text and "examples/s by batch size" in text


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


def test_compress_suite_runs_the_shipped_recipes():
  # The CNN's int8 program is tested in test_int8; the suite's CNN leg
  # only adds its timing.
  report = bench.run_compress_suite(dataset="digits", epochs=2, seeds=1,
                                    model_names=("mlp",),
                                    share=0.1, teacher_widths=(64, 64),
                                    latency_rounds=1, latency_repeats=2,
                                    stage_latency=False, progress=False)
  m = report["mlp"]
  assert not report["full"] and report["recipe_share"] == 0.1
  # each recipe's figures are its last stage's
  for name in bench.MLP_RECIPES:
    assert m[name]["stages"][-1]["accuracy"] == m[name]["accuracy"]
  # int8 post-training quantization barely moves the dense model
  assert abs(m["int8"]["accuracy"] - m["dense"]["accuracy"]) < 0.02
  # the recipe files, a tenth of their fine-tuning: prune-90's 2,000 steps
  assert m["prune-90"]["stages"][0]["options"]["min_steps"] == 200
  assert m["prune-90"]["sparsity"] == pytest.approx(0.9, abs=0.01)
  assert 3.8 < m["int8"]["ratio"] < 4.0   # int8 values, a float32 scale a channel
  assert m["shrink-50"]["parameters"] < 0.55 * m["dense"]["parameters"]
  sched = m["peers"]["jaxpruner_schedule"]
  # 200 steps: pruning ends at 80, masks every 10 steps; the count of zeros
  # is exact, so the published formula holds to one weight in 50,000
  assert sched["updates"] == 9 and sched["max_abs_difference"] < 1e-4
  assert sched["final_sparsity"] == pytest.approx(0.9, abs=1e-4)
  q = m["peers"]["qwix_int8"]
  assert q["jaxaccel"]["accuracy"] == m["int8"]["accuracy"]
  assert abs(q["qwix"]["accuracy"] - m["dense"]["accuracy"]) < 0.02
  assert set(q["latency_ms_batch_1024"]) == {"float32", "jaxaccel int8",
                                             "qwix int8"}
  d = m["distill"]
  means = {int(e): sum(v) / len(v) for e, v in d["labels_only_by_epochs"].items()}
  assert set(means) == {2, 4, 8} and d["labels_only_epochs"] == max(means, key=means.get)
  assert d["student_distilled"] == pytest.approx(sum(d["distilled_by_seed"]))
  gap = d["teacher_accuracy"] - d["student_labels_only"]
  if gap > 0:
    assert d["gap_closed"] == pytest.approx(
        (d["student_distilled"] - d["student_labels_only"]) / gap, abs=1e-3)
  assert "cnn" not in report
  text = bench.format_compress_report(report)
  assert "--recipe shrink-50" in text and "CNN" not in text
  assert "0.1 of each recipe's fine-tuning" in text
  assert "peer int8 PTQ: jaxaccel" in text and "jaxpruner's polynomial" in text


def test_deploy_suite_serves_one_model_every_way():
  from jaxaccel.bench import deploy as bench_deploy
  report = bench_deploy.run_deploy_suite(dataset="digits", model_names=("mlp",),
                                         rounds=1, epochs=5, torch_peer=False,
                                         progress=False)
  m = report["models"]["mlp"]
  acc = m["accuracy"]
  assert acc["flax float32"] > 0.9
  # the artifacts run the very programs jaxaccel runs
  assert acc["ONNX Runtime float32"] == acc["flax float32"]
  assert acc["jaxaccel int8 (ONNX Runtime)"] == acc["jaxaccel int8 (XLA)"]
  assert abs(acc["jaxaccel int8 (XLA)"] - acc["flax float32"]) <= 0.01
  assert acc["jaxaccel int8 (StableHLO artifact)"] == acc["jaxaccel int8 (XLA)"]
  assert acc["StableHLO float32 artifact"] == acc["flax float32"]
  assert set(m["batch_1"]["ms"]) == set(acc) and len(acc) == 6
  a = m["batch_1024"]["int8_artifact_speedup"]
  ms = m["batch_1024"]["ms"]
  assert a["stablehlo"] == pytest.approx(
      ms["StableHLO float32 artifact"] / ms["jaxaccel int8 (StableHLO artifact)"],
      rel=1e-2)
  assert all(v > 0 for b in (1, 1024) for v in m[f"batch_{b}"]["ms"].values())
  b = m["bytes"]
  assert b["onnx int8"] < 0.3 * b["onnx"] and b["stablehlo int8"] < 0.3 * b["stablehlo"]
  assert m["pruned_int8_gzip_vs_onnx_float32"] == pytest.approx(
      b["onnx"] / b[bench_deploy.PRUNED], abs=0.01)
  assert b[bench_deploy.PRUNED] < b["onnx int8"] / 2
  text = bench_deploy.format_deploy_report(report)
  assert "jaxaccel int8 (ONNX Runtime)" in text and "onnx int8" in text


def test_deploy_suite_serves_the_gpt_from_its_cache(tmp_path):
  """The GPT's sides: the StableHLO decoders score and decode as the
  compiled loop does (same weights, same int8 scales)."""
  from jaxaccel.bench import serve
  g = serve.run_gpt_serving(tmp_path, spec="gpt:1,2,16", steps=4, prompt=8,
                            new_tokens=8, rounds=1, torch_peer=False)
  bpb, agree = g["val_bits_per_byte"], g["greedy_agreement"]
  assert len(bpb) == 4 and set(g["generation_tokens_per_second"]) == set(bpb)
  assert bpb["StableHLO float32 artifact"] == pytest.approx(
      bpb["jaxaccel float32 (XLA)"], abs=1e-4)
  assert bpb["jaxaccel int8 (StableHLO artifact)"] == pytest.approx(
      bpb["jaxaccel int8 (XLA)"], abs=1e-4)
  assert abs(bpb["jaxaccel int8 (XLA)"] - bpb["jaxaccel float32 (XLA)"]) < 0.05
  assert agree["StableHLO float32 artifact"] == 1.0
  assert g["prefill_shape"] == [32, 16] and len(g["int8_layers"]) == 7
  assert all(v > 0 for v in g["prefill_tokens_per_second"].values())
  text = "\n".join(serve.format_gpt_serving(g))
  assert "8 greedy tokens after a 8-byte prompt" in text


def test_lm_suite_sides_train_the_same_network():
  """The flax NNX side loads jaxaccel's initial weights and takes fit's
  batches: after the same steps both reach the same validation bits per
  byte (a gap would mean one side trains another network or other bytes)."""
  from jaxaccel.bench import lm as bench_lm
  report = bench_lm.run_lm_suite(model_spec="gpt:1,2,16", steps=3, epochs=2,
                                 repeats=1, torch_peer=False, context=16,
                                 prompt=8, new_tokens=8, progress=False)
  gpt = report["models"]["gpt"]
  assert gpt["val_bits_per_byte"] == pytest.approx(
      gpt["flax_val_bits_per_byte"], abs=2e-3)
  assert 5.0 < gpt["val_bits_per_byte"] < 8.0    # 6 steps from uniform (8)
  assert gpt["generation"]["new_tokens"] == 8 and report["context"] == 16
  assert "flax NNX" in bench_lm.format_lm_report(report)


def test_lm_torch_peer_computes_what_the_registry_gpt_computes():
  torch = pytest.importorskip("torch")
  import jax
  import numpy as np
  from jaxaccel import models
  from jaxaccel.bench import lm as bench_lm
  model = models.create("gpt", num_classes=256, layers=2, heads=2, width=16,
                        context=16)
  x = np.arange(32, dtype=np.int32).reshape(2, 16) * 7 % 256
  variables = model.init(jax.random.key(1), x)
  net = bench_lm.torch_gpt(bench_lm.fused_weights(variables["params"]), 2)
  with torch.no_grad():
    ours = np.asarray(model.apply(variables, x))
    theirs = net(torch.from_numpy(x.astype(np.int64))).numpy()
    # The peer's cached decoding continues as its full pass does.
    ids = bench_lm.torch_generate(net, x[0, :8], 8)
  np.testing.assert_allclose(theirs, ours, atol=2e-5)
  first = int(np.argmax(ours[0, 7]))
  assert ids[0] == first
