"""What every bench suite shares: the data and models, the machine's
matmul rate, a step's FLOPs, timing helpers and table formatting."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from jaxaccel import core, data, models

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


def _subset(ds: data.Dataset, n: int) -> data.Dataset:
  return dataclasses.replace(ds, x_train=ds.x_train[:n], y_train=ds.y_train[:n],
                             x_val=ds.x_val[:0], y_val=ds.y_val[:0])


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
    return True
  except ImportError:
    return False


def _aligned(header: list, rows: list) -> list[str]:
  """Right-aligned table lines: the header, then one per row."""
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
  return [line(header)] + [line(r) for r in rows]


def _rate(v: float) -> str:
  """Steps/s with three significant digits (ResNet-18 runs under one)."""
  return f"{v:.1f}" if v >= 100 else f"{v:.3g}"


def _steady(times: list[float]) -> float:
  """Seconds for all epochs at the rate of the epochs after the first (which
  compiles)."""
  return sum(times[1:]) * len(times) / (len(times) - 1)


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


