"""Quantization: QArray leaves, post-training quantization, fake quantization
with a straight-through gradient, and a real int8 inference path.

`quantize` maps a params pytree to the same tree with `QArray` leaves
(integers + scale, optional zero point); `dequantize` maps it back. Symmetric
and pow2 schemes map 0 to 0, so pruned weights stay pruned.

Examples:
  >>> import jax.numpy as jnp
  >>> from jaxaccel.compress import quantization as q
  >>> params = {"w": jnp.array([[0.5, -1.0], [0.0, 0.25]])}
  >>> qp = q.quantize(params, bits=8, granularity="tensor")
  >>> qp["w"].values.tolist()
  [[64, -127], [0, 32]]
  >>> qp["w"].nbytes, params["w"].nbytes
  (8, 16)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxaccel.compress.pruning import leaf_names
from jaxaccel.errors import ConfigError
from jaxaccel.models import ModelAdapter, adapt

PyTree = Any
BITS = (4, 8)
GRANULARITIES = ("tensor", "channel")
SCHEMES = ("symmetric", "asymmetric", "pow2")


@jax.tree_util.register_pytree_node_class
class QArray:
  """A quantized array: integer `values`, float32 `scale`, optional `zero_point`.

  The real number is `(values - zero_point) * scale`. `scale` and
  `zero_point` broadcast against `values` (one per tensor or per output
  channel). Values are held in int8 (uint8 for asymmetric); 4-bit values
  are stored two per byte, which `nbytes` counts.
  """

  def __init__(self, values, scale, zero_point=None, *, bits: int = 8):
    self.values = values
    self.scale = scale
    self.zero_point = zero_point
    self.bits = bits

  def tree_flatten(self):
    return (self.values, self.scale, self.zero_point), self.bits

  @classmethod
  def tree_unflatten(cls, bits, children):
    return cls(*children, bits=bits)

  @property
  def shape(self):
    return self.values.shape

  @property
  def nbytes(self) -> int:
    """Bytes of the stored encoding: packed values, scales, zero points."""
    values = math.ceil(self.values.size * self.bits / 8)
    scale = self.scale.size * 4
    zero = 0 if self.zero_point is None else math.ceil(
        self.zero_point.size * self.bits / 8)
    return values + scale + zero

  def dequantize(self) -> jax.Array:
    v = self.values.astype(jnp.float32)
    if self.zero_point is not None:
      v = v - self.zero_point.astype(jnp.float32)
    return v * self.scale

  def __repr__(self):
    return (f"QArray(shape={tuple(self.shape)}, bits={self.bits}, "
            f"scale_shape={tuple(self.scale.shape)}, "
            f"zero_point={self.zero_point is not None})")


def is_qarray(x) -> bool:
  return isinstance(x, QArray)


def _check_options(bits, granularity, scheme):
  if bits not in BITS:
    raise ConfigError(f"unsupported bit width {bits!r}: use 8 or 4")
  if granularity not in GRANULARITIES:
    raise ConfigError(f"unknown granularity {granularity!r}: use tensor or "
                      "channel")
  if scheme not in SCHEMES:
    raise ConfigError(f"unknown quantization scheme {scheme!r}: use symmetric, "
                      "asymmetric or pow2")


def _reduce_axes(x, granularity):
  """Axes a scale is shared over: all, or all but the output channel."""
  if granularity == "channel" and x.ndim >= 2:
    return tuple(range(x.ndim - 1))
  return tuple(range(x.ndim))


def symmetric_scale(x: jax.Array, bits: int, granularity: str = "tensor",
                    *, pow2: bool = False) -> jax.Array:
  """max|x| / qmax per tensor or channel (a power of two with `pow2`)."""
  qmax = 2 ** (bits - 1) - 1
  amax = jnp.max(jnp.abs(x), axis=_reduce_axes(x, granularity), keepdims=True)
  amax = jnp.where(amax > 0, amax, 1.0).astype(jnp.float32)
  if pow2:
    return 2.0 ** jnp.ceil(jnp.log2(amax / qmax))
  return amax / qmax


def quantize_array(x: jax.Array, *, bits: int = 8, granularity: str = "channel",
                   scheme: str = "symmetric", name: str = "array") -> QArray:
  """Quantizes one floating array (see `quantize`)."""
  _check_options(bits, granularity, scheme)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ConfigError(f"cannot quantize {name}: it holds {x.dtype} values, not "
                      "floats; quantize only floating leaves (use include=...)")
  x = x.astype(jnp.float32)
  if scheme == "asymmetric":
    levels = 2 ** bits - 1
    axes = _reduce_axes(x, granularity)
    lo = jnp.minimum(jnp.min(x, axis=axes, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=axes, keepdims=True), 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
    zero = jnp.clip(jnp.round(-lo / scale), 0, levels)
    values = jnp.clip(jnp.round(x / scale) + zero, 0, levels)
    return QArray(values.astype(jnp.uint8), scale, zero.astype(jnp.uint8),
                  bits=bits)
  qmax = 2 ** (bits - 1) - 1
  scale = symmetric_scale(x, bits, granularity, pow2=scheme == "pow2")
  values = jnp.clip(jnp.round(x / scale), -qmax, qmax)
  return QArray(values.astype(jnp.int8), scale, bits=bits)


def _default_include(name: str, leaf) -> bool:
  del name
  return leaf.ndim >= 1


def quantize(params: PyTree, *, bits: int = 8, granularity: str = "channel",
             scheme: str = "symmetric",
             include: Callable[[str, jax.Array], bool] | None = None) -> PyTree:
  """Post-training quantization of a params pytree.

  Args:
    params: floating leaves (a non-float leaf is an error).
    bits: 8 or 4.
    granularity: "tensor" (one scale) or "channel" (one per output channel,
      the last axis of kernels).
    scheme: "symmetric" (zero-preserving, values in [-qmax, qmax]),
      "asymmetric" (unsigned values with a zero point), or "pow2"
      (w_q = round(w / 2^p) * 2^p: the scale is a power of two).
    include: `(name, leaf) -> bool`, which leaves to quantize (default: all
      but scalars); the others stay float.

  Returns:
    The params tree with `QArray` leaves where quantized.
  """
  _check_options(bits, granularity, scheme)
  include = include or _default_include
  names = leaf_names(params)
  leaves, treedef = jax.tree.flatten(params)
  flags = []
  for name, x in zip(names, leaves):
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      raise ConfigError(f"cannot quantize leaf {name}: it holds {x.dtype} "
                        "values, not floats; pass floating params only")
    flags.append(bool(include(name, x)))

  # One compiled program for all leaves: leaf by leaf, a model with many
  # layers would spend seconds dispatching small operations.
  def run(leaves):
    return [quantize_array(x, bits=bits, granularity=granularity,
                           scheme=scheme, name=name) if keep else x
            for name, x, keep in zip(names, leaves, flags)]
  return jax.tree.unflatten(treedef, jax.jit(run)(leaves))


@jax.jit
def dequantize(tree: PyTree) -> PyTree:
  """Replaces every `QArray` leaf by its float32 value."""
  return jax.tree.map(lambda x: x.dequantize() if is_qarray(x) else x, tree,
                      is_leaf=is_qarray)


def pack_int4(values: jax.Array) -> jax.Array:
  """Two signed 4-bit values per byte (low nibble first), as uint8."""
  v = jnp.asarray(values, jnp.int8).ravel()
  if v.size % 2:
    v = jnp.concatenate([v, jnp.zeros(1, jnp.int8)])
  nib = (v.astype(jnp.uint8) & 0x0F).reshape(-1, 2)
  return nib[:, 0] | (nib[:, 1] << 4)


def unpack_int4(packed: jax.Array, shape) -> jax.Array:
  """Inverse of `pack_int4`."""
  packed = jnp.asarray(packed, jnp.uint8)
  nib = jnp.stack([packed & 0x0F, packed >> 4], axis=1).ravel().astype(jnp.int8)
  signed = jnp.where(nib >= 8, nib - 16, nib).astype(jnp.int8)
  return signed[:math.prod(shape)].reshape(shape)


# ------------------------------------------------ fake quantization (QAT)

@jax.custom_vjp
def _round_clip_ste(x, qmax):
  return jnp.clip(jnp.round(x), -qmax, qmax)


def _ste_fwd(x, qmax):
  return _round_clip_ste(x, qmax), (x, qmax)


def _ste_bwd(res, g):
  x, qmax = res
  # Straight through where rounding alone decides, zero where clipped.
  return (jnp.where(jnp.abs(x) <= qmax + 0.5, g, 0.0), None)


_round_clip_ste.defvjp(_ste_fwd, _ste_bwd)


def fake_quantize(x: jax.Array, *, bits: int = 8, granularity: str = "channel",
                  scheme: str = "symmetric") -> jax.Array:
  """Quantize-dequantize in float, with a straight-through gradient.

  Forward: `dequantize(quantize_array(x))` for the symmetric and pow2
  schemes. Backward: the identity where x is representable (the rounding is
  skipped), so training sees the quantized weights and still moves them.
  """
  _check_options(bits, granularity, scheme)
  if scheme == "asymmetric":
    raise ConfigError("fake quantization supports the symmetric and pow2 "
                      "schemes; use scheme='symmetric'")
  qmax = 2 ** (bits - 1) - 1
  scale = jax.lax.stop_gradient(
      symmetric_scale(x, bits, granularity, pow2=scheme == "pow2"))
  return _round_clip_ste(x / scale, float(qmax)) * scale


def fake_quantize_params(params: PyTree, *, bits: int = 8,
                         granularity: str = "channel",
                         scheme: str = "symmetric",
                         include: Callable | None = None) -> PyTree:
  """`fake_quantize` on every leaf `quantize` would quantize."""
  include = include or _default_include
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [
      fake_quantize(x, bits=bits, granularity=granularity, scheme=scheme)
      if include(n, x) else x
      for n, x in zip(leaf_names(params), leaves)])


@dataclasses.dataclass(frozen=True)
class QuantAwareModel(ModelAdapter):
  """Wraps a model so every forward pass uses fake-quantized params.

  It is a model like any other, so quantization-aware training is
  `fit(QuantAwareModel(model), tx, data, ...)` for any model kind. After
  training, `quantize(params, ...)` with the same options gives exactly the
  weights the model was trained with.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jaxaccel import models
    >>> qat = QuantAwareModel(models.create("mlp", num_classes=3, widths=(4,)))
    >>> params, state = qat.init(jax.random.key(0), jnp.ones((1, 5)))
    >>> qat.apply(params, state, jnp.ones((2, 5)), train=False)[0].shape
    (2, 3)
  """
  model: Any
  bits: int = 8
  granularity: str = "channel"
  scheme: str = "symmetric"

  def __post_init__(self):
    _check_options(self.bits, self.granularity, self.scheme)

  @property
  def module(self):
    return adapt(self.model).module

  def init(self, key, sample):
    return adapt(self.model).init(key, sample)

  def apply(self, params, model_state, x, *, train, rng=None):
    params = fake_quantize_params(params, bits=self.bits,
                                  granularity=self.granularity,
                                  scheme=self.scheme)
    return adapt(self.model).apply(params, model_state, x, train=train, rng=rng)

  def with_batch_axis(self, axis_name):
    return dataclasses.replace(
        self, model=adapt(self.model).with_batch_axis(axis_name))


# ------------------------------------------------------ int8 inference path

def _dense_layers(params: PyTree) -> list[str]:
  """Names Dense_0..Dense_k of an MLP's params, checked."""
  return mlp_layer_names(params, "the int8 path runs MLPs (Dense_0..Dense_k "
                                 "layers with kernel and bias)")


def mlp_layer_names(params: PyTree, requirement: str) -> list[str]:
  """Names Dense_0..Dense_k of an MLP's params, in order; a ConfigError
  starting with `requirement` when params are not such an MLP."""
  names = sorted((k for k in params if k.startswith("Dense_")),
                 key=lambda k: int(k.split("_")[1]))
  if not names or set(params) != set(names) or any(
      set(params[n]) != {"kernel", "bias"} or len(params[n]["kernel"].shape) != 2
      for n in names):
    raise ConfigError(f"{requirement}; got layers {sorted(params)}")
  return names


def mlp_activations(params: PyTree, x: jax.Array) -> list[jax.Array]:
  """The float input of every Dense layer of an MLP, for calibration."""
  names = _dense_layers(params)
  h = x.reshape(x.shape[0], -1).astype(jnp.float32)
  inputs = []
  for i, name in enumerate(names):
    inputs.append(h)
    h = h @ params[name]["kernel"] + params[name]["bias"]
    if i < len(names) - 1:
      h = jax.nn.relu(h)
  return inputs


def calibration_batches(x: np.ndarray, *, examples: int = 5000,
                        batch_size: int = 1000) -> list[np.ndarray]:
  """The first `examples` inputs of x in batches: what `calibrate` reads."""
  return [x[i:i + batch_size]
          for i in range(0, min(examples, len(x)), batch_size)]


def calibrate(params: PyTree, batches: Iterable, *, bits: int = 8,
              percentile: float = 99.99) -> list:
  """Activation scales for the int8 path, from a few batches of inputs.

  Each Dense layer's input range is the `percentile` of |input| (averaged
  over batches), divided by 127. A high percentile rather than the maximum
  keeps rare outliers (standardized pixels that are almost always zero reach
  150) from wasting the 8 bits; they are clipped instead.

  Args:
    params: float params of an MLP.
    batches: an iterable of input arrays.
    bits: 8 (the integer path runs int8 activations).
    percentile: in (0, 100]; 100 takes the maximum.
  """
  if bits != 8:
    raise ConfigError(f"the integer inference path runs int8 activations; "
                      f"got bits={bits}")
  if not 0.0 < percentile <= 100.0:
    raise ConfigError(f"calibration percentile must lie in (0, 100]; got "
                      f"{percentile}")
  fn = jax.jit(lambda p, x: [jnp.percentile(jnp.abs(a), percentile)
                             for a in mlp_activations(p, x)])
  ranges = [fn(params, jnp.asarray(xb)) for xb in batches]
  if not ranges:
    raise ConfigError("calibration got no batches; give at least one")
  amax = [sum(r[i] for r in ranges) / len(ranges) for i in range(len(ranges[0]))]
  return [jnp.where(a > 0, a, 1.0).astype(jnp.float32) / 127.0 for a in amax]


def _quantize_activation(h, scale):
  # times the reciprocal: a division per element costs the int8 path 3%
  return jnp.clip(jnp.round(h * (1.0 / scale)), -127, 127).astype(jnp.int8)


def int8_layers(qparams: PyTree, act_scales: list) -> list[dict]:
  """The int8 path's layers, laid out as it runs them.

  Each kernel's int8 values are transposed once to [out, in], and the two
  scales that rescale its int32 sums are folded into one per output channel.
  Activations flow feature-major ([features, batch]): XLA:CPU's int8 matmul
  runs 1.2x faster with the weights on the left than on the right (1024 x
  784 x 300: 0.80 ms vs 0.99 ms on the 2-core development machine).

  Args:
    qparams: `quantize(params, bits=8, scheme="symmetric")` of an MLP (the
      kernels as QArray; biases float or QArray).
    act_scales: `calibrate(params, batches)`, one per Dense layer.
  """
  names = _dense_layers(qparams)
  if len(act_scales) != len(names):
    raise ConfigError(f"the int8 path needs one activation scale per Dense "
                      f"layer: {len(names)} layers, {len(act_scales)} scales")
  layers = []
  for name, s in zip(names, act_scales):
    w, b = qparams[name]["kernel"], qparams[name]["bias"]
    if not is_qarray(w) or w.bits != 8 or w.zero_point is not None:
      raise ConfigError(f"the int8 path needs symmetric int8 kernels; layer "
                        f"{name} holds {w!r}")
    s = jnp.asarray(s, jnp.float32)
    layers.append({
        "kernel": jnp.asarray(w.values).T,
        "in_scale": s,
        "out_scale": (s * w.scale.reshape(-1)).astype(jnp.float32),
        "bias": jnp.asarray(b.dequantize() if is_qarray(b) else b, jnp.float32)})
  # Between layers, rescale, bias, ReLU and requantization are one
  # multiply-add and a clip: relu(acc * o + b) / s' = max(acc * o/s' + b/s', 0).
  for layer, nxt in zip(layers, layers[1:]):
    layer["requant_scale"] = layer["out_scale"] / nxt["in_scale"]
    layer["requant_bias"] = layer["bias"] / nxt["in_scale"]
  return layers


# From this batch size on, the layers after the first run as two independent
# halves of the batch: XLA:CPU runs the first (large) matmul on every core
# but the later, small ones on one core each, so two halves run side by side
# (LeNet-300-100 at batch 1024: 5% faster on the 2-core development machine).
_SPLIT_FROM_BATCH = 256


def _batch_halves(a: jax.Array) -> list[jax.Array]:
  """[features, batch] as two halves of the batch when it is large."""
  n = a.shape[1]
  return [a[:, :n // 2], a[:, n // 2:]] if n >= _SPLIT_FROM_BATCH else [a]


def int8_forward(layers: list[dict], x: jax.Array) -> jax.Array:
  """Logits of `int8_layers` on float inputs x: int8 x int8 -> int32 matmuls;
  between layers the int32 sums are rescaled, biased, rectified and
  requantized to int8 in one step; the last layer's are rescaled to float."""
  h = x.reshape(x.shape[0], -1).astype(jnp.float32)
  hq = _quantize_activation(h, layers[0]["in_scale"])       # [batch, in]
  acc = _int8_dot(layers[0], hq, act_dim=1)                 # [out, batch]
  return jnp.concatenate([_int8_rest(layers, a) for a in _batch_halves(acc)],
                         axis=1).T


def _int8_dot(layer: dict, hq: jax.Array, act_dim: int) -> jax.Array:
  return jax.lax.dot_general(layer["kernel"], hq, (((1,), (act_dim,)), ((), ())),
                             preferred_element_type=jnp.int32).astype(jnp.float32)


def _int8_rest(layers: list[dict], acc: jax.Array) -> jax.Array:
  """From the first layer's int32 sums (as float) to the logits, [out, batch]."""
  for layer, nxt in zip(layers, layers[1:]):
    hq = jnp.clip(jnp.round(acc * layer["requant_scale"][:, None]
                            + layer["requant_bias"][:, None]),
                  0, 127).astype(jnp.int8)                  # [in, batch]
    acc = _int8_dot(nxt, hq, act_dim=0)
  last = layers[-1]
  return acc * last["out_scale"][:, None] + last["bias"][:, None]


def feature_major_float(params: PyTree) -> Callable:
  """The float32 MLP computed as the int8 path runs (kernels transposed to
  [out, in], activations [features, batch], the later layers on two halves
  of a large batch): the float reference that separates what int8 gains
  from what the layout and schedule gain."""
  names = _dense_layers(params)
  layers = [(jnp.asarray(params[n]["kernel"]).T, jnp.asarray(params[n]["bias"]))
            for n in names]
  dot = lambda k, h, act_dim: jax.lax.dot_general(k, h, (((1,), (act_dim,)),
                                                         ((), ())))

  def rest(h):
    for k, b in layers[1:]:
      h = dot(k, jax.nn.relu(h), 0) + b[:, None]
    return h

  @jax.jit
  def forward(x):
    k, b = layers[0]
    h = dot(k, x.reshape(x.shape[0], -1).astype(jnp.float32), 1) + b[:, None]
    return jnp.concatenate([rest(a) for a in _batch_halves(h)], axis=1).T

  return forward


def int8_mlp(qparams: PyTree, act_scales: list) -> Callable:
  """The int8 path as a jitted function of the inputs: the layers are laid
  out once (`int8_layers`), not at every call, and compiled in as constants,
  as a float model's weights are when its apply closes over them (LeNet-300-
  100 at batch 1024: 5% faster than passing them as arguments, on the 2-core
  development machine)."""
  layers = int8_layers(qparams, act_scales)
  return jax.jit(lambda x: int8_forward(layers, x))


def int8_mlp_apply(qparams: PyTree, act_scales: list, x: jax.Array) -> jax.Array:
  """MLP logits with int8 x int8 -> int32 matmuls, rescaled to float: the
  pure form of `int8_mlp` (it lays the layers out at every call).

  Args:
    qparams: `quantize(params, bits=8, scheme="symmetric")` of an MLP (the
      kernels as QArray; biases float or QArray).
    act_scales: `calibrate(params, batches)`.
    x: float inputs.
  """
  return int8_forward(int8_layers(qparams, act_scales), x)


def predict_int8(qparams: PyTree, act_scales: list, x: np.ndarray, *,
                 batch_size: int = 1024) -> np.ndarray:
  """Logits of the int8 path over x in batches, as numpy."""
  fn = int8_mlp(qparams, act_scales)
  outs = [np.asarray(fn(jnp.asarray(x[i:i + batch_size])))
          for i in range(0, len(x), batch_size)]
  return np.concatenate(outs)
