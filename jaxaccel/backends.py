"""The one place for jaxaccel's choices for XLA:CPU, and the switch that
applies them.

On the CPU, XLA runs some formulations of the zoo's layers much faster than
the plain ones (docs/performance.md, "Layer formulations on XLA:CPU"): a
convolution whose gradient is written out as NHWC convolutions (by phases
for strides, an im2col matmul for a small kernel), a bias whose gradient is
a product with a vector of ones, a 2x2 max pool whose gradient is one
elementwise pass. They are workarounds for XLA:CPU: on a GPU or TPU the
zoo's layers take the plain flax formulation and the backend's own
convolution gradients.

`formulation()` says which applies: under "auto" (the default) the CPU's
when `jax.default_backend()` is the CPU, the plain one elsewhere; `use`
sets it for a block of code, for instance to lower a train step for a GPU
from a CPU machine. Both formulations compute the same values and
gradients (tested).

Examples:
  >>> from jaxaccel import backends
  >>> backends.formulation()      # on a CPU
  'cpu'
  >>> with backends.use("plain"):
  ...   backends.formulation()
  'plain'
"""

from __future__ import annotations

import contextlib

import jax

CHOICES = ("auto", "cpu", "plain")

# Compiler options for jaxaccel's own programs on the CPU: no YNNPACK
# fusions. Eigen's kernels were faster for every shape the models train
# with (a 32->64 3x3 convolution's filter gradient: 16.2 against 72.7 ms).
CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# Programs that run once (a linen model's init): without LLVM's passes a
# small ResNet's initializer compiled in 1.9 s instead of 8 s.
RUN_ONCE = {"xla_backend_optimization_level": 0}
# A convolution with fewer inputs per output (kh * kw * c_in) than this
# takes its kernel gradient as an im2col matmul (training), and its int8
# form as int32 multiply-adds of shifted windows (inference).
SMALL_KERNEL_INPUTS = 32

_choice = "auto"


def formulation() -> str:
  """"cpu" (the XLA:CPU formulations) or "plain" (flax's), as chosen."""
  if _choice == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "plain"
  return _choice


@contextlib.contextmanager
def use(choice: str):
  """Within the block, the zoo's layers take `choice`'s formulation
  ("cpu", "plain" or "auto"). It applies when a model is traced: jit or
  lower inside the block."""
  global _choice
  if choice not in CHOICES:
    from jaxaccel.errors import ConfigError
    raise ConfigError(f"unknown formulation {choice!r}; choose one of "
                      f"{', '.join(CHOICES)}")
  before, _choice = _choice, choice
  try:
    yield
  finally:
    _choice = before
