"""`jaxaccel bench --suite parallel`: fit on one device, under pmap and
under sharded jit, each against the one-device loop."""

from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from tqdm.auto import tqdm

from jaxaccel import core, data, parallel, train
from jaxaccel.bench.common import (
    BATCH,
    LEARNING_RATE,
    _aligned,
    _rate,
    _subset,
    bench_data,
    bench_model)

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
