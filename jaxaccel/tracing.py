"""The one jaxpr toolkit: a model's eval forward pass as a jaxpr, and what
its clients (integer inference, ONNX emission, shrinking, the scan
decision) read in it.

Examples:
  >>> import jax, numpy as np
  >>> import flax.linen as nn
  >>> from jaxaccel import tracing
  >>> model = nn.Dense(3)
  >>> variables = model.init(jax.random.key(0), np.ones((1, 4), "f4"))
  >>> forward = tracing.forward_pass(model, variables)
  >>> jaxpr, consts = forward.trace(np.ones((2, 4), "f4"))
  >>> forward.names, sorted(tracing.primitive_names(jaxpr))
  (['bias', 'kernel'], ['add', 'dot_general', 'reshape'])
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

# The products whose weights int8, pruning and ONNX look for.
PRODUCTS = ("dot_general", "conv_general_dilated")
# Primitives whose body is read inline, so products inside them (a jitted
# helper, a custom-gradient function) are found too.
CALLS = ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call",
         "custom_vjp_call", "custom_vjp_call_jaxpr", "remat", "checkpoint")
CONST = ""           # the name of values computed from constants alone


@dataclasses.dataclass
class ForwardPass:
  """A function of a model's variables as a jaxpr: `trace(*args)` gives
  (jaxpr, consts) for arguments shaped like `args` (pytrees of concrete
  arrays or `jax.ShapeDtypeStruct`s, symbolic dimensions too); the jaxpr's
  arguments are `leaves` then the arguments' leaves, the first named by
  `names` (parameter leaves 'Dense_0/kernel'-style, model state `CONST`).
  `unflatten(outs)` gives the function's output pytree."""
  trace: Callable[..., tuple[Any, list]]
  leaves: list
  names: list[str]
  unflatten: Callable[[list], Any] = lambda outs: outs[0]


def function_pass(fn: Callable, variables: dict) -> ForwardPass:
  """`fn(variables, *args)` (an array or a pytree of arrays out) as a
  function of the variables' leaves and the arguments."""
  from jaxaccel.compress.pruning import leaf_names
  variables = dict(variables)
  params = variables.pop("params")
  leaves = jax.tree.leaves(params) + jax.tree.leaves(variables)
  names = ["" if n is None else n for n in leaf_names(params)]
  names += [CONST] * len(jax.tree.leaves(variables))
  treedef = jax.tree.structure((params, variables))
  out_tree = []

  def call(leaves, *args):
    p, s = jax.tree.unflatten(treedef, leaves)
    out = fn({"params": p, **s}, *args)
    out_tree[:] = [jax.tree.structure(out)]
    return jax.tree.leaves(out)

  def trace(*args):
    spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    closed = jax.make_jaxpr(call)(leaves, *spec)
    return closed.jaxpr, list(closed.consts)
  return ForwardPass(trace, leaves, names,
                     lambda outs: jax.tree.unflatten(out_tree[0], outs))


def forward_pass(model, variables: dict,
                 prepare: Callable | None = None) -> ForwardPass:
  """The eval forward pass of any model `jaxaccel.models.adapt` takes, as
  a function of one input x; `prepare` (a normalization) runs on x first."""
  from jaxaccel.models import adapt
  adapter = adapt(model)

  def forward(variables, x):
    variables = dict(variables)
    params = variables.pop("params")
    return adapter.apply(params, variables, prepare(x) if prepare else x,
                         train=False)[0]
  return function_pass(forward, variables)


def call_body(eqn) -> tuple[Any, list] | None:
  """(jaxpr, consts) of a call-like equation's body (`CALLS`), or None."""
  if eqn.primitive.name not in CALLS:
    return None
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    body = eqn.params.get(key)
    if isinstance(body, jcore.ClosedJaxpr):
      return body.jaxpr, list(body.consts)
    if isinstance(body, jcore.Jaxpr):
      return body, []
  return None


def indexed(jaxpr, names: list[str]) -> set[str]:
  """The names (of `names`, one per jaxpr argument) of the arguments the
  jaxpr reads by index, as a `gather` or `dynamic_slice` operand, cast or
  reshaped or not, in calls too: embedding tables."""
  found = set()

  def walk(jaxpr, named: dict):
    for eqn in jaxpr.eqns:
      ins = [v if isinstance(v, jcore.Var) and v in named else None
             for v in eqn.invars]
      body = call_body(eqn)
      if body is not None:
        walk(body[0], {b: named[a] for a, b in zip(ins, body[0].invars)
                       if a is not None})
      elif eqn.primitive.name in ("gather", "dynamic_slice") and ins[0]:
        found.add(named[ins[0]])
      elif eqn.primitive.name in ("convert_element_type", "reshape",
                                  "copy") and ins[0]:
        named[eqn.outvars[0]] = named[ins[0]]
  walk(jaxpr, {v: n for v, n in zip(jaxpr.invars, names) if n})
  return found


def primitive_names(jaxpr, *, opaque: tuple[str, ...] = ()) -> set[str]:
  """Names of the primitives in a jaxpr and in every jaxpr nested in it,
  except inside primitives whose names start with one of `opaque`."""
  names = set()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    names.add(name)
    if not (opaque and name.startswith(opaque)):
      for sub in jcore.jaxprs_in_params(eqn.params):
        names |= primitive_names(sub, opaque=opaque)
  return names


def channel_vector(c, channels: int):
  """c as a (channels,) vector when it varies along the last axis alone
  (a bias, broadcast or not); None otherwise."""
  shape = np.shape(c)
  if not shape or shape[-1] != channels or any(d != 1 for d in shape[:-1]):
    return None
  return jnp.reshape(jnp.asarray(c, jnp.float32), (channels,))
