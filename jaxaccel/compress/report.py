"""Before/after figures of a compression: parameters, bytes, sparsity,
accuracy and latency.

Bytes are those of a real encoding, computed from the arrays: dense float32;
or, for a leaf that is mostly zeros, the cheaper of a packed bitmask plus the
nonzero values, and relative indices (each nonzero stores the count of zeros
before it in a few bits, with filler entries for longer runs, as in Han et
al. 2016) plus the values. Values take 32 bits, or the QArray's bit width
plus its scales.

Examples:
  >>> import jax.numpy as jnp
  >>> w = jnp.zeros((100, 10)).at[:, 0].set(1.0)  # 100 nonzeros, 9 zeros apart
  >>> encoded_bytes(w), 100 * (4 + 32) // 8         # 4-bit skips + float32
  (450, 450)
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel import models
from jaxaccel.compress import pruning, quantization
from jaxaccel.compress.quantization import QArray, is_qarray

PyTree = Any


def relative_index_entries(nonzero: np.ndarray, index_bits: int) -> int:
  """Entries of a relative-index encoding: one per nonzero, plus a filler
  per 2^b zeros in a run that the b-bit skip field cannot span."""
  positions = np.flatnonzero(nonzero)
  if positions.size == 0:
    return 0
  runs = np.diff(np.concatenate([[-1], positions])) - 1
  return int(positions.size + np.sum(runs // (2 ** index_bits)))


def encoded_bytes(leaf) -> int:
  """Bytes of the smallest encoding of one leaf (see the module doc)."""
  if is_qarray(leaf):
    values = np.asarray(leaf.values)
    nonzero = (values != (0 if leaf.zero_point is None else
                          np.broadcast_to(np.asarray(leaf.zero_point),
                                          values.shape)))
    value_bits = leaf.bits
    extra = leaf.nbytes - math.ceil(values.size * leaf.bits / 8)
  else:
    values = np.asarray(leaf)
    nonzero = values != 0
    value_bits = 32
    extra = 0
  n, nnz = values.size, int(nonzero.sum())
  dense = math.ceil(n * value_bits / 8)
  bitmask = math.ceil(n / 8) + math.ceil(nnz * value_bits / 8)
  relative = min(math.ceil(relative_index_entries(nonzero.ravel(), b)
                           * (b + value_bits) / 8) for b in range(1, 9))
  return min(dense, bitmask, relative) + extra


def size_bytes(tree: PyTree, *, sparse: bool = True) -> int:
  """Stored bytes of a params tree (QArray leaves as encoded); with
  `sparse`, zeros are not stored (see `encoded_bytes`)."""
  leaves = jax.tree.leaves(tree, is_leaf=is_qarray)
  if not sparse:
    return sum(int(x.nbytes) for x in leaves)
  return sum(encoded_bytes(x) for x in leaves)


def dense_bytes(params: PyTree) -> int:
  """Bytes of the params as dense float32 arrays."""
  return sum(int(np.prod(np.shape(x))) * 4
             for x in jax.tree.leaves(params, is_leaf=is_qarray))


def sparsity(tree: PyTree) -> float:
  """Fraction of zeros among the kernels (ndim >= 2) of float params."""
  floats = jax.tree.map(lambda x: x.dequantize() if is_qarray(x) else x, tree,
                        is_leaf=is_qarray)
  return pruning.sparsity_report(floats)["sparsity"]


def latency_ms(fn: Callable, x: np.ndarray, *, repeats: int = 20) -> float:
  """Median milliseconds of one jitted call of `fn(x)` (after a warm-up)."""
  f = jax.jit(fn)
  x = jnp.asarray(x)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t)
  return statistics.median(times) * 1e3


def latencies(fn: Callable, x: np.ndarray, *, batch_sizes=(1, 1024),
              repeats: int = 20) -> dict:
  """{"batch_1": ms, "batch_1024": ms}: rows taken (repeated) from x."""
  out = {}
  for b in batch_sizes:
    xb = np.resize(x, (b, *x.shape[1:]))
    out[f"batch_{b}"] = round(latency_ms(fn, xb, repeats=repeats), 4)
  return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.asarray(logits).argmax(-1) == np.asarray(labels)))


def metric_of(record: dict) -> str:
  """The name of the task metric a `measure` record holds."""
  return record.get("metric", "accuracy")


def compare(before: dict, after: dict) -> dict:
  """The `jaxaccel compress` JSON keys from two {metric, params, latency}
  records (see `measure`): `test_accuracy_before/after` for a classifier,
  `test_mse_before/after` for a regression, and so on."""
  metric = metric_of(before)
  return {
      f"test_{metric}_before": before[metric],
      f"test_{metric}_after": after[metric],
      "size_bytes_before": before["size_bytes"],
      "size_bytes_after": after["size_bytes"],
      "compression_ratio": round(before["size_bytes"] / after["size_bytes"], 3),
      "parameters_before": before["parameters"],
      "parameters_after": after["parameters"],
      "sparsity": after["sparsity"],
      "latency_ms_before": before["latency_ms"],
      "latency_ms_after": after["latency_ms"],
  }


def measure(name: str, params: PyTree, logits_fn: Callable, x: np.ndarray,
            y: np.ndarray, *, task=None, extras: dict | None = None,
            latency: bool = True, batch_size: int = 1024,
            repeats: int = 20, dense: bool = False) -> dict:
  """The task's metric, size, sparsity and latency of one model variant.

  Args:
    name: a label for tables and plots.
    params: what is stored (float or QArray leaves).
    logits_fn: `x -> outputs` of this variant.
    x, y: test inputs and targets.
    task: a `jaxaccel.tasks.Task` or its name (default classification):
      the record holds its ranking metric (`metric` names it; `accuracy`
      for a classifier) over the whole split.
    extras: more test arrays the task reads (a padding "mask").
    dense: count bytes as dense float32 (the uncompressed reference) rather
      than the smallest encoding.
  """
  from jaxaccel import tasks
  task = tasks.get(task)
  f = jax.jit(logits_fn)
  logits = np.concatenate([np.asarray(f(jnp.asarray(x[i:i + batch_size])))
                           for i in range(0, len(x), batch_size)])
  batch = {"y": jnp.asarray(y), **{k: jnp.asarray(v)
                                   for k, v in (extras or {}).items()}}
  if task.name == "classification":   # counted exactly, as it always was
    value = accuracy(logits, y)
  else:
    logits = jnp.asarray(logits)
    value = float(task.summarize(
        {"loss": float(task.loss(logits, batch)),
         **{k: float(v) for k, v in task.metrics(logits, batch).items()}}
    )[task.metric])
  record = {"name": name, "metric": task.metric, "maximize": task.maximize,
            task.metric: value,
            "size_bytes": dense_bytes(params) if dense else size_bytes(params),
            "parameters": models.count_params(params),
            "sparsity": round(sparsity(params), 6)}
  record["latency_ms"] = (latencies(logits_fn, x, repeats=repeats)
                          if latency else None)
  return record


def format_table(records: list[dict]) -> str:
  """A text table of `measure` records, ratios against the first."""
  base = records[0]["size_bytes"]
  metric = metric_of(records[0])
  header = ["model", "test acc" if metric == "accuracy" else f"test {metric}",
            "params", "bytes", "smaller", "sparsity", "ms@1", "ms@1024"]
  # language models: greedy generation at batch 1 (float variants only)
  generation = any("generation_tokens_per_second" in r for r in records)
  if generation:
    header.append("gen tok/s")
  rows = []
  for r in records:
    lat = r.get("latency_ms") or {}
    rows.append([r["name"], f"{r[metric]:.4f}", f"{r['parameters']:,}",
                 f"{r['size_bytes']:,}", f"{base / r['size_bytes']:.1f}x",
                 f"{r['sparsity']:.3f}",
                 f"{lat['batch_1']:.3f}" if "batch_1" in lat else "-",
                 f"{lat['batch_1024']:.3f}" if "batch_1024" in lat else "-"])
    if generation:
      speed = r.get("generation_tokens_per_second")
      rows[-1].append(f"{speed:,.0f}" if speed else "-")
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])]
                   + [line(r) for r in rows])


def plot_accuracy_vs_size(records: list[dict], path=None, *, ax=None,
                          title: str | None = None):
  """Scatter of the test metric (accuracy for a classifier) against stored
  kilobytes (log scale), the Pareto front drawn through the points no other
  point beats on both."""
  from jaxaccel.errors import optional
  matplotlib = optional("matplotlib", "plots")
  if path is not None and ax is None:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig = None
  if ax is None:
    fig, ax = plt.subplots(figsize=(6, 4))
  metric = metric_of(records[0])
  kb = [r["size_bytes"] / 1024 for r in records]
  acc = [r[metric] for r in records]
  ax.scatter(kb, acc)
  for r, s, a in zip(records, kb, acc):
    ax.annotate(r["name"], (s, a), fontsize=8, xytext=(3, 3),
                textcoords="offset points")
  front = pareto_front(records)
  ax.plot([r["size_bytes"] / 1024 for r in front],
          [r[metric] for r in front], "--", alpha=0.6, label="Pareto front")
  ax.set_xscale("log")
  ax.set_xlabel("stored size (KiB, log scale)")
  ax.set_ylabel(f"test {metric.replace('_', ' ')}")
  ax.set_title(title or f"{metric.replace('_', ' ')} vs size")
  ax.legend()
  if path is not None and fig is not None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
  return ax


def pareto_front(records: list[dict]) -> list[dict]:
  """Records that no other record beats in both size and the test metric
  (accuracy: higher is better; a loss-like metric: lower), by size."""
  metric = metric_of(records[0])
  sign = 1.0 if records[0].get("maximize", True) else -1.0
  score = lambda r: sign * r[metric]
  front = [r for r in records if not any(
      o["size_bytes"] <= r["size_bytes"] and score(o) >= score(r)
      and (o["size_bytes"], o[metric]) != (r["size_bytes"], r[metric])
      for o in records)]
  return sorted(front, key=lambda r: r["size_bytes"])


def save_compressed(path, tree: PyTree, report: dict | None = None) -> None:
  """Writes the compressed params to `params.npz` (no pickle: one array per
  leaf field, keyed by leaf name) and the report to `report.json`."""
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  arrays = {}
  leaves = jax.tree.leaves(tree, is_leaf=is_qarray)
  names = pruning.leaf_names(jax.tree.map(lambda x: 0, tree, is_leaf=is_qarray))
  for name, leaf in zip(names, leaves):
    if isinstance(leaf, QArray):
      # int4 values are stored two to a byte, as `QArray.nbytes` counts them.
      arrays[f"{name}/values"] = np.asarray(
          quantization.pack_int4(leaf.values) if leaf.bits == 4 else leaf.values)
      arrays[f"{name}/scale"] = np.asarray(leaf.scale)
      arrays[f"{name}/bits"] = np.asarray(leaf.bits)
      if leaf.zero_point is not None:
        arrays[f"{name}/zero_point"] = np.asarray(leaf.zero_point)
    else:
      arrays[name] = np.asarray(leaf)
  np.savez_compressed(path / "params.npz", **arrays)
  if report is not None:
    (path / "report.json").write_text(json.dumps(report, indent=2) + "\n")

