"""Many optimizer configurations trained at once, and batch-size search.

`sweep` stacks the train states of every configuration (hyperparameter
values x seeds) along a leading axis and runs each epoch of all of them as
one compiled, vmapped `lax.scan`. The swept hyperparameters are array
leaves of the optimizer state (`optim.build(..., hyperparams=...)`), so one
program serves every value. Chains of different structure (optimizer
families) each get their own program; successive halving ranks all of them
together by the task's validation metric (accuracy for classification) and
drops the worse half every few epochs.

Examples:
  >>> from jaxaccel import data, models, sweep
  >>> ds = data.load("digits", validation=0.1)
  >>> model = models.create("mlp", num_classes=10, widths=(32,))
  >>> out = sweep.sweep(model, "adam(1e-3)", ds, epochs=2, progress=False,
  ...                   grid={"learning_rate": [1e-3, 1e-2]}, seeds=(0, 1))
  >>> len(out.results)
  4
"""

from __future__ import annotations

import dataclasses
import itertools
import pathlib
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxaccel import core, optim, parallel, train
from jaxaccel.core import compiled
from jaxaccel.data import Dataset, Stream
from jaxaccel.errors import ConfigError, SpecError


@dataclasses.dataclass
class SweepResult:
  """What `sweep` returns.

  `results` has one entry per configuration: its concrete `spec` (the chain
  with the swept values written in, which `fit` reproduces), `family`,
  `hyperparams`, `seed`, the ranking metric `metric` (`val_accuracy` for
  classification, `val_mse`, `val_bits_per_byte`; after the last epoch it
  trained), `epochs`, and that metric's history (`val_accuracy_history`).
  `best` is the best entry among those trained for every epoch.
  """
  results: list[dict]
  best: dict
  wall_seconds: float
  sequential_estimate_seconds: float | None
  states: list          # the final stacked states of each family's survivors
  epoch_seconds: list[float]   # per epoch: training and validation of all
  metric: str = "val_accuracy"  # the key that ranks the entries
  maximize: bool = True         # whether larger is better


@dataclasses.dataclass
class _Family:
  """One chain structure: its configs and their stacked states."""
  index: int
  tx: object
  entries: list[dict]   # results entries of the configs still trained
  states: core.TrainState


def _make_epoch(model, train_step, task):
  """One compiled program per epoch for all configurations: each one's
  training scan over its batch order, and its summed validation loss and
  metrics (with their count)."""
  eval_step = core.make_eval_step(model, task)

  def run_epoch(states, orders, arrays, val_batches):
    def one(state, order):
      state, _ = jax.lax.scan(
          lambda s, idx: train_step(s, jax.tree.map(lambda a: a[idx], arrays)),
          state, order)
      variables = core.variables_of(state)
      sums = jax.lax.map(lambda b: eval_step(variables, b), val_batches)
      return state, jax.tree.map(jnp.sum, sums)
    return jax.vmap(one)(states, orders)
  return compiled.jit(run_epoch, donate_argnums=0)


def _make_stream_programs(model, train_step, task):
  """For a stream: one step of every configuration on the same batch, and
  every configuration's summed validation loss and metrics on one batch."""
  eval_step = core.make_eval_step(model, task)
  step = compiled.jit(jax.vmap(train_step, in_axes=(0, None)), donate_argnums=0)
  evaluate = compiled.jit(jax.vmap(
      lambda state, batch: eval_step(core.variables_of(state), batch),
      in_axes=(0, None)))
  return step, evaluate


def _val_batches(val_data, batch_size: int = 1024):
  """Host batches of what a streamed sweep validates on."""
  if isinstance(val_data, Stream):
    return train.epoch_batches(val_data)
  if isinstance(val_data, dict):
    return train.eval_batches(val_data, batch_size)
  return (b for lo in range(0, len(val_data), batch_size)
          for b in train.eval_batches(val_data[lo:lo + batch_size], batch_size))


def _stacked_val_batches(data: Dataset) -> dict:
  batches = list(train.eval_batches(data.arrays("val"), 1024))
  return {k: jnp.stack([b[k] for b in batches]) for k in batches[0]}


def configurations(grid: dict | None, seeds: Sequence[int]) -> list[tuple[dict, int]]:
  """Every (hyperparameter values, seed) pair of a grid, in a fixed order."""
  grid = grid or {}
  for name, values in grid.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise SpecError(f"grid entry {name!r} needs a non-empty list of values; "
                      f"got {values!r}")
  if not seeds:
    raise ConfigError("a sweep needs at least one seed")
  names = list(grid)
  return [(dict(zip(names, combo)), seed)
          for combo in itertools.product(*grid.values()) for seed in seeds]


def _init_family(model, index, spec, configs, data, metric) -> _Family:
  names = tuple(configs[0][0])
  entries, transforms = [], []
  for values, seed in configs:
    calls = optim.with_values(spec, **values) if values else optim.parse(spec)
    # Built for each config so a bad value is an error before any work.
    transforms.append(optim.build(calls, hyperparams=("learning_rate",) + names))
    entries.append({"spec": optim.to_string(calls), "family": index,
                    "hyperparams": dict(values), "seed": seed,
                    f"{metric}_history": []})
  # Every config's update reads its hyperparameters from its own state, so
  # one transformation serves them all; the states differ only in values.
  tx = transforms[0]

  # Initial variables per seed exactly as `fit` makes them (eagerly: a
  # compiled random init costs more than the whole sweep of a small model).
  input_shape, input_dtype = train.input_spec(data)
  per_seed = {seed: core.init_variables(model, input_shape, seed=seed,
                                        dtype=input_dtype)
              for seed in dict.fromkeys(seed for _, seed in configs)}
  variables = jax.tree.map(lambda *v: jnp.stack(v),
                           *[per_seed[seed][0] for _, seed in configs])
  rngs = jnp.stack([per_seed[seed][1] for _, seed in configs])
  values = jnp.asarray([[v[n] for n in names] for v, _ in configs],
                       jnp.float32).reshape(len(configs), len(names))

  def init_one(variables, rng, values):
    state = core.state_from_variables(variables, tx, rng)
    if names:
      state = state._replace(opt_state=optim.set_hyperparams(
          state.opt_state, **dict(zip(names, values))))
    return state
  states = jax.jit(jax.vmap(init_one))(variables, rngs, values)
  if optim.has_plateau(states.opt_state):
    raise SpecError("reduce_on_plateau needs fit's per-run validation loss; "
                    "sweep the chain without it")
  return _Family(index=index, tx=tx, entries=entries, states=states)


def sweep(model, specs, data: Dataset | Stream, *, epochs: int,
          grid: dict | None = None, seeds: Sequence[int] = (0,),
          batch_size: int | None = None, halving_every: int | None = None,
          sequential_sample: int = 0, task=None, val_data=None,
          progress: bool = True) -> SweepResult:
  """Trains every configuration at once and ranks them by the task's
  validation metric (accuracy for classification).

  Args:
    model: any model `jaxaccel.models.adapt` takes.
    specs: one chain spec, or a list of them (optimizer families); each
      gets its own compiled program.
    data: a `Dataset` with a validation split; or a `Stream`
      (`jaxaccel.data.streams`), whose batches every configuration trains
      on in the stream's order (seeds then vary the initialization only),
      with `val_data` to rank them by.
    epochs: epochs per configuration (survivors of halving train them all).
    grid: hyperparameter name -> list of values, e.g.
      `{"learning_rate": [1e-3, 3e-3], "weight_decay": [0.0, 1e-4]}`; every
      spec must take every name.
    seeds: each configuration runs once per seed (init and batch order).
    batch_size: examples per step (default 128; a stream's is its own).
    halving_every: successive halving: every this many epochs keep the
      better half of all configurations (by the validation metric).
    sequential_sample: time this many configurations with `fit`, one after
      another as a user would (each compiles), and extrapolate.
    task: a `jaxaccel.tasks.Task` or its name (default: inferred from the
      targets, as `fit` does).
    val_data: for a stream: what ranks the configurations (an
      `ArrayFiles`, a batch dict of arrays or a `Stream`).
    progress: show a progress bar.
  """
  if isinstance(specs, (str, dict, pathlib.Path)):
    specs = [specs]
  if not specs:
    raise SpecError("sweep needs at least one optimizer spec")
  task = train.resolve_task(task, data)
  metric = f"val_{task.metric}"
  streamed = isinstance(data, Stream)
  if streamed:
    if batch_size not in (None, data.batch_size):
      raise ConfigError(f"batch_size={batch_size} differs from the stream's "
                        f"batch size {data.batch_size}: build the stream with "
                        "the batch size to sweep with")
    batch_size = data.batch_size
    if val_data is None:
      raise ConfigError(f"a streamed sweep ranks configurations by {metric}: "
                        "give val_data (arrays on disk, a batch dict or a "
                        "stream)")
  elif not len(data.x_val):
    raise ConfigError(f"sweep ranks configurations by {metric}: load the "
                      "data with validation > 0")
  batch_size = batch_size or 128
  if epochs <= 0:
    raise ConfigError(f"epochs must be positive; got {epochs}")
  if halving_every is not None and halving_every <= 0:
    raise ConfigError(f"halving_every must be positive; got {halving_every}")
  if sequential_sample < 0:
    raise ConfigError(f"sequential_sample must be >= 0; got {sequential_sample}")
  train.check_data(model, data, batch_size, task)
  configs = configurations(grid, seeds)
  # Best first: larger values for a metric to maximize.
  rank = (lambda e: -e[metric]) if task.maximize else (lambda e: e[metric])

  t_start = time.perf_counter()
  families = [_init_family(model, i, spec, configs, data, metric)
              for i, spec in enumerate(specs)]
  make = _make_stream_programs if streamed else _make_epoch
  programs = {f.index: make(
      model, core.make_train_step(model, f.tx, task=task), task)
      for f in families}
  if streamed:
    batches = data.iterator()
  else:
    arrays = jax.device_put(data.arrays("train"))
    n = len(data.x_train)
    val_batches = _stacked_val_batches(data)
  finished, epoch_seconds = [], []
  bar = tqdm(range(epochs), desc=f"sweep ({len(specs) * len(configs)} configs)",
             unit="epoch", disable=not progress, leave=False)
  for epoch in bar:
    t0 = time.perf_counter()
    if streamed:
      family_sums = _stream_epoch(families, programs, batches,
                                  data.steps_per_epoch, val_data)
    else:
      family_sums = {}
      for f in families:
        by_seed = {seed: train.epoch_order(seed, epoch, n, batch_size)
                   for seed in dict.fromkeys(e["seed"] for e in f.entries)}
        orders = jnp.stack([by_seed[e["seed"]] for e in f.entries])
        f.states, family_sums[f.index] = programs[f.index](
            f.states, orders, arrays, val_batches)
    for f in families:
      sums = {k: np.asarray(v) for k, v in family_sums[f.index].items()}
      count = sums.pop("count")
      for i, e in enumerate(f.entries):
        value = task.summarize({k: float(v[i] / count[i])
                                for k, v in sums.items()})[task.metric]
        e[f"{metric}_history"].append(value)
        e[metric], e["epochs"] = value, epoch + 1
    epoch_seconds.append(time.perf_counter() - t0)
    alive = sum(len(f.entries) for f in families)
    if halving_every and (epoch + 1) % halving_every == 0 and alive > 1 and (
        epoch + 1 < epochs):
      families, dropped = _halve(families, rank)
      finished += dropped
    leader = min((e for f in families for e in f.entries), key=rank)
    bar.set_postfix(configs=sum(len(f.entries) for f in families),
                    best=f"{leader[metric]:.4f}")
  bar.close()
  if streamed:
    batches.close()
  wall = time.perf_counter() - t_start
  survivors = [e for f in families for e in f.entries]
  results = sorted(finished + survivors,
                   key=lambda e: (e["family"], _config_index(e, configs)))
  best = min(survivors, key=rank)

  estimate = None
  if sequential_sample:
    estimate = _sequential_estimate(model, results, data, epochs, batch_size,
                                    sequential_sample)
  return SweepResult(results=results, best=best, wall_seconds=wall,
                     sequential_estimate_seconds=estimate,
                     states=[f.states for f in families],
                     epoch_seconds=epoch_seconds, metric=metric,
                     maximize=task.maximize)


def _stream_epoch(families, programs, batches, steps: int, val_data) -> dict:
  """One epoch of a streamed sweep: each batch read once and trained on by
  every configuration of every family; then their validation sums."""
  for i in range(steps):
    batch = jax.device_put(next(batches))
    for f in families:
      f.states, metrics = programs[f.index][0](f.states, batch)
    if (i + 1) % parallel.SYNC_EVERY == 0:
      jax.block_until_ready(metrics)
  sums = {f.index: None for f in families}
  for batch in _val_batches(val_data):
    for f in families:
      out = programs[f.index][1](f.states, batch)
      sums[f.index] = out if sums[f.index] is None else jax.tree.map(
          jnp.add, sums[f.index], out)
  return sums


def _config_index(entry: dict, configs) -> int:
  return next(i for i, (v, s) in enumerate(configs)
              if v == entry["hyperparams"] and s == entry["seed"])


def _halve(families: list[_Family], rank) -> tuple[list[_Family], list[dict]]:
  """Keeps the better half of all configurations (`rank`: smaller is
  better; ties: earlier first)."""
  ranked = sorted(((rank(e), f.index, i)
                   for f in families for i, e in enumerate(f.entries)))
  keep = {(fi, i) for _, fi, i in ranked[:math.ceil(len(ranked) / 2)]}
  kept, dropped = [], []
  for f in families:
    idx = [i for i in range(len(f.entries)) if (f.index, i) in keep]
    dropped += [e for i, e in enumerate(f.entries) if (f.index, i) not in keep]
    if idx:
      take = jnp.asarray(idx)
      kept.append(dataclasses.replace(
          f, entries=[f.entries[i] for i in idx],
          states=jax.tree.map(lambda a: a[take], f.states)))
  return kept, dropped


def _sequential_estimate(model, results, data, epochs, batch_size, sample):
  """Seconds to train every configuration one after another with `fit`,
  extrapolated from `sample` of them, each compiled afresh as a user's loop
  would; configurations dropped by halving count only their epochs."""
  picked = results[:: max(1, len(results) // sample)][:sample]
  seconds = 0.0
  for e in picked:
    t0 = time.perf_counter()
    train.fit(model, e["spec"], data, epochs=epochs, batch_size=batch_size,
              seed=e["seed"], progress=False)
    seconds += time.perf_counter() - t0
  per_epoch = seconds / (len(picked) * epochs)
  return per_epoch * sum(e["epochs"] for e in results)


# --------------------------------------------------------------- batch size

def sweep_batch_sizes(model, spec, data: Dataset, *,
                      batch_sizes: Sequence[int], base_batch_size: int = 128,
                      epochs: int, seed: int = 0, target: float | None = None,
                      progress: bool = True) -> dict:
  """Trains once per batch size with the learning rate scaled linearly
  (lr * batch / base_batch_size) and ranks them by time to accuracy.

  Returns a dict with `results` (per batch size: learning_rate,
  steps_per_second, examples_per_second, val_accuracy, seconds_to_target),
  `target` (by default 99% of the best final validation accuracy) and
  `best` (the batch size reaching the target first). Times are the training
  seconds of each epoch, the first one including compilation.
  """
  if train.resolve_task(None, data).name != "classification":
    raise ConfigError("batch-size search ranks batch sizes by the time to a "
                      "validation accuracy: it takes classification data")
  calls = optim.parse(spec)
  base_lr = _constant_learning_rate(calls)
  if not batch_sizes:
    raise ConfigError("give at least one batch size")
  if not len(data.x_val):
    raise ConfigError("batch-size search needs a validation split "
                      "(validation > 0)")
  runs = []
  for b in tqdm(batch_sizes, desc="batch sizes", disable=not progress,
                leave=False):
    if b <= 0 or b > len(data.x_train):
      raise ConfigError(f"batch size {b} must be in [1, {len(data.x_train)}]")
    lr = base_lr * b / base_batch_size
    scaled = optim.with_values(calls, learning_rate=lr)
    result = train.fit(model, scaled, data, epochs=epochs, batch_size=b,
                       seed=seed, progress=False)
    runs.append({"batch_size": b, "learning_rate": lr,
                 "spec": optim.to_string(scaled),
                 "steps_per_second": result.steps_per_second,
                 "examples_per_second": result.steps_per_second * b,
                 "val_accuracy": result.history[-1]["val_accuracy"],
                 "curve": [(sum(h["epoch_seconds"] for h in result.history[:i + 1]),
                            h["val_accuracy"]) for i, h in enumerate(result.history)]})
  if target is None:
    target = 0.99 * max(r["val_accuracy"] for r in runs)
  for r in runs:
    r["seconds_to_target"] = next(
        (t for t, acc in r.pop("curve") if acc >= target), None)
  reached = [r for r in runs if r["seconds_to_target"] is not None]
  best = min(reached, key=lambda r: r["seconds_to_target"]) if reached else None
  return {"results": runs, "target": target, "best": best}


def _constant_learning_rate(calls: list[dict]) -> float:
  for c in calls:
    arguments = optim.arguments(c)
    if "learning_rate" in arguments:
      lr = arguments["learning_rate"]
      if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
      raise SpecError(f"batch-size search scales a constant learning rate; "
                      f"{c['name']} has learning_rate={lr!r}")
  raise SpecError(f"no transformation in {optim.to_string(calls)!r} sets a "
                  "learning_rate")


# ------------------------------------------------------------------- plots

def accuracy_table(result: SweepResult) -> tuple[list, list, np.ndarray]:
  """Mean final validation metric (`result.metric`, accuracy for
  classification) over seeds as a table: rows are the
  values of the first swept name, columns those of the second (or the
  optimizer families when one name is swept). Returns (rows, cols, table)."""
  entries = result.results
  names = list(entries[0]["hyperparams"])
  row_of = lambda e: e["hyperparams"][names[0]] if names else e["spec"]
  if len(names) >= 2:
    col_of = lambda e: e["hyperparams"][names[1]]
  else:   # one name: a column per optimizer family
    col_of = lambda e: _family_label(e, entries) if names else "seed mean"
  rows = list(dict.fromkeys(row_of(e) for e in entries))
  cols = list(dict.fromkeys(col_of(e) for e in entries))
  table = np.full((len(rows), len(cols)), np.nan)
  for i, r in enumerate(rows):
    for j, c in enumerate(cols):
      accs = [e[result.metric] for e in entries
              if row_of(e) == r and col_of(e) == c]
      if accs:
        table[i, j] = np.mean(accs)
  return rows, cols, table


def _family_label(entry: dict, entries: list[dict]) -> str:
  """The family's last call name, or its whole spec when names collide."""
  last = lambda e: e["spec"].split(" | ")[-1].split("(")[0]
  firsts = {e["family"]: e for e in entries}
  if len({last(e) for e in firsts.values()}) == len(firsts):
    return last(entry)
  return firsts[entry["family"]]["spec"]


def plot_sweep(result: SweepResult, ax=None):
  """A heat map of `accuracy_table`, each cell labelled with its value."""
  from jaxaccel.errors import optional
  plt = optional("matplotlib.pyplot", "plots")
  rows, cols, table = accuracy_table(result)
  if ax is None:
    _, ax = plt.subplots(figsize=(1.6 + 1.3 * len(cols), 1.2 + 0.6 * len(rows)))
  image = ax.imshow(table, cmap="viridis", aspect="auto")
  ax.figure.colorbar(image, ax=ax, label=result.metric.replace("_", " "))
  ax.set_xticks(range(len(cols)), [str(c) for c in cols])
  ax.set_yticks(range(len(rows)), [f"{r:g}" if isinstance(r, float) else str(r)
                                   for r in rows])
  names = list(result.results[0]["hyperparams"])
  ax.set_ylabel(names[0] if names else "spec")
  ax.set_xlabel(names[1] if len(names) > 1 else "optimizer")
  for (i, j), v in np.ndenumerate(table):
    if np.isfinite(v):
      ax.text(j, i, f"{v:.3f}", ha="center", va="center",
              color="white" if v < np.nanmean(table) else "black", fontsize=8)
  return ax


def plot_batch_sizes(search: dict, ax=None):
  """Validation accuracy and examples/s per batch size, side by side."""
  from jaxaccel.errors import optional
  plt = optional("matplotlib.pyplot", "plots")
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 3.5))
  runs = search["results"]
  labels = [str(r["batch_size"]) for r in runs]
  ax.bar(labels, [r["val_accuracy"] for r in runs], color="tab:blue")
  ax.axhline(search["target"], color="tab:red", linestyle="--", label="target")
  ax.set_xlabel("batch size")
  ax.set_ylabel("validation accuracy")
  ax.legend(loc="lower left")
  twin = ax.twinx()
  twin.plot(labels, [r["examples_per_second"] for r in runs], "o-",
            color="tab:orange")
  twin.set_ylabel("examples / s", color="tab:orange")
  return ax
