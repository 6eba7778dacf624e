"""`jaxaccel bench --suite train`: fit against the hand-written JAX loop
and PyTorch eager, same model, batch, optimizer and data."""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from jaxaccel import core, data, train
from jaxaccel.bench.common import (
    BATCH,
    LEARNING_RATE,
    SCALING_BATCHES,
    _aligned,
    _rate,
    _steps_per_second,
    _subset,
    bench_data,
    bench_model,
    matmul_gflops,
    step_flops,
    torch_available)
from jaxaccel.bench.peers import time_torch

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


