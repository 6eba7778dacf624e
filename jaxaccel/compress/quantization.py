"""Quantization: QArray leaves, post-training quantization, fake quantization
with a straight-through gradient, and quantization-aware training. Integer
inference for any model is `compress.int8`.

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
from typing import Any, Callable

import jax
import jax.numpy as jnp

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
