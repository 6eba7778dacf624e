"""`jaxaccel bench --suite sweep`: one vmapped sweep against the same
configurations trained one after another with plain optax."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxaccel import core, data, models, sweep
from jaxaccel.bench.common import _steady

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


