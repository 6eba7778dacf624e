import json
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxaccel.checkpoint import RunDir

from conftest import jaxaccel_cmd, last_json, run_cli, run_until_killed


TRAIN_KEYS = {"test_accuracy", "train_loss", "epochs", "steps_per_second",
              "wall_seconds", "parameters", "devices", "out"}


def test_train_json_and_predict_round_trip(capsys, tmp_path):
  code, out, _ = run_cli(capsys, "train", "--model", "mlp:32", "--epochs", "8",
                         "--batch-size", "32", "--optimizer", "adam(3e-3)",
                         "--out", str(tmp_path / "r"),
                         "--json", "--no-progress")
  assert code == 0
  result = last_json(out)
  assert TRAIN_KEYS <= set(result)
  assert result["epochs"] == 8 and result["devices"] == 8
  assert result["parameters"] == 64 * 32 + 32 + 330
  assert result["test_accuracy"] > 0.9
  assert result["optimizer"] == "adam(0.003)"
  metrics = RunDir(tmp_path / "r").read_metrics()
  assert [m["epoch"] for m in metrics] == list(range(1, 9))
  assert [m["learning_rate"] for m in metrics] == pytest.approx([3e-3] * 8)

  from sklearn.datasets import load_digits
  raw = load_digits().images[:5]          # raw units (0..16), no channel axis
  np.save(tmp_path / "x.npy", raw)
  code, out, _ = run_cli(capsys, "predict", "--run", str(tmp_path / "r"),
                         "--input", str(tmp_path / "x.npy"), "--json")
  assert code == 0
  preds = last_json(out)["predictions"]
  assert len(preds) == 5
  assert sum(p == t for p, t in zip(preds, load_digits().target[:5])) >= 4
  code, out, _ = run_cli(capsys, "predict", "--run", str(tmp_path / "r"),
                         "--input", str(tmp_path / "x.npy"),
                         "--output", str(tmp_path / "p.npy"))
  assert code == 0 and "written to" in out
  np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), preds)


def test_demo_prints_a_table(capsys):
  code, out, _ = run_cli(capsys, "demo", "--epochs", "10", "--no-progress", "--json")
  assert code == 0
  assert "test acc" in out and "bytes" in out
  result = last_json(out)
  assert result["test_accuracy_before"] > 0.9
  assert result["size_bytes_before"] == 4 * result["parameters"]


def test_sweep_json_and_heat_map(capsys, tmp_path):
  code, out, _ = run_cli(capsys, "sweep", "--model", "mlp:16", "--epochs", "2",
                         "--grid", "learning_rate=1e-3,1e-2", "--seeds", "2",
                         "--sequential-sample", "1", "--plot",
                         str(tmp_path / "heat.png"), "--json", "--no-progress")
  assert code == 0
  result = last_json(out)
  assert {"results", "best", "wall_seconds", "sequential_estimate_seconds"} <= set(result)
  assert [(r["hyperparams"]["learning_rate"], r["seed"]) for r in result["results"]] == [
      (1e-3, 0), (1e-3, 1), (1e-2, 0), (1e-2, 1)]
  assert result["best"]["val_accuracy"] == max(r["val_accuracy"] for r in result["results"])
  assert result["sequential_estimate_seconds"] > 0
  assert (tmp_path / "heat.png").stat().st_size > 1000

  code, out, _ = run_cli(capsys, "sweep", "--model", "mlp:16", "--epochs", "2",
                         "--optimizer", "sgd(0.05)", "--batch-sizes", "32,64",
                         "--batch-size", "32", "--json", "--no-progress")
  assert code == 0
  result = last_json(out)
  assert [r["learning_rate"] for r in result["results"]] == pytest.approx([0.05, 0.1])
  assert "best by time to accuracy" in out


def test_transfer_from_a_run_on_the_command_line(capsys, tmp_path):
  assert run_cli(capsys, "train", "--model", "mlp:16", "--epochs", "2", "--out",
                 str(tmp_path / "src"), "--no-progress")[0] == 0
  code, out, _ = run_cli(capsys, "train", "--model", "mlp:16", "--epochs", "2",
                         "--init-from", str(tmp_path / "src"), "--optimizer",
                         "adam(1e-3) | freeze('Dense_0')", "--out",
                         str(tmp_path / "dst"), "--json", "--no-progress")
  assert code == 0
  src = RunDir(tmp_path / "src").restore_variables()["params"]
  dst = RunDir(tmp_path / "dst").restore_variables()["params"]
  jax.tree.map(np.testing.assert_array_equal, src["Dense_0"], dst["Dense_0"])
  assert not np.array_equal(src["Dense_1"]["kernel"], dst["Dense_1"]["kernel"])
  assert RunDir(tmp_path / "dst").read_config()["init_from"]["copied"] == [
      "params/Dense_0/bias", "params/Dense_0/kernel", "params/Dense_1/bias",
      "params/Dense_1/kernel"]


def bad_inputs(tmp_path):
  np.savez(tmp_path / "nokeys.npz", x_train=np.zeros((4, 2)))
  np.savez(tmp_path / "mismatch.npz", x_train=np.zeros((4, 2)),
           y_train=np.zeros(3, int), x_test=np.zeros((2, 2)), y_test=np.zeros(2, int))
  np.savez(tmp_path / "labels.npz", x_train=np.zeros((4, 2)),
           y_train=np.array([0, 1, -1, 1]), x_test=np.zeros((2, 2)),
           y_test=np.zeros(2, int))
  np.savez(tmp_path / "flat.npz", x_train=np.zeros((40, 6)),
           y_train=np.arange(40) % 2, x_test=np.zeros((4, 6)),
           y_test=np.zeros(4, int))
  np.save(tmp_path / "wrong.npy", np.zeros((3, 5, 5)))
  (tmp_path / "empty_run").mkdir()
  (tmp_path / "empty_run" / "config.json").write_text("{not json")
  (tmp_path / "other_run").mkdir()
  (tmp_path / "other_run" / "config.json").write_text(json.dumps(
      {"model": "another model", "optimizer": "sgd(0.1)", "dataset": "digits",
       "batch_size": 128, "seed": 0}))
  t = str(tmp_path)
  return [
      (["train", "--dataset", "mnist"], "unknown data set 'mnist'"),
      (["train", "--model", "vgg"], "unknown model 'vgg'"),
      (["train", "--epochs", "0"], "must be a positive integer, got 0"),
      (["train", "--batch-size", "-3"], "must be a positive integer, got -3"),
      (["train", "--batch-size", "ten"], "expected a positive integer, got 'ten'"),
      (["train", "--parallel", "x"], "invalid choice: 'x'"),
      (["train", "--optimizer", "adma(1e-3)"], "did you mean 'adam'"),
      (["train", "--optimizer", "__import__('os')"], "unknown function '__import__'"),
      (["train", "--optimizer", "adam(1e-3).__class__"], "not allowed"),
      (["train", "--validation", "1.5"], "must lie in [0, 1)"),
      (["train", "--dataset", f"{t}/nokeys.npz"], "missing key(s) y_train"),
      (["train", "--dataset", f"{t}/mismatch.npz"], "x_train has 4 rows but y_train"),
      (["train", "--dataset", f"{t}/labels.npz"], "must lie in [0, 2)"),
      (["train", "--dataset", f"{t}/flat.npz", "--model", "cnn"],
       "model 'cnn' needs images"),
      (["train", "--dataset", "digits", "--num-classes", "5"], "must lie in [0, 5)"),
      (["train", "--resume"], "--resume needs --out"),
      (["train", "--resume", "--out", f"{t}/other_run"],
       "cannot resume " + f"{t}/other_run: model, optimizer differ(s)"),
      (["train", "--augment", "rotate"], "unknown augmentation 'rotate'"),
      (["predict", "--run", f"{t}/none", "--input", f"{t}/wrong.npy"],
       "no run found"),
      (["predict", "--run", f"{t}/empty_run", "--input", f"{t}/wrong.npy"],
       "is corrupt"),
      (["bench", "--suite", "nope"], "invalid choice: 'nope'"),
      (["train", "--optimizer", "adam(1e-3) | freeze('Conv')"],
       "parameter pattern 'Conv' matches no parameter"),
      (["train", "--init-from", f"{t}/none"], "no run found"),
      (["sweep", "--grid", "learning_rate=a,b"], "write NAME=V1,V2"),
      (["sweep", "--grid", "momentum=0.9"], "takes 'momentum'"),
      (["sweep", "--optimizer", "sgd(0.1)", "--optimizer", "adma(1e-3)"],
       "did you mean 'adam'"),
      (["sweep", "--batch-sizes", "32,x"], "whole numbers"),
      (["sweep", "--batch-sizes", "32", "--grid", "learning_rate=1e-3"],
       "without --grid"),
      (["sweep", "--validation", "0"], "validation > 0"),
  ]


def test_bad_input_table(capsys, tmp_path):
  for argv, message in bad_inputs(tmp_path):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (argv, code, err)
    assert message in err, (argv, err)
    assert len(err.strip().splitlines()) == 1, (argv, err)
    assert "Traceback" not in err


def test_predict_rejects_wrong_shapes(capsys, tmp_path):
  assert run_cli(capsys, "train", "--model", "mlp:8", "--epochs", "1", "--out",
                 str(tmp_path / "r"), "--no-progress")[0] == 0
  np.save(tmp_path / "wrong.npy", np.zeros((3, 5, 5)))
  code, _, err = run_cli(capsys, "predict", "--run", str(tmp_path / "r"),
                         "--input", str(tmp_path / "wrong.npy"))
  assert code == 2 and "shape (3, 5, 5), but the run takes rows of shape (8, 8, 1)" in err
  code, _, err = run_cli(capsys, "predict", "--run", str(tmp_path / "r"),
                         "--input", str(tmp_path / "missing.npy"))
  assert code == 2 and "does not exist" in err


def test_errors_reach_the_shell_without_traceback(tmp_path):
  proc = subprocess.run(jaxaccel_cmd("train", "--dataset", str(tmp_path / "x.npz")),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().startswith("jaxaccel: error: data file")
  assert "Traceback" not in proc.stderr


def test_a_requeued_command_killed_three_times_ends_as_if_never_killed(
    digits, tmp_path, capsys):
  # A preemptible job re-runs the very same command, --resume included,
  # from its very first start. It streams its data from disk through grain,
  # whose position rides in every checkpoint.
  from jaxaccel import data
  for split in ("train", "test"):
    data.save_arrays(tmp_path / "ds" / split, x=getattr(digits, f"x_{split}"),
                     y=getattr(digits, f"y_{split}"))
  args = ["train", "--dataset", str(tmp_path / "ds"), "--model", "mlp:64",
          "--epochs", "12", "--batch-size", "16",
          "--optimizer", "sgd(0.05, momentum=0.9)", "--seed", "3",
          "--no-progress", "--json", "--out", str(tmp_path / "run"), "--resume"]
  run = RunDir(tmp_path / "run")   # one reader, while other processes write
  ckpt = tmp_path / "run" / "checkpoint"
  # 1. before the first checkpoint: the run's config is written, no epoch is.
  err = run_until_killed(jaxaccel_cmd(*args),
                   lambda: (tmp_path / "run" / "config.json").exists())
  assert "no checkpoint in" in err and "starting a fresh run" in err
  assert run.latest_epoch() is None
  # 2. somewhere inside an epoch after the third checkpoint.
  run_until_killed(jaxaccel_cmd(*args), lambda: (ckpt / "3").exists(), settle=0.137)
  # 3. right as the eighth checkpoint lands.
  run_until_killed(jaxaccel_cmd(*args), lambda: (ckpt / "8").exists())
  done = run.latest_epoch()
  assert done is not None and 8 <= done < 12

  code, out, err = run_cli(capsys, *args)
  assert code == 0, err
  assert last_json(out)["epochs"] == 12
  assert "fresh run" not in err
  ref_args = [a for a in args if a != "--resume"]
  ref_args[ref_args.index(str(tmp_path / "run"))] = str(tmp_path / "ref")
  assert run_cli(capsys, *ref_args)[0] == 0
  a = RunDir(tmp_path / "ref").restore_variables()
  b = run.restore_variables()
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert [m["epoch"] for m in run.read_metrics()] == list(range(1, 13))
  assert run.read_config()["data"]["source"] == "grain"


def test_resume_with_no_directory_starts_fresh(tmp_path, capsys):
  code, out, err = run_cli(capsys, "train", "--model", "mlp:8", "--epochs", "1",
                           "--out", str(tmp_path / "new"), "--resume",
                           "--no-progress", "--json")
  assert code == 0
  assert f"no checkpoint in {tmp_path / 'new'} yet; starting a fresh run" in err
  assert RunDir(tmp_path / "new").latest_epoch() == 1


def test_regression_from_the_command_line_trains_and_predicts_values(
    tmp_path, capsys):
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (1200, 2)).astype(np.float32)
  y = x[:, 0] * x[:, 1] + 0.5 * x[:, 0]
  np.savez(tmp_path / "reg.npz", x_train=x[:1000], y_train=y[:1000],
           x_test=x[1000:], y_test=y[1000:])
  code, out, err = run_cli(capsys, "train", "--dataset", str(tmp_path / "reg.npz"),
                           "--model", "mlp:64,64", "--epochs", "20",
                           "--batch-size", "50", "--optimizer", "adam(3e-3)",
                           "--normalize", "standardize",
                           "--out", str(tmp_path / "r"), "--json", "--no-progress")
  assert code == 0, err
  result = last_json(out)
  assert result["task"] == "regression" and "test_accuracy" not in result
  assert result["test_mse"] < 0.1 * np.var(y) and result["val_mse"] < 0.1 * np.var(y)
  np.save(tmp_path / "x.npy", x[1000:])
  code, out, err = run_cli(capsys, "predict", "--run", str(tmp_path / "r"),
                           "--input", str(tmp_path / "x.npy"),
                           "--output", str(tmp_path / "y.npy"), "--json")
  assert code == 0, err
  predicted = np.load(tmp_path / "y.npy")
  assert predicted.shape == (200, 1)
  assert np.mean((predicted[:, 0] - y[1000:]) ** 2) == pytest.approx(
      result["test_mse"], rel=1e-4)


def test_a_directory_of_arrays_is_streamed_from_disk(digits, tmp_path, capsys):
  from jaxaccel import data
  for split in ("train", "val", "test"):
    data.save_arrays(tmp_path / "ds" / split, x=getattr(digits, f"x_{split}"),
                     y=getattr(digits, f"y_{split}"))
  code, out, err = run_cli(capsys, "train", "--dataset", str(tmp_path / "ds"),
                           "--model", "mlp:32", "--epochs", "4",
                           "--batch-size", "32", "--optimizer", "adam(3e-3)",
                           "--out", str(tmp_path / "r"), "--json", "--no-progress")
  assert code == 0, err
  result = last_json(out)
  assert result["test_accuracy"] > 0.85 and result["val_accuracy"] > 0.85
  config = RunDir(tmp_path / "r").read_config()
  assert config["data"]["source"] == "grain"
  assert config["data"]["path"] == str((tmp_path / "ds" / "train").resolve())
  # An int8 export must calibrate on the data: it says how to give it.
  code, _, err = run_cli(capsys, "export", "--run", str(tmp_path / "r"),
                         "--format", "onnx", "--int8", "--out",
                         str(tmp_path / "m.onnx"))
  assert code == 2 and "which config.json cannot make again" in err
