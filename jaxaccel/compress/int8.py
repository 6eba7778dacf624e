"""Integer inference for any model: every matmul and convolution whose
weight is a parameter runs int8 x int8 -> int32.

The model is not asked how it is built. Its eval-mode forward pass is traced
to a jaxpr and evaluated again with one change: at each `dot_general` or
`conv_general_dilated` whose one operand is computed from a parameter alone
(a Dense/Linear kernel, a Conv kernel, or a kernel reshaped for an im2col
matmul) and whose other operand is an activation, the weight is quantized
per output channel, the activation per tensor with a scale calibrated on
training inputs (to [-127, 127], or to [0, 127] when no calibration input
was negative), and the product runs on int8 operands with int32 sums,
rescaled to float. A convolution's rescale waits through its bias, ReLU
and max-pool, which then run on the int32 sums (the same result, cheaper).
Everything else (biases, batch norm, pooling, the activations between
layers) runs as before, so linen, NNX and plain-function models take the
same path. A product it cannot quantize (two activations, as
in attention, or batched weights) stays float and is listed in `float_sites`.

Examples:
  >>> import jax, jax.numpy as jnp, numpy as np
  >>> import flax.linen as nn
  >>> from jaxaccel.compress import int8
  >>> model = nn.Sequential([nn.Conv(4, (3, 3)), nn.relu,
  ...                        lambda x: x.reshape(x.shape[0], -1), nn.Dense(3)])
  >>> x = np.random.default_rng(0).normal(size=(16, 6, 6, 1)).astype("f4")
  >>> variables = model.init(jax.random.key(0), x)
  >>> program = int8.convert(model, variables, [x])
  >>> [s.name for s in program.sites]
  ['layers_0/kernel', 'layers_3/kernel']
  >>> float_logits = model.apply(variables, x)
  >>> bool(np.abs(program(x) - float_logits).max() < 0.05)
  True
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from jaxaccel import backends, tracing
from jaxaccel.errors import ConfigError
from jaxaccel.models.zoo import shifted_windows

PyTree = Any
PRODUCTS = tracing.PRODUCTS


@dataclasses.dataclass
class Site:
  """One matmul or convolution of the forward pass."""
  index: int
  kind: str                     # "dot_general" or "conv_general_dilated"
  name: str                     # the parameter its weight comes from, or ""
  quantized: bool
  reason: str = ""              # why it stays float
  weight_side: int = 1          # operand index of the weight
  reduce_axes: tuple[int, ...] = ()   # the weight's axes a scale spans
  scale_shape: tuple[int, ...] = ()   # the scales' shape against the output
  values: np.ndarray | None = None     # int8 weight, the operand's layout
  weight_scale: np.ndarray | None = None  # broadcasts against the output
  input_scale: float | None = None
  # No calibration input was negative: the input is quantized to [0, 127]
  # (the same values as [-127, 127] for such inputs), which lets ONNX
  # Runtime use its faster unsigned x signed kernel without overflow.
  unsigned: bool = False

  @property
  def description(self) -> str:
    if not self.name:
      return f"a product of {self.reason}"
    return self.name if self.quantized else f"{self.name} ({self.reason})"


@dataclasses.dataclass
class _Deferred:
  """A convolution's int32 sums whose rescale to float waits: y =
  max(acc * scale + bias, 0 if relu), per channel (the last axis), with
  scale >= 0. Every step of that map is non-decreasing in acc (float
  rounding included), so a max-pool taken on acc equals the one taken
  after it, bit for bit; pooling the int32 sums first converts a quarter
  of the values. Anything else reads the float value (`value`)."""
  acc: jax.Array
  scale: jax.Array              # (channels,)
  bias: jax.Array | None = None   # (channels,), added after the scale
  relu: bool = False

  def value(self) -> jax.Array:
    y = self.acc.astype(jnp.float32) * self.scale
    if self.bias is not None:
      y = y + self.bias
    return jnp.maximum(y, 0.0) if self.relu else y


def _float(v):
  return v.value() if isinstance(v, _Deferred) else v


def _deferred_step(eqn, vals, origins):
  """The next _Deferred when `eqn` (on a _Deferred input) is one the
  rescale can wait through, else None: a per-channel constant added
  before the ReLU, the ReLU itself (max with 0), a reshape that keeps the
  channel axis last, and a max over other axes (reduce_max, or a
  reduce_window max whose window spans one channel)."""
  name = eqn.primitive.name
  d = next(v for v in vals if isinstance(v, _Deferred))
  channels = d.acc.shape[-1]
  other = [(v, o) for v, o in zip(vals, origins) if v is not d]
  if name == "add" and len(other) == 1 and not d.relu:
    c, origin = other[0]
    vec = None if origin is None else tracing.channel_vector(c, channels)
    if vec is not None:
      bias = vec if d.bias is None else d.bias + vec
      return dataclasses.replace(d, bias=bias)
  if name == "max" and len(other) == 1 and np.ndim(other[0][0]) == 0:
    if other[0][1] is not None and float(other[0][0]) == 0.0:
      return dataclasses.replace(d, relu=True)
  if name == "reshape" and eqn.params["new_sizes"][-1] == channels \
      and eqn.params.get("dimensions") is None:
    return dataclasses.replace(d, acc=d.acc.reshape(eqn.params["new_sizes"]))
  if name == "reduce_max" and d.acc.ndim - 1 not in eqn.params["axes"]:
    return dataclasses.replace(d, acc=_max_over(d.acc, eqn.params["axes"]))
  if name == "reduce_window_max" and eqn.params["window_dimensions"][-1] == 1 \
      and eqn.params["window_strides"][-1] == 1:
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
      acc = eqn.primitive.bind(d.acc, **params)
    return dataclasses.replace(d, acc=acc)
  return None


def _max_over(x: jax.Array, axes) -> jax.Array:
  """jnp.max over `axes`, short ones (a pooling window's 2 or 3) as an
  elementwise maximum of slices: XLA:CPU runs that as one vectorized loop,
  a reduce over the 2x2 window of a (n, h/2, 2, w/2, 2, c) view 3x slower."""
  for axis in sorted(axes, reverse=True):
    if x.shape[axis] > 4:
      x = jnp.max(x, axis=axis)
      continue
    parts = [jax.lax.index_in_dim(x, i, axis, keepdims=False)
             for i in range(x.shape[axis])]
    x = functools.reduce(jnp.maximum, parts)
  return x


def _per_channel_int8(w: np.ndarray, reduce_axes: tuple[int, ...]):
  """Symmetric int8 values and scales of w, one scale per kept axis."""
  w = np.asarray(w, np.float32)
  amax = np.max(np.abs(w), axis=reduce_axes, keepdims=True)
  scale = np.where(amax > 0, amax, 1.0).astype(np.float32) / 127.0
  values = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
  return values, scale


class _Pass:
  """One evaluation of the traced forward pass in one of three modes:
  "scan" (find the sites and return their weights), "calibrate"
  (record each site's input range) and "run" (the int8 products)."""

  def __init__(self, mode: str, sites: list[Site] | None = None,
               percentile: float = 99.99):
    self.mode = mode
    self.sites = sites if sites is not None else []
    self.percentile = percentile
    self.ranges: list = []
    self.minima: list = []
    self.weights: list = []
    self.count = 0

  def evaluate(self, jaxpr, consts, args, names, inner: bool = False):
    """The jaxpr's outputs; with `inner` (a call's body), a _Deferred
    output stays deferred for the caller."""
    env, prov = {}, {}

    def read(v):
      return v.val if isinstance(v, jcore.Literal) else env[v]

    def origin(v):
      return tracing.CONST if isinstance(v, jcore.Literal) else prov.get(v)

    for v, c in zip(jaxpr.constvars, consts):
      env[v], prov[v] = c, tracing.CONST
    for v, a, n in zip(jaxpr.invars, args, names):
      env[v], prov[v] = a, n
    for eqn in jaxpr.eqns:
      vals = [read(v) for v in eqn.invars]
      origins = [origin(v) for v in eqn.invars]
      body = tracing.call_body(eqn)
      deferred = (any(isinstance(v, _Deferred) for v in vals)
                  and body is None and _deferred_step(eqn, vals, origins))
      if deferred:
        outs = [deferred]
      elif eqn.primitive.name in PRODUCTS and None in origins:
        outs = [self.product(eqn, [_float(v) for v in vals], origins)]
      elif body is not None:
        outs = self.evaluate(body[0], body[1], vals, origins, inner=True)
      else:
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
          outs = eqn.primitive.bind(*[_float(v) for v in vals], **params)
        if not eqn.primitive.multiple_results:
          outs = [outs]
      # A value computed from parameters and constants alone is a weight;
      # it is named after the first parameter it comes from.
      weight = None if None in origins else next(
          (o for o in origins if o), tracing.CONST)
      for v, out in zip(eqn.outvars, outs):
        env[v], prov[v] = out, weight
    outs = [read(v) for v in jaxpr.outvars]
    return outs if inner else [_float(v) for v in outs]

  def product(self, eqn, vals, origins):
    index, self.count = self.count, self.count + 1
    if self.mode == "scan":
      self.sites.append(_site(index, eqn, vals, origins))
    site = self.sites[index]
    if not site.quantized:
      return eqn.primitive.bind(*vals, **eqn.params)
    if self.mode == "scan":
      self.weights.append(vals[site.weight_side])
    act = vals[1 - site.weight_side]
    if self.mode == "calibrate":
      self.minima.append(jnp.min(act.astype(jnp.float32)))
      self.ranges.append(jnp.percentile(jnp.abs(act.astype(jnp.float32)),
                                        self.percentile))
    if self.mode != "run":
      return eqn.primitive.bind(*vals, **eqn.params)
    s = jnp.float32(site.input_scale)
    q = jnp.clip(jnp.round(act.astype(jnp.float32) / s),
                 0 if site.unsigned else -127, 127
                 ).astype(jnp.int8)
    conv = site.kind == "conv_general_dilated"
    form = conv_form(eqn) if conv else "native"
    if form != "native":
      acc = _conv_int32(eqn, q, site.values, form)
    else:
      operands = [q, q]
      operands[site.weight_side] = jnp.asarray(site.values)
      acc = eqn.primitive.bind(*operands, **_int32_params(eqn))
    scale = s * jnp.asarray(site.weight_scale)
    out_dtype = eqn.outvars[0].aval.dtype
    if (conv and out_dtype == jnp.float32
        and eqn.params["dimension_numbers"].out_spec[1] == acc.ndim - 1):
      return _Deferred(acc, scale.reshape(-1))     # features last (NHWC)
    return (acc.astype(jnp.float32) * scale).astype(out_dtype)


def _int32_params(eqn) -> dict:
  """The product's parameters for int8 operands summed in int32."""
  params = dict(eqn.params, preferred_element_type=jnp.int32)
  if "precision" in params:
    params["precision"] = None
  return params


def inputs_per_output(eqn) -> int:
  """A convolution's products summed into each output (kh * kw * c_in)."""
  rhs = eqn.invars[1].aval
  out_feature = eqn.params["dimension_numbers"].rhs_spec[0]
  return int(np.prod(rhs.shape)) // rhs.shape[out_feature]


def conv_form(eqn) -> str:
  """How the int8 program runs a convolution with int32 sums:
  "direct" (shifted multiply-adds, few inputs per output), "matmul"
  (im2col and one int8 matmul) or "native" (XLA's int8 convolution)."""
  if backends.formulation() != "cpu" or not _plain_2d(eqn):
    return "native"
  # few inputs per output: a first layer on one to three channels (9 or 27)
  if inputs_per_output(eqn) < backends.SMALL_KERNEL_INPUTS:
    return "direct"
  return "native" if native_int8_convolution(eqn) else "matmul"


def native_int8_convolution(eqn) -> bool:
  """Whether XLA compiles this int8 convolution (its shapes and options)
  with int32 sums to a fast kernel here. XLA:CPU hands large ones to
  YNNPACK (a 1024x14x14x32 -> 64 3x3 layer: 49 ms, against 55 ms as the
  im2col matmul) and runs small ones (batch 1) through a generic loop,
  where the im2col matmul is faster."""
  lhs, rhs = (v.aval for v in eqn.invars)
  # A symbolic batch (an exported artifact) is judged at a serving batch.
  concrete = lambda shape: tuple(d if isinstance(d, int) else 256 for d in shape)
  params = tuple(sorted((k, str(v)) for k, v in eqn.params.items()))
  return _native_conv(concrete(lhs.shape), concrete(rhs.shape), params, eqn)


_NATIVE: dict = {}


def _native_conv(lhs_shape, rhs_shape, key_params, eqn) -> bool:
  key = (lhs_shape, rhs_shape, key_params)
  if key not in _NATIVE:
    params = _int32_params(eqn)
    conv = jax.jit(lambda x, k: eqn.primitive.bind(x, k, **params))
    try:
      _NATIVE[key] = "ynn" in conv.lower(
          jax.ShapeDtypeStruct(lhs_shape, jnp.int8),
          jax.ShapeDtypeStruct(rhs_shape, jnp.int8)).compile().as_text()
    except Exception:   # an XLA that cannot say: the matmul form is safe
      _NATIVE[key] = False
  return _NATIVE[key]


def _plain_2d(eqn) -> bool:
  """Whether a convolution is a plain 2-D one `_conv_int32` runs."""
  p = eqn.params
  return (len(p["window_strides"]) == 2 and p["feature_group_count"] == 1
          and set(p["lhs_dilation"]) == {1} and set(p["rhs_dilation"]) == {1})


def _conv_int32(eqn, q: jax.Array, kernel: np.ndarray, form: str) -> jax.Array:
  """A 2-D convolution of int8 inputs with int32 sums, in the equation's
  layouts, from its shifted input windows: each window times its kernel
  tap, summed in int32 ("direct"), or all windows side by side in one int8
  x int8 -> int32 matmul ("matmul", im2col).

  XLA:CPU runs an int8 `conv_general_dilated` it cannot give YNNPACK
  through a slow generic loop; its int8 matmul is faster than the float
  one. With few inputs per output the matmul is slower still: a one-channel
  3x3 layer at batch 1024 (28x28, 32 filters) took 34 ms as im2col and
  5.9 ms as nine multiply-adds that XLA fuses with the pooling after it.
  """
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs, rhs, out = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  x = jnp.transpose(q, (lhs[0], *lhs[2:], lhs[1]))               # NHWC
  w = np.transpose(kernel, (*rhs[2:], rhs[1], rhs[0]))            # HWIO
  kh, kw, cin, cout = w.shape
  (lo_h, hi_h), (lo_w, hi_w) = p["padding"]
  sh, sw = p["window_strides"]
  x = jnp.pad(x, ((0, 0), (lo_h, hi_h), (lo_w, hi_w), (0, 0)))
  oh = (x.shape[1] - kh) // sh + 1
  ow = (x.shape[2] - kw) // sw + 1
  windows = shifted_windows(x, (kh, kw), (oh, ow), (sh, sw))
  if form == "direct":
    taps = jnp.asarray(w.reshape(kh * kw, cin, cout), jnp.int32)
    acc = sum(windows[t][..., c:c + 1].astype(jnp.int32) * taps[t, c]
              for t in range(kh * kw) for c in range(cin))
  else:
    acc = jax.lax.dot_general(
        jnp.concatenate(windows, axis=-1),
        jnp.asarray(w.reshape(kh * kw * cin, cout)),
        (((3,), (0,)), ((), ())), preferred_element_type=jnp.int32)  # NHWC
  order = np.argsort([out[0], out[2], out[3], out[1]])
  return jnp.transpose(acc, order)


def _site(index, eqn, vals, origins) -> Site:
  """A product's site, from shapes alone (the weight may be a tracer):
  which operand is the weight, the axes its scales reduce over and the
  shape they broadcast to against the output."""
  kind = eqn.primitive.name
  sides = [i for i, o in enumerate(origins) if o is not None]
  if not sides:
    return Site(index, kind, "", False, "two activations")
  side = sides[0]
  name = origins[side]
  if not name:
    return Site(index, kind, "", False, "an activation and a constant")
  w = vals[side]
  if not jnp.issubdtype(w.dtype, jnp.floating):
    return Site(index, kind, name, False, f"{w.dtype} weight")
  if kind == "dot_general":
    (contract, batch) = eqn.params["dimension_numbers"]
    if batch[0] or batch[1]:
      return Site(index, kind, name, False, "batched product")
    reduce_axes = tuple(contract[side])
    # dot_general's output: lhs free axes, then rhs free axes, in order.
    shape = [d for i, d in enumerate(w.shape) if i not in reduce_axes]
    if side == 0:
      shape += [1] * (vals[1].ndim - len(contract[1]))
  else:
    dn = eqn.params["dimension_numbers"]
    if side != 1 or eqn.params.get("batch_group_count", 1) != 1:
      return Site(index, kind, name, False, "unsupported convolution layout")
    out_feature = dn.rhs_spec[0]
    reduce_axes = tuple(i for i in range(w.ndim) if i != out_feature)
    shape = [1] * eqn.outvars[0].aval.ndim
    shape[dn.out_spec[1]] = w.shape[out_feature]
  return Site(index, kind, name, True, weight_side=side,
              reduce_axes=reduce_axes, scale_shape=tuple(shape))


def _quantize_site(site: Site, w) -> None:
  """Fills a site's int8 weight and its scales, broadcastable to the output."""
  site.values, scale = _per_channel_int8(np.asarray(w), site.reduce_axes)
  site.weight_scale = scale.reshape(site.scale_shape).astype(np.float32)


@dataclasses.dataclass(eq=False)
class Int8Model:
  """A model's forward pass (or a function of its variables) with int8
  products; call it on the float inputs the float one takes."""
  sites: list[Site]
  float_sites: list[Site]
  forward: Callable

  def __call__(self, *args) -> jax.Array:
    return self.forward(*jax.tree.map(jnp.asarray, args))

  @property
  def all_sites(self) -> list[Site]:
    """Every product of the forward pass, in order."""
    return sorted(self.sites + self.float_sites, key=lambda s: s.index)

  def summary(self) -> dict:
    return {"int8": [s.name for s in self.sites],
            "float": [s.description for s in self.float_sites]}


def product_weights(model, variables: dict, sample) -> list[str]:
  """Names ('Dense_0/kernel' style) of the parameters the model's forward
  pass multiplies by its activations: the kernels of its Dense/Linear,
  Einsum and Conv layers, attention projections included. Embedding tables
  (read by index, even when tied to the output projection), positional
  tables (added), norms and biases are not among them. What pruning takes
  as a model's weights."""
  traced = tracing.forward_pass(model, variables)
  x = jnp.asarray(sample)[:1]
  scan, _ = _scan(traced, x)
  jaxpr, _ = traced.trace(x)
  tables = tracing.indexed(jaxpr, traced.names)
  return list(dict.fromkeys(s.name for s in scan.sites
                            if s.quantized and s.name not in tables))


def _scan(traced: tracing.ForwardPass, *args):
  """The scan pass over the traced function at `args`: (the pass, with
  every product's Site, and the weights of the quantizable ones)."""
  scan = _Pass("scan")

  @jax.jit
  def weights(*args):
    _evaluate(scan, traced, args)
    return scan.weights
  return scan, weights(*args)


def _evaluate(p: _Pass, traced: tracing.ForwardPass, args: tuple):
  """The traced function's outputs at `args` through the pass `p`."""
  jaxpr, consts = traced.trace(*args)
  flat = jax.tree.leaves(args)
  outs = p.evaluate(jaxpr, consts, [*traced.leaves, *flat],
                    [*traced.names, *[None] * len(flat)])
  return traced.unflatten(outs)


def calibration_batches(x: np.ndarray, *, examples: int = 5000,
                        batch_size: int = 1000) -> list[np.ndarray]:
  """The first `examples` inputs of x in batches: what `convert` reads."""
  return [x[i:i + batch_size]
          for i in range(0, min(examples, len(x)), batch_size)]


def convert(model, variables: dict, batches: Iterable, *,
            percentile: float = 99.99) -> Int8Model:
  """The int8 forward pass of `model` at `variables`.

  Args:
    model: any model `jaxaccel.models.adapt` takes.
    variables: `{"params": ..., **model_state}`, float (dequantize a
      quantized tree first: its per-channel values come back unchanged).
    batches: a few batches of training inputs, for the activation scales
      (`calibration_batches`).
    percentile: each activation's range is this percentile of the absolute input
      (averaged over batches), divided by 127; 100 takes the maximum.

  Raises:
    ConfigError: no batches, a percentile outside (0, 100], or a model with
      no matmul or convolution on a parameter.
  """
  return _convert(tracing.forward_pass(model, variables),
                  [(jnp.asarray(b),) for b in batches], percentile)


def convert_function(fn: Callable, variables: dict, calls: Iterable, *,
                     percentile: float = 99.99) -> Int8Model:
  """`fn(variables, *args)` with int8 products, as `convert` makes a
  forward pass: each product of an activation and a parameter runs int8,
  its input scale calibrated on the argument tuples `calls`. A language
  model's cached decoder (`generate.decoder`) is one such function: its
  calibration calls are full windows of training text from position 0."""
  return _convert(tracing.function_pass(fn, variables),
                  [tuple(jax.tree.map(jnp.asarray, c)) for c in calls],
                  percentile)


def _convert(traced: tracing.ForwardPass, calls: list[tuple],
             percentile: float) -> Int8Model:
  if not 0.0 < percentile <= 100.0:
    raise ConfigError(f"calibration percentile must lie in (0, 100]; got "
                      f"{percentile}")
  if not calls:
    raise ConfigError("calibration got no batches; give at least one")
  first = jax.tree.map(lambda a: a[:1] if a.ndim else a, calls[0])
  scan, found = _scan(traced, *first)
  quantized = [s for s in scan.sites if s.quantized]
  for site, w in zip(quantized, found):
    _quantize_site(site, w)
  if not quantized:
    found = ", ".join(s.description for s in scan.sites) or "none"
    raise ConfigError("the model has no matmul or convolution on a parameter "
                      f"to quantize (products found: {found})")

  @jax.jit
  def ranges(*args):
    p = _Pass("calibrate", scan.sites, percentile)
    _evaluate(p, traced, args)
    return p.ranges, p.minima
  measured = [ranges(*c) for c in calls]
  amax = np.mean([np.asarray(r) for r, _ in measured], axis=0)
  lowest = np.min([np.asarray(m) for _, m in measured], axis=0)
  for site, a, low in zip(quantized, amax, lowest):
    site.input_scale = float(a if a > 0 else 1.0) / 127.0
    site.unsigned = bool(low >= 0)

  @jax.jit
  def forward(*args):
    return _evaluate(_Pass("run", scan.sites), traced, args)
  return Int8Model(quantized, [s for s in scan.sites if not s.quantized],
                   forward)
