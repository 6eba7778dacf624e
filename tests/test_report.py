import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel import cli
from jaxaccel.compress import pruning, quantization as q, report

from conftest import run_cli

COMPRESS_KEYS = {"test_accuracy_before", "test_accuracy_after",
                 "size_bytes_before", "size_bytes_after", "compression_ratio",
                 "sparsity", "latency_ms_before", "latency_ms_after"}


def brute_force_entries(nonzero, bits):
  """Walks the array as an encoder would, emitting fillers for long runs
  (the zeros after the last nonzero need no entries: the size is known)."""
  entries, run = 0, 0
  for nz in nonzero[:np.flatnonzero(nonzero)[-1] + 1]:
    if nz:
      entries += 1
      run = 0
    else:
      run += 1
      if run == 2 ** bits:       # the skip field is full: store a zero
        entries += 1
        run = 0
  return entries


@pytest.mark.parametrize("density", [0.02, 0.1, 0.5])
@pytest.mark.parametrize("bits", [1, 3, 4, 8])
def test_relative_index_count_matches_an_encoder(density, bits):
  nonzero = np.random.default_rng(bits).random(3000) < density
  nonzero[-50:] = False              # trailing zeros cost nothing
  assert report.relative_index_entries(nonzero, bits) == brute_force_entries(
      nonzero, bits)


def test_encoded_sizes():
  dense = jnp.asarray(np.random.default_rng(0).normal(size=(40, 20)), jnp.float32)
  assert report.encoded_bytes(dense) == 800 * 4
  pruned, _ = pruning.prune({"w": dense}, 0.9)
  nz = np.asarray(pruned["w"]).ravel() != 0
  want = min(800 * 4, 100 + 80 * 4, *[
      -(-report.relative_index_entries(nz, b) * (b + 32) // 8) for b in range(1, 9)])
  assert report.encoded_bytes(pruned["w"]) == want < 800 * 4 / 5
  qa = q.quantize_array(pruned["w"], bits=8)
  want8 = min(800, 100 + 80, *[
      -(-report.relative_index_entries(nz, b) * (b + 8) // 8) for b in range(1, 9)])
  assert report.encoded_bytes(qa) == want8 + 20 * 4     # + per-channel scales
  assert report.sparsity({"w": qa}) == 0.9
  assert report.dense_bytes({"w": qa}) == 3200


def test_pareto_front_and_plot(tmp_path):
  records = [{"name": n, "size_bytes": s, "accuracy": a}
             for n, s, a in [("a", 100, 0.9), ("b", 50, 0.85), ("c", 60, 0.8),
                             ("d", 10, 0.5), ("e", 200, 0.9)]]
  assert [r["name"] for r in report.pareto_front(records)] == ["d", "b", "a"]
  report.plot_accuracy_vs_size(records, tmp_path / "p.png")
  assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("run") / "r"
  assert cli.main(["train", "--model", "mlp:32", "--epochs", "8",
                   "--batch-size", "32", "--optimizer", "adam(3e-3)",
                   "--out", str(out), "--no-progress"]) == 0
  return out


def test_compress_prune_and_int8_json(capsys, trained_run, tmp_path):
  code, out, err = run_cli(capsys, "compress", "--from", str(trained_run),
                           "--prune", "0.5", "--prune-schedule", "one-shot",
                           "--prune-scope", "layer", "--finetune-epochs", "2",
                           "--quantize", "int8", "--json", "--no-progress",
                           "--out", str(tmp_path / "c"),
                           "--plot", str(tmp_path / "c.png"))
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert COMPRESS_KEYS <= set(result)
  assert result["size_bytes_before"] == (64 * 32 + 32 + 32 * 10 + 10) * 4
  assert result["compression_ratio"] == pytest.approx(
      result["size_bytes_before"] / result["size_bytes_after"], abs=1e-3)
  assert result["compression_ratio"] > 4.5          # int8 and half the weights gone
  assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)
  assert result["test_accuracy_before"] > 0.9
  assert result["test_accuracy_after"] > result["test_accuracy_before"] - 0.05
  assert set(result["latency_ms_after"]) == {"batch_1", "batch_1024"}
  assert [s["name"] for s in result["stages"]] == [
      "original", "pruned 0.5 +2 ep", "int8 (int8 products)"]
  saved = np.load(tmp_path / "c" / "params.npz")
  assert saved["Dense_0/kernel/values"].dtype == np.int8
  assert (saved["Dense_0/kernel/values"] == 0).mean() == pytest.approx(0.5, abs=1e-3)
  assert json.loads((tmp_path / "c" / "report.json").read_text())[
      "size_bytes_after"] == result["size_bytes_after"]
  assert (tmp_path / "c.png").is_file()


def test_compress_distills_a_student(capsys, trained_run):
  code, out, err = run_cli(capsys, "compress", "--from", str(trained_run),
                           "--distill-student", "mlp:8", "--distill-epochs", "20",
                           "--learning-rate", "0.01",
                           "--json", "--no-progress")
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["size_bytes_after"] == (64 * 8 + 8 + 8 * 10 + 10) * 4
  student = result["stages"][-1]
  assert student["name"] == "student mlp:8" and student["agreement"] > 0.8


@pytest.mark.parametrize("args, message", [
    (["--prune", "1.0"], r"sparsity must lie in \[0, 1\).*got 1.0"),
    (["--prune", "-0.2"], r"got -0.2"),
    (["--prune-pattern", "4:2"], "N=4 of every M=2"),
    (["--prune-pattern", "2:3"], "has 64 inputs per output, which is not divisible by M=3"),
    (["--prune", "0.5", "--prune-method", "l0"], "unknown pruning method 'l0'"),
    (["--quantize", "int3"], "unsupported quantization 'int3'"),
    (["--prune", "0.3", "--prune-pattern", "2:4"], "prunes 0.5 of the weights, but sparsity 0.3"),
    (["--quantize", "int8", "--prune-scope", "all"], "unknown pruning scope 'all'"),
    (["--prune-pattern", "channel", "--quantize", "int8"],
     "pattern 'channel' needs a sparsity"),
    (["--distill-student", "mlp:x"], "model spec 'mlp:x'"),
    (["--distill-student", "transformer"], "unknown model 'transformer'"),
    (["--distill-student", "mlp:8", "--mixup", "1"],
     r"mixes the inputs but not their labels.*use alpha=1.0 \(got alpha=0.9\)"),
    (["--quantize", "int8", "--mixup", "1"], "mixup 1.0 mixes the inputs a student"),
    ([], "nothing to do"),
    (["--recipe", "prune-99"], "unknown recipe 'prune-99': use one of distill, distill-lm, int8, "
                               "lowrank, prune-50, prune-90, prune-90-int8"),
    (["--recipe", "int8", "--prune", "0.5"], "give a recipe or the shorthand flags"),
    (["--recipe", "RECIPE:unknown_key"],
     r"stage 1 \(prune\): unknown option\(s\) spars: prune takes sparsity, method"),
    (["--recipe", "RECIPE:bad_value"], r"stage 1 \(prune\): unknown pruning schedule 'cubic'"),
    (["--recipe", "RECIPE:bad_type"],
     r"stage 1 \(prune\): sparsity = '0.9' is not a number"),
    (["--recipe", "RECIPE:after_quantize"],
     r"stage 2 \(finetune\) follows quantize, which must come last"),
    (["--recipe", "RECIPE:unknown_stage"], "stage 1: unknown stage 'grow'"),
    (["--quantize", "int8", "--out", "FROM"], "holds a training run; give "
                                             "compress a new directory"),
])
def test_compress_bad_inputs(capsys, trained_run, tmp_path, args, message):
  if args and args[-1].startswith("RECIPE:"):
    path = tmp_path / "bad.toml"
    path.write_text(BAD_RECIPES[args[-1][len("RECIPE:"):]])
    args = [*args[:-1], str(path)]
  args = [str(trained_run) if a == "FROM" else a for a in args]
  before = sorted(p.name for p in trained_run.rglob("*"))
  code, out, err = run_cli(capsys, "compress", "--from", str(trained_run),
                           "--no-progress", *args)
  assert code == 2
  assert len(err.strip().splitlines()) == 1
  import re
  assert re.search(message, err), err
  assert sorted(p.name for p in trained_run.rglob("*")) == before


BAD_RECIPES = {
    "unknown_key": '[[stages]]\nstage = "prune"\nspars = 0.9\n',
    "bad_value": '[[stages]]\nstage = "prune"\nsparsity = 0.9\nschedule = "cubic"\n',
    "bad_type": '[[stages]]\nstage = "prune"\nsparsity = "0.9"\n',
    "after_quantize": ('[[stages]]\nstage = "quantize"\n'
                       '[[stages]]\nstage = "finetune"\n'),
    "unknown_stage": '[[stages]]\nstage = "grow"\nfraction = 0.5\n',
}


def test_list_recipes(capsys):
  code, out, _ = run_cli(capsys, "compress", "--list-recipes", "--json")
  assert code == 0
  recipes = json.loads(out.strip().splitlines()[-1])["recipes"]
  assert set(recipes) == {"distill", "distill-lm", "int8", "lowrank", "prune-50", "prune-90",
                          "prune-90-int8", "shrink-50"}
  assert "gradual global magnitude pruning" in recipes["prune-90"]


def test_prune_90_int8_recipe_on_the_command_line(capsys, trained_run, tmp_path):
  # mlp:32 on digits: gradual global pruning to 90% over 2,000 steps (the
  # recipe's floor; digits has 10 steps an epoch), then calibrated int8.
  code, out, err = run_cli(capsys, "compress", "--from", str(trained_run),
                           "--recipe", "prune-90-int8", "--json", "--no-progress",
                           "--out", str(tmp_path / "c"))
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["recipe"] == "prune-90-int8"
  prune, quant = result["stages"][1:]
  assert (prune["stage"], quant["stage"]) == ("prune", "quantize")
  assert prune["name"] == "pruned 0.9 gradually over 200 ep"
  assert result["sparsity"] == pytest.approx(0.9, abs=2e-3)
  # 237 weights left of mlp:32's 2,368: 0.9226 measured (0.9529 dense)
  assert result["test_accuracy_after"] > 0.9
  assert result["compression_ratio"] > 12
  assert all(s["seconds"] > 0 for s in result["stages"][1:])
  saved = json.loads((tmp_path / "c" / "report.json").read_text())
  assert [s["stage"] for s in saved["stages"][1:]] == ["prune", "quantize"]

  # The output is a run directory too: predict --run and export --run take it.
  from jaxaccel import data, train
  model, variables, config = train.load_run(tmp_path / "c")
  assert config["compressed_from"] == str(trained_run)
  kernels = [v["kernel"] for v in variables["params"].values()]
  zeros = sum(int((np.asarray(k) == 0).sum()) for k in kernels)
  assert zeros / sum(k.size for k in kernels) == pytest.approx(0.9, abs=2e-3)
  ds = data.load("digits", validation=0.1, seed=0)
  raw = ds.x_test * ds.stats["scale"]
  np.save(tmp_path / "x.npy", raw)
  accuracy = lambda classes: float(np.mean(np.asarray(classes) == ds.y_test))
  code, out, _ = run_cli(capsys, "predict", "--run", str(tmp_path / "c"),
                         "--input", str(tmp_path / "x.npy"), "--json")
  assert code == 0
  # float products of the int8 weights against the int8 products: 5 of 594
  # test images may differ
  by_run = accuracy(json.loads(out.strip().splitlines()[-1])["predictions"])
  assert abs(by_run - result["test_accuracy_after"]) <= 5 / len(ds.y_test)
  code, out, err = run_cli(capsys, "export", "--run", str(tmp_path / "c"),
                           "--format", "onnx", "--int8", "--out",
                           str(tmp_path / "c.onnx.gz"), "--json")
  assert code == 0, err
  code, out, _ = run_cli(capsys, "predict", "--artifact",
                         str(tmp_path / "c.onnx.gz"), "--input",
                         str(tmp_path / "x.npy"), "--json")
  by_artifact = accuracy(json.loads(out.strip().splitlines()[-1])["predictions"])
  assert abs(by_artifact - result["test_accuracy_after"]) <= 5 / len(ds.y_test)


def test_compress_missing_run(capsys, tmp_path):
  code, _, err = run_cli(capsys, "compress", "--from", str(tmp_path / "none"),
                         "--quantize", "int8")
  assert code == 2 and "config.json is missing" in err


def test_demo_has_pruning_and_int8_rows(capsys):
  code, out, _ = run_cli(capsys, "demo", "--epochs", "10", "--no-progress",
                         "--json")
  assert code == 0
  result = json.loads(out.strip().splitlines()[-1])
  names = [r["model"] for r in result["rows"]]
  assert names[1:] == ["80% pruned, 5 epochs fine-tuned", "int8 (int8 matmuls)",
                       "80% pruned + int8"]
  assert COMPRESS_KEYS - {"latency_ms_before", "latency_ms_after"} <= set(result)
  assert result["sparsity"] == pytest.approx(0.8, abs=1e-3)
  sizes = [r["size_bytes"] for r in result["rows"]]
  assert sizes[0] / sizes[2] > 3.5 and sizes[0] / sizes[3] > 8
  assert min(r["test_accuracy"] for r in result["rows"]) > 0.85


def test_compress_a_run_trained_on_an_npz_file(capsys, tiny_npz, tmp_path):
  assert run_cli(capsys, "train", "--dataset", str(tiny_npz), "--model", "mlp:16",
                 "--epochs", "3", "--out", str(tmp_path / "r"), "--no-progress")[0] == 0
  code, out, err = run_cli(capsys, "compress", "--from", str(tmp_path / "r"),
                           "--prune", "0.5", "--prune-schedule", "one-shot",
                           "--json", "--no-progress")
  assert code == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert result["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_a_language_models_table_shows_generation_speed_where_measured():
  rec = lambda name, speed: {
      "name": name, "bits_per_byte": 2.5, "metric": "bits_per_byte",
      "parameters": 100, "size_bytes": 400, "sparsity": 0.0,
      "latency_ms": {"batch_1": 0.2}, **({"generation_tokens_per_second": speed}
                                         if speed else {})}
  table = report.format_table([rec("original", 2500.4), rec("int8", None)])
  header, _, original, int8 = table.splitlines()
  assert header.split()[-2:] == ["gen", "tok/s"]
  assert original.split()[-1] == "2,500" and int8.split()[-1] == "-"
