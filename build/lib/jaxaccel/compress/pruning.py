"""Pruning: scores -> masks -> masked params, one-shot or gradual.

Scores, mask selection and schedules are separate pure functions. Masks are
boolean pytrees with the structure of the params (True keeps a weight);
leaves that are not pruned (biases, norms: anything with fewer than two
dimensions) get all-True masks, never None.

* `prune(params, sparsity, ...)` prunes once, to an exact sparsity.
* `prune_gradually(...)` is an optax transformation following the Zhu-Gupta
  cubic schedule; its state holds the masks, so they are checkpointed with
  the optimizer state, and pruned weights stay exactly zero.
* `keep_masks(masks)` fine-tunes with fixed masks.

Examples:
  >>> import jax.numpy as jnp
  >>> from jaxaccel.compress import pruning
  >>> params = {"w": jnp.array([[1.0, -4.0], [3.0, 2.0]]), "b": jnp.ones(2)}
  >>> pruned, masks = pruning.prune(params, 0.5)
  >>> pruned["w"].tolist(), pruned["b"].tolist()
  ([[0.0, -4.0], [3.0, 0.0]], [1.0, 1.0])
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxaccel import optim
from jaxaccel.errors import ConfigError

PyTree = Any
METHODS = ("magnitude", "saliency", "taylor", "random")
SCOPES = ("layer", "global")


# ------------------------------------------------------------------ leaves

def leaf_names(params: PyTree) -> list[str]:
  """'Dense_0/kernel'-style names of the leaves, in tree order."""
  return [optim.param_path(path)
          for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def is_prunable(leaf) -> bool:
  """Kernels are pruned (floating, two or more dimensions); biases are not."""
  return jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 2


def _prunable_flags(params: PyTree, include: Callable | None) -> list[bool]:
  names, leaves = leaf_names(params), jax.tree.leaves(params)
  flags = [is_prunable(x) and (include is None or bool(include(n, x)))
           for n, x in zip(names, leaves)]
  if not any(flags):
    raise ConfigError("nothing to prune: the params hold no floating leaf "
                      "with two or more dimensions (kernels)")
  return flags


def parse_pattern(pattern: str) -> tuple[str, int, int]:
  """'unstructured', 'channel' or 'N:M' -> (kind, n, m)."""
  if pattern in ("unstructured", "channel"):
    return pattern, 0, 0
  n_text, sep, m_text = pattern.partition(":")
  try:
    n, m = int(n_text), int(m_text)
  except ValueError:
    n = m = -1
  if not sep or n < 1 or m < 1:
    raise ConfigError(f"unknown pruning pattern {pattern!r}: use unstructured, "
                      "channel, or N:M such as 2:4")
  if n >= m:
    raise ConfigError(f"N:M pattern {pattern!r} keeps N={n} of every M={m} "
                      "weights: N must be smaller than M, e.g. 2:4")
  return "n:m", n, m


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
  """Raises ConfigError unless 0 <= sparsity < 1."""
  try:
    value = float(sparsity)
  except (TypeError, ValueError):
    raise ConfigError(f"{what} must be a number in [0, 1); got {sparsity!r}")
  if not 0.0 <= value < 1.0:
    raise ConfigError(f"{what} must lie in [0, 1) (the fraction of weights "
                      f"set to zero); got {sparsity}")
  return value


# ------------------------------------------------------------------ scores

class GradientStats(NamedTuple):
  """Gradients summed over batches, for the gradient-based scores."""
  total: PyTree     # sum over batches of dL/dw
  squares: PyTree   # sum over batches of (dL/dw)^2
  count: int        # number of batches


def gradient_statistics(loss_fn: Callable, params: PyTree,
                        batches: Iterable) -> GradientStats:
  """Sums dL/dw and (dL/dw)^2 over batches, for `saliency` and `taylor`.

  Args:
    loss_fn: `(params, batch) -> scalar loss`.
    params: the trained params.
    batches: an iterable of whatever `loss_fn` takes as its batch.
  """
  grad_fn = jax.jit(jax.grad(loss_fn))
  total = squares = None
  count = 0
  for batch in batches:
    g = grad_fn(params, batch)
    sq = jax.tree.map(jnp.square, g)
    total = g if total is None else jax.tree.map(jnp.add, total, g)
    squares = sq if squares is None else jax.tree.map(jnp.add, squares, sq)
    count += 1
  if count == 0:
    raise ConfigError("gradient_statistics got no batches; give at least one")
  return GradientStats(total, squares, count)


def compute_scores(params: PyTree, method: str = "magnitude", *,
                   grads: GradientStats | None = None,
                   key: jax.Array | None = None) -> PyTree:
  """Importance of every weight (higher is kept longer), float32.

  Args:
    params: the params pytree.
    method: "magnitude" |w|; "saliency" the sum over batches of (dL/dw)^2;
      "taylor" |w * dL/dw| (gradient summed over batches); "random".
    grads: `gradient_statistics(...)`, needed by saliency and taylor.
    key: a PRNG key, needed by random.
  """
  if method not in METHODS:
    raise ConfigError(f"unknown pruning method {method!r}: use one of "
                      f"{', '.join(METHODS)}")
  as_f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  if method == "magnitude":
    return jax.tree.map(jnp.abs, as_f32(params))
  if method == "random":
    if key is None:
      raise ConfigError("random pruning needs a PRNG key: pass key=jax.random.key(seed)")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [
        jax.random.uniform(k, x.shape) for k, x in zip(keys, leaves)])
  if grads is None:
    raise ConfigError(f"{method!r} pruning needs gradients: pass "
                      "grads=gradient_statistics(loss_fn, params, batches)")
  if method == "saliency":
    return as_f32(grads.squares)
  return jax.tree.map(lambda w, g: jnp.abs(w * g), as_f32(params),
                      as_f32(grads.total))


# ---------------------------------------------------------- mask selection

def _ranks(flat: jax.Array) -> jax.Array:
  """Rank of each entry in ascending order; ties go to the lower index."""
  order = jnp.argsort(flat, stable=True)
  return jnp.zeros(flat.shape, jnp.int32).at[order].set(
      jnp.arange(flat.size, dtype=jnp.int32))


def _lowest_k_mask(flat: jax.Array, sparsity, keep_at_least: int = 1) -> jax.Array:
  """Prunes the round(sparsity * n) lowest entries, keeping `keep_at_least`."""
  n = flat.size
  k = jnp.clip(jnp.round(jnp.asarray(sparsity, jnp.float32) * n), 0,
               n - keep_at_least).astype(jnp.int32)
  return _ranks(flat) >= k


def _units(score: jax.Array, kind: str) -> jax.Array:
  """What is ranked: every weight, or one summed score per output channel."""
  if kind == "channel":
    return score.reshape(-1, score.shape[-1]).sum(0)
  return score.ravel()


def _expand(unit_mask: jax.Array, shape, kind: str) -> jax.Array:
  if kind == "channel":
    return jnp.broadcast_to(unit_mask, shape)
  return unit_mask.reshape(shape)


def _n_m_mask(score: jax.Array, n: int, m: int, name: str) -> jax.Array:
  """Keeps the n highest of every m consecutive weights along the input axis."""
  rows = math.prod(score.shape[:-1])
  if rows % m:
    raise ConfigError(f"layer {name} has {rows} inputs per output, which is "
                      f"not divisible by M={m}; use a pattern whose M divides "
                      f"{rows} or exclude the layer")
  groups = score.reshape(rows // m, m, score.shape[-1])
  order = jnp.argsort(groups, axis=1, stable=True)
  ranks = jnp.argsort(order, axis=1, stable=True)
  return (ranks >= m - n).reshape(score.shape)


def select_masks(scores: PyTree, sparsity, *, prunable: list[bool],
                 names: list[str], scope: str = "layer",
                 pattern: str = "unstructured",
                 previous: PyTree | None = None) -> PyTree:
  """Masks that prune the lowest-scoring weights (jit-compatible in sparsity).

  Per-layer scope prunes round(sparsity * n) weights (or channels) of each
  layer; global scope divides each layer's scores by their L2 norm and prunes
  round(sparsity * N) of all N at once. Every layer keeps at least one weight
  (one channel). Weights pruned in `previous` are pruned first, so masks only
  ever shrink.
  """
  kind, n, m = parse_pattern(pattern)
  leaves, treedef = jax.tree.flatten(scores)
  prev = (jax.tree.leaves(previous) if previous is not None
          else [None] * len(leaves))
  masks = [jnp.ones(x.shape, bool) for x in leaves]
  idx = [i for i, p in enumerate(prunable) if p]
  if kind == "n:m":
    for i in idx:
      s = leaves[i] if prev[i] is None else jnp.where(prev[i], leaves[i], -1.0)
      masks[i] = _n_m_mask(s, n, m, names[i])
    return jax.tree.unflatten(treedef, masks)

  units = []
  for i in idx:
    u = _units(leaves[i], kind)
    if prev[i] is not None:
      u = jnp.where(_units(prev[i].astype(jnp.float32), kind) > 0, u, -1.0)
    units.append(u)
  if scope == "layer":
    for i, u in zip(idx, units):
      masks[i] = _expand(_lowest_k_mask(u, sparsity), leaves[i].shape, kind)
  else:
    # One threshold over normalized scores; each layer's best unit is
    # protected so no layer is emptied.
    normed = []
    for u in units:
      norm = jnp.sqrt(jnp.sum(jnp.square(jnp.maximum(u, 0.0))))
      v = jnp.where(u >= 0, u / jnp.maximum(norm, 1e-30), -1.0)
      normed.append(v.at[jnp.argmax(u)].set(jnp.inf))
    joined = _lowest_k_mask(jnp.concatenate(normed), sparsity,
                            keep_at_least=len(normed))
    start = 0
    for i, u in zip(idx, units):
      masks[i] = _expand(joined[start:start + u.size], leaves[i].shape, kind)
      start += u.size
  return jax.tree.unflatten(treedef, masks)


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeros the pruned weights."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)),
                      params, masks)


def check_scope(scope: str, pattern: str) -> None:
  """Raises ConfigError for an unknown scope or a global N:M request."""
  if scope not in SCOPES:
    raise ConfigError(f"unknown pruning scope {scope!r}: use layer or global")
  if scope == "global" and parse_pattern(pattern)[0] == "n:m":
    raise ConfigError(f"pattern {pattern!r} is local to each group of M "
                      "weights; use scope='layer' with N:M")


# ----------------------------------------------------------------- one-shot

def prune(params: PyTree, sparsity: float | None, *, method: str = "magnitude",
          scope: str = "layer", pattern: str = "unstructured",
          grads: GradientStats | None = None, key: jax.Array | None = None,
          include: Callable[[str, jax.Array], bool] | None = None
          ) -> tuple[PyTree, PyTree]:
  """Prunes once to an exact sparsity.

  Args:
    params: the params pytree.
    sparsity: fraction of prunable weights set to zero, in [0, 1). With an
      N:M pattern it is 1 - N/M and may be given as None.
    method: score, see `compute_scores`.
    scope: "layer" (each layer to `sparsity`) or "global".
    pattern: "unstructured", "channel" (whole output channels), or "N:M".
    grads: gradient statistics for saliency and taylor scores.
    key: PRNG key for random scores.
    include: optional `(name, leaf) -> bool` choosing which kernels to prune,
      e.g. to spare the output layer.

  Returns:
    (pruned params, boolean masks with the params' structure).

  Examples:
    >>> import jax.numpy as jnp
    >>> params = {"w": jnp.arange(1.0, 9.0).reshape(4, 2)}
    >>> pruned, masks = prune(params, None, pattern="2:4")
    >>> pruned["w"].tolist()
    [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]
  """
  kind, n, m = parse_pattern(pattern)
  if kind == "n:m":
    implied = 1.0 - n / m
    if sparsity is not None and not math.isclose(float(sparsity), implied):
      raise ConfigError(f"pattern {pattern!r} prunes {implied:g} of the "
                        f"weights, but sparsity {sparsity} was asked: pass "
                        "sparsity=None or a matching value")
    sparsity = implied
  else:
    if sparsity is None:
      raise ConfigError(f"pattern {pattern!r} needs a sparsity in [0, 1)")
    sparsity = check_sparsity(sparsity)
  check_scope(scope, pattern)
  flags = _prunable_flags(params, include)
  names = leaf_names(params)
  if method not in METHODS:
    raise ConfigError(f"unknown pruning method {method!r}: use one of "
                      f"{', '.join(METHODS)}")

  # One compiled program: leaf by leaf, a model with many layers would spend
  # seconds dispatching small operations.
  def run(params, grads, key):
    scores = compute_scores(params, method, grads=grads, key=key)
    masks = select_masks(scores, sparsity, prunable=flags, names=names,
                         scope=scope, pattern=pattern)
    return apply_masks(params, masks), masks
  return jax.jit(run)(params, grads, key)


# ------------------------------------------------------------------ gradual

def cubic_sparsity(step, *, initial_sparsity: float, target_sparsity: float,
                   begin_step: int, end_step: int, every: int):
  """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3,
  held constant between mask updates (every `every` steps)."""
  t = jnp.clip(jnp.asarray(step, jnp.float32), begin_step, end_step)
  t = begin_step + jnp.floor((t - begin_step) / every) * every
  progress = (t - begin_step) / max(end_step - begin_step, 1)
  s = target_sparsity + (initial_sparsity - target_sparsity) * (1.0 - progress) ** 3
  return jnp.where(step < begin_step, 0.0, s)


class PruneState(NamedTuple):
  """Masks and the step counter of gradual pruning."""
  count: jax.Array          # (), int32: updates seen
  masks: PyTree             # the params' structure, bool


def prune_gradually(target_sparsity: float, *, begin_step: int, end_step: int,
                    every: int = 100, initial_sparsity: float = 0.0,
                    method: str = "magnitude", scope: str = "layer",
                    pattern: str = "unstructured", seed: int = 0,
                    include: Callable[[str, jax.Array], bool] | None = None
                    ) -> optax.GradientTransformation:
  """Gradual magnitude pruning as an optax transformation.

  Put it last in the chain (after the optimizer): it rewrites the updates so
  that `params + updates` is zero exactly where the mask prunes, so pruned
  weights stay zero whatever the optimizer's momentum holds. Masks are
  recomputed from the current params every `every` steps between
  `begin_step` and `end_step`, at the sparsity of the cubic schedule, and
  only ever shrink.

  Args:
    target_sparsity: final sparsity s_f, in [0, 1).
    begin_step: step t0 of the first pruning.
    end_step: step t0 + n dt at which the final sparsity is reached.
    every: dt, steps between mask updates.
    initial_sparsity: s_i, the sparsity at t0.
    method: "magnitude" or "random" (scores computed from params alone).
    scope: "layer" or "global".
    pattern: "unstructured", "channel", or "N:M" (whose sparsity is fixed:
      it applies at every mask update from `begin_step`).
    seed: seeds random scores.
    include: optional `(name, leaf) -> bool` choosing the kernels to prune.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> tx = optax.chain(optax.adam(1e-2),
    ...                  prune_gradually(0.5, begin_step=0, end_step=4, every=2))
    >>> params = {"w": jnp.arange(1.0, 5.0).reshape(2, 2)}
    >>> state = tx.init(params)
    >>> for _ in range(5):
    ...   updates, state = tx.update(params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> int((params["w"] == 0).sum())
    2
  """
  target_sparsity = check_sparsity(target_sparsity, "target sparsity")
  initial_sparsity = check_sparsity(initial_sparsity, "initial sparsity")
  if method not in ("magnitude", "random"):
    raise ConfigError(f"gradual pruning scores weights from the params alone: "
                      f"use method 'magnitude' or 'random', not {method!r}")
  if every <= 0 or end_step < begin_step or begin_step < 0:
    raise ConfigError(f"need 0 <= begin_step <= end_step and every > 0; got "
                      f"begin_step={begin_step}, end_step={end_step}, "
                      f"every={every}")
  check_scope(scope, pattern)
  schedule = lambda step: cubic_sparsity(
      step, initial_sparsity=initial_sparsity, target_sparsity=target_sparsity,
      begin_step=begin_step, end_step=end_step, every=every)

  def init_fn(params):
    _prunable_flags(params, include)
    return PruneState(count=jnp.zeros((), jnp.int32),
                      masks=jax.tree.map(lambda p: jnp.ones(p.shape, bool), params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ConfigError("prune_gradually needs the params: call "
                        "tx.update(grads, state, params)")
    step = state.count
    flags = _prunable_flags(params, include)
    names = leaf_names(params)

    def new_masks(_):
      key = jax.random.fold_in(jax.random.key(seed), step)
      scores = compute_scores(params, method, key=key)
      return select_masks(scores, schedule(step), prunable=flags, names=names,
                          scope=scope, pattern=pattern, previous=state.masks)

    due = ((step >= begin_step) & (step <= end_step)
           & ((step - begin_step) % every == 0))
    masks = jax.lax.cond(due, new_masks, lambda _: state.masks, None)
    updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p),
                           updates, params, masks)
    return updates, PruneState(count=optax.safe_increment(step), masks=masks)

  return optax.GradientTransformation(init_fn, update_fn)


class MaskState(NamedTuple):
  """The fixed masks of `keep_masks`."""
  masks: PyTree


def keep_masks(masks: PyTree) -> optax.GradientTransformation:
  """Holds pruned weights at exactly zero while fine-tuning the others.

  Chain it after the optimizer, like `prune_gradually`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> params, masks = prune({"w": jnp.array([[1.0, -3.0], [2.0, 4.0]])}, 0.5)
    >>> tx = optax.chain(optax.adam(0.1), keep_masks(masks))
    >>> updates, _ = tx.update(params, tx.init(params), params)
    >>> optax.apply_updates(params, updates)["w"][0, 0].item()
    0.0
  """
  def init_fn(params):
    del params
    return MaskState(masks=masks)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ConfigError("keep_masks needs the params: call "
                        "tx.update(grads, state, params)")
    updates = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p),
                           updates, params, state.masks)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------ report

def sparsity_report(params: PyTree) -> dict:
  """Zeros per prunable layer and in total.

  Returns:
    {"layers": [{"name", "shape", "size", "zeros", "sparsity"}, ...],
     "zeros", "size", "sparsity"} over the kernels (ndim >= 2).
  """
  layers = []
  for name, x in zip(leaf_names(params), jax.tree.leaves(params)):
    if not is_prunable(x):
      continue
    zeros = int(jnp.sum(x == 0))
    layers.append({"name": name, "shape": list(x.shape), "size": int(x.size),
                   "zeros": zeros, "sparsity": zeros / max(int(x.size), 1)})
  size = sum(l["size"] for l in layers)
  zeros = sum(l["zeros"] for l in layers)
  return {"layers": layers, "zeros": zeros, "size": size,
          "sparsity": zeros / size if size else 0.0}


def format_sparsity_report(report: dict) -> str:
  """The per-layer report as a small text table."""
  lines = [f"{'layer':<24} {'shape':<16} {'zeros':>10} {'sparsity':>9}"]
  for l in report["layers"]:
    lines.append(f"{l['name']:<24} {'x'.join(map(str, l['shape'])):<16} "
                 f"{l['zeros']:>10,} {l['sparsity']:>9.4f}")
  lines.append(f"{'total':<24} {'':<16} {report['zeros']:>10,} "
               f"{report['sparsity']:>9.4f}")
  return "\n".join(lines)
