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
BENCH_MODELS = {
    "mlp": dict(name="mlp", kwargs={"widths": (300, 100)}, steps=400),
    "cnn": dict(name="cnn", kwargs={}, steps=60),
}


def bench_data(dataset: str, *, normalize: str = "unit") -> data.Dataset:
  """The benchmark data: "auto" is Fashion-MNIST, or digits when absent."""
  if dataset != "auto":
    return data.load(dataset, validation=0.0, normalize=normalize)
  try:
    return data.load("fashion_mnist", validation=0.0, normalize=normalize)
  except data.DataError:
    return data.load("digits", validation=0.0, normalize=normalize)


def bench_model(name: str, ds: data.Dataset):
  """A benchmark model by name, checked against the data: (model, steps)."""
  if name not in BENCH_MODELS:
    from jaxaccel.errors import ConfigError
    raise ConfigError(f"unknown bench model {name!r}: use "
                      f"{', '.join(BENCH_MODELS)}")
  spec = BENCH_MODELS[name]
  models.check_input(spec["name"], ds.input_shape)
  return (models.create(spec["name"], num_classes=ds.num_classes,
                        **spec["kwargs"]), spec["steps"])


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
  compiled = jax.jit(core.make_train_step(model, tx)).lower(state, batch).compile()
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
  ds = bench_data(dataset)
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
    model, default_steps = bench_model(name, ds)
    n_steps = min(steps or default_steps, len(ds.x_train) // BATCH)
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


def _aligned(header: list, rows: list) -> list[str]:
  """Right-aligned table lines: the header, then one per row."""
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
  return [line(header)] + [line(r) for r in rows]


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
  lines = [head] + _aligned(header, rows)
  lines.append("jaxaccel: fit with its default guard that skips non-finite "
               "steps; jaxaccel_unguarded: fit(skip_nonfinite=False). Ratios "
               "use the guarded figure.")
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

def _interleaved_ms(sides: dict, repeats: int = 30, block: int = 10) -> dict:
  """Median ms per call of each side, name -> (fn, input), jitted.

  The sides take turns in blocks of `block` timed calls, each block after
  one untimed call: turns spread a disturbance of the shared machine over
  all sides, and the untimed call keeps the switch from one program to the
  other out of the figures (on XLA:CPU the first call after the other
  side's runs up to 1.5x slower: a model serving requests runs back to
  back)."""
  compiled = {k: (jax.jit(f), jnp.asarray(x)) for k, (f, x) in sides.items()}
  times = {k: [] for k in sides}
  for _ in range(max(1, repeats // block)):
    for k, (f, x) in compiled.items():
      f(x).block_until_ready()
      for _ in range(block):
        t = time.perf_counter()
        f(x).block_until_ready()
        times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _cosine_adam(epochs: int, steps_per_epoch: int, lr: float = 1e-3):
  return optim.cosine_adam(lr, epochs * steps_per_epoch)


def _mlp_name(widths) -> str:
  return "mlp_" + "_".join(str(w) for w in widths)


def run_compress_suite(*, dataset: str = "auto", model_names=("mlp", "cnn"),
                       epochs: int = 10, cnn_epochs: int = 3,
                       distill_epochs: int = 100, seeds: int = 3,
                       teacher_widths=(1200, 1200), latency_rounds: int = 7,
                       progress: bool = True) -> dict:
  """Measures the compression targets on LeNet-300-100 (and the CNN).

  Every figure is measured in this run: the dense model is trained first
  (Adam, cosine decay, standardized inputs), then pruned, quantized and
  factorized against it. Distillation trains a 784-64-64-10 student from a
  wide MLP teacher (`teacher_widths`, trained like the dense model; its
  figures are the target's) and, beside it, from the dense model.

  Args:
    epochs: the dense model's and the wide teacher's training epochs; the
      labels-only student tries epochs, 2x and 4x that.
    distill_epochs: the distilled student's epochs.
    seeds: students trained per setting; figures are their means.
    latency_rounds: rounds of the batch-1024 latency measurement; the
      latencies are medians over rounds.
  """
  from jaxaccel.compress import (distillation, lowrank, pruning, quantization,
                                 report as creport)
  ds = bench_data(dataset, normalize="standardize")
  per_epoch = len(ds.x_train) // BATCH
  out = {"suite": "compress", "dataset": ds.name, "batch_size": BATCH,
         "epochs": epochs, "backend": jax.default_backend(),
         "cpu_count": os.cpu_count()}
  teacher_names = list(dict.fromkeys([_mlp_name(teacher_widths),
                                      _mlp_name((300, 100))]))
  stages = (["train", "prune", "int8", "distill: labels only", "distill: teacher"]
            + [f"distill: from {name}" for name in teacher_names] + ["lowrank"])
  if "cnn" in model_names:
    stages += ["cnn train", "cnn prune+int8"]
  bar = tqdm(total=len(stages), desc="compress bench", disable=not progress,
             leave=False)
  acc = lambda m, v: train.evaluate(m, v, ds.x_test, ds.y_test)["accuracy"]

  def step(name):
    bar.set_postfix(stage=name)

  # The dense reference: LeNet-300-100.
  step("train")
  model = models.create("mlp", num_classes=ds.num_classes, widths=(300, 100))
  dense = train.fit(model, _cosine_adam(epochs, per_epoch), ds, epochs=epochs,
                    batch_size=BATCH, progress=False)
  params = dense.state.params
  base_acc = acc(model, dense.state)
  base_bytes = creport.dense_bytes(params)
  out["mlp"] = {"dense": {"accuracy": base_acc, "size_bytes": base_bytes}}
  bar.update()

  # 90% sparsity: gradual global magnitude pruning while fine-tuning.
  step("prune")
  total = epochs * per_epoch
  tx = optax.chain(_cosine_adam(epochs, per_epoch),
                   pruning.prune_gradually(0.9, begin_step=0,
                                           end_step=total // 2,
                                           every=max(1, min(100, total // 20)),
                                           scope="global"))
  tuned = train.fit(model, tx, ds, epochs=epochs, batch_size=BATCH,
                    progress=False,
                    state=dense.state._replace(opt_state=tx.init(params)))
  pruned = tuned.state.params
  rep = pruning.sparsity_report(pruned)
  pruned_acc = acc(model, tuned.state)
  out["mlp"]["pruned_90"] = {
      "accuracy": pruned_acc, "loss_points": round(100 * (base_acc - pruned_acc), 3),
      "sparsity": rep["sparsity"],
      "layer_sparsity": {l["name"]: round(l["sparsity"], 4) for l in rep["layers"]},
      "size_bytes": creport.size_bytes(pruned),
      "ratio": round(base_bytes / creport.size_bytes(pruned), 2)}
  bar.update()

  # int8 post-training quantization, run with int8 matmuls.
  step("int8")
  calib = quantization.calibration_batches(ds.x_train)
  scales = quantization.calibrate(params, calib)
  q8 = quantization.quantize(params, bits=8, granularity="channel")
  q8_acc = creport.accuracy(quantization.predict_int8(q8, scales, ds.x_test),
                            ds.y_test)
  xb = np.resize(ds.x_test, (1024, *ds.input_shape))
  x1 = ds.x_test[:1]
  f32 = lambda x: model.apply({"params": params}, x)
  i8 = quantization.int8_mlp(q8, scales)
  # float32 as flax runs it, and float32 in the int8 path's layout (weights
  # on the left), so that the share of the layout in the speed-up shows.
  f32_fm = quantization.feature_major_float(params)
  # Rounds in one process: on the shared machine single rounds of 100 calls
  # a side move the ratio by up to 10%, so the figures are medians of rounds.
  by_round = [_interleaved_ms({"float32": (f32, xb),
                               "float32_feature_major": (f32_fm, xb),
                               "int8": (i8, xb)}, repeats=100)
              for _ in range(latency_rounds)]
  ms = {k: statistics.median(r[k] for r in by_round) for k in by_round[0]}
  ms1 = _interleaved_ms({"float32": (f32, x1), "int8": (i8, x1)}, repeats=200)
  # The bare matmul, for scale: what int8 can gain on this CPU at best.
  a = jnp.asarray(np.random.default_rng(0).normal(size=(1024, 1024)), jnp.float32)
  a8 = jnp.clip(jnp.round(a * 30), -127, 127).astype(jnp.int8)
  mm = _interleaved_ms({
      "float32": (lambda x: x @ x, a),
      "int8": (lambda x: jax.lax.dot_general(
          x, x, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32), a8)},
      repeats=20)
  out["mlp"]["int8"] = {
      "accuracy": q8_acc, "loss_points": round(100 * (base_acc - q8_acc), 3),
      "size_bytes": creport.size_bytes(q8),
      "ratio": round(base_bytes / creport.size_bytes(q8), 3),
      "latency_ms_batch_1024": {k: round(v, 4) for k, v in ms.items()},
      "speedup_batch_1024": round(ms["float32"] / ms["int8"], 3),
      "speedup_batch_1024_by_round": [round(r["float32"] / r["int8"], 3)
                                      for r in by_round],
      "speedup_vs_feature_major_float32": round(
          ms["float32_feature_major"] / ms["int8"], 3),
      "latency_ms_batch_1": {k: round(v, 4) for k, v in ms1.items()},
      "speedup_batch_1": round(ms1["float32"] / ms1["int8"], 3),
      "matmul_1024_speedup": round(mm["float32"] / mm["int8"], 3)}
  # 90% pruned + int8.
  pscales = quantization.calibrate(pruned, calib)
  pq8 = quantization.quantize(pruned, bits=8, granularity="channel")
  pq_acc = creport.accuracy(quantization.predict_int8(pq8, pscales, ds.x_test),
                            ds.y_test)
  out["mlp"]["pruned_90_int8"] = {
      "accuracy": pq_acc, "loss_points": round(100 * (base_acc - pq_acc), 3),
      "size_bytes": creport.size_bytes(pq8),
      "ratio": round(base_bytes / creport.size_bytes(pq8), 2)}
  bar.update()

  # Distillation: a 784-64-64-10 student. The labels-only baseline gets its
  # best epoch budget (mean over seeds, chosen on the test set, which favours
  # it); the distilled student follows the recipe that pays here: T=1,
  # alpha=1, inputs mixed (Beta(1, 1)), a long cosine schedule. The target's
  # teacher is a wide MLP (1200-1200, the MNIST teacher of Hinton et al.
  # 2015); the dense LeNet-300-100 above teaches the same student beside it.
  student = models.create("mlp", num_classes=ds.num_classes, widths=(64, 64))
  step("distill: labels only")
  labels_only = {}
  for e in sorted({max(1, epochs), 2 * epochs, 4 * epochs}):
    labels_only[e] = [acc(student, train.fit(
        student, _cosine_adam(e, per_epoch), ds, epochs=e, batch_size=BATCH,
        seed=s, progress=False).state) for s in range(seeds)]
  best_e = max(labels_only, key=lambda e: np.mean(labels_only[e]))
  a_alone = float(np.mean(labels_only[best_e]))
  bar.update()
  step("distill: teacher")
  wide = models.create("mlp", num_classes=ds.num_classes,
                       widths=tuple(teacher_widths))
  wide_state = train.fit(wide, _cosine_adam(epochs, per_epoch), ds,
                         epochs=epochs, batch_size=BATCH, progress=False).state
  teachers = dict(zip(teacher_names, [(wide, core.variables_of(wide_state)),
                                      (model, core.variables_of(dense.state))]))
  bar.update()
  by_teacher = {}
  for name, (t_model, t_vars) in teachers.items():
    step(f"distill: from {name}")
    taught = [distillation.distill(
        student, [(t_model, t_vars)], _cosine_adam(distill_epochs, per_epoch),
        ds, epochs=distill_epochs, batch_size=BATCH, temperature=1.0,
        alpha=1.0, mixup=1.0, seed=s, progress=False) for s in range(seeds)]
    a_taught = [acc(student, t.state) for t in taught]
    a_kd, t_acc = float(np.mean(a_taught)), acc(t_model, t_vars)
    gap = t_acc - a_alone
    by_teacher[name] = {
        "teacher_accuracy": t_acc,
        "teacher_size_bytes": creport.dense_bytes(t_vars["params"]),
        "student_distilled": a_kd, "distilled_by_seed": a_taught,
        "gap_closed": round((a_kd - a_alone) / gap, 3) if gap > 0 else None,
        "agreement": distillation.agreement(
            student, core.variables_of(taught[0].state), t_model, t_vars,
            ds.x_test)}
    bar.update()
  main = teacher_names[0]
  out["mlp"]["distill"] = {
      "student": "-".join(str(w) for w in (int(np.prod(ds.input_shape)), 64, 64,
                                           ds.num_classes)),
      "teacher": main, **by_teacher[main], "by_teacher": by_teacher,
      "seeds": seeds, "student_labels_only": a_alone,
      "labels_only_epochs": best_e,
      "labels_only_by_epochs": {str(e): v for e, v in labels_only.items()},
      "distill_recipe": {"epochs": distill_epochs, "temperature": 1.0,
                         "alpha": 1.0, "mixup": 1.0},
      "student_size_bytes": creport.dense_bytes(taught[0].state.params)}

  # Low rank: SVD keeping 80% of each kernel's energy, then 2 epochs.
  step("lowrank")
  low, ranks = lowrank.factorize(params, energy=0.8)
  small = lowrank.lowrank_model(model, ranks)
  tx = _cosine_adam(2, per_epoch, 3e-4)
  lstate = core.init_state(small, tx, ds.input_shape)._replace(
      params=low, opt_state=tx.init(low))
  l_before = acc(small, lstate)
  ltuned = train.fit(small, tx, ds, epochs=2, batch_size=BATCH, progress=False,
                     state=lstate)
  out["mlp"]["lowrank"] = {
      "ranks": list(ranks), "accuracy_svd": l_before,
      "accuracy_finetuned": acc(small, ltuned.state),
      "size_bytes": creport.dense_bytes(low),
      "ratio": round(base_bytes / creport.dense_bytes(low), 2)}
  bar.update()

  if "cnn" in model_names:
    step("cnn train")
    cnn = models.create("cnn", num_classes=ds.num_classes)
    c = train.fit(cnn, _cosine_adam(cnn_epochs, per_epoch), ds, epochs=cnn_epochs,
                  batch_size=BATCH, progress=False)
    c_acc = acc(cnn, c.state)
    bar.update()
    step("cnn prune+int8")
    ft = 2
    tx = optax.chain(_cosine_adam(ft, per_epoch, 3e-4),
                     pruning.prune_gradually(0.8, begin_step=0,
                                             end_step=ft * per_epoch // 2,
                                             every=max(1, min(50, per_epoch // 10)),
                                             scope="global"))
    ct = train.fit(cnn, tx, ds, epochs=ft, batch_size=BATCH, progress=False,
                   state=c.state._replace(opt_state=tx.init(c.state.params)))
    cp = ct.state.params
    cq = quantization.quantize(cp, bits=8, granularity="channel")
    cq_acc = acc(cnn, {"params": quantization.dequantize(cq)})
    out["cnn"] = {
        "dense": {"accuracy": c_acc, "size_bytes": creport.dense_bytes(cp)},
        "pruned_80": {"accuracy": acc(cnn, ct.state),
                      "sparsity": pruning.sparsity_report(cp)["sparsity"]},
        "pruned_80_int8": {
            "accuracy": cq_acc, "loss_points": round(100 * (c_acc - cq_acc), 3),
            "size_bytes": creport.size_bytes(cq),
            "ratio": round(creport.dense_bytes(cp) / creport.size_bytes(cq), 2)}}
    bar.update()
  bar.close()
  return out


def format_compress_report(r: dict) -> str:
  """The compress suite: each figure beside its target."""
  m = r["mlp"]
  yes = lambda ok: "met" if ok else "NOT met"
  lines = [f"compression of LeNet-300-100 on {r['dataset']} "
           f"(dense: {m['dense']['accuracy']:.4f}, "
           f"{m['dense']['size_bytes']:,} bytes float32)"]
  p, q, pq, d, lr = (m["pruned_90"], m["int8"], m["pruned_90_int8"],
                     m["distill"], m["lowrank"])
  lines.append(f"  90% pruned + fine-tuned: {p['accuracy']:.4f} "
               f"({p['loss_points']:+.2f} pt loss; target <= 0.5: "
               f"{yes(p['loss_points'] <= 0.5)}), {p['ratio']:.1f}x smaller")
  lines.append(f"  int8 PTQ: {q['accuracy']:.4f} ({q['loss_points']:+.2f} pt; "
               f"target <= 0.3: {yes(q['loss_points'] <= 0.3)}), "
               f"{q['ratio']:.2f}x smaller")
  lines.append(f"  int8 latency at batch 1024: "
               f"{q['latency_ms_batch_1024']['int8']:.3f} ms vs float32 "
               f"{q['latency_ms_batch_1024']['float32']:.3f} ms = "
               f"{q['speedup_batch_1024']:.2f}x (median of "
               f"{len(q['speedup_batch_1024_by_round'])} rounds, single rounds "
               f"{min(q['speedup_batch_1024_by_round']):.2f}-"
               f"{max(q['speedup_batch_1024_by_round']):.2f}x; target >= 1.4: "
               f"{yes(q['speedup_batch_1024'] >= 1.4)}); against float32 "
               f"in the same layout "
               f"({q['latency_ms_batch_1024']['float32_feature_major']:.3f} ms): "
               f"{q['speedup_vs_feature_major_float32']:.2f}x; batch 1: "
               f"{q['speedup_batch_1']:.2f}x; bare 1024^3 int8 matmul: "
               f"{q['matmul_1024_speedup']:.2f}x")
  lines.append(f"  90% pruned + int8: {pq['accuracy']:.4f} "
               f"({pq['loss_points']:+.2f} pt), {pq['size_bytes']:,} bytes = "
               f"{pq['ratio']:.1f}x smaller (target >= 20: "
               f"{yes(pq['ratio'] >= 20)})")
  r_ = d["distill_recipe"]
  lines.append(f"  distillation {d['student']} (mean of {d['seeds']} seeds; "
               f"T={r_['temperature']:g}, alpha={r_['alpha']:g}, mixup "
               f"{r_['mixup']:g}, {r_['epochs']} epochs): labels only "
               f"{d['student_labels_only']:.4f} (best of "
               f"{'/'.join(d['labels_only_by_epochs'])} epochs: "
               f"{d['labels_only_epochs']})")
  for name, t in d["by_teacher"].items():
    gap = t["gap_closed"]
    target = (f" (target >= 40%: {yes(gap is not None and gap >= 0.4)})"
              if name == d["teacher"] else "")
    lines.append(f"    from {name} ({t['teacher_accuracy']:.4f}): distilled "
                 f"{t['student_distilled']:.4f}, gap closed "
                 + (f"{100 * gap:.0f}%" if gap is not None
                    else "n/a (student not below teacher)")
                 + f"{target}, agreement {t['agreement']:.3f}")
  lines.append(f"  low rank (80% energy, ranks {lr['ranks']}): "
               f"{lr['accuracy_svd']:.4f} after SVD, "
               f"{lr['accuracy_finetuned']:.4f} after 2 epochs, "
               f"{lr['ratio']:.1f}x smaller")
  if "cnn" in r:
    c = r["cnn"]
    lines.append(f"  CNN: dense {c['dense']['accuracy']:.4f}; 80% pruned "
                 f"{c['pruned_80']['accuracy']:.4f}; + int8 "
                 f"{c['pruned_80_int8']['accuracy']:.4f} "
                 f"({c['pruned_80_int8']['loss_points']:+.2f} pt; target <= 1: "
                 f"{yes(c['pruned_80_int8']['loss_points'] <= 1.0)}), "
                 f"{c['pruned_80_int8']['ratio']:.1f}x smaller")
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
  fresh = lambda: jax.tree.map(jnp.array, core.init_state(model, tx,
                                                          sub.input_shape))
  engines = {"jit": parallel.make_engine(model, tx),
             "sharded_1": parallel.make_engine(model, tx, mode="sharded",
                                               devices=jax.devices()[:1])}
  epochs = {side: (lambda state, order, e=e: e.run_epoch(
      state, sub.x_train, sub.y_train, order, use_scan=True))
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
    model, default_steps = bench_model(name, ds)
    n_steps = min(steps or default_steps, len(ds.x_train) // batch)
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
  lines = [head] + _aligned(header, rows)
  lines.append("none/pmap/sharded: fit(parallel=...) on all devices; "
               "none_bf16: fit(precision='bf16') on one device; jit: a jitted "
               "scan epoch on one device; sharded_1: the sharded engine on a "
               "one-device mesh, run epoch by epoch alternately with jit "
               "(overhead: 1 - median per-epoch speed ratio).")
  if "note" in report:
    lines.append(report["note"])
  return "\n".join(lines)
