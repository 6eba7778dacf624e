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

from jaxaccel import core, data, models, optim, sweep, train

BATCH = 128
LEARNING_RATE = 1e-3
# Steps per timed epoch: long enough that per-epoch dispatch is noise.
# ResNet-18 takes seconds a step on 2 cores: two timed steps, one epoch.
BENCH_MODELS = {
    "mlp": dict(name="mlp", kwargs={"widths": (300, 100)}, steps=400, epochs=3),
    "cnn": dict(name="cnn", kwargs={}, steps=60, epochs=3),
    "resnet18": dict(name="resnet18", kwargs={}, steps=2, epochs=2),
}
# Batch sizes of the scaling table (one run per side each; BATCH's figures
# come from the main, repeated runs).
SCALING_BATCHES = (32, 128, 512)


def bench_data(dataset: str, *, normalize: str = "unit") -> data.Dataset:
  """The benchmark data: "auto" is Fashion-MNIST, or digits when absent."""
  if dataset != "auto":
    return data.load(dataset, validation=0.0, normalize=normalize)
  try:
    return data.load("fashion_mnist", validation=0.0, normalize=normalize)
  except data.DataError:
    return data.load("digits", validation=0.0, normalize=normalize)


def bench_model(name: str, ds: data.Dataset):
  """A benchmark model by name, checked against the data: (model, steps,
  epochs) with the steps per timed epoch at batch `BATCH`."""
  if name not in BENCH_MODELS:
    from jaxaccel.errors import ConfigError
    raise ConfigError(f"unknown bench model {name!r}: use "
                      f"{', '.join(BENCH_MODELS)}")
  spec = BENCH_MODELS[name]
  models.check_input(spec["name"], ds.input_shape)
  return (models.create(spec["name"], num_classes=ds.num_classes,
                        **spec["kwargs"]), spec["steps"], spec["epochs"])


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
  state = core.init_state(model, tx, input_shape)
  batch = {"x": jnp.zeros((BATCH, *input_shape)), "y": jnp.zeros(BATCH, jnp.int32)}
  # The lowered program's count: within 0.2% of the compiled one's for the
  # GPT, without a second compile of a step `fit` compiles anyway.
  cost = jax.jit(core.make_train_step(model, tx)).lower(state, batch).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


# ----------------------------------------------------------------- the sides

def _steps_per_second(steps: int, epoch_times: list[float]) -> float:
  """Steps/s over the epochs after the first, which also compiles or warms."""
  timed = epoch_times[1:] or epoch_times
  return steps * len(timed) / sum(timed)


def time_jaxaccel(model, ds: data.Dataset, steps: int, epochs: int = 3, *,
                  skip_nonfinite: bool = True, batch: int = BATCH
                  ) -> tuple[float, float]:
  """Steps/s of `fit` over epochs of exactly `steps` steps (first excluded),
  and the last epoch's mean training loss."""
  sub = _subset(ds, steps * batch)
  result = train.fit(model, optax.adam(LEARNING_RATE), sub, epochs=epochs,
                     batch_size=batch, progress=False,
                     skip_nonfinite=skip_nonfinite)
  return result.steps_per_second, result.history[-1]["train_loss"]


def time_plain_jax(model, ds: data.Dataset, steps: int, epochs: int = 3, *,
                   batch: int = BATCH) -> tuple[float, float]:
  """Steps/s of the hand-written jit + lax.scan loop a JAX user would write
  for a linen model `(x, *, train)`, batch statistics included, and the
  last epoch's mean training loss. It starts from the variables `fit`
  starts from and takes its batches in `fit`'s order (both made outside the
  timing), so the two train the very same model: their losses agree."""
  x = jnp.asarray(ds.x_train[:steps * batch])
  y = jnp.asarray(ds.y_train[:steps * batch])
  variables, _ = core.init_variables(model, ds.input_shape)
  params = variables["params"]
  extra = {k: v for k, v in variables.items() if k != "params"}
  tx = optax.adam(LEARNING_RATE)
  opt_state = tx.init(params)

  def loss_fn(params, extra, xb, yb):
    logits, updated = model.apply({"params": params, **extra}, xb, train=True,
                                  mutable=list(extra))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return loss, updated

  @jax.jit
  def epoch(params, extra, opt_state, perm):
    def body(carry, idx):
      params, extra, opt_state = carry
      (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          params, extra, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), extra, opt_state), loss
    (params, extra, opt_state), losses = jax.lax.scan(
        body, (params, extra, opt_state), perm)
    return params, extra, opt_state, losses

  times = []
  for e in range(epochs):
    order = train.epoch_order(0, e, steps * batch, batch).block_until_ready()
    t = time.perf_counter()
    params, extra, opt_state, losses = epoch(params, extra, opt_state, order)
    losses.block_until_ready()
    times.append(time.perf_counter() - t)
  return _steps_per_second(steps, times), float(losses.mean())


def torch_model(name: str):
  """The bench models in PyTorch, layer for layer (NCHW)."""
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
  if name == "resnet18":
    return _torch_resnet18()
  raise ValueError(name)


def _torch_resnet18(width: int = 64, num_classes: int = 10):
  """`models.ResNet`'s layout: 3x3 stem, no max pool, four stages of two
  basic blocks, batch norm with flax's momentum 0.9 (PyTorch's 0.1)."""
  import torch.nn as tnn

  def bn(c):
    return tnn.BatchNorm2d(c, momentum=0.1, eps=1e-5)

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = bn(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = bn(cout)
      self.shortcut = (tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                      bn(cout))
                       if stride != 1 or cin != cout else tnn.Identity())

    def forward(self, x):
      y = self.bn1(self.conv1(x)).relu()
      return (self.bn2(self.conv2(y)) + self.shortcut(x)).relu()

  layers = [tnn.Conv2d(1, width, 3, 1, 1, bias=False), bn(width), tnn.ReLU()]
  cin = width
  for i in range(4):
    for j in range(2):
      cout = width * 2 ** i
      layers.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
      cin = cout
  layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, num_classes)]
  return tnn.Sequential(*layers)


def time_torch(name: str, ds: data.Dataset, steps: int, epochs: int = 3, *,
               batch: int = BATCH) -> tuple[float, None]:
  """Steps/s of the usual PyTorch eager loop on the CPU (its own
  initialization and order: no loss to compare)."""
  import torch
  torch.manual_seed(0)
  net = torch_model(name)
  opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
  x = torch.from_numpy(np.ascontiguousarray(
      ds.x_train[:steps * batch].transpose(0, 3, 1, 2)))   # NCHW
  y = torch.from_numpy(ds.y_train[:steps * batch].astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()
  times = []
  for _ in range(epochs):
    perm = torch.randperm(len(x))
    t = time.perf_counter()
    for i in range(steps):
      idx = perm[i * batch:(i + 1) * batch]
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(net(x[idx]), y[idx])
      loss.backward()
      opt.step()
    loss.item()
    times.append(time.perf_counter() - t)
  return _steps_per_second(steps, times), None


def _subset(ds: data.Dataset, n: int) -> data.Dataset:
  return dataclasses.replace(ds, x_train=ds.x_train[:n], y_train=ds.y_train[:n],
                             x_val=ds.x_val[:0], y_val=ds.y_val[:0])


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


def _time_side(side: str, name: str, model, ds: data.Dataset, steps: int,
               epochs: int, batch: int) -> tuple[float, float | None]:
  """(steps/s, the last epoch's training loss, None for PyTorch) of a side."""
  if side.startswith("jaxaccel"):
    return time_jaxaccel(model, ds, steps, epochs, batch=batch,
                         skip_nonfinite=side == "jaxaccel")
  if side == "plain_jax":
    return time_plain_jax(model, ds, steps, epochs, batch=batch)
  return time_torch(name, ds, steps, epochs, batch=batch)


def run_train_suite(*, dataset: str = "auto",
                    model_names=("mlp", "cnn", "resnet18"),
                    steps: int | None = None, repeats: int = 3,
                    batch_sizes=SCALING_BATCHES, torch_peer: bool = True,
                    progress: bool = True) -> dict:
  """Measures training throughput of jaxaccel against its peers.

  At batch `BATCH` each side runs `repeats` times, interleaved, and keeps
  its best: the machine is shared, so the best run is the one least
  disturbed. The other `batch_sizes` run each side once, for the scaling
  table, over about as many examples per epoch.
  """
  ds = bench_data(dataset)
  use_torch = torch_peer and torch_available()
  peak = matmul_gflops()
  report = {"suite": "train", "dataset": ds.name, "batch_size": BATCH,
            "optimizer": f"adam(learning_rate={LEARNING_RATE})",
            "repeats": repeats, "batch_sizes": list(batch_sizes),
            "backend": jax.default_backend(), "devices": jax.device_count(),
            "cpu_count": os.cpu_count(), "matmul_gflops": round(peak, 2),
            "torch": use_torch, "models": {}}
  if torch_peer and not use_torch:
    report["note"] = ("PyTorch is not installed: pip install -e '.[bench]' "
                      "for the torch column")
  sides = (["jaxaccel", "jaxaccel_unguarded", "plain_jax"]
           + (["torch"] if use_torch else []))
  scaling_sides = [s for s in sides if s != "jaxaccel_unguarded"]
  others = [b for b in batch_sizes if b != BATCH]
  total = len(model_names) * (repeats * len(sides)
                              + len(others) * len(scaling_sides))
  bar = tqdm(total=total, desc="bench", disable=not progress, leave=False)
  for name in model_names:
    model, default_steps, epochs = bench_model(name, ds)
    n_steps = min(steps or default_steps, len(ds.x_train) // BATCH)
    runs = {s: [] for s in sides}
    losses = {}
    for _ in range(repeats):
      for side in sides:
        bar.set_postfix(model=name, side=side)
        speed, losses[side] = _time_side(side, name, model, ds, n_steps,
                                         epochs, BATCH)
        runs[side].append(speed)
        bar.update()
    sps = {s: max(v) for s, v in runs.items()}
    flops = step_flops(model, optax.adam(LEARNING_RATE), ds.input_shape)
    entry = {
        "steps_per_epoch": n_steps,
        "steps_per_second": {s: round(v, 4) for s, v in sps.items()},
        "examples_per_second": {s: round(v * BATCH, 1) for s, v in sps.items()},
        "spread": {s: round(statistics.pstdev(v) / statistics.mean(v), 4)
                   for s, v in runs.items()},
        "ratio_vs_plain_jax": round(sps["jaxaccel"] / sps["plain_jax"], 3),
        "ratio_unguarded_vs_plain_jax": round(
            sps["jaxaccel_unguarded"] / sps["plain_jax"], 3),
        # The JAX sides train the same model from the same start on the
        # same batches: equal losses say each timed the same work.
        "train_loss": {s: v for s, v in losses.items() if v is not None},
        "gflop_per_step": round(flops / 1e9, 4),
        "achieved_gflops": round(flops * sps["jaxaccel"] / 1e9, 2),
    }
    entry["fraction_of_matmul_peak"] = round(entry["achieved_gflops"] / peak, 3)
    if use_torch:
      entry["ratio_vs_torch"] = round(sps["jaxaccel"] / sps["torch"], 3)
    scaling = {}
    for b in batch_sizes:
      if b == BATCH:
        at = {s: sps[s] for s in scaling_sides}
      else:
        b_steps = max(1, min(n_steps * BATCH // b, len(ds.x_train) // b))
        at = {}
        for side in scaling_sides:
          bar.set_postfix(model=name, side=side, batch=b)
          at[side] = _time_side(side, name, model, ds, b_steps, epochs, b)[0]
          bar.update()
      scaling[str(b)] = {
          "steps_per_second": {s: round(v, 4) for s, v in at.items()},
          "examples_per_second": {s: round(v * b, 1) for s, v in at.items()}}
      if use_torch:
        scaling[str(b)]["ratio_vs_torch"] = round(at["jaxaccel"] / at["torch"], 3)
    entry["batch_scaling"] = scaling
    report["models"][name] = entry
  bar.close()
  return report


def _aligned(header: list, rows: list) -> list[str]:
  """Right-aligned table lines: the header, then one per row."""
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
  return [line(header)] + [line(r) for r in rows]


def _rate(v: float) -> str:
  """Steps/s with three significant digits (ResNet-18 runs under one)."""
  return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def format_train_report(report: dict) -> str:
  """The train suite as tables for people: throughput at the bench batch,
  then examples/s at each batch size."""
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
    rows.append([name] + [_rate(e['steps_per_second'][s]) for s in sides]
                + [f"{e['ratio_vs_plain_jax']:.2f}x"]
                + ([f"{e['ratio_vs_torch']:.2f}x"] if report["torch"] else [])
                + [f"{e['achieved_gflops']:.1f}",
                   f"{100 * e['fraction_of_matmul_peak']:.0f}%"])
  lines = [head] + _aligned(header, rows)
  lines.append("jaxaccel: fit with its default guard that skips non-finite "
               "steps; jaxaccel_unguarded: fit(skip_nonfinite=False). Ratios "
               "use the guarded figure.")
  scaling_sides = [s for s in sides if s != "jaxaccel_unguarded"]
  header = (["model", "batch"] + [f"{s} ex/s" for s in scaling_sides]
            + (["vs torch"] if report["torch"] else []))
  rows = []
  for name, e in report["models"].items():
    for b, at in e.get("batch_scaling", {}).items():
      rows.append([name, b] + [f"{at['examples_per_second'][s]:.0f}"
                               for s in scaling_sides]
                  + ([f"{at['ratio_vs_torch']:.2f}x"] if report["torch"] else []))
  if rows:
    lines += ["", "examples/s by batch size (batch "
              f"{report['batch_size']}: the best of the runs above; others: "
              "one run each)"] + _aligned(header, rows)
  if "note" in report:
    lines.append(report["note"])
  return "\n".join(lines)


# ------------------------------------------------------------------- sweep

SWEEP_LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)


def time_plain_optax_config(model, ds: data.Dataset, learning_rate: float,
                            seed: int, epochs: int, batch_size: int):
  """One configuration the way a user loops over them with plain optax: a
  new `optax.adam(lr)` and a new jitted step (so it compiles), a Python loop
  over shuffled batches. Returns (seconds per epoch, validation accuracy)."""
  params = model.init(jax.random.key(seed), jnp.zeros((1, *ds.input_shape)),
                      train=False)["params"]
  tx = optax.adam(learning_rate)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(seed)
  steps = len(ds.x_train) // batch_size
  times = []
  for _ in range(epochs):
    t0 = time.perf_counter()
    perm = rng.permutation(len(ds.x_train))
    for i in range(steps):
      idx = perm[i * batch_size:(i + 1) * batch_size]
      params, opt_state = step(params, opt_state, ds.x_train[idx], ds.y_train[idx])
    jax.block_until_ready(params)
    times.append(time.perf_counter() - t0)
  logits = model.apply({"params": params}, ds.x_val, train=False)
  return times, float(np.mean(np.argmax(logits, -1) == ds.y_val))


def _steady(times: list[float]) -> float:
  """Seconds for all epochs at the rate of the epochs after the first (which
  compiles)."""
  return sum(times[1:]) * len(times) / (len(times) - 1)


def run_sweep_suite(*, learning_rates=SWEEP_LEARNING_RATES, seeds: int = 4,
                    epochs: int = 20, batch_size: int = 128, repeats: int = 1,
                    progress: bool = True) -> dict:
  """16 learning-rate/seed configurations of the digits MLP, trained as one
  vmapped program by `sweep` and one after another with plain optax.

  `speedup_end_to_end` includes compilation on both sides;
  `speedup_compile_excluded` sets the steady epochs against each other.
  """
  ds = data.load("digits", validation=0.1, seed=0)
  model = models.create("mlp", num_classes=ds.num_classes, widths=(64, 64))
  configs = [(lr, s) for lr in learning_rates for s in range(seeds)]
  # Both sides initialize with the same eager flax init, whose op-by-op
  # compilation a process pays once: pay it before either side is timed.
  core.init_variables(model, ds.input_shape, seed=0)
  bar = tqdm(total=repeats * (1 + len(configs)), desc="bench sweep",
             disable=not progress, leave=False)
  best_vmapped, best_sequential = None, None
  for _ in range(repeats):
    t0 = time.perf_counter()
    result = sweep.sweep(model, "adam(1e-3)", ds, epochs=epochs,
                         grid={"learning_rate": list(learning_rates)},
                         seeds=range(seeds), batch_size=batch_size,
                         progress=False)
    vmapped = {"wall": time.perf_counter() - t0,
               "steady": _steady(result.epoch_seconds),
               "best_val_accuracy": result.best["val_accuracy"]}
    bar.update()
    t0 = time.perf_counter()
    steady, accs = 0.0, []
    for lr, seed in configs:
      times, acc = time_plain_optax_config(model, ds, lr, seed, epochs, batch_size)
      steady += _steady(times)
      accs.append(acc)
      bar.update()
    sequential = {"wall": time.perf_counter() - t0, "steady": steady,
                  "best_val_accuracy": max(accs)}
    if best_vmapped is None or vmapped["wall"] < best_vmapped["wall"]:
      best_vmapped = vmapped
    if best_sequential is None or sequential["wall"] < best_sequential["wall"]:
      best_sequential = sequential
  bar.close()
  return {
      "suite": "sweep", "dataset": ds.name, "model": "mlp:64,64",
      "configurations": len(configs), "epochs": epochs, "batch_size": batch_size,
      "learning_rates": list(learning_rates), "seeds": seeds,
      "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
      "repeats": repeats,
      "vmapped_seconds": round(best_vmapped["wall"], 6),
      "sequential_seconds": round(best_sequential["wall"], 6),
      "speedup_end_to_end": round(best_sequential["wall"] / best_vmapped["wall"], 3),
      "vmapped_steady_seconds": round(best_vmapped["steady"], 6),
      "sequential_steady_seconds": round(best_sequential["steady"], 6),
      "speedup_compile_excluded": round(
          best_sequential["steady"] / best_vmapped["steady"], 3),
      "best_val_accuracy": {"vmapped": best_vmapped["best_val_accuracy"],
                            "sequential": best_sequential["best_val_accuracy"]},
  }


def format_sweep_report(report: dict) -> str:
  """The sweep suite for people."""
  return "\n".join([
      f"sweep: {report['configurations']} configurations (learning rates "
      f"{report['learning_rates']} x {report['seeds']} seeds) of the "
      f"{report['dataset']} {report['model']}, {report['epochs']} epochs, "
      f"batch {report['batch_size']}, {report['backend']} "
      f"({report['cpu_count']} cores)",
      f"  one vmapped program (jaxaccel sweep): {report['vmapped_seconds']:.1f} s"
      f" end to end, {report['vmapped_steady_seconds']:.1f} s without compiling",
      f"  one after another (plain optax, a new adam per config): "
      f"{report['sequential_seconds']:.1f} s end to end, "
      f"{report['sequential_steady_seconds']:.1f} s without compiling",
      f"  speed-up: {report['speedup_end_to_end']:.2f}x end to end, "
      f"{report['speedup_compile_excluded']:.2f}x compile excluded",
      f"  best validation accuracy: vmapped "
      f"{report['best_val_accuracy']['vmapped']:.4f}, sequential "
      f"{report['best_val_accuracy']['sequential']:.4f}",
  ])


# ------------------------------------------------------------ compress suite

def interleaved_ms(calls: dict, *, repeats: int = 30, block: int = 10) -> dict:
  """Median ms a call of each side, name -> a callable of no arguments that
  returns when its result is ready.

  The sides take turns in blocks of `block` timed calls, each block after
  one untimed call: turns spread a disturbance of the shared machine over
  all sides, and the untimed call keeps the switch from one program to the
  other out of the figures (on XLA:CPU the first call after the other
  side's runs up to 1.5x slower: a model serving requests runs back to
  back)."""
  times = {k: [] for k in calls}
  for _ in range(max(1, repeats // block)):
    for k, f in calls.items():
      f()
      for _ in range(block):
        t = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _jitted_call(fn, x):
  f, x = jax.jit(fn), jnp.asarray(x)
  return lambda: f(x).block_until_ready()


def _cosine_adam(epochs: int, steps_per_epoch: int, lr: float = 1e-3):
  return optim.cosine_adam(lr, epochs * steps_per_epoch)


def _mlp_name(widths) -> str:
  return "mlp_" + "_".join(str(w) for w in widths)


# The default run's share of each recipe's fine-tuning (epochs and
# min_steps), so the suite ends within 10 minutes on a 2-core CPU; --full
# runs the recipes as shipped.
REDUCED = 0.25
MLP_RECIPES = ("prune-90", "int8", "prune-90-int8", "lowrank", "shrink-50")


def _scaled(stages: list[dict], share: float) -> list[dict]:
  """A recipe's stages with `share` of their training (epochs, min_steps)."""
  out = []
  for st in stages:
    st = dict(st)
    for key in ("epochs", "min_steps"):
      if st.get(key):
        st[key] = max(1 if key == "epochs" else 0, int(round(st[key] * share)))
    out.append(st)
  return out


def qwix_int8(model, variables: dict, ds: data.Dataset):
  """The same post-training int8 done with qwix, the JAX quantization
  library a user would otherwise pick: int8 weights (per output channel,
  absmax) and int8 activations quantized per batch (qwix's dynamic-range
  PTQ; jaxaccel's int8 recipe calibrates static activation scales instead).
  Returns ({accuracy, seconds, version}, jitted forward), or None when qwix
  is not installed (`pip install 'jaxaccel[bench]'`)."""
  try:
    import qwix
  except ImportError:
    return None
  from importlib.metadata import version
  t = time.perf_counter()
  rules = [qwix.QtRule(module_path=".*", weight_qtype="int8",
                       act_qtype="int8")]
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), ds.x_train[:1])
  qparams = qwix.quantize_params(variables["params"], abstract["params"])
  rest = {k: v for k, v in variables.items() if k != "params"}
  forward = jax.jit(lambda x: qmodel.apply({"params": qparams, **rest}, x))
  from jaxaccel.compress.report import accuracy
  logits = np.concatenate([np.asarray(forward(ds.x_test[i:i + 1024]))
                           for i in range(0, len(ds.x_test), 1024)])
  figures = {"accuracy": round(accuracy(logits, ds.y_test), 4),
             "seconds": round(time.perf_counter() - t, 2),
             "version": version("qwix")}
  return figures, forward


def polynomial_schedule_gap(params, schedule: dict, target: float) -> dict:
  """`prune_gradually`'s realized global sparsity after each mask update
  against jaxpruner's published schedule (its PolynomialSchedule: Zhu &
  Gupta's s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3, power 3,
  written here from the formula: jaxpruner is not on the package index).
  The weights get no gradient, so the masks alone move the sparsity."""
  from jaxaccel.compress import pruning
  t0, t1, every = schedule["begin_step"], schedule["end_step"], schedule["every"]
  tx = pruning.prune_gradually(target, begin_step=t0, end_step=t1, every=every,
                               scope="global")
  kernels = lambda p: [k for k in jax.tree.leaves(p) if k.ndim >= 2]
  total = sum(k.size for k in kernels(params))
  zeros = jax.tree.map(jnp.zeros_like, params)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, st = carry
      u, st = tx.update(zeros, st, p)
      p = optax.apply_updates(p, u)
      return (p, st), sum(jnp.sum(k == 0) for k in kernels(p)) / total
    return jax.lax.scan(body, (params, tx.init(params)), None,
                        length=t1 + 1)[1]
  realized = np.asarray(run(params))
  updates = range(t0, t1 + 1, every)
  published = [target * (1 - (1 - (t - t0) / max(t1 - t0, 1)) ** 3)
               for t in updates]
  gap = max(abs(float(realized[t]) - s) for t, s in zip(updates, published))
  return {"updates": len(updates), "max_abs_difference": gap,
          "final_sparsity": round(float(realized[t1]), 6),
          "by_update": [[t, round(float(realized[t]), 6), round(s, 6)]
                        for t, s in zip(updates, published)]}


def _recipe_figures(records: list[dict], base: dict) -> dict:
  """One recipe's figures from `compress.run`'s records: the last stage's
  against the dense model's."""
  last = records[-1]
  return {"accuracy": last["accuracy"],
          "loss_points": round(100 * (base["accuracy"] - last["accuracy"]), 3),
          "size_bytes": last["size_bytes"],
          "ratio": round(base["size_bytes"] / last["size_bytes"], 2),
          "parameters": last["parameters"], "sparsity": last["sparsity"],
          "latency_ms": last["latency_ms"],
          "seconds": round(sum(r.get("seconds", 0) for r in records), 1),
          "stages": records[1:]}


def int8_against_float32(model, variables, ds: data.Dataset, *, rounds: int,
                         repeats: int, extra: dict | None = None) -> list[dict]:
  """Batch-1024 ms of the model's float32 forward pass ("float32") and of
  its int8 program ("int8"; calibrated as the int8 recipe calibrates),
  plus any `extra` jitted forward passes, in `rounds` of interleaved
  timing in this process: one {side: ms} dict a round."""
  from jaxaccel.compress import int8, quantization
  program = int8.convert(model, variables, quantization.calibration_batches(
      ds.x_train), percentile=99.99)
  f32 = jax.jit(lambda x: models.adapt(model).logits(variables, x))
  xb = np.resize(ds.x_test, (1024, *ds.input_shape))
  calls = {k: _jitted_call(f, xb) for k, f in
           {"float32": f32, "int8": program.forward, **(extra or {})}.items()}
  return [interleaved_ms(calls, repeats=repeats, block=min(10, repeats))
          for _ in range(rounds)]


def _median_ms(by_round: list[dict]) -> dict:
  return {k: round(statistics.median(r[k] for r in by_round), 3)
          for k in by_round[0]}


def _peer_figures(model, variables, ds, figures: dict, rounds: int,
                  repeats: int) -> dict:
  """jaxaccel beside the peer libraries: the int8 recipe against qwix's PTQ
  (accuracy, seconds, batch-1024 ms in interleaved rounds), the prune-90
  recipe's schedule against jaxpruner's formula."""
  out = {}
  prune = figures["prune-90"]["stages"][0]
  out["jaxpruner_schedule"] = polynomial_schedule_gap(
      variables["params"], prune["schedule"], prune["options"]["sparsity"])
  peer = qwix_int8(model, variables, ds)
  if peer is None:
    out["qwix_int8"] = None
    return out
  qwix_figures, qwix_forward = peer
  ms = _median_ms(int8_against_float32(model, variables, ds, rounds=rounds,
                                       repeats=repeats,
                                       extra={"qwix int8": qwix_forward}))
  ms["jaxaccel int8"] = ms.pop("int8")
  out["qwix_int8"] = {"qwix": qwix_figures,
                      "jaxaccel": {"accuracy": figures["int8"]["accuracy"],
                                   "seconds": figures["int8"]["seconds"]},
                      "float32_accuracy": figures["dense"]["accuracy"],
                      "latency_ms_batch_1024": ms}
  return out


def run_compress_suite(*, dataset: str = "auto", model_names=("mlp", "cnn"),
                       full: bool = False, epochs: int | None = None,
                       seeds: int | None = None, share: float | None = None,
                       teacher_widths=(1200, 1200), latency_rounds: int = 5,
                       latency_repeats: int = 20, stage_latency: bool = True,
                       progress: bool = True) -> dict:
  """Measures the compression targets with the shipped recipes.

  Every figure comes from `compress.run` with a recipe file, as `jaxaccel
  compress --from RUN --recipe NAME` runs it, against a dense model trained
  in this run (Adam, cosine decay, standardized inputs): LeNet-300-100
  through prune-90, int8, prune-90-int8, lowrank, shrink-50; a wide MLP
  (`teacher_widths`) through distill, against the same student trained on
  labels alone; the CNN through int8, its integer convolutions timed against
  float32.

  Args:
    full: the recipes as shipped, 10 dense epochs, 3 seeds (the README's
      figures). By default the recipes' fine-tuning is cut to a quarter, the
      dense models train 5 epochs (the CNN 2) and students use one seed.
    epochs, seeds, share: override the dense epochs, the student seeds and
      the share of the recipes' fine-tuning.
    latency_rounds: interleaved rounds of the CNN's int8/float32 timing.
    latency_repeats: timed batch-1024 calls of each side a round.
    stage_latency: each stage record's batch-1 and batch-1024 latency.
  """
  from jaxaccel.compress import stages as cstages
  share = share or (1.0 if full else REDUCED)
  epochs = epochs or (10 if full else 5)
  seeds = seeds or (3 if full else 1)
  ds = bench_data(dataset, normalize="standardize")
  per_epoch = len(ds.x_train) // BATCH
  settings = cstages.Settings(batch_size=BATCH, progress=False,
                              latency=stage_latency)
  out = {"suite": "compress", "dataset": ds.name, "batch_size": BATCH,
         "epochs": epochs, "seeds": seeds, "full": full,
         "recipe_share": share, "backend": jax.default_backend(),
         "cpu_count": os.cpu_count()}
  todo = (["dense"] + list(MLP_RECIPES) + ["peers", "labels only", "teacher",
                                           "distill"]
          + (["cnn", "cnn int8"] if "cnn" in model_names else []))
  bar = tqdm(total=len(todo), desc="compress bench", disable=not progress,
             leave=False)

  def trained(model, n_epochs, seed=0):
    result = train.fit(model, _cosine_adam(n_epochs, per_epoch), ds,
                       epochs=n_epochs, batch_size=BATCH, seed=seed,
                       progress=False)
    return core.variables_of(result.state)

  def recipe(name, model, variables, seed=0, **options):
    bar.set_postfix(stage=name)
    stages = _scaled(cstages.load_recipe(name)["stages"], share)
    stages = [{**st, **options} for st in stages]
    _, _, records = cstages.run(model, variables, ds, stages,
                                settings=dataclasses.replace(settings, seed=seed))
    return records

  bar.set_postfix(stage="dense")
  lenet = models.create("mlp", num_classes=ds.num_classes, widths=(300, 100))
  dense = trained(lenet, epochs)
  bar.update()
  base = None
  out["mlp"] = {}
  for name in MLP_RECIPES:
    records = recipe(name, lenet, dense)
    bar.update()
    base = base or records[0]
    out["mlp"][name] = _recipe_figures(records, base)
  out["mlp"]["dense"] = {k: base[k] for k in ("accuracy", "size_bytes",
                                              "parameters", "latency_ms")}
  bar.set_postfix(stage="peers")
  out["mlp"]["peers"] = _peer_figures(lenet, dense, ds, out["mlp"],
                                      latency_rounds, latency_repeats)

  # Distillation: a 784-64-64-10 student taught by a wide MLP against the
  # same student trained on labels alone (its best mean over 1x, 2x and 4x
  # the dense epochs, chosen on the test set, which favours it).
  student_spec = "mlp:64,64"
  bar.set_postfix(stage="labels only")
  student = models.create("mlp", num_classes=ds.num_classes, widths=(64, 64))
  labels_only = {}
  for e in (epochs, 2 * epochs, 4 * epochs):
    labels_only[e] = [train.evaluate(student, trained(student, e, s), ds.x_test,
                                     ds.y_test)["accuracy"]
                      for s in range(seeds)]
  best_e = max(labels_only, key=lambda e: np.mean(labels_only[e]))
  a_alone = float(np.mean(labels_only[best_e]))
  bar.update()
  bar.set_postfix(stage="teacher")
  wide = models.create("mlp", num_classes=ds.num_classes,
                       widths=tuple(teacher_widths))
  wide_vars = trained(wide, epochs)
  bar.update()
  runs = [recipe("distill", wide, wide_vars, seed=s, student=student_spec)
          for s in range(seeds)]
  bar.update()
  taught = [records[-1]["accuracy"] for records in runs]
  t_acc = runs[0][0]["accuracy"]
  gap = t_acc - a_alone
  a_kd = float(np.mean(taught))
  out["mlp"]["distill"] = {
      "student": student_spec, "teacher": _mlp_name(teacher_widths),
      "teacher_accuracy": t_acc, "student_distilled": a_kd,
      "student_labels_only": a_alone, "labels_only_epochs": best_e,
      "labels_only_by_epochs": {str(e): v for e, v in labels_only.items()},
      "distilled_by_seed": taught,
      "gap_closed": round((a_kd - a_alone) / gap, 3) if gap > 0 else None,
      "agreement": runs[0][-1]["agreement"],
      "seconds": round(sum(r.get("seconds", 0) for r in runs[0]), 1),
      "stages": runs[0][1:]}

  if "cnn" in model_names:
    bar.set_postfix(stage="cnn")
    cnn = models.create("cnn", num_classes=ds.num_classes)
    cnn_vars = trained(cnn, 3 if full else 2)
    bar.update()
    records = recipe("int8", cnn, cnn_vars)
    bar.update()
    figures = _recipe_figures(records, records[0])
    # int8 against float32 at batch 1024, interleaved rounds in this process.
    q = records[-1]
    by_round = int8_against_float32(cnn, cnn_vars, ds, rounds=latency_rounds,
                                    repeats=latency_repeats)
    ms = {k: statistics.median(r[k] for r in by_round) for k in by_round[0]}
    figures.update(
        int8_layers=q["int8_layers"], float_layers=q["float_layers"],
        latency_ms_batch_1024={k: round(v, 3) for k, v in ms.items()},
        speedup_batch_1024=round(ms["float32"] / ms["int8"], 3),
        speedup_batch_1024_by_round=[round(r["float32"] / r["int8"], 3)
                                     for r in by_round])
    out["cnn"] = {"dense": {k: records[0][k] for k in ("accuracy", "size_bytes",
                                                      "latency_ms")},
                  "int8": figures}
  bar.close()
  return out


def format_compress_report(r: dict) -> str:
  """The compress suite: each figure beside its target."""
  m = r["mlp"]
  yes = lambda ok: "met" if ok else "NOT met"
  mode = ("recipes as shipped" if r["full"] else
          f"reduced: {r['recipe_share']:g} of each recipe's fine-tuning, "
          f"{r['epochs']} dense epochs, {r['seeds']} seed(s); --full for "
          "the README figures")
  lines = [f"compression of LeNet-300-100 on {r['dataset']} ({mode})",
           f"  dense: {m['dense']['accuracy']:.4f}, "
           f"{m['dense']['size_bytes']:,} bytes float32"]
  targets = {"prune-90": ("loss", 0.5), "int8": ("loss", 0.3),
             "prune-90-int8": ("ratio", 20.0), "shrink-50": ("loss", 1.0)}
  for name in MLP_RECIPES:
    f = m[name]
    kind, bar_ = targets.get(name, (None, None))
    target = ""
    if kind == "loss":
      target = f"; target <= {bar_:g} pt: {yes(f['loss_points'] <= bar_)}"
    elif kind == "ratio":
      target = f"; target >= {bar_:g}x: {yes(f['ratio'] >= bar_)}"
    lat = f["latency_ms"] or {}
    speed = (f", batch-1024 {m['dense']['latency_ms']['batch_1024'] / lat['batch_1024']:.2f}x"
             " the dense latency" if lat and m["dense"]["latency_ms"] else "")
    lines.append(f"  --recipe {name}: {f['accuracy']:.4f} "
                 f"({-f['loss_points']:+.2f} pt), {f['size_bytes']:,} bytes = "
                 f"{f['ratio']:.1f}x smaller, {f['parameters']:,} parameters"
                 f"{speed}{target} [{f['seconds']:.0f} s]")
  peers = m["peers"]
  q = peers["qwix_int8"]
  if q is None:
    lines.append("  peer int8: qwix not installed (pip install "
                 "'jaxaccel[bench]')")
  else:
    ms = q["latency_ms_batch_1024"]
    lines.append(
        f"  peer int8 PTQ: jaxaccel {q['jaxaccel']['accuracy']:.4f} in "
        f"{q['jaxaccel']['seconds']:.1f} s (static calibrated scales), "
        f"{ms['jaxaccel int8']:.2f} ms at batch 1024; qwix "
        f"{q['qwix']['version']} {q['qwix']['accuracy']:.4f} in "
        f"{q['qwix']['seconds']:.1f} s (per-batch activation scales), "
        f"{ms['qwix int8']:.2f} ms; float32 {q['float32_accuracy']:.4f}, "
        f"{ms['float32']:.2f} ms")
  sched = peers["jaxpruner_schedule"]
  lines.append(
      f"  peer pruning schedule: prune-90's sparsity after each of its "
      f"{sched['updates']} mask updates against jaxpruner's polynomial "
      f"schedule (power 3): largest difference {sched['max_abs_difference']:.1e}"
      f" (jaxpruner is not on the package index: the formula, not its code)")
  d = m["distill"]
  gap = d["gap_closed"]
  lines.append(
      f"  --recipe distill ({d['student']} from {d['teacher']}, "
      f"{d['teacher_accuracy']:.4f}): {d['student_distilled']:.4f} against "
      f"{d['student_labels_only']:.4f} on labels alone (best of "
      f"{'/'.join(d['labels_only_by_epochs'])} epochs: "
      f"{d['labels_only_epochs']}); gap closed "
      + (f"{100 * gap:.0f}% (target >= 40%: {yes(gap >= 0.4)})"
         if gap is not None else "n/a (student not below teacher)")
      + f", agreement {d['agreement']:.3f}")
  if "cnn" in r:
    c = r["cnn"]["int8"]
    lines.append(
        f"  CNN --recipe int8: {c['accuracy']:.4f} against "
        f"{r['cnn']['dense']['accuracy']:.4f} ({-c['loss_points']:+.2f} pt; "
        f"target <= 1: {yes(c['loss_points'] <= 1.0)}); integer layers "
        f"{', '.join(c['int8_layers'])}"
        + (f"; float: {', '.join(c['float_layers'])}" if c["float_layers"] else "")
        + f"; batch 1024 {c['latency_ms_batch_1024']['int8']:.2f} ms vs "
        f"float32 {c['latency_ms_batch_1024']['float32']:.2f} ms = "
        f"{c['speedup_batch_1024']:.2f}x (target > 1: "
        f"{yes(c['speedup_batch_1024'] > 1.0)})")
  return "\n".join(lines)


# ------------------------------------------------------------ parallel suite

PARALLEL_MODES = ("none", "pmap", "sharded")


def time_parallel_fit(model, ds: data.Dataset, steps: int, mode: str, *,
                      batch_size: int, epochs: int = 3,
                      precision: str = "fp32") -> tuple[float, float]:
  """Steps/s of `fit(parallel=mode, precision=...)` over epochs of `steps`
  steps, and the last epoch's mean training loss."""
  sub = _subset(ds, steps * batch_size)
  result = train.fit(model, optax.adam(LEARNING_RATE), sub, epochs=epochs,
                     batch_size=batch_size, parallel=mode, precision=precision,
                     progress=False)
  return result.steps_per_second, result.history[-1]["train_loss"]


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
  fresh = lambda: jax.tree.map(jnp.array, core.init_state(model, tx,
                                                          sub.input_shape))
  engines = {"jit": parallel.make_engine(model, tx),
             "sharded_1": parallel.make_engine(model, tx, mode="sharded",
                                               devices=jax.devices()[:1])}
  epochs = {side: (lambda state, order, e=e: e.run_epoch(
      state, sub.arrays("train"), order, use_scan=True))
      for side, e in engines.items()}
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
  ds = bench_data(dataset)
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
    model, default_steps, _ = bench_model(name, ds)
    n_steps = min(steps or default_steps, len(ds.x_train) // batch)
    runs = {side: [] for side in (*PARALLEL_MODES, "none_bf16", "jit",
                                  "sharded_1")}
    one_device_ratios, losses = [], {}
    for _ in range(repeats):
      for kind, side in sides:
        bar.set_postfix(model=name, side=side)
        if kind in ("fit", "bf16"):
          speed, losses[side] = time_parallel_fit(
              model, ds, n_steps, "none" if kind == "bf16" else side,
              batch_size=batch, precision=kind if kind == "bf16" else "fp32")
          runs[side].append(speed)
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
        # Every placement trains the same model on the same batches: the
        # same loss up to float rounding (bf16 up to its precision).
        "train_loss": losses,
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
    rows.append([name] + [_rate(e['steps_per_second'][s]) for s in sides]
                + [f"{e['ratio_vs_none']['pmap']:.2f}x",
                   f"{e['ratio_vs_none']['sharded']:.2f}x",
                   f"{e['bf16_vs_fp32']:.2f}x",
                   f"{100 * e['sharded_overhead_one_device']:+.1f}%"])
  lines = [head] + _aligned(header, rows)
  lines.append("none/pmap/sharded: fit(parallel=...) on all devices; "
               "none_bf16: fit(precision='bf16') on one device; jit: a jitted "
               "scan epoch on one device; sharded_1: the sharded engine on a "
               "one-device mesh, run epoch by epoch alternately with jit "
               "(overhead: 1 - median per-epoch speed ratio).")
  if "note" in report:
    lines.append(report["note"])
  return "\n".join(lines)
