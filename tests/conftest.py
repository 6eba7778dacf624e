"""Test set-up: 8 forced CPU devices before jax loads, one compilation cache
for the session, and shared fixtures."""

import os
import shutil
import tempfile

# The suite is compile-bound: most tests run small models for a few steps,
# so XLA:CPU compiles the cheapest way. Tests check values, never speed.
# - Backend optimization level 0: LLVM's cheapest code generation (10% less
#   CPU for the suite).
# - XLA's elemental fusion emitters in place of its newer MLIR fusion
#   emitters: a small CNN's train step compiles in 0.23 s instead of 0.96
#   s, and the suite takes 28% less CPU.
# The real-data tests (marked slow) and the shared models of the xdist
# groups train for thousands of steps, so their own programs compile at
# XLA's default level 2 (see pytest_runtest_setup).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0"
                           + " --xla_cpu_use_fusion_emitters=false").strip()
# Many tests build the same programs (the same small model, optimizer and
# batch shape) in fresh closures, and subprocesses and notebook kernels build
# them again: a compilation cache shared by all of them, new for each
# session, compiles each program once. Set in the environment, so the
# command-line subprocesses and notebook kernels use it too.
# The process that makes the cache (pytest itself, or xdist's controller:
# its workers inherit the variable) removes it at the end.
OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  OWN_CACHE = tempfile.mkdtemp(prefix="jaxaccel-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (must come after XLA_FLAGS)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxaccel import data  # noqa: E402


FULL_OPTIMIZATION = {"xla_backend_optimization_level": 2}


def pytest_runtest_setup(item):
  """A slow test, and a test of an xdist group (the first of which trains
  the group's shared model), compiles jaxaccel's programs at XLA's default
  optimization level: they run thousands of steps."""
  if item.get_closest_marker("slow") or item.get_closest_marker("xdist_group"):
    from jaxaccel.core import compiled
    options = compiled.compiler_options
    item._jaxaccel_options = options
    compiled.compiler_options = lambda: {**options(), **FULL_OPTIMIZATION}


def pytest_runtest_teardown(item):
  if hasattr(item, "_jaxaccel_options"):
    from jaxaccel.core import compiled
    compiled.compiler_options = item._jaxaccel_options


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
  """With JAXACCEL_CPU_REPORT=FILE, appends each test's CPU seconds (this
  process and the subprocesses it waited for: setup, call and teardown) and
  the seconds this process spent tracing, lowering and compiling programs
  to FILE, to see where the
  suite's budget goes."""
  report = os.environ.get("JAXACCEL_CPU_REPORT")
  if not report:
    yield
    return
  import resource

  def used():
    return sum(r.ru_utime + r.ru_stime for r in (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN)))
  compile_seconds = [0.0]

  def on_event(event, seconds, **_):
    if event.startswith("/jax/core/compile/"):   # trace, lower, compile
      compile_seconds[0] += seconds
  jax.monitoring.register_event_duration_secs_listener(on_event)
  start = used()
  yield
  jax.monitoring.unregister_event_duration_listener(on_event)
  with open(report, "a") as f:
    f.write(f"{used() - start:.2f} {compile_seconds[0]:.2f} {item.nodeid}\n")


def pytest_unconfigure(config):
  if OWN_CACHE is not None and not hasattr(config, "workerinput"):
    shutil.rmtree(OWN_CACHE, ignore_errors=True)


def fashion_mnist_available() -> bool:
  root = data.fashion_mnist_dir()
  return all((root / f).is_file() for f in data.FASHION_MNIST_FILES.values())


requires_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist "
           "(make test does this when run as root)")


requires_fortunes = pytest.mark.skipif(
    not (data.text.fortunes_dir() / "fortunes").is_file(),
    reason="fortunes missing: apt-get install fortunes (make test does this "
           "when run as root)")


@pytest.fixture
def key():
  return jax.random.key(0)


@pytest.fixture(scope="session")
def digits():
  return data.load("digits", validation=0.1, seed=0)


@pytest.fixture
def tiny_npz(tmp_path):
  """A 12x12 two-class image data set where class = bright left half."""
  rng = np.random.default_rng(0)

  def make(n):
    y = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.3, (n, 12, 12)).astype(np.float32)
    x[y == 1, :, :6] += 0.7
    return x, y
  x_tr, y_tr = make(256)
  x_te, y_te = make(64)
  path = tmp_path / "tiny.npz"
  np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
  return path


def run_cli(capsys, *argv):
  """Runs `jaxaccel ARGV` in this process: (exit code, stdout, stderr)."""
  from jaxaccel import cli
  try:
    code = cli.main(list(argv))
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def jaxaccel_cmd(*args):
  """The command line of `jaxaccel ARGS` in a fresh process."""
  import sys
  return [sys.executable, "-m", "jaxaccel.cli", *args]


def run_until_killed(cmd, ready, *, settle: float = 0.0):
  """Starts `cmd`, SIGKILLs it once `ready()` holds (plus `settle` seconds);
  fails if it ended by itself first. Returns its stderr."""
  import signal
  import subprocess
  import time
  victim = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and not ready() and victim.poll() is None:
    time.sleep(0.005)
  time.sleep(settle)
  victim.send_signal(signal.SIGKILL)
  _, err = victim.communicate(timeout=60)
  assert victim.returncode == -signal.SIGKILL, f"ended before the kill: {err}"
  return err


def last_json(out: str) -> dict:
  """The JSON object on the last line of a command's stdout."""
  import json
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def fashion_lenet(tmp_path_factory):
  """LeNet-300-100 trained 10 epochs on standardized Fashion-MNIST (Adam,
  cosine decay from 1e-3, batch 128): (model, data, train state), shared by
  the slow real-data tests. Trained once per session: the first worker to
  get here trains it into a run directory beside the workers' temp dirs;
  the others wait on the lock and restore its checkpoint."""
  import fcntl

  if not fashion_mnist_available():
    pytest.skip("Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
  from jaxaccel import core, models, optim, train
  from jaxaccel.checkpoint import RunDir
  ds = data.load("fashion_mnist", validation=0.0, normalize="standardize")
  model = models.create("mlp", num_classes=10, widths=(300, 100))
  steps = 10 * (60000 // 128)
  spec = f"adam(cosine_decay_schedule(1e-3, {steps}))"
  shared = tmp_path_factory.getbasetemp().parent
  with open(shared / "fashion_lenet.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    run = RunDir(shared / "fashion_lenet")
    if run.latest_epoch() == 10:
      template = core.init_state(model, optim.build(spec), ds.input_shape)
      state, _ = run.restore(template)
      run.close()
      return model, ds, state
    state = train.fit(model, spec, ds, epochs=10, batch_size=128,
                      out=run.path, progress=False).state
    return model, ds, state
