"""Two processes with two CPU devices each against one process with four."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxaccel import parallel
from jaxaccel.checkpoint import RunDir
from jaxaccel.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME_LIMIT = 240   # seconds for the whole launch; a hang fails the test
TRAIN = ["train", "--dataset", "digits", "--model", "mlp:32", "--epochs", "2",
         "--batch-size", "64", "--parallel", "sharded", "--no-progress", "--json"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def xla_flags(devices: int) -> str:
  """The suite's compiler flags (conftest.py) with `devices` CPU devices."""
  return " ".join([f"--xla_force_host_platform_device_count={devices}"] + [
      f for f in os.environ["XLA_FLAGS"].split()
      if not f.startswith("--xla_force_host_platform_device_count")])


def launch(args, devices, log, **env):
  env = dict(os.environ, **env, PYTHONPATH=str(ROOT), XLA_FLAGS=xla_flags(devices),
             JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-m", "jaxaccel.cli", *TRAIN, *args],
                          env=env, stdout=open(log, "w"),
                          stderr=subprocess.STDOUT, cwd=ROOT)


def wait_all(procs, limit):
  """Waits for every process; kills them all on a hang or an interrupt."""
  deadline = time.monotonic() + limit
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pytest.fail(f"multi-process run did not finish within {limit} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def last_json(log) -> dict:
  return json.loads(pathlib.Path(log).read_text().strip().splitlines()[-1])


def slurm_job_id() -> int:
  """A job id whose coordinator port (JAX takes 61440 + id % 4096 under
  SLURM) is free here."""
  for _ in range(100):
    port = 61440 + int(np.random.default_rng().integers(4096))
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", port))
      except OSError:
        continue
    return 4096 * 7 + port - 61440
  pytest.skip("no free port in 61440..65535 for a SLURM coordinator")


def test_two_slurm_tasks_with_coordinator_auto_match_one_process(digits, tmp_path):
  """Two processes started with the environment `srun` gives each task, and
  `--coordinator auto`, train what this process trains on its eight
  devices (as do two started with an explicit coordinator, below)."""
  from jaxaccel import core, models, train
  two = tmp_path / "two"
  job = str(slurm_job_id())
  procs = [launch(["--out", str(two), "--coordinator", "auto"], 2,
                  tmp_path / f"proc{i}.log", SLURM_JOB_ID=job,
                  SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                  SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
                  SLURM_STEP_NUM_NODES="1", SLURM_NODELIST="localhost")
           for i in range(2)]
  model = models.create("mlp", num_classes=10, widths=(32,))
  single = train.fit(model, "adam(learning_rate=0.001)", digits, epochs=2,
                     batch_size=64, parallel="sharded", progress=False)
  wait_all(procs, TIME_LIMIT)
  logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("proc0", "proc1")}
  assert [p.returncode for p in procs] == [0, 0], logs
  multi = last_json(tmp_path / "proc0.log")
  assert (multi["processes"], multi["devices"]) == (2, 4)
  test = train.evaluate(model, single.state, digits.x_test, digits.y_test)
  assert multi["test_accuracy"] == pytest.approx(test["accuracy"], abs=1e-9)
  assert multi["train_loss"] == pytest.approx(single.history[-1]["train_loss"],
                                              rel=1e-5)
  # Only process 0 prints and writes metrics.
  assert "test accuracy" not in logs["proc1"] and "{" not in logs["proc1"]
  assert [r["epoch"] for r in RunDir(two).read_metrics()] == [1, 2]
  # The checkpoint is written once, and this process reads it.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               RunDir(two).restore_variables(), core.variables_of(single.state))


def test_two_processes_streaming_from_disk_match_one_process(digits, tmp_path):
  """Each process reads only its rows of every global batch from the files;
  together they train what this process trains on its eight devices."""
  from jaxaccel import core, data, models, train
  for split in ("train", "test"):
    data.save_arrays(tmp_path / "ds" / split, x=getattr(digits, f"x_{split}"),
                     y=getattr(digits, f"y_{split}"))
  port = free_port()
  procs = [launch(["--dataset", str(tmp_path / "ds"), "--out", str(tmp_path / "two"),
                   "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                   "--process-id", str(i)], 2, tmp_path / f"proc{i}.log")
           for i in range(2)]
  stream = data.from_grain(data.ArrayFiles(tmp_path / "ds" / "train"),
                           batch_size=64, seed=0)
  single = train.fit(models.create("mlp", num_classes=10, widths=(32,)),
                     "adam(learning_rate=0.001)", stream, epochs=2,
                     parallel="sharded", progress=False)
  wait_all(procs, TIME_LIMIT)
  logs = [(tmp_path / f"proc{i}.log").read_text() for i in range(2)]
  assert [p.returncode for p in procs] == [0, 0], logs
  multi = last_json(tmp_path / "proc0.log")
  assert (multi["processes"], multi["devices"]) == (2, 4)
  assert multi["train_loss"] == pytest.approx(single.history[-1]["train_loss"],
                                              rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               RunDir(tmp_path / "two").restore_variables(),
               core.variables_of(single.state))


def test_unreachable_coordinator_fails_in_bounded_time():
  address = f"127.0.0.1:{free_port()}"
  t0 = time.monotonic()
  with pytest.raises(ConfigError, match=f"cannot reach the coordinator at {address}"):
    parallel.initialize(address, num_processes=2, process_id=1,
                        timeout_seconds=1)
  assert time.monotonic() - t0 < 30


def test_busy_coordinator_port_is_refused():
  with socket.socket() as s:
    s.bind(("", 0))
    s.listen()
    port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot host the coordinator at "
                       f"127.0.0.1:{port}: port {port} is not free"):
      parallel.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=0)


@pytest.mark.slow
def test_mismatched_process_counts_stop_both_processes(tmp_path):
  """Mostly waiting: the survivor gives up after gloo's 30 s deadline."""
  port = free_port()
  common = ["--out", str(tmp_path / "r"), "--coordinator", f"127.0.0.1:{port}",
            "--coordinator-timeout", "20", "--epochs", "1"]
  procs = [launch([*common, "--num-processes", str(n), "--process-id", str(i)],
                  2, tmp_path / f"proc{i}.log") for i, n in ((0, 2), (1, 3))]
  wait_all(procs, 120)
  logs = [(tmp_path / f"proc{i}.log").read_text() for i in range(2)]
  assert [p.returncode for p in procs] == [2, 2], logs
  assert f"the run at 127.0.0.1:{port} has 2 processes, but this one was told 3" in logs[1]
  assert (f"process 0 of the run at 127.0.0.1:{port} could not reach all 2 "
          "processes") in logs[0]


def test_a_process_whose_runtime_is_already_initialized_joins_it(tmp_path):
  """As under Ray's or Kubeflow's launchers: jax.distributed is initialized
  before jaxaccel runs; the command line (and fit) join that runtime."""
  script = (
      "import jax; jax.distributed.initialize("
      f"coordinator_address='127.0.0.1:{free_port()}', num_processes=1, "
      "process_id=0)\n"
      "from jaxaccel import cli, parallel\n"
      "try:\n"
      "  parallel.initialize('10.0.0.1:1234', num_processes=2, process_id=0)\n"
      "except Exception as e:\n"
      "  print('refused:', e)\n"
      "cli.main(['train', '--dataset', 'digits', '--model', 'mlp:16', '--epochs', "
      "'1', '--batch-size', '16', '--optimizer', 'adam(0.01)', '--parallel', 'sharded', '--no-progress', "
      "'--json', '--coordinator', '10.0.0.1:1234', '--num-processes', '1', "
      "'--process-id', '0'])\n")
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(2))
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=TIME_LIMIT)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert lines[0] == ("refused: jax.distributed is already initialized with "
                      "num_processes=1, but 2 was asked for")
  result = json.loads(lines[-1])
  assert (result["processes"], result["devices"]) == (1, 2)
  assert result["test_accuracy"] > 0.5
