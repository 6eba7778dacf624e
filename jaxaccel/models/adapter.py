"""The one model contract the core calls, and adapters to it.

Users bring the models they already have. `adapt` turns each kind into a
`ModelAdapter`, two pure functions over pytrees:

    init(key, sample) -> (params, model_state)
    apply(params, model_state, x, *, train, rng=None) -> (logits, model_state)

`params` are what the optimizer updates; `model_state` is everything else a
model carries between steps (batch-norm statistics). Both are pytrees of
arrays, so optax, checkpoints, pruning and quantization treat every kind of
model alike. Accepted:

* a flax linen module, called with no mode argument or with one of `train`,
  `training`, `is_training` or `deterministic` (inverted); dropout draws from
  the `rng` given to `apply`, mutable collections become `model_state`;
* a flax NNX module: `nnx.split` and `nnx.merge` at the edges of the pure
  step, `model.train()` / `model.eval()` to switch mode, its RNG streams
  seeded from `rng` on every call (so dropout follows the train state's
  key, like linen's);
* `from_functions(init_fn, apply_fn)` for models written without flax.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> from jaxaccel.models import adapt
  >>> class Net(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.linear = nnx.Linear(4, 3, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.linear(x)
  >>> model = adapt(Net(nnx.Rngs(0)))
  >>> params, model_state = model.init(jax.random.key(0), jnp.zeros((1, 4)))
  >>> logits, _ = model.apply(params, model_state, jnp.ones((2, 4)), train=False)
  >>> logits.shape, sorted(params["linear"])
  ((2, 3), ['bias', 'kernel'])
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jaxaccel import backends
from jaxaccel.errors import ConfigError

PyTree = Any
# Linen call arguments that switch between training and inference, and
# whether True means training.
MODE_ARGUMENTS = {"train": True, "training": True, "is_training": True,
                  "deterministic": False}


class ModelAdapter:
  """What the core knows of a model. Subclasses implement `init` and `apply`.

  `with_compute_dtype` and `with_batch_axis` return adapters for mixed
  precision and for batch statistics shared over a device axis; the defaults
  work for any model.
  """

  def init(self, key: jax.Array, sample: jax.Array) -> tuple[PyTree, PyTree]:
    raise NotImplementedError

  def apply(self, params: PyTree, model_state: PyTree, x: jax.Array, *,
            train: bool, rng: jax.Array | None = None
            ) -> tuple[jax.Array, PyTree]:
    raise NotImplementedError

  def logits(self, variables: dict, x: jax.Array) -> jax.Array:
    """Eval-mode logits from `{"params": ..., **model_state}`."""
    variables = dict(variables)
    params = variables.pop("params")
    return self.apply(params, variables, x, train=False)[0]

  def with_compute_dtype(self, dtype) -> "ModelAdapter":
    """The model computing in `dtype`, its params kept as they are."""
    return self if dtype == jnp.float32 else CastModel(self, dtype)

  def with_batch_axis(self, axis_name: str) -> "ModelAdapter":
    """The model with batch statistics averaged over `axis_name` (pmap)."""
    del axis_name
    return self

  @property
  def module(self):
    """The user's own model object, where there is one."""
    return None


@dataclasses.dataclass(frozen=True)
class CastModel(ModelAdapter):
  """Runs `inner` on params and inputs cast to a lower float dtype."""
  inner: ModelAdapter
  dtype: Any

  def init(self, key, sample):
    return self.inner.init(key, sample)

  def apply(self, params, model_state, x, *, train, rng=None):
    cast = lambda a: (a.astype(self.dtype)
                      if jnp.issubdtype(a.dtype, jnp.floating) else a)
    return self.inner.apply(jax.tree.map(cast, params), model_state, cast(x),
                            train=train, rng=rng)

  def with_batch_axis(self, axis_name):
    return CastModel(self.inner.with_batch_axis(axis_name), self.dtype)

  @property
  def module(self):
    return self.inner.module



# ------------------------------------------------------------------ linen

def _mode_argument(module: nn.Module) -> str | None:
  try:
    params = inspect.signature(type(module).__call__).parameters
  except (TypeError, ValueError):
    return None
  found = [name for name in MODE_ARGUMENTS if name in params]
  return found[0] if found else None


def _share_batch_stats(axis_name: str):
  """A linen interceptor: every BatchNorm without an axis averages its
  statistics over `axis_name`, so pmap sees the global batch's."""
  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, nn.BatchNorm) and context.method_name == "__call__"
        and module.axis_name is None):
      # The bound module is a fresh copy made for this call.
      object.__setattr__(module, "axis_name", axis_name)
    return next_fun(*args, **kwargs)
  return intercept


@dataclasses.dataclass(frozen=True)
class LinenModel(ModelAdapter):
  """A flax linen module of any of the common call signatures."""
  linen: nn.Module
  rng_names: tuple[str, ...] = ("dropout",)
  batch_axis: str | None = None

  @property
  def module(self):
    return self.linen

  def _mode(self, train: bool) -> dict:
    name = _mode_argument(self.linen)
    if name is None:
      return {}
    return {name: train if MODE_ARGUMENTS[name] else not train}

  def init(self, key, sample):
    rngs = {"params": key, **{n: jax.random.fold_in(key, i + 1)
                              for i, n in enumerate(self.rng_names)}}
    # Compiled: run op by op, a CNN's initializers take seconds to dispatch.
    # Traced inputs (eval_shape, vmap) stage it into an outer program, which
    # takes no options of its own.
    traced = any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves((key, sample)))
    init = jax.jit(lambda rngs, sample: self.linen.init(
        rngs, sample, **self._mode(False)),
        compiler_options=None if traced else backends.RUN_ONCE)
    variables = dict(init(rngs, sample))
    params = variables.pop("params", {})
    return params, variables

  def apply(self, params, model_state, x, *, train, rng=None):
    variables = {"params": params, **model_state}
    rngs = ({n: jax.random.fold_in(rng, i) for i, n in enumerate(self.rng_names)}
            if rng is not None else None)
    mutable = list(model_state) if train and model_state else False

    def run():
      return self.linen.apply(variables, x, **self._mode(train), rngs=rngs,
                              mutable=mutable)
    if self.batch_axis is not None:
      with nn.intercept_methods(_share_batch_stats(self.batch_axis)):
        out = run()
    else:
      out = run()
    if mutable:
      logits, updates = out
      return logits, {**model_state, **updates}
    return out, model_state

  def with_compute_dtype(self, dtype):
    # Layers built with an explicit `dtype` field would cast a cast model
    # back, so such modules are cloned the flax way instead.
    if dtype != jnp.float32 and "dtype" in getattr(
        self.linen, "__dataclass_fields__", {}):
      return dataclasses.replace(self, linen=self.linen.clone(dtype=dtype))
    return super().with_compute_dtype(dtype)

  def with_batch_axis(self, axis_name):
    if "axis_name" in getattr(self.linen, "__dataclass_fields__", {}):
      return dataclasses.replace(self, linen=self.linen.clone(axis_name=axis_name))
    return dataclasses.replace(self, batch_axis=axis_name)


# -------------------------------------------------------------------- NNX

class NNXModel(ModelAdapter):
  """A flax NNX module. Its current values are the initial ones: an NNX
  module is initialized when it is built, so `init` ignores the key."""

  def __init__(self, module: nnx.Module, *, batch_axis: str | None = None):
    self._module = module
    self.batch_axis = batch_axis
    self.graphdef, rng_state, params, rest = nnx.split(
        module, nnx.RngState, nnx.Param, ...)
    self._rng_state, self._params, self._rest = rng_state, params, rest

  def _rng_streams(self, rng: jax.Array | None) -> nnx.State:
    """The module's RNG streams, each reseeded from `rng` (its own key folded
    with the stream's index) with its count at zero: dropout draws are then
    a function of the train state's key, as for linen."""
    pure = self._rng_state.to_pure_dict()
    if rng is not None:
      leaves, treedef = jax.tree.flatten(pure)
      leaves = [jax.random.fold_in(rng, i)
                if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
                else jnp.zeros_like(leaf) for i, leaf in enumerate(leaves)]
      pure = jax.tree.unflatten(treedef, leaves)
    return self._filled(self._rng_state, pure)

  @property
  def module(self):
    return self._module

  @staticmethod
  def _filled(template: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda v: v, template)   # a copy: never fill the template
    nnx.replace_by_pure_dict(state, pure)
    return state

  def init(self, key, sample):
    del key, sample
    return self._params.to_pure_dict(), self._rest.to_pure_dict()

  def apply(self, params, model_state, x, *, train, rng=None):
    module = nnx.merge(self.graphdef, self._rng_streams(rng),
                       self._filled(self._params, params),
                       self._filled(self._rest, model_state))
    if train:
      module.train()
    else:
      module.eval()
    if self.batch_axis is not None:
      for _, sub in nnx.iter_graph(module):
        if isinstance(sub, nnx.BatchNorm) and sub.axis_name is None:
          sub.axis_name = self.batch_axis
    logits = module(x)
    _, _, _, rest = nnx.split(module, nnx.RngState, nnx.Param, ...)
    # Only what model_state held: values a call sows are not carried.
    return logits, _only(rest.to_pure_dict(), model_state)

  def with_batch_axis(self, axis_name):
    return NNXModel(self._module, batch_axis=axis_name)


def _only(tree: dict, like: dict) -> dict:
  """The entries of nested dict `tree` at the paths that `like` has."""
  if not isinstance(like, dict):
    return tree
  return {k: _only(tree[k], v) for k, v in like.items()}


# ------------------------------------------------------------ plain functions

def _accepts(fn: Callable, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD
                               for p in params.values())


@dataclasses.dataclass(frozen=True)
class FunctionModel(ModelAdapter):
  """A model written as two plain functions (see `from_functions`)."""
  init_fn: Callable
  apply_fn: Callable
  stateful: bool = False

  def init(self, key, sample):
    out = self.init_fn(key, sample)
    return tuple(out) if self.stateful else (out, {})

  def apply(self, params, model_state, x, *, train, rng=None):
    kwargs = {}
    if _accepts(self.apply_fn, "train"):
      kwargs["train"] = train
    if _accepts(self.apply_fn, "rng"):
      kwargs["rng"] = rng
    if self.stateful:
      logits, model_state = self.apply_fn(params, model_state, x, **kwargs)
      return logits, model_state
    return self.apply_fn(params, x, **kwargs), model_state


def from_functions(init_fn: Callable, apply_fn: Callable, *,
                   stateful: bool = False) -> FunctionModel:
  """A model from plain functions, for code written without flax.

  Args:
    init_fn: `(key, sample) -> params`, or with `stateful=True`
      `(key, sample) -> (params, model_state)`.
    apply_fn: `(params, x) -> logits`, or with `stateful=True`
      `(params, model_state, x) -> (logits, model_state)`. It is also given
      `train=` and `rng=` (a key for dropout, None in eval mode) when its
      signature names them.
    stateful: whether the model carries state besides its params.
  """
  if not callable(init_fn) or not callable(apply_fn):
    raise ConfigError("from_functions takes two functions, init_fn(key, sample)"
                      " and apply_fn(params, x); got "
                      f"{type(init_fn).__name__} and {type(apply_fn).__name__}")
  return FunctionModel(init_fn, apply_fn, stateful)


# ------------------------------------------------------------------- adapt

_NNX_ADAPTERS: "weakref.WeakKeyDictionary[nnx.Module, NNXModel]" = (
    weakref.WeakKeyDictionary())


def adapt(model) -> ModelAdapter:
  """The `ModelAdapter` of a linen module, an NNX module, an
  `(init_fn, apply_fn)` pair, or an adapter (returned as it is)."""
  if isinstance(model, ModelAdapter):
    return model
  if isinstance(model, nn.Module):
    return LinenModel(model)
  if isinstance(model, nnx.Module):
    if model not in _NNX_ADAPTERS:   # one adapter per module: one compile
      _NNX_ADAPTERS[model] = NNXModel(model)
    return _NNX_ADAPTERS[model]
  if (isinstance(model, tuple) and len(model) == 2
      and all(callable(f) for f in model)):
    return from_functions(*model)
  raise ConfigError(
      f"jaxaccel cannot use a model of type {type(model).__name__}: give a "
      "flax linen module, a flax NNX module, an (init_fn, apply_fn) pair, or "
      "jaxaccel.models.from_functions(init_fn, apply_fn)")


def output_classes(model, sample_shape, dtype=jnp.float32) -> int | None:
  """The size of the last axis of the model's outputs (logits: one per
  class, or per position and class) for one input of `sample_shape` and
  `dtype`, found without computing anything; None for one value per
  example."""
  shape = output_shape(model, sample_shape, dtype)
  return int(shape[-1]) if len(shape) >= 2 else None


def output_shape(model, sample_shape, dtype=jnp.float32) -> tuple[int, ...]:
  """The shape of the model's outputs for a batch of one input of
  `sample_shape` and `dtype`, found without computing anything."""
  adapter = adapt(model)
  sample = jax.ShapeDtypeStruct((1, *sample_shape), dtype)

  def logits(key, x):
    params, state = adapter.init(key, x)
    return adapter.apply(params, state, x, train=False)[0]
  try:
    out = jax.eval_shape(logits, jax.random.key(0), sample)
  except Exception as e:   # the model's own error, said in one line
    raise ConfigError(
        f"the model cannot take inputs of shape {tuple(sample_shape)} "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); check the "
        "data's shape against the model") from None
  return tuple(out.shape)
