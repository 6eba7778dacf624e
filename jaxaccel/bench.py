"""`jaxaccel bench`: side-by-side figures against the peers a user would pick.

Every figure comes from this process run, peers measured beside jaxaccel on
the same model, batch, optimizer and data:

* jaxaccel: `fit` itself (one compiled `lax.scan` per epoch);
* plain_jax: the loop a JAX user writes by hand: `jit` + `lax.scan` over a
  shuffled epoch, flax `apply`, `optax.adam`;
* torch: PyTorch eager on the CPU (the optional `bench` extra).

Achieved GFLOP/s (XLA's own count of the step's FLOPs, times steps/s) is
set against this machine's measured float32 matmul rate: the practical
roofline of a CPU.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxaccel import data, models, train

BATCH = 128
LEARNING_RATE = 1e-3
# Steps per timed epoch: long enough that per-epoch dispatch is noise.
BENCH_MODELS = {
    "mlp": dict(name="mlp", kwargs={"widths": (300, 100)}, steps=400),
    "cnn": dict(name="cnn", kwargs={}, steps=60),
}


def matmul_gflops(n: int = 1024, repeats: int = 10) -> float:
  """This machine's float32 matmul rate through XLA: the practical peak."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best / 1e9


def step_flops(model, tx, input_shape) -> float:
  """FLOPs of one train step, as XLA counts them."""
  state = train.init_state(model, tx, input_shape)
  batch = {"x": jnp.zeros((BATCH, *input_shape)), "y": jnp.zeros(BATCH, jnp.int32)}
  compiled = jax.jit(train.make_train_step(model, tx)).lower(state, batch).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


# ----------------------------------------------------------------- the sides

def _steps_per_second(steps: int, epoch_times: list[float]) -> float:
  """Steps/s over the epochs after the first, which also compiles or warms."""
  timed = epoch_times[1:] or epoch_times
  return steps * len(timed) / sum(timed)


def time_jaxaccel(model, ds: data.Dataset, steps: int, epochs: int = 3, *,
                  skip_nonfinite: bool = True) -> float:
  """Steps/s of `fit` over epochs of exactly `steps` steps (first excluded)."""
  sub = _subset(ds, steps * BATCH)
  result = train.fit(model, optax.adam(LEARNING_RATE), sub, epochs=epochs,
                     batch_size=BATCH, progress=False,
                     skip_nonfinite=skip_nonfinite)
  return result.steps_per_second


def time_plain_jax(model, ds: data.Dataset, steps: int, epochs: int = 3) -> float:
  """Steps/s of the hand-written jit + lax.scan loop a JAX user would write."""
  x = jnp.asarray(ds.x_train[:steps * BATCH])
  y = jnp.asarray(ds.y_train[:steps * BATCH])
  params = model.init(jax.random.key(0), x[:1])["params"]
  tx = optax.adam(LEARNING_RATE)
  opt_state = tx.init(params)

  def loss_fn(params, xb, yb):
    logits = model.apply({"params": params}, xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def epoch(params, opt_state, key):
    perm = jax.random.permutation(key, x.shape[0]).reshape(steps, BATCH)

    def body(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, opt_state), losses = jax.lax.scan(body, (params, opt_state), perm)
    return params, opt_state, losses

  times = []
  for e in range(epochs):
    t = time.perf_counter()
    params, opt_state, losses = epoch(params, opt_state, jax.random.key(e))
    losses.block_until_ready()
    times.append(time.perf_counter() - t)
  return _steps_per_second(steps, times)


def torch_model(name: str):
  import torch.nn as tnn
  if name == "mlp":
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 300), tnn.ReLU(),
                          tnn.Linear(300, 100), tnn.ReLU(), tnn.Linear(100, 10))
  if name == "cnn":
    return tnn.Sequential(
        tnn.Conv2d(1, 32, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Flatten(), tnn.Linear(64 * 7 * 7, 128), tnn.ReLU(),
        tnn.Linear(128, 10))
  raise ValueError(name)


def time_torch(name: str, ds: data.Dataset, steps: int, epochs: int = 3) -> float:
  """Steps/s of the usual PyTorch eager loop on the CPU."""
  import torch
  torch.manual_seed(0)
  net = torch_model(name)
  opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
  x = torch.from_numpy(np.ascontiguousarray(
      ds.x_train[:steps * BATCH].transpose(0, 3, 1, 2)))   # NCHW
  y = torch.from_numpy(ds.y_train[:steps * BATCH].astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()
  times = []
  for _ in range(epochs):
    perm = torch.randperm(len(x))
    t = time.perf_counter()
    for i in range(steps):
      idx = perm[i * BATCH:(i + 1) * BATCH]
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(net(x[idx]), y[idx])
      loss.backward()
      opt.step()
    loss.item()
    times.append(time.perf_counter() - t)
  return _steps_per_second(steps, times)


def _subset(ds: data.Dataset, n: int) -> data.Dataset:
  return dataclasses.replace(ds, x_train=ds.x_train[:n], y_train=ds.y_train[:n],
                             x_val=ds.x_val[:0], y_val=ds.y_val[:0])


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


def run_train_suite(*, dataset: str = "auto", model_names=("mlp", "cnn"),
                    steps: int | None = None, repeats: int = 3, torch_peer: bool = True,
                    progress: bool = True) -> dict:
  """Measures training throughput of jaxaccel against its peers.

  Each side runs `repeats` times, interleaved, and keeps its best: the
  machine is shared, so the best run is the one least disturbed.
  """
  if dataset == "auto":
    try:
      ds = data.load("fashion_mnist", validation=0.0)
    except data.DataError:
      ds = data.load("digits", validation=0.0)
  else:
    ds = data.load(dataset, validation=0.0)
  use_torch = torch_peer and torch_available()
  peak = matmul_gflops()
  report = {"suite": "train", "dataset": ds.name, "batch_size": BATCH,
            "optimizer": f"adam(learning_rate={LEARNING_RATE})",
            "repeats": repeats,
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "matmul_gflops": round(peak, 2),
            "torch": use_torch, "models": {}}
  if torch_peer and not use_torch:
    report["note"] = ("PyTorch is not installed: pip install -e '.[bench]' "
                      "for the torch column")
  sides = (["jaxaccel", "jaxaccel_unguarded", "plain_jax"]
           + (["torch"] if use_torch else []))
  total = len(model_names) * repeats * len(sides)
  bar = tqdm(total=total, desc="bench", disable=not progress, leave=False)
  for name in model_names:
    if name not in BENCH_MODELS:
      from jaxaccel.errors import ConfigError
      raise ConfigError(f"unknown bench model {name!r}: use "
                        f"{', '.join(BENCH_MODELS)}")
    spec = BENCH_MODELS[name]
    n_steps = min(steps or spec["steps"], len(ds.x_train) // BATCH)
    models.check_input(spec["name"], ds.input_shape)
    model = models.create(spec["name"], num_classes=ds.num_classes,
                          **spec["kwargs"])
    runs = {s: [] for s in sides}
    for _ in range(repeats):
      for side in sides:
        bar.set_postfix(model=name, side=side)
        if side.startswith("jaxaccel"):
          runs[side].append(time_jaxaccel(
              model, ds, n_steps, skip_nonfinite=side == "jaxaccel"))
        elif side == "plain_jax":
          runs[side].append(time_plain_jax(model, ds, n_steps))
        else:
          runs[side].append(time_torch(name, ds, n_steps))
        bar.update()
    sps = {s: max(v) for s, v in runs.items()}
    flops = step_flops(model, optax.adam(LEARNING_RATE), ds.input_shape)
    entry = {
        "steps_per_epoch": n_steps,
        "steps_per_second": {s: round(v, 2) for s, v in sps.items()},
        "examples_per_second": {s: round(v * BATCH, 1) for s, v in sps.items()},
        "spread": {s: round(statistics.pstdev(v) / statistics.mean(v), 4)
                   for s, v in runs.items()},
        "ratio_vs_plain_jax": round(sps["jaxaccel"] / sps["plain_jax"], 3),
        "ratio_unguarded_vs_plain_jax": round(
            sps["jaxaccel_unguarded"] / sps["plain_jax"], 3),
        "gflop_per_step": round(flops / 1e9, 4),
        "achieved_gflops": round(flops * sps["jaxaccel"] / 1e9, 2),
    }
    entry["fraction_of_matmul_peak"] = round(entry["achieved_gflops"] / peak, 3)
    if use_torch:
      entry["ratio_vs_torch"] = round(sps["jaxaccel"] / sps["torch"], 3)
    report["models"][name] = entry
  bar.close()
  return report


def format_train_report(report: dict) -> str:
  """The train suite as a table for people."""
  sides = (["jaxaccel", "jaxaccel_unguarded", "plain_jax"]
           + (["torch"] if report["torch"] else []))
  head = (f"train throughput, {report['dataset']}, batch {report['batch_size']}, "
          f"{report['optimizer']}, {report['backend']} x{report['devices']} "
          f"({report['cpu_count']} cores; f32 matmul peak "
          f"{report['matmul_gflops']:.1f} GFLOP/s)")
  header = (["model"] + [f"{s} steps/s" for s in sides]
            + ["vs plain_jax"] + (["vs torch"] if report["torch"] else [])
            + ["GFLOP/s", "of peak"])
  rows = []
  for name, e in report["models"].items():
    rows.append([name] + [f"{e['steps_per_second'][s]:.1f}" for s in sides]
                + [f"{e['ratio_vs_plain_jax']:.2f}x"]
                + ([f"{e['ratio_vs_torch']:.2f}x"] if report["torch"] else [])
                + [f"{e['achieved_gflops']:.1f}",
                   f"{100 * e['fraction_of_matmul_peak']:.0f}%"])
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
  lines = [head, line(header)] + [line(r) for r in rows]
  lines.append("jaxaccel: fit with its default guard that skips non-finite "
               "steps; jaxaccel_unguarded: fit(skip_nonfinite=False). Ratios "
               "use the guarded figure.")
  if "note" in report:
    lines.append(report["note"])
  return "\n".join(lines)


# ------------------------------------------------------------ parallel suite

PARALLEL_MODES = ("none", "pmap", "sharded")


def time_parallel_fit(model, ds: data.Dataset, steps: int, mode: str, *,
                      batch_size: int, epochs: int = 3,
                      precision: str = "fp32") -> float:
  """Steps/s of `fit(parallel=mode, precision=...)` over epochs of `steps`
  steps."""
  sub = _subset(ds, steps * batch_size)
  result = train.fit(model, optax.adam(LEARNING_RATE), sub, epochs=epochs,
                     batch_size=batch_size, parallel=mode, precision=precision,
                     progress=False)
  return result.steps_per_second


def time_one_device(model, ds: data.Dataset, steps: int, *, batch_size: int,
                    rounds: int = 6) -> dict:
  """The plain jitted scan epoch ("jit") against the sharded engine over a
  one-device mesh ("sharded_1"), on one device: the cost of the sharding
  machinery itself.

  The two run alternately, one epoch each per round, so that load from
  elsewhere on the machine hits both alike. Returns the best steps/s of each
  (first round excluded: it compiles) and the median per-round ratio.
  """
  from jaxaccel import parallel
  sub = _subset(ds, steps * batch_size)
  tx = optax.adam(LEARNING_RATE)
  fresh = lambda: jax.tree.map(jnp.array, train.init_state(model, tx,
                                                          sub.input_shape))
  run = train.make_scan_epoch(train.make_train_step(model, tx))
  x, y = jax.device_put(sub.x_train), jax.device_put(sub.y_train)
  engine = parallel.make_engine(model, tx, mode="sharded",
                                devices=jax.devices()[:1])
  epochs = {"jit": lambda state, order: run(state, x, y, order),
            "sharded_1": lambda state, order: engine.run_epoch(
                state, sub.x_train, sub.y_train, order, use_scan=True)}
  states = {side: fresh() for side in epochs}
  times = {side: [] for side in epochs}
  for r in range(rounds + 1):
    order = train.epoch_order(0, r, steps * batch_size, batch_size)
    for side, epoch in epochs.items():
      t = time.perf_counter()
      states[side], metrics = epoch(states[side], order)
      jax.block_until_ready(metrics)
      times[side].append(time.perf_counter() - t)
  ratios = [a / b for a, b in zip(times["jit"][1:], times["sharded_1"][1:])]
  return {"steps_per_second": {s: steps / min(t[1:]) for s, t in times.items()},
          "ratio": statistics.median(ratios)}


def run_parallel_suite(*, dataset: str = "auto", model_names=("mlp",),
                       steps: int | None = None, repeats: int = 3,
                       batch_size: int | None = None,
                       progress: bool = True) -> dict:
  """Steps/s of none / pmap / sharded on the available devices, and the
  sharded path against plain `jit` on one device, measured side by side.

  The global batch is `BATCH` rounded up to a multiple of the device count.
  """
  if dataset == "auto":
    from jaxaccel.data import fashion_mnist_dir, FASHION_MNIST_FILES
    have = all((fashion_mnist_dir() / f).is_file()
               for f in FASHION_MNIST_FILES.values())
    ds = data.load("fashion_mnist" if have else "digits", validation=0.0)
  else:
    ds = data.load(dataset, validation=0.0)
  n_dev = jax.device_count()
  batch = batch_size or -(-BATCH // n_dev) * n_dev
  backend = jax.default_backend()
  report = {"suite": "parallel", "dataset": ds.name, "batch_size": batch,
            "optimizer": f"adam(learning_rate={LEARNING_RATE})",
            "repeats": repeats, "backend": backend, "devices": n_dev,
            "cpu_count": os.cpu_count(), "models": {}}
  if backend == "cpu":
    report["note"] = (
        "CPU: forced host devices share the same cores, so pmap and sharded "
        "on them test correctness only; their steps/s say nothing about "
        "scaling. The one-device overhead figure is meaningful.")
  sides = [("fit", m) for m in PARALLEL_MODES] + [("bf16", "none_bf16"),
                                                  ("one", "jit and sharded_1")]
  bar = tqdm(total=len(model_names) * repeats * len(sides), desc="bench",
             disable=not progress, leave=False)
  for name in model_names:
    if name not in BENCH_MODELS:
      from jaxaccel.errors import ConfigError
      raise ConfigError(f"unknown bench model {name!r}: use "
                        f"{', '.join(BENCH_MODELS)}")
    spec = BENCH_MODELS[name]
    n_steps = min(steps or spec["steps"], len(ds.x_train) // batch)
    models.check_input(spec["name"], ds.input_shape)
    model = models.create(spec["name"], num_classes=ds.num_classes,
                          **spec["kwargs"])
    runs = {side: [] for side in (*PARALLEL_MODES, "none_bf16", "jit",
                                  "sharded_1")}
    one_device_ratios = []
    for _ in range(repeats):
      for kind, side in sides:
        bar.set_postfix(model=name, side=side)
        if kind == "fit":
          runs[side].append(time_parallel_fit(model, ds, n_steps, side,
                                              batch_size=batch))
        elif kind == "bf16":
          runs[side].append(time_parallel_fit(model, ds, n_steps, "none",
                                              batch_size=batch,
                                              precision="bf16"))
        else:
          one = time_one_device(model, ds, n_steps, batch_size=batch)
          for s, v in one["steps_per_second"].items():
            runs[s].append(v)
          one_device_ratios.append(one["ratio"])
        bar.update()
    sps = {s: max(v) for s, v in runs.items()}
    report["models"][name] = {
        "steps_per_epoch": n_steps,
        "steps_per_second": {s: round(v, 2) for s, v in sps.items()},
        "examples_per_second": {s: round(v * batch, 1) for s, v in sps.items()},
        "ratio_vs_none": {m: round(sps[m] / sps["none"], 3)
                          for m in PARALLEL_MODES},
        "bf16_vs_fp32": round(sps["none_bf16"] / sps["none"], 3),
        # Per repeat, the median per-epoch speed ratio sharded_1 / jit.
        "one_device_ratios": [round(r, 4) for r in one_device_ratios],
        "sharded_overhead_one_device": round(
            1.0 - statistics.median(one_device_ratios), 4),
    }
  bar.close()
  return report


def format_parallel_report(report: dict) -> str:
  """The parallel suite as a table for people."""
  head = (f"parallel training, {report['dataset']}, global batch "
          f"{report['batch_size']}, {report['optimizer']}, {report['backend']} "
          f"x{report['devices']} ({report['cpu_count']} cores)")
  sides = list(PARALLEL_MODES) + ["none_bf16", "jit", "sharded_1"]
  header = (["model"] + [f"{s} steps/s" for s in sides]
            + ["pmap/none", "sharded/none", "bf16/fp32",
               "sharded overhead, 1 device"])
  rows = []
  for name, e in report["models"].items():
    rows.append([name] + [f"{e['steps_per_second'][s]:.1f}" for s in sides]
                + [f"{e['ratio_vs_none']['pmap']:.2f}x",
                   f"{e['ratio_vs_none']['sharded']:.2f}x",
                   f"{e['bf16_vs_fp32']:.2f}x",
                   f"{100 * e['sharded_overhead_one_device']:+.1f}%"])
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
  lines = [head, line(header)] + [line(r) for r in rows]
  lines.append("none/pmap/sharded: fit(parallel=...) on all devices; "
               "none_bf16: fit(precision='bf16') on one device; jit: a jitted "
               "scan epoch on one device; sharded_1: the sharded engine on a "
               "one-device mesh, run epoch by epoch alternately with jit "
               "(overhead: 1 - median per-epoch speed ratio).")
  if "note" in report:
    lines.append(report["note"])
  return "\n".join(lines)
