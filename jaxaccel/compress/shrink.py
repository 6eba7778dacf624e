"""Structured pruning that removes units: a smaller model, not a masked one.

`shrink` scores each hidden unit of an MLP (a Dense output), each filter of
a CNN (a Conv output channel) or each hidden unit of a GPT block's MLP by
the norm of the weights into it times the norm of the weights out of it,
keeps the best `1 - fraction` of each layer,
and slices the kept units out of that layer's kernel and bias and out of the
next layer's kernel (for the last convolution, out of every position of the
flattened features the first Dense layer reads). The result is the same
kind of model with smaller widths: fewer parameters, fewer FLOPs, and a
faster forward pass with no masks or sparse kernels.

Flax NNX modules and plain-function models take arrays of any shape at call
time, so for them the layers are found in the traced forward pass instead
of by name: every hidden layer between two Dense/Linear kernels (a kernel's
output, its bias and any elementwise activation, read by nothing but the
next kernel) loses its weakest units, as the MLP blocks of a transformer
do. The model object stays; its variables shrink. (A linen module checks
its parameters' shapes at every call: only the registry's are rebuilt.)

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from jaxaccel import models
  >>> model = models.create("mlp", num_classes=10, widths=(300, 100))
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 784)))
  >>> small, small_vars = shrink(model, variables, 0.5)
  >>> small.widths, small_vars["params"]["Dense_1"]["kernel"].shape
  ((150, 50), (150, 50))
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jaxaccel import models, tracing
from jaxaccel.errors import ConfigError

PyTree = Any


def _norm(w: np.ndarray, unit_axis: int) -> np.ndarray:
  """L2 norm of w per index of `unit_axis`."""
  axes = tuple(i for i in range(w.ndim) if i != unit_axis % w.ndim)
  return np.sqrt(np.sum(np.square(w), axis=axes))


def _keep(score: np.ndarray, fraction: float) -> np.ndarray:
  """Indices of the best `1 - fraction` of the units, in their order."""
  k = max(1, int(round(score.size * (1.0 - fraction))))
  return np.sort(np.argsort(-score, kind="stable")[:k])


def _registry_kind(model) -> tuple[str, dict]:
  desc = models.describe(model) or {}
  name = desc.get("name")
  if name not in ("mlp", "cnn", "gpt"):
    what = name or type(getattr(model, "module", None) or model).__name__
    raise ConfigError(f"shrink removes units of jaxaccel's mlp, cnn and gpt models "
                      f"and of NNX and plain-function models; got {what}, "
                      f"whose layers it cannot remove (prune with "
                      f"pattern = \"channel\" keeps the shape and masks "
                      f"instead)")
  return name, desc


def _drop_units(p: dict, cur: str, nxt: str, fraction: float) -> int:
  """Removes the weakest `fraction` of layer `cur`'s output units from its
  kernel and bias and from the inputs of layer `nxt` (in place); the number
  kept. A Dense `nxt` after a convolution reads the flattened (h, w,
  channel) features, so a channel is removed at every position."""
  kernel, following = p[cur]["kernel"], p[nxt]["kernel"]
  units = kernel.shape[-1]
  if following.ndim == 4:                      # the next convolution: HWIO
    incoming = following.transpose(2, 0, 1, 3)
  else:                                        # (positions * units, out)
    incoming = following.reshape(-1, units, following.shape[-1]).transpose(1, 0, 2)
  keep = _keep(_norm(kernel, -1) * _norm(incoming, 0), fraction)
  p[cur]["kernel"] = kernel[..., keep]
  p[cur]["bias"] = p[cur]["bias"][keep]
  if following.ndim == 4:
    p[nxt]["kernel"] = following[:, :, keep, :]
  else:
    rows = following.reshape(-1, units, following.shape[-1])[:, keep, :]
    p[nxt]["kernel"] = rows.reshape(-1, following.shape[-1])
  return int(keep.size)


def _plain_dicts(tree):
  """Nested (frozen) dicts as plain ones that `_drop_units` can change."""
  if hasattr(tree, "items"):
    return {k: _plain_dicts(v) for k, v in tree.items()}
  return tree


def _traced_shapes(model) -> bool:
  """Whether the model runs on parameters of any shape (NNX modules, plain
  functions): shrink then finds its layers in the traced forward pass."""
  return isinstance(models.adapt(model), (models.NNXModel,
                                          models.FunctionModel))


def check_model(model) -> None:
  """A ConfigError unless shrink can remove units of `model`."""
  if not _traced_shapes(model):
    _registry_kind(model)


# Primitives that act on each element alone: an activation between two
# kernels made of these keeps the hidden units apart.
_POINTWISE = frozenset({
    "abs", "add", "cbrt", "clamp", "convert_element_type", "copy", "cos",
    "div", "eq", "erf", "erf_inv", "erfc", "exp", "exp2", "expm1", "ge", "gt",
    "integer_pow", "le", "log", "log1p", "logistic", "lt", "max", "min", "mul",
    "ne", "neg", "pow", "rsqrt", "select_n", "sign", "sin", "sqrt", "square",
    "stop_gradient", "sub", "tan", "tanh"})


def _is_var(v) -> bool:
  return not isinstance(v, jcore.Literal)


def _pointwise(eqn) -> bool:
  """Whether `eqn` acts on each element alone (a call, such as jitted gelu
  or custom-jvp relu, when its body does)."""
  if eqn.primitive.name in _POINTWISE:
    return True
  body = tracing.call_body(eqn)
  return body is not None and all(
      _pointwise(e) or (e.primitive.name == "broadcast_in_dim"
                        and e.invars[0].aval.ndim == 0)
      for e in body[0].eqns)


def hidden_layers(model, variables: dict, sample) -> list[tuple[str, str | None, str]]:
  """(kernel in, its bias or None, kernel out) for every hidden layer whose
  units shrink can remove, found in the traced eval forward pass: a 2-D
  kernel's output, plus a bias over its units and any pointwise activation,
  read only by one other 2-D kernel (leaf names as `pruning.leaf_names`)."""
  traced = tracing.forward_pass(model, variables)
  trace, leaves, names = traced.trace, traced.leaves, traced.names
  jaxpr, _ = trace(jnp.asarray(sample))
  n = len(leaves)
  param = {v: names[i] for i, v in enumerate(jaxpr.invars[:n]) if names[i]}
  uses: dict = {}
  for e in jaxpr.eqns:
    for v in e.invars:
      if _is_var(v):
        uses[v] = uses.get(v, 0) + 1
    # a reshaped or cast parameter (a bias broadcast over the units) is a view
    if (e.primitive.name in ("reshape", "broadcast_in_dim",
                             "convert_element_type")
        and _is_var(e.invars[0]) and e.invars[0] in param):
      param[e.outvars[0]] = param[e.invars[0]]
  leaf_vars = {names[i]: v for i, v in enumerate(jaxpr.invars[:n]) if names[i]}
  shape = {name: leaves[i].shape for i, name in enumerate(names[:n]) if name}

  def kernel_of(eqn):
    """The 2-D kernel a dot multiplies its activation (lhs) by, on the
    lhs's last axis and the kernel's first; None otherwise."""
    if eqn.primitive.name != "dot_general":
      return None
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = eqn.invars
    if (rhs in param and rhs.aval.ndim == 2 and tuple(rc) == (0,)
        and tuple(lc) == (lhs.aval.ndim - 1,) and not lb and not rb
        and lhs not in param):
      return param[rhs]
    return None

  scalar = lambda v: not _is_var(v) or v.aval.ndim == 0
  found = []
  outputs = {v for v in jaxpr.outvars if _is_var(v)}
  for i, eqn in enumerate(jaxpr.eqns):
    k_in = kernel_of(eqn)
    if k_in is None:
      continue
    out = eqn.outvars[0]
    units = shape[k_in][1]
    over_units = lambda v: (_is_var(v) and v in param
                            and shape[param[v]] == (units,))
    group, bias, k_out, ok = {out}, None, None, True
    for e in jaxpr.eqns[i + 1:]:
      if not any(_is_var(v) and v in group for v in e.invars):
        continue
      others = [v for v in e.invars
                if not (_is_var(v) and v in group)]
      k_next = kernel_of(e)
      if k_next is not None and e.invars[0] in group and not others[1:]:
        if k_out is not None or shape[k_next][0] != units:
          ok = False
          break
        k_out = k_next
        continue
      if (_pointwise(e) and e.outvars[0].aval.shape == out.aval.shape
          and all(scalar(v) or (bias is None and e.primitive.name == "add"
                                and over_units(v)) for v in others)):
        for v in others:
          if not scalar(v):
            bias = param[v]
        group.update(e.outvars)
        continue
      ok = False
      break
    if not ok or k_out is None or group & outputs:
      continue
    # each kernel and bias belongs to this layer alone (no tied weights)
    if all(uses.get(leaf_vars[name], 0) == 1 for name in (k_in, k_out)) and (
        bias is None or uses.get(leaf_vars[bias], 0) == 1):
      found.append((k_in, bias, k_out))
  return found


def _shrink_traced(model, variables: dict, fraction: float, sample):
  """shrink for models that take parameters of any shape."""
  from jaxaccel.compress.pruning import leaf_names
  if sample is None:
    raise ConfigError("shrinking an NNX or plain-function model needs a sample "
                      "input to trace its layers: shrink(..., sample=x[:1])")
  layers = hidden_layers(model, variables, sample)
  if not layers:
    raise ConfigError(
        f"shrink found no hidden layer between two Dense/Linear kernels in "
        f"{type(getattr(models.adapt(model), '_module', model)).__name__} "
        "(units read by anything else cannot be removed)")
  params = variables["params"]
  leaves, treedef = jax.tree.flatten(params)
  names = leaf_names(params)
  by_name = dict(zip(names, (np.asarray(v) for v in leaves)))
  for k_in, bias, k_out in layers:
    keep = _keep(_norm(by_name[k_in], 1) * _norm(by_name[k_out], 0), fraction)
    by_name[k_in] = by_name[k_in][:, keep]
    by_name[k_out] = by_name[k_out][keep, :]
    if bias is not None:
      by_name[bias] = by_name[bias][keep]
  new = jax.tree.unflatten(treedef, [jnp.asarray(by_name[n]) for n in names])
  return model, {**variables, "params": new}


def shrink(model, variables: dict, fraction: float, *,
           sample=None) -> tuple[Any, dict]:
  """The model with `fraction` of every hidden layer's units removed.

  Args:
    model: a registry `mlp`, `cnn` or `gpt` (`jaxaccel.models.create`: a
      GPT loses units of each block's MLP, the same number in every block,
      its attention is kept), a flax NNX
      module or a plain-function model (their hidden layers between two
      Dense/Linear kernels, found by tracing `sample`).
    variables: its trained variables.
    fraction: in (0, 1): the share of units removed from each hidden layer.
    sample: one input batch, for NNX and plain-function models.

  Returns:
    (the smaller model, its variables): for NNX and plain-function models
    the same model object, with smaller variables.
  """
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
      or not 0.0 < fraction < 1.0:
    raise ConfigError(f"shrink fraction must lie in (0, 1) (the share of "
                      f"units removed); got {fraction!r}")
  if _traced_shapes(model):
    return _shrink_traced(model, variables, fraction, sample)
  name, desc = _registry_kind(model)
  p = jax.tree.map(np.asarray, _plain_dicts(variables["params"]))
  if name == "gpt":   # each block's MLP hidden units, as many in every block
    kept = {_drop_units(p[f"block_{i}"], "mlp_in", "mlp_out", fraction)
            for i in range(desc["kwargs"]["layers"])}
    kwargs = {"mlp": kept.pop()}
  elif name == "mlp":
    layers = [f"Dense_{i}" for i in range(len(desc["kwargs"]["widths"]) + 1)]
    kwargs = {"widths": tuple(_drop_units(p, cur, nxt, fraction)
                              for cur, nxt in zip(layers, layers[1:]))}
  else:
    convs = [f"Conv_{i}" for i in range(len(desc["kwargs"]["features"]))]
    features = tuple(_drop_units(p, cur, nxt, fraction)
                     for cur, nxt in zip(convs, convs[1:] + ["Dense_0"]))
    kwargs = {"features": features,
              "hidden": _drop_units(p, "Dense_0", "Dense_1", fraction)}
  small = models.create(name, num_classes=desc["num_classes"],
                        **{**{k: tuple(v) if isinstance(v, list) else v
                              for k, v in desc["kwargs"].items()}, **kwargs})
  params = jax.tree.map(jnp.asarray, p)
  rest = {k: v for k, v in variables.items() if k != "params"}
  return small, {"params": params, **rest}


def flops(model, variables: dict, sample: np.ndarray) -> int:
  """Floating-point operations of one eval forward pass on `sample` (one
  batch), as XLA's cost analysis counts them."""
  adapter = models.adapt(model)
  fn = jax.jit(lambda x: adapter.logits(variables, x))
  cost = fn.lower(jnp.asarray(sample)).compile().cost_analysis()
  if isinstance(cost, list):
    cost = cost[0]
  return int(cost.get("flops", 0))
