"""ONNX graphs of a model's eval forward pass, float32 or int8.

The forward pass (the run's normalization first) is traced to a jaxpr with
a symbolic batch dimension and written node by node with the `onnx`
package's helpers. Everything computed from weights and constants alone
(a kernel's reshape, a batch norm's folded scale) is evaluated here and
stored as an initializer, so the graph holds only the work that depends on
the input. With an int8 program (`compress.int8.convert`), each quantized
matmul or convolution becomes QuantizeLinear -> MatMulInteger/ConvInteger ->
Cast -> Mul with jaxpr's own weight values, weight scales and calibrated
input scales. Activations and weights go in as uint8 with zero point 128
(the int8 value plus 128), so the integer products equal the int8 x int8
ones; a dense layer on an input never negative in calibration takes it as
uint8 with zero point 0 against int8 weights (ONNX Runtime's faster u8 x s8
kernel, exact below 128). A convolution's rescale waits, as in
`compress.int8`, until its sums have been max-pooled (`_Pending`).

Primitives without a rule raise a ConfigError naming them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import jax
import jax.extend.core as jcore
import numpy as np

from jaxaccel import tracing
from jaxaccel.errors import ConfigError, DataError

OPSET = 18
INPUT, OUTPUT = "x", "logits"


def _onnx():
  try:
    import onnx
    return onnx
  except ImportError:
    raise ConfigError("ONNX export needs the onnx package: pip install "
                      "'jaxaccel[export]'") from None


class _Graph:
  """Nodes, initializers and the batch size of one graph under construction."""

  def __init__(self, batch, keep_weights: bool = True):
    self.onnx = _onnx()
    self.helper = self.onnx.helper
    self.nodes, self.inits, self.count = [], [], 0
    self.batch = batch
    self.keep_weights = keep_weights     # False: a walk that only looks
    self._batch_dim = None
    self._consts: dict[tuple, str] = {}

  def name(self, hint: str) -> str:
    self.count += 1
    return f"{hint}_{self.count}"

  def node(self, op: str, inputs, hint: str | None = None, **attrs) -> str:
    out = self.name(hint or op.lower())
    self.nodes.append(self.helper.make_node(op, list(inputs), [out], **attrs))
    return out

  def const(self, value, hint: str = "c") -> str:
    value = np.asarray(value)
    key = (value.dtype.str, value.shape, value.tobytes())
    if len(key[2]) <= 64 and key in self._consts:
      return self._consts[key]
    name = self.name(hint)
    if self.keep_weights:
      self.inits.append(self.onnx.numpy_helper.from_array(value, name))
    if len(key[2]) <= 64:
      self._consts[key] = name
    return name

  def shape(self, dims) -> str:
    """An int64 shape tensor; the symbolic batch dimension read from x."""
    if all(isinstance(d, (int, np.integer)) for d in dims):
      return self.const(np.asarray(dims, np.int64), "shape")
    parts = []
    for d in dims:
      if isinstance(d, (int, np.integer)):
        parts.append(self.const(np.asarray([d], np.int64), "dim"))
      elif d == self.batch:
        parts.append(self.batch_dim())
      else:
        raise ConfigError(f"cannot export a shape with dimension {d}: only "
                          "the batch dimension may vary")
    return self.node("Concat", parts, "shape", axis=0)

  def batch_dim(self) -> str:
    if self._batch_dim is None:
      shape = self.node("Shape", [INPUT], "input_shape")
      self._batch_dim = self.node(
          "Slice", [shape, self.const(np.asarray([0], np.int64)),
                    self.const(np.asarray([1], np.int64))], "batch")
    return self._batch_dim


def _ranked(c, ndim: int) -> np.ndarray:
  """A constant operand with leading axes of 1 up to `ndim`: the same
  broadcast, and ONNX Runtime runs an elementwise op with a rank-0 operand
  on a slow path (x / 255 on 1024x28x28x1: 7.6 ms, against 0.14 ms with a
  (1, 1, 1, 1) divisor)."""
  c = np.asarray(c)
  return c.reshape((1,) * (ndim - c.ndim) + c.shape) if c.ndim < ndim else c


def _axes(g: _Graph, axes) -> str:
  return g.const(np.asarray(list(axes), np.int64), "axes")


def _dtype(dtype) -> int:
  return _onnx().helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# ------------------------------------------------------------------ rules
# Each rule: (graph, eqn, inputs) -> output tensor name, where inputs are
# tensor names (constants already stored as initializers).

_ELEMENTWISE = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div",
                "max": "Max", "min": "Min", "pow": "Pow",
                "gt": "Greater", "lt": "Less", "ge": "GreaterOrEqual",
                "le": "LessOrEqual", "eq": "Equal", "and": "And", "or": "Or"}
_UNARY = {"neg": "Neg", "exp": "Exp", "log": "Log", "tanh": "Tanh",
          "logistic": "Sigmoid", "sqrt": "Sqrt", "abs": "Abs", "erf": "Erf",
          "sign": "Sign", "floor": "Floor", "ceil": "Ceil", "not": "Not",
          "stop_gradient": "Identity", "copy": "Identity",
          "copy_p": "Identity", "reduce_precision": "Identity",
          "optimization_barrier": "Identity"}
_REDUCE = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax",
           "reduce_min": "ReduceMin", "reduce_prod": "ReduceProd"}


def _rule_binary(op):
  return lambda g, eqn, ins: g.node(op, ins)


def _rule_unary(op):
  return lambda g, eqn, ins: g.node(op, ins[:1])


def _rule_reduce(op):
  return lambda g, eqn, ins: g.node(op, [ins[0], _axes(g, eqn.params["axes"])],
                                    keepdims=0)


def _rsqrt(g, eqn, ins):
  return g.node("Reciprocal", [g.node("Sqrt", ins)])


def _integer_pow(g, eqn, ins):
  y = eqn.params["y"]
  if y == 2:
    return g.node("Mul", [ins[0], ins[0]])
  dtype = eqn.invars[0].aval.dtype
  return g.node("Pow", [ins[0], g.const(np.asarray(y, dtype))])


def _square(g, eqn, ins):
  return g.node("Mul", [ins[0], ins[0]])


def _reshape(g, eqn, ins):
  return g.node("Reshape", [ins[0], g.shape(eqn.params["new_sizes"])])


def _broadcast_in_dim(g, eqn, ins):
  shape = eqn.params["shape"]
  dims = eqn.params["broadcast_dimensions"]
  in_shape = eqn.invars[0].aval.shape
  # Put the input's axes where they land, size 1 elsewhere, then Expand.
  ranked = [1] * len(shape)
  for axis, d in zip(dims, in_shape):
    ranked[axis] = d
  x = g.node("Reshape", [ins[0], g.shape(ranked)])
  return g.node("Expand", [x, g.shape(shape)])


def _transpose(g, eqn, ins):
  return g.node("Transpose", ins[:1], perm=list(eqn.params["permutation"]))


def _squeeze(g, eqn, ins):
  return g.node("Squeeze", [ins[0], _axes(g, eqn.params["dimensions"])])


def _expand_dims(g, eqn, ins):
  return g.node("Unsqueeze", [ins[0], _axes(g, eqn.params["dimensions"])])


def _convert(g, eqn, ins):
  return g.node("Cast", ins[:1], to=_dtype(eqn.params["new_dtype"]))


def _select_n(g, eqn, ins):
  if len(ins) != 3:
    raise ConfigError("cannot export select_n with more than two cases")
  # select_n(pred, on_false, on_true)
  pred = ins[0]
  if eqn.invars[0].aval.dtype != np.bool_:
    pred = g.node("Cast", [pred], to=_dtype(np.bool_))
  return g.node("Where", [pred, ins[2], ins[1]])


def _concatenate(g, eqn, ins):
  return g.node("Concat", ins, axis=int(eqn.params["dimension"]))


def _slice(g, eqn, ins):
  """A Slice of the axes the slice cuts (a whole axis, the symbolic batch
  among them, is left out of it)."""
  shape = eqn.invars[0].aval.shape
  starts = eqn.params["start_indices"]
  limits = eqn.params["limit_indices"]
  strides = eqn.params["strides"] or [1] * len(starts)
  axes = []
  for i, (start, limit, step, size) in enumerate(zip(starts, limits, strides,
                                                      shape)):
    if start == 0 and step == 1 and (limit is size or limit == size):
      continue                  # the whole axis
    if not all(isinstance(v, (int, np.integer)) for v in (start, limit, step)):
      raise ConfigError("cannot export a slice of the batch dimension to ONNX")
    axes.append(i)
  if not axes:
    return g.node("Identity", [ins[0]])
  pick = lambda values: g.const(np.asarray([values[i] for i in axes], np.int64))
  return g.node("Slice", [ins[0], pick(starts), pick(limits), _axes(g, axes),
                          pick(strides)])


def _gather_slice(g, eqn, x: str, index) -> str | None:
  """A gather that is a slice at constant offsets (`x[..., a:b]` traced with
  a symbolic batch), as one Slice; None for any other gather."""
  dims = eqn.params["dimension_numbers"]
  operand = eqn.invars[0].aval.shape
  sizes = eqn.params["slice_sizes"]
  axes = list(dims.start_index_map)
  if (dims.collapsed_slice_dims or dims.operand_batching_dims
      or tuple(dims.offset_dims) != tuple(range(len(operand)))
      or np.shape(index) != (len(axes),)
      or any(sizes[i] is not operand[i] and sizes[i] != operand[i]
             for i in range(len(operand)) if i not in axes)):
    return None
  start = [int(np.clip(int(s), 0, operand[a] - sizes[a]))
           for s, a in zip(np.asarray(index), axes)]
  return g.node("Slice", [x, g.const(np.asarray(start, np.int64)),
                          g.const(np.asarray([s + sizes[a] for s, a in
                                              zip(start, axes)], np.int64)),
                          g.const(np.asarray(axes, np.int64))])


def _split(g, eqn, x: str) -> list[str]:
  """`jnp.split`'s pieces, one Slice each along the split axis."""
  axis, starts = int(eqn.params["axis"]), np.cumsum([0, *eqn.params["sizes"]])
  return [g.node("Slice", [x, g.const(np.asarray([a], np.int64)),
                           g.const(np.asarray([b], np.int64)),
                           g.const(np.asarray([axis], np.int64))])
          for a, b in zip(starts[:-1], starts[1:])]


def _pad(g, eqn, ins):
  config = eqn.params["padding_config"]
  if any(interior for _, _, interior in config):
    raise ConfigError("cannot export pad with interior padding")
  if any(lo < 0 or hi < 0 for lo, hi, _ in config):
    raise ConfigError("cannot export pad with negative padding")
  pads = [lo for lo, _, _ in config] + [hi for _, hi, _ in config]
  return g.node("Pad", [ins[0], g.const(np.asarray(pads, np.int64)), ins[1]])


def _reduce_window(op):
  """max_pool / avg_pool: the window's axes go last, the others (batch and
  channels) first, as ONNX's pools take them."""
  def rule(g, eqn, ins):
    p = eqn.params
    window, strides = p["window_dimensions"], p["window_strides"]
    if set(p["base_dilation"]) != {1}:
      raise ConfigError("cannot export a pooling window with base dilation")
    pooled = [i for i, (w, s) in enumerate(zip(window, strides))
              if w != 1 or s != 1]
    kept = [i for i in range(len(window)) if i not in pooled]
    if len(kept) != 2 or any(p["padding"][i] != (0, 0) for i in kept):
      raise ConfigError("cannot export a pooling window over "
                        f"{len(kept)} unpooled axes (ONNX pools take batch "
                        "and channels)")
    perm = kept + pooled
    x = g.node("Transpose", ins[:1], perm=perm)
    attrs = dict(kernel_shape=[window[i] for i in pooled],
                 strides=[strides[i] for i in pooled],
                 pads=([p["padding"][i][0] for i in pooled]
                       + [p["padding"][i][1] for i in pooled]))
    dilations = [p["window_dilation"][i] for i in pooled]
    if set(dilations) != {1}:
      if op == "sum":
        raise ConfigError("cannot export an average pool with dilation")
      attrs["dilations"] = dilations
    if op == "sum":
      y = g.node("AveragePool", [x], count_include_pad=1, **attrs)
      size = np.prod(attrs["kernel_shape"]).astype(eqn.outvars[0].aval.dtype)
      y = g.node("Mul", [y, g.const(size)])
    else:
      y = g.node("MaxPool", [x], **attrs)
    return g.node("Transpose", [y], perm=list(np.argsort(perm)))
  return rule


def _dot_general(g, eqn, ins):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = (v.aval for v in eqn.invars)
  if (not lb and not rb and list(lc) == [lhs.ndim - 1] and list(rc) == [0]
      and rhs.ndim == 2):
    return g.node("MatMul", ins)
  # Anything else as an einsum: batch axes, then lhs free, then rhs free.
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  l_sub = [next(letters) for _ in range(lhs.ndim)]
  r_sub = [None] * rhs.ndim
  for a, b in zip(lb, rb):
    r_sub[b] = l_sub[a]
  for a, b in zip(lc, rc):
    r_sub[b] = l_sub[a]
  r_sub = [s or next(letters) for s in r_sub]
  out = ([l_sub[a] for a in lb]
         + [s for i, s in enumerate(l_sub) if i not in lb and i not in lc]
         + [s for i, s in enumerate(r_sub) if i not in rb and i not in rc])
  spec = f"{''.join(l_sub)},{''.join(r_sub)}->{''.join(out)}"
  return g.node("Einsum", ins, equation=spec)


def _contracted_last(g, x: str, shape, lc: list[int]) -> str:
  """x (of `shape`) with its contracted axes `lc` moved last and merged
  into one: the left operand of a MatMul by a weight matrix."""
  free = [d for d in range(len(shape)) if d not in lc]
  if free + lc != list(range(len(shape))):
    x = g.node("Transpose", [x], perm=free + lc)
  if len(lc) == 1:
    return x
  k = int(np.prod([shape[d] for d in lc]))
  return g.node("Reshape", [x, g.shape([shape[d] for d in free] + [k])])


def _weight_matrix(w: np.ndarray, rc: list[int]) -> np.ndarray:
  """A weight of any rank as a (contracted, kept) matrix, its contracted
  axes `rc` first, in order, then the rest."""
  keep = [d for d in range(w.ndim) if d not in rc]
  return np.transpose(w, rc + keep).reshape(
      int(np.prod([w.shape[d] for d in rc])), -1)


def _matmul(g, eqn, vals, consts) -> str | None:
  """A dot_general as one MatMul where it is one, which ONNX Runtime runs
  much faster than an Einsum: x @ W with a constant weight of any rank (its
  contracted axes merged at export, x's brought last), and a product of two
  activations with batch axes (attention's scores and weighted values),
  free and contracted axes merged. None where the symbolic batch is not a
  batch axis of the product (an Einsum then)."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lc, rc, lb, rb = list(lc), list(rc), list(lb), list(rb)
  lhs, rhs = (v.aval for v in eqn.invars)
  out = eqn.outvars[0].aval
  (lkind, x), (rkind, _) = vals
  if lkind == "tensor" and consts[1] is not None and not lb:
    w = _weight_matrix(np.asarray(consts[1]), rc)
    y = g.node("MatMul", [_contracted_last(g, x, lhs.shape, lc), g.const(w)])
    return y if rhs.ndim - len(rc) == 1 else g.node(
        "Reshape", [y, g.shape(out.shape)])
  if lkind == rkind == "tensor":
    lfree = [d for d in range(lhs.ndim) if d not in lb + lc]
    rfree = [d for d in range(rhs.ndim) if d not in rb + rc]
    sizes = [lhs.shape[d] for d in lfree + lc] + [rhs.shape[d] for d in rfree]
    if not all(isinstance(n, (int, np.integer)) for n in sizes):
      return None              # the symbolic batch is not a batch axis
    batch = [lhs.shape[d] for d in lb]

    def as_matrices(t, shape, order, rows, cols):
      """t with its axes in `order` (batch, rows, cols), rows and cols
      each merged into one."""
      if order != list(range(len(shape))):
        t = g.node("Transpose", [t], perm=order)
      if len(rows) != 1 or len(cols) != 1:
        merged = [int(np.prod([shape[d] for d in axes])) for axes in (rows, cols)]
        t = g.node("Reshape", [t, g.shape(batch + merged)])
      return t
    a = as_matrices(x, lhs.shape, lb + lfree + lc, lfree, lc)
    b = as_matrices(vals[1][1], rhs.shape, rb + rc + rfree, rc, rfree)
    y = g.node("MatMul", [a, b])
    if len(lfree) != 1 or len(rfree) != 1:
      y = g.node("Reshape", [y, g.shape(out.shape)])
    return y
  return None


def _conv_attrs(eqn) -> dict:
  p = eqn.params
  if set(p["lhs_dilation"]) != {1}:
    raise ConfigError("cannot export a transposed convolution (lhs_dilation)")
  if p.get("batch_group_count", 1) != 1:
    raise ConfigError("cannot export a convolution with batch groups")
  pads = [lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]]
  return dict(strides=list(p["window_strides"]), pads=pads,
              dilations=list(p["rhs_dilation"]),
              group=int(p["feature_group_count"]))


def _pool_view(view, shape) -> bool:
  """Whether `view` is the (n, h/2, 2, w/2, 2, c) view of an (n, h, w, c)
  `shape` that `models.max_pool_2x2` takes a max of over axes 2 and 4."""
  return (len(shape) == 4 and len(view) == 6
          and (view[2], view[4], view[5]) == (2, 2, shape[3])
          and isinstance(shape[1], int) and isinstance(shape[2], int)
          and (view[1] * 2, view[3] * 2) == tuple(shape[1:3]))


def _to_nchw(g, eqn, x):
  lhs = eqn.params["dimension_numbers"].lhs_spec
  return x if tuple(lhs) == tuple(range(len(lhs))) else g.node(
      "Transpose", [x], perm=list(lhs))


def _from_nchw(g, eqn, y):
  out = eqn.params["dimension_numbers"].out_spec
  back = list(np.argsort(out))
  return y if back == list(range(len(out))) else g.node(
      "Transpose", [y], perm=back)


def _conv(g, eqn, x, consts):
  rhs = eqn.params["dimension_numbers"].rhs_spec
  if consts[1] is None:
    raise ConfigError("cannot export a convolution whose kernel depends on "
                      "the input")
  w = g.const(np.transpose(consts[1], rhs).astype(np.float32), "kernel")
  y = g.node("Conv", [_to_nchw(g, eqn, x), w], **_conv_attrs(eqn))
  return _from_nchw(g, eqn, y)


_RULES: dict[str, Callable] = {
    **{k: _rule_binary(v) for k, v in _ELEMENTWISE.items()},
    **{k: _rule_unary(v) for k, v in _UNARY.items()},
    **{k: _rule_reduce(v) for k, v in _REDUCE.items()},
    "rsqrt": _rsqrt, "integer_pow": _integer_pow, "square": _square,
    "reshape": _reshape, "broadcast_in_dim": _broadcast_in_dim,
    "transpose": _transpose, "squeeze": _squeeze, "expand_dims": _expand_dims,
    "convert_element_type": _convert, "select_n": _select_n,
    "concatenate": _concatenate, "slice": _slice, "pad": _pad,
    "dot_general": _dot_general,
    "reduce_window_sum": _reduce_window("sum"),
    "reduce_window_max": _reduce_window("max"),
}


@dataclasses.dataclass
class _Pending:
  """An int8 convolution's output, kept in ONNX's NCHW layout, whose
  rescale waits through its bias, ReLU and max pool, as `compress.int8`
  waits (the same values: each step is non-decreasing in the sums, per
  channel). The pool runs as one MaxPool in NCHW, the rescale on a quarter
  of the values, and there is one transpose back to the model's NHWC.

  When the next int8 product reads it (`quantized`), the convolution is a
  `QLinearConv` whose uint8 output is already that product's quantized
  input (bias folded in, ReLU by the clip at zero), pooled as uint8.

  An average pool after the ReLU (flax's `avg_pool`: a window sum, then a
  division) cannot wait for the rescale, which it does not commute with:
  the sums are rescaled and pooled in NCHW (or, `quantized`, the uint8
  values are), and `avg` is the factor the pooled float values still owe.
  """
  acc: str                      # NCHW tensor: int32 sums (float once
                                # pooled), or uint8 when `quantized`
  shape: tuple                  # the NHWC shape it stands for
  scale: np.ndarray             # (channels,)
  site: int                     # the convolution's product index
  bias: np.ndarray | None = None
  relu: bool = False
  view: tuple | None = None     # a pending reshape to (n, h/2, 2, w/2, 2, c)
  pooled: bool = False
  flat: tuple | None = None     # a reshape after the transpose back
  quantized: float | None = None   # the reader's input scale
  reader: int | None = None     # the product index that reads it
  avg: float | None = None      # average pooled: the value is acc * avg
                                # (times `quantized` when quantized)


class _Emitter:
  """Walks the jaxpr: folds constant work, writes the rest as nodes."""

  def __init__(self, g: _Graph, sites: list | None,
               handoffs: dict | None = None):
    self.g = g
    self.sites = sites          # every product site of the int8 program
    self.products = 0
    self.views: dict = {}       # reshape output -> (its input, input shape)
    # convolution index -> (reader index, bias): the int8 products that read
    # a convolution's pending output (found by a first walk)
    self.handoffs = handoffs or {}
    self.found: dict = {}

  def walk(self, jaxpr, consts, args):
    env: dict = {}

    def read(v):
      return ("const", np.asarray(v.val)) if isinstance(v, jcore.Literal) \
          else env[v]

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = ("const", np.asarray(c))
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      vals = [read(v) for v in eqn.invars]
      body = tracing.call_body(eqn)
      step = None
      if any(kind == "pending" for kind, _ in vals) and body is None:
        step = self.pending_step(eqn, vals)
        if step is None and eqn.primitive.name not in tracing.PRODUCTS:
          vals = [self.settle(v) for v in vals]
      if step is not None:
        outs = [("pending", step)]
      elif all(kind == "const" for kind, _ in vals):
        outs = self.fold(eqn, [c for _, c in vals])
      elif body is not None:
        outs = self.walk(body[0], body[1], vals)
      elif eqn.primitive.name == "split":
        outs = [("tensor", piece)
                for piece in _split(self.g, eqn, self.settle(vals[0])[1])]
      else:
        outs = [self.emit(eqn, vals)]
      for v, out in zip(eqn.outvars, outs):
        env[v] = out
    return [read(v) for v in jaxpr.outvars]

  def pending_step(self, eqn, vals) -> _Pending | None:
    """The next _Pending when `eqn` (on a pending input) is one the rescale
    waits through, else None: a per-channel constant added before the ReLU,
    the ReLU, a full slice, and a 2x2 max pool (the zoo's reshape and
    max, or a reduce_window max over the spatial axes)."""
    name = eqn.primitive.name
    d = next(c for kind, c in vals if kind == "pending")
    n, channels = d.shape[0], d.shape[-1]
    # the other operand, when it is a constant
    others = [(kind, c) for kind, c in vals if c is not d]
    const = others[0][1] if len(others) == 1 and others[0][0] == "const" \
        else None
    if name in tracing.PRODUCTS or d.flat is not None:
      return None
    if d.view is not None:
      if name == "reduce_max" and tuple(eqn.params["axes"]) == (2, 4):
        return self.pool(d, [2, 2], [2, 2], tuple(eqn.outvars[0].aval.shape))
      return None
    if name == "add" and const is not None and not (d.relu or d.pooled):
      vec = tracing.channel_vector(const, channels)
      if vec is not None:
        vec = np.asarray(vec)
        return dataclasses.replace(
            d, bias=vec if d.bias is None else d.bias + vec)
    if name == "max" and const is not None and np.ndim(const) == 0 \
        and float(const) == 0.0:
      return dataclasses.replace(d, relu=True)
    if name == "slice" and tuple(eqn.params["start_indices"]) == (0,) * 4 \
        and tuple(eqn.params["limit_indices"]) == tuple(d.shape) \
        and set(eqn.params["strides"] or [1]) == {1}:
      return d
    if name == "reshape" and eqn.params.get("dimensions") is None:
      view = tuple(eqn.params["new_sizes"])
      if _pool_view(view, d.shape) and not d.pooled:
        return dataclasses.replace(d, view=view)
      if len(view) == 2 and (view[0] is n or (
          isinstance(n, int) and view[0] == n)):   # (n, h * w * c)
        return dataclasses.replace(d, flat=view)
    if d.avg is not None and name in ("div", "mul") and const is not None \
        and np.ndim(const) == 0 and float(const) > 0:
      return dataclasses.replace(
          d, avg=d.avg / float(const) if name == "div" else d.avg * float(const))
    if name in ("reduce_window_max", "reduce_window_sum") and not d.pooled:
      p = eqn.params
      window, strides = p["window_dimensions"], p["window_strides"]
      if (window[0], window[3], strides[0], strides[3]) == (1, 1, 1, 1) \
          and not any(np.ravel(p["padding"])) \
          and set(p["base_dilation"]) == set(p["window_dilation"]) == {1}:
        kernel, step = list(window[1:3]), list(strides[1:3])
        shape = tuple(eqn.outvars[0].aval.shape)
        if name == "reduce_window_max":
          return self.pool(d, kernel, step, shape)
        if d.relu:
          return self.average(d, kernel, step, shape)
    return None

  def pool(self, d: _Pending, kernel, strides, shape) -> _Pending:
    g = self.g
    x = d.acc if d.quantized else g.node("Cast", [d.acc],
                                         to=_dtype(np.float32))
    y = g.node("MaxPool", [x], kernel_shape=kernel, strides=strides)
    return dataclasses.replace(d, acc=y, shape=shape, view=None, pooled=True)

  def average(self, d: _Pending, kernel, strides, shape) -> _Pending:
    """A window sum of the ReLU's output: an AveragePool in NCHW of the
    rescaled values (of the uint8 ones, `quantized`), owing the window's
    size."""
    g = self.g
    x = (g.node("Cast", [d.acc], to=_dtype(np.float32)) if d.quantized
         else self.rescaled(d))
    y = g.node("AveragePool", [x], kernel_shape=kernel, strides=strides)
    return dataclasses.replace(d, acc=y, shape=shape, pooled=True,
                               avg=float(np.prod(kernel)))

  def rescaled(self, d: _Pending) -> str:
    """The float values of a pending int32 (or pooled float) NCHW tensor:
    scale, bias and ReLU applied."""
    g = self.g
    channel = lambda v: g.const(v.reshape(1, -1, 1, 1).astype(np.float32))
    y = d.acc if d.pooled else g.node("Cast", [d.acc], to=_dtype(np.float32))
    y = g.node("Mul", [y, channel(d.scale)])
    if d.bias is not None:
      y = g.node("Add", [y, channel(d.bias)])
    return g.node("Relu", [y]) if d.relu else y

  def settle(self, val):
    """A value as a tensor or constant: a _Pending rescaled, back in NHWC."""
    kind, d = val
    if kind != "pending":
      return val
    g = self.g
    if d.avg is not None:
      factor = np.float32(d.avg * (d.quantized or 1.0))
      return ("tensor", self.layout(d, g.node("Mul", [d.acc, g.const(factor)])))
    if d.quantized:      # read by another than its reader: dequantized
      y = g.node("Cast", [self.layout(d, self.clip_127(d.acc))],
                 to=_dtype(np.float32))
      return ("tensor", g.node("Mul", [y, g.const(np.float32(d.quantized))]))
    return ("tensor", self.layout(d, self.rescaled(d)))

  def layout(self, d: _Pending, y: str) -> str:
    """An NCHW tensor back in the layout the model reads it in."""
    g = self.g
    y = g.node("Transpose", [y], perm=[0, 2, 3, 1])
    view = d.view or d.flat
    return y if view is None else g.node("Reshape", [y, g.shape(view)])

  def clip_127(self, x: str) -> str:
    """uint8 values above 127 to 127: the reader quantizes to [0, 127]."""
    return self.g.node("Min", [x, self.g.const(np.uint8(127), "hi")])

  @staticmethod
  def fold(eqn, consts):
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
      outs = eqn.primitive.bind(*consts, **params)
    outs = outs if eqn.primitive.multiple_results else [outs]
    return [("const", np.asarray(o)) for o in outs]

  def emit(self, eqn, vals) -> tuple[str, object]:
    name = eqn.primitive.name
    g = self.g
    consts = [c if kind == "const" else None for kind, c in vals]
    if name in tracing.PRODUCTS:
      site, index = None, self.products
      if self.sites is not None:
        site, self.products = self.sites[index], index + 1
      if site is not None and site.quantized:
        return self.int8_product(eqn, index, site, vals)
      vals = [self.settle(v) for v in vals]
      if name == "conv_general_dilated":
        return ("tensor", _conv(g, eqn, vals[0][1], consts))
      product = _matmul(g, eqn, vals, consts)
      if product is not None:
        return ("tensor", product)
    if name == "gather" and vals[0][0] == "tensor" and consts[1] is not None:
      sliced = _gather_slice(g, eqn, vals[0][1], consts[1])
      if sliced is not None:
        return ("tensor", sliced)
    if name == "reduce_max" and self.sites is None:
      pooled = self.window_max(eqn, vals[0][1])
      if pooled is not None:
        return ("tensor", pooled)
    rule = _RULES.get(name)
    if rule is None:
      raise ConfigError(f"cannot export the primitive {name!r} to ONNX (no "
                        "rule for it); export --format stablehlo runs any "
                        "jax program")
    if name in _ELEMENTWISE:
      consts = [None if c is None else _ranked(c, eqn.outvars[0].aval.ndim)
                for c in consts]
    out = rule(g, eqn, [c if kind == "tensor" else g.const(k)
                        for (kind, c), k in zip(vals, consts)])
    if name == "reshape" and vals[0][0] == "tensor":
      self.views[out] = (vals[0][1], eqn.invars[0].aval.shape)
    return ("tensor", out)

  def window_max(self, eqn, x: str) -> str | None:
    """A 2x2, stride-2 max pool written as a reshape of (n, h, w, c) to
    (n, h/2, 2, w/2, 2, c) and a max over axes 2 and 4 (as
    `models.max_pool_2x2` writes it) becomes one MaxPool in a float graph,
    where ONNX Runtime runs it in the blocked layout of the convolution
    before it: the zoo CNN at batch 1024, 75 -> 64 ms. (An int8 graph
    pools a convolution's sums before their rescale: `_Pending`.)"""
    if x not in self.views or tuple(eqn.params["axes"]) != (2, 4):
      return None
    source, shape = self.views[x]
    if not _pool_view(eqn.invars[0].aval.shape, shape):
      return None
    g = self.g
    y = g.node("MaxPool", [g.node("Transpose", [source], perm=[0, 3, 1, 2])],
               kernel_shape=[2, 2], strides=[2, 2])
    return g.node("Transpose", [y], perm=[0, 2, 3, 1])

  def int8_product(self, eqn, index, site, vals) -> tuple[str, object]:
    g = self.g
    kind, act = vals[1 - site.weight_side]
    s = np.float32(site.input_scale)
    dense = site.kind != "conv_general_dilated"
    matrix = None        # a product of another shape: x and W as matrices
    if dense:
      (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
      lhs_nd = eqn.invars[0].aval.ndim
      if site.weight_side != 1 or lb:
        raise ConfigError(f"cannot export the int8 product of {site.name} "
                          "to ONNX (only x @ W, W a weight of any rank, with "
                          "no batch dimensions)")
      if not (list(lc) == [lhs_nd - 1] and list(rc) == [0]
              and site.values.ndim == 2):
        matrix = (list(lc), list(rc))
        if kind == "pending":
          vals = [self.settle(v) for v in vals]
          kind, act = vals[0]
    # round(x / s) clipped to [-127, 127], as compress.int8 computes it,
    # plus the zero point 128 (QuantizeLinear alone would saturate at
    # -128); an input never negative in calibration is clipped to [0, 127]
    # with zero point 0.
    zero = 0 if site.unsigned else 128
    zp = g.const(np.uint8(zero), "zero_point")
    if kind == "pending" and act.reader == index:
      q = act.acc
      if act.avg is not None:   # average pooled uint8 values, rounded
        q = g.node("QuantizeLinear", [q, g.const(np.float32(1 / act.avg)),
                                      g.const(np.uint8(0), "zero_point")])
      q = self.layout(act, self.clip_127(q))
    else:
      if kind == "pending":
        if site.unsigned:
          self.found[act.site] = (index, act.bias)
        act = self.settle((kind, act))[1]
      q = g.node("QuantizeLinear", [act, g.const(s, "input_scale"), zp])
      q = g.node("Clip", [q, g.const(np.uint8(zero - (not site.unsigned) * 127),
                                     "lo"),
                          g.const(np.uint8(zero + 127), "hi")])
    # int8 weights plus 128 as uint8, zero point 128: u8 x u8 products
    # equal the int8 x int8 ones.
    shifted = (site.values.astype(np.int16) + 128).astype(np.uint8)
    w_zp = g.const(np.uint8(128), "zero_point")
    if not dense:
      return self.int8_conv(eqn, index, site, q, zp, shifted, w_zp)
    if matrix is not None:
      return self.int8_matrix_product(eqn, site, q, zp, shifted, w_zp, *matrix)
    if site.unsigned:
      # A dense layer on an unsigned input multiplies it by the int8
      # weights: ONNX Runtime's u8 x s8 kernel is 2.3x faster than u8 x u8
      # here (1024x784 @ 784x300: 0.29 vs 0.66 ms) and exact while the u8
      # values stay below 128 (its int16 pair sums cannot overflow).
      acc = g.node("MatMulInteger", [q, g.const(site.values, "kernel_int8"),
                                     zp, g.const(np.int8(0), "zero_point")])
    else:
      acc = g.node("MatMulInteger", [q, g.const(shifted, "kernel_int8"),
                                     zp, w_zp])
    out = g.node("Cast", [acc], to=_dtype(np.float32))
    scale = _ranked((s * site.weight_scale).astype(np.float32),
                    eqn.outvars[0].aval.ndim)
    return ("tensor", g.node("Mul", [out, g.const(scale, "scale")]))

  def int8_matrix_product(self, eqn, site, q, zp, shifted, w_zp, lc, rc):
    """x @ W for a weight of any rank (an attention projection's 3-D
    kernel): the contracted axes of both brought last and first and merged,
    one MatMulInteger, the result reshaped to the product's shape."""
    g = self.g
    q = _contracted_last(g, q, eqn.invars[0].aval.shape, lc)
    as_matrix = lambda w: _weight_matrix(w, rc)
    if site.unsigned:
      acc = g.node("MatMulInteger", [q, g.const(as_matrix(site.values),
                                                "kernel_int8"),
                                     zp, g.const(np.int8(0), "zero_point")])
    else:
      acc = g.node("MatMulInteger", [q, g.const(as_matrix(shifted),
                                                "kernel_int8"), zp, w_zp])
    out = eqn.outvars[0].aval
    y = g.node("Reshape", [g.node("Cast", [acc], to=_dtype(np.float32)),
                           g.shape(out.shape)])
    scale = _ranked((np.float32(site.input_scale) * site.weight_scale)
                    .astype(np.float32), out.ndim)
    return ("tensor", g.node("Mul", [y, g.const(scale, "scale")]))

  def int8_conv(self, eqn, index, site, q, zp, shifted, w_zp):
    """ConvInteger (u8 x u8), its int32 sums pending; or, when the next
    int8 product reads the output (a first walk found it) and the input is
    unsigned, a QLinearConv (u8 x s8) requantizing to that product's input
    scale: the zoo CNN's second layer at batch 1024 took 28 ms, against
    92 ms as ConvInteger and 64 ms as a float Conv."""
    g = self.g
    s = np.float32(site.input_scale)
    rhs = eqn.params["dimension_numbers"].rhs_spec
    out = eqn.outvars[0].aval
    nhwc = (eqn.params["dimension_numbers"].out_spec == (0, 3, 1, 2)
            and out.dtype == np.float32)
    pending = _Pending("", tuple(out.shape),
                       (s * site.weight_scale).reshape(-1), index)
    x = _to_nchw(g, eqn, q)
    handoff = self.handoffs.get(index)
    if handoff is not None and site.unsigned and nhwc:
      reader, bias = handoff
      channels = pending.scale.shape[0]
      b = np.zeros(channels) if bias is None else bias / pending.scale
      y_scale = np.float32(self.sites[reader].input_scale)
      acc = g.node("QLinearConv", [
          x, g.const(s, "input_scale"), zp,
          g.const(np.transpose(site.values, rhs), "kernel_int8"),
          g.const(site.weight_scale.reshape(-1).astype(np.float32),
                  "weight_scale"),
          g.const(np.zeros(channels, np.int8), "zero_point"),
          g.const(y_scale, "output_scale"), g.const(np.uint8(0), "zero_point"),
          g.const(np.round(b).astype(np.int32), "bias_int32")],
                   **_conv_attrs(eqn))
      return ("pending", dataclasses.replace(
          pending, acc=acc, quantized=float(y_scale), reader=reader))
    acc = g.node("ConvInteger", [x, g.const(np.transpose(shifted, rhs),
                                            "kernel_int8"), zp, w_zp],
                 **_conv_attrs(eqn))
    if nhwc:     # NHWC out: the rescale waits
      return ("pending", dataclasses.replace(pending, acc=acc))
    acc = g.node("Cast", [_from_nchw(g, eqn, acc)], to=_dtype(np.float32))
    scale = _ranked(pending.scale.reshape(site.weight_scale.shape),
                    out.ndim).astype(np.float32)
    return ("tensor", g.node("Mul", [acc, g.const(scale, "scale")]))


def build(model, variables: dict, *, input_shape, prepare=None,
          program=None, metadata: dict | None = None):
  """The ONNX ModelProto of the model's eval forward pass; `prepare` (the
  run's normalization, a jax function) runs on the inputs first."""
  onnx = _onnx()
  helper = onnx.helper
  traced = tracing.forward_pass(model, variables, prepare=prepare)
  trace, leaves = traced.trace, traced.leaves
  batch, = jax.export.symbolic_shape("batch")
  jaxpr, consts = trace(jax.ShapeDtypeStruct((batch, *input_shape),
                                             np.float32))
  args = [("const", np.asarray(a)) for a in leaves] + [("tensor", INPUT)]
  sites = program.all_sites if program is not None else None
  handoffs = None
  if sites is not None:    # a first walk finds which products read which conv
    first = _Emitter(_Graph(batch, keep_weights=False), sites)
    first.walk(jaxpr, consts, args)
    handoffs = first.found
  g = _Graph(batch)
  emitter = _Emitter(g, sites, handoffs)
  (kind, out), = [emitter.settle(v) for v in emitter.walk(jaxpr, consts, args)]
  if kind == "const":
    raise ConfigError("the model's output does not depend on its input")
  g.nodes.append(helper.make_node("Identity", [out], [OUTPUT]))
  classes = jaxpr.outvars[0].aval.shape[-1]
  # Constants made for a form the emitter then did not take (a zero point
  # of a product it wrote another way) are left out of the file.
  used = {name for node in g.nodes for name in node.input}
  g.inits = [t for t in g.inits if t.name in used]
  graph = helper.make_graph(
      g.nodes, "jaxaccel",
      [helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT,
                                     ["batch", *input_shape])],
      [helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT,
                                     ["batch", int(classes)])],
      g.inits)
  proto = helper.make_model(graph, producer_name="jaxaccel",
                            opset_imports=[helper.make_opsetid("", OPSET)])
  proto.ir_version = min(proto.ir_version, 10)
  if metadata:
    helper.set_model_props(proto, {"jaxaccel": json.dumps(metadata)})
  onnx.checker.check_model(proto, full_check=True)
  return proto


def session(data: bytes, threads: int | None = None):
  """An ONNX Runtime session on the CPU."""
  try:
    import onnxruntime as ort
  except ImportError:
    raise ConfigError("running an ONNX artifact needs onnxruntime: pip "
                      "install 'jaxaccel[export]'") from None
  options = ort.SessionOptions()
  options.log_severity_level = 3
  if threads:
    options.intra_op_num_threads = threads
  return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def header(path: pathlib.Path, raw: bytes) -> dict:
  """The jaxaccel header of an ONNX file written by `write`; a DataError
  for any other file."""
  onnx = _onnx()
  try:
    proto = onnx.load_model_from_string(raw)
  except Exception:
    proto = None
  props = {p.key: p.value for p in proto.metadata_props} if proto else {}
  if not proto or not proto.graph.node or "jaxaccel" not in props:
    raise DataError(f"{path} is not an artifact of `jaxaccel export` (neither "
                    "StableHLO nor ONNX with jaxaccel's header); export the "
                    "run again")
  return json.loads(props["jaxaccel"])


def runner(raw: bytes) -> Callable[[np.ndarray], np.ndarray]:
  """Logits of raw inputs through ONNX Runtime."""
  sess = session(raw)
  return lambda x: sess.run([OUTPUT], {INPUT: x})[0]
