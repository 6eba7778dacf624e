"""`jaxaccel bench`: side-by-side figures against the peers a user would pick.

Every figure comes from this process run, peers measured beside jaxaccel on
the same model, batch, optimizer and data:

* jaxaccel: `fit` itself (one compiled `lax.scan` per epoch);
* plain_jax: the loop a JAX user writes by hand: `jit` + `lax.scan` over a
  shuffled epoch, flax `apply`, `optax.adam`;
* torch: PyTorch eager on the CPU (the optional `bench` extra).

Achieved GFLOP/s (XLA's own count of the step's FLOPs, times steps/s) is
set against this machine's measured float32 matmul rate: the practical
roofline of a CPU.

One module per suite (`train`, `sweep`, `compress`, `parallel`, `deploy`,
`lm`), what they share in `common`, and the peers (PyTorch, qwix) in
`peers`, imported only when a suite runs them. Nothing in the library
imports this package; `jaxaccel bench` does, on demand.
"""

from jaxaccel.bench.common import (BATCH, bench_data, interleaved_ms,
                                   matmul_gflops, step_flops, torch_available)
from jaxaccel.bench.compress import (MLP_RECIPES, format_compress_report,
                                     run_compress_suite)
from jaxaccel.bench.parallel import format_parallel_report, run_parallel_suite
from jaxaccel.bench.sweep import format_sweep_report, run_sweep_suite
from jaxaccel.bench.train import format_train_report, run_train_suite

__all__ = ["BATCH", "MLP_RECIPES", "bench_data", "format_compress_report",
           "format_parallel_report", "format_sweep_report",
           "format_train_report", "interleaved_ms", "matmul_gflops",
           "run_compress_suite", "run_parallel_suite", "run_sweep_suite",
           "run_train_suite", "step_flops", "torch_available"]
