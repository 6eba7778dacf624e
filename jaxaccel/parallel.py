"""Devices: meshes, placing state and batches, compiling the one train step,
multi-process start-up.

This is the only module that knows about devices. `fit` hands every epoch,
whatever `parallel=` says, to an `Engine` built here around the one train
step of `jaxaccel.core`:

* "none": one device, `jax.jit`;
* "pmap": `jax.pmap` over the local devices; each global batch is split
  along a leading device axis and gradients, batch-norm statistics and
  metrics are averaged with `lax.pmean` over the named axis "data";
* "sharded": `jax.jit` over a `Mesh`. The batch is split over the mesh axis
  "data"; the state is replicated, or split by rules on parameter paths:
  dense kernels over a second axis "model" (tensor parallelism) and, with
  `fsdp=True`, every parameter and its optimizer state over "data".

All three give the same parameters after the same steps (up to float
rounding): the loss is the mean over the global batch either way.

Examples:
  >>> import jax, optax
  >>> from jaxaccel import data, models, parallel, train
  >>> mesh = parallel.make_mesh()              # every device on "data"
  >>> mesh.shape["data"] == jax.device_count()
  True
  >>> ds = data.load("digits")
  >>> model = models.create("mlp", num_classes=10, widths=(32,))
  >>> result = train.fit(model, optax.adam(1e-3), ds, epochs=1,
  ...                    batch_size=8 * jax.device_count(),
  ...                    parallel="sharded", progress=False)
  >>> result.history[0]["steps"] > 0
  True
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import socket
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from jaxaccel import optim, precision as precision_lib
from jaxaccel.core import compiled, make_train_step
from jaxaccel.errors import ConfigError
from jaxaccel.models import ModelAdapter, adapt

MODES = ("none", "pmap", "sharded")
DATA_AXIS = "data"
MODEL_AXIS = "model"
# Block on results this often when stepping one batch at a time: XLA:CPU
# aborts when too many collective steps are queued without a sync.
SYNC_EVERY = 8

# Tensor parallelism. Matched anywhere in the state, so the optimizer's
# moments of a kernel follow the kernel. A transformer block is split the
# Megatron way, one all-reduce per half: attention heads over "model"
# (query/key/value column-parallel, the output projection row-parallel),
# and the MLP's first layer by its outputs, its second by its inputs. Other
# flax Dense layers split their output features.
TENSOR_PARALLEL_RULES = (
    (r"(query|key|value)/kernel$", P(None, MODEL_AXIS, None)),
    (r"(query|key|value)/bias$", P(MODEL_AXIS, None)),
    (r"attention/out/kernel$", P(MODEL_AXIS, None, None)),
    (r"mlp_in/kernel$", P(None, MODEL_AXIS)),
    (r"mlp_in/bias$", P(MODEL_AXIS)),
    (r"mlp_out/kernel$", P(MODEL_AXIS, None)),
    (r"Dense_\d+/kernel$", P(None, MODEL_AXIS)),
    (r"Dense_\d+/bias$", P(MODEL_AXIS)),
)


# ------------------------------------------------------------ multi-process

def initialize(coordinator: str | None = None, *,
               num_processes: int | None = None,
               process_id: int | None = None,
               timeout_seconds: int = 120) -> None:
  """Joins a multi-process run; call it before anything touches a device.

  Every process runs the same program with the same arguments but its own
  `process_id`; process 0 also hosts the coordinator at `coordinator`.
  With `coordinator="auto"` JAX detects the cluster (SLURM, Open MPI, TPU
  pods, ...) and reads the counts from it. A process whose runtime is
  already initialized (by Ray's or Kubeflow's JAX launcher, or a call of
  its own to `jax.distributed.initialize`) joins it.

  Args:
    coordinator: "HOST:PORT" of process 0, or "auto".
    num_processes: how many processes take part.
    process_id: this process's index in [0, num_processes).
    timeout_seconds: how long to wait for the others before giving up.

  Raises:
    ConfigError: on inconsistent arguments, or when the coordinator cannot
      be reached in `timeout_seconds` (the message names the address).
  """
  if coordinator is None:
    if num_processes is not None or process_id is not None:
      raise ConfigError("num_processes / process_id need the coordinator's "
                        "address: pass coordinator='HOST:PORT' "
                        "(--coordinator on the command line)")
    return
  if jax.distributed.is_initialized():
    # A launcher (Ray, Kubeflow, the user's own call) started the runtime
    # already: join it, if it is the run the arguments describe.
    for name, given, actual in (("num_processes", num_processes, jax.process_count()),
                                ("process_id", process_id, jax.process_index())):
      if given is not None and given != actual:
        raise ConfigError(f"jax.distributed is already initialized with "
                          f"{name}={actual}, but {given} was asked for")
    return
  if coordinator == "auto":
    try:
      jax.distributed.initialize(num_processes=num_processes,
                                 process_id=process_id,
                                 initialization_timeout=timeout_seconds)
    except (RuntimeError, ValueError) as e:
      raise ConfigError(f"no cluster detected for coordinator='auto' ({e}); "
                        "pass --coordinator HOST:PORT --num-processes N "
                        "--process-id I") from None
    return
  host, sep, port = coordinator.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"coordinator {coordinator!r} is not HOST:PORT; give "
                      "e.g. 10.0.0.1:1234 (process 0's address and a free port)")
  if num_processes is None or process_id is None:
    raise ConfigError(f"coordinator {coordinator} needs num_processes and "
                      "process_id (--num-processes N --process-id I)")
  if num_processes < 1:
    raise ConfigError(f"num_processes must be at least 1; got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise ConfigError(f"process id {process_id} is outside 0..{num_processes - 1} "
                      f"for {num_processes} processes: number the processes "
                      "0, 1, ..., N-1")
  # The runtime aborts the whole process when it cannot connect, so the
  # address is checked here first, where a clear error can still be raised.
  if process_id == 0:
    _check_can_listen(coordinator, int(port))
  else:
    _wait_for_coordinator(coordinator, host.strip("[]"), int(port),
                          timeout_seconds)
  try:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=num_processes,
                               process_id=process_id,
                               initialization_timeout=timeout_seconds)
  except Exception as e:   # the runtime raises several types for this
    raise ConfigError(
        f"cannot join the run at coordinator {coordinator} within "
        f"{timeout_seconds} s as process {process_id} of {num_processes} "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); start process "
        "0 first, check the address and port, and give every process the "
        "same --num-processes") from None
  if jax.process_count() != num_processes:
    raise ConfigError(f"the run at {coordinator} has {jax.process_count()} "
                      f"processes, but this one was told {num_processes}; "
                      "give every process the same --num-processes")
  # One small collective: every process must have joined with the same count
  # before training starts, or this one stops here with a clear message.
  from jax.experimental import multihost_utils
  try:
    counts = multihost_utils.process_allgather(np.int32(num_processes))
  except Exception as e:
    raise ConfigError(
        f"process {process_id} of the run at {coordinator} could not reach "
        f"all {num_processes} processes ({type(e).__name__}: "
        f"{str(e).splitlines()[0][-160:]}); one of them stopped or was given "
        "other settings: give every process the same --num-processes") from None
  if np.any(np.asarray(counts) != num_processes):
    raise ConfigError(f"the processes of the run at {coordinator} were told "
                      f"different --num-processes: {np.asarray(counts).tolist()}")


def _check_can_listen(coordinator: str, port: int) -> None:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      sock.bind(("", port))
    except OSError as e:
      raise ConfigError(f"process 0 cannot host the coordinator at "
                        f"{coordinator}: port {port} is not free ({e.strerror}); "
                        "choose another port") from None


def _wait_for_coordinator(coordinator: str, host: str, port: int,
                          timeout_seconds: float) -> None:
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      with socket.create_connection((host, port), timeout=1.0):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise ConfigError(
            f"cannot reach the coordinator at {coordinator} within "
            f"{timeout_seconds} s ({e.strerror or e}); start process 0 there "
            "first, or check the address, the port and the firewall") from None
      time.sleep(0.25)


def is_main_process() -> bool:
  """True on the process that prints, logs and writes metrics (process 0)."""
  return jax.process_index() == 0


# --------------------------------------------------------------------- meshes

def parse_mesh(text: str) -> tuple[int, ...]:
  """Reads the command line's mesh spelling: "8" or "2x4" (data x model)."""
  try:
    shape = tuple(int(v) for v in text.lower().split("x"))
  except ValueError:
    raise ConfigError(f"mesh {text!r} is not a shape: give DATA or "
                      "DATAxMODEL, e.g. 8 or 2x4") from None
  if not 1 <= len(shape) <= 2 or any(v <= 0 for v in shape):
    raise ConfigError(f"mesh {text!r} must be one or two positive sizes "
                      "(data, or data x model), e.g. 8 or 2x4")
  return shape


def _check_device_count(shape: Sequence[int], available: int, what: str) -> None:
  need = math.prod(shape)
  if need > available:
    raise ConfigError(f"{what} {tuple(shape)} asks for {need} devices but only "
                      f"{available} exist; use a mesh of at most {available} "
                      "devices")
  if need != available:
    raise ConfigError(f"{what} {tuple(shape)} multiplies to {need}, not to the "
                      f"{available} devices; use a shape whose sizes multiply "
                      f"to {available}, e.g. ({available},) or "
                      f"({available // 2 or 1}, {2 if available > 1 else 1})")


def make_mesh(mesh_shape: Sequence[int] | None = None, *,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all devices: axes ("data",) or ("data", "model").

  Args:
    mesh_shape: `(data,)` or `(data, model)`; its sizes must multiply to the
      number of devices. Default: every device on "data".
    devices: the devices to use (default: all of them).
  """
  n = len(devices) if devices is not None else jax.device_count()
  shape = tuple(mesh_shape) if mesh_shape is not None else (n,)
  if not 1 <= len(shape) <= 2 or any(int(v) <= 0 for v in shape):
    raise ConfigError(f"mesh shape {shape} must be (data,) or (data, model) "
                      "with positive sizes")
  _check_device_count(shape, n, "mesh shape")
  names = (DATA_AXIS, MODEL_AXIS)[:len(shape)]
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


# ------------------------------------------------------------ state sharding

def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, *,
                   rules: Sequence[tuple[str, P]] = (),
                   fsdp: bool = False) -> P:
  """The PartitionSpec of one leaf of the train state.

  The first rule whose regex is found in `path` gives the spec; a dimension
  that its mesh axis does not divide stays whole. With `fsdp`, the largest
  dimension still whole that "data" divides is split over "data".
  """
  spec: list[Any] = [None] * len(shape)
  for pattern, rule in rules:
    if re.search(pattern, path):
      for d, axis in enumerate(tuple(rule)[:len(shape)]):
        if axis is not None and axis in mesh.shape and shape[d] % mesh.shape[axis] == 0:
          spec[d] = axis
      break
  n_data = mesh.shape.get(DATA_AXIS, 1)
  if fsdp and n_data > 1:
    free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % n_data == 0]
    if free:
      spec[max(free, key=lambda d: shape[d])] = DATA_AXIS
  return P(*spec)


def state_shardings(state, mesh: Mesh, *, rules: Sequence[tuple[str, P]] = (),
                    fsdp: bool = False):
  """NamedShardings for every leaf of `state`, from rules on leaf paths."""
  def one(path, leaf):
    return NamedSharding(mesh, partition_spec(optim.param_path(path), np.shape(leaf),
                                              mesh, rules=rules, fsdp=fsdp))
  return jax.tree_util.tree_map_with_path(one, state)


def describe_shardings(tree) -> list[dict]:
  """Path, shape and PartitionSpec of every leaf of a placed pytree."""
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    spec = getattr(getattr(leaf, "sharding", None), "spec", None)
    rows.append({"path": optim.param_path(path), "shape": tuple(np.shape(leaf)),
                 "spec": str(spec) if spec is not None else "single device"})
  return rows


# -------------------------------------------------------------- prefetch

def prefetch(batches: Iterable, size: int = 2) -> Iterator:
  """Yields from `batches` while keeping `size` of them already issued.

  Transfers to devices are asynchronous, so the next batch is on its way
  while the current step runs.
  """
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) >= size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


# ------------------------------------------------------------- placements

class Placement:
  """How one parallel mode puts state and batches on its devices and
  compiles a function of the state. `Engine` runs every mode through these
  methods alone; a new mode is one subclass.
  """
  mode = "none"
  axis_name: str | None = None   # the step averages over it (pmap)
  data_shards = 1                # how many pieces each batch is cut in
  scan_supported = True          # whole-epoch scans with data on the devices

  def place(self, state):
    """The state on the devices."""
    return state

  def host(self, state):
    """The state as `evaluate` and checkpoints take it."""
    return state

  def compile(self, fn: Callable, placed) -> Callable:
    """`fn(state, *args) -> (state, metrics)` compiled, the state donated."""
    del placed
    return compiled.jit(fn, donate_argnums=0)

  def resident(self, x: np.ndarray):
    """`x` on the devices for a whole-epoch scan."""
    return jax.device_put(x)

  def scan_order(self, order):
    """An epoch's (steps, batch) indices as the compiled scan takes them."""
    return order

  def constrain(self, batch):
    """A batch gathered inside the compiled scan, laid out for the step."""
    return batch

  def batch(self, arrays: dict):
    """One global host batch (a dict of arrays), placed for the compiled
    step."""
    return jax.device_put(arrays)

  def local_batch(self, arrays: dict):
    """This process's rows of a global batch, placed for the compiled step
    (a stream reads only its own rows); one process holds them all."""
    return self.batch(arrays)

  def metrics(self, metrics):
    """Metrics as the host reads them (one value per step)."""
    return metrics


class Pmap(Placement):
  """`jax.pmap` over the local devices: state replicated, batches split along
  a leading device axis, gradients averaged over the axis "data"."""
  mode = "pmap"
  axis_name = DATA_AXIS

  def __init__(self):
    self.data_shards = jax.local_device_count()
    self._sharding = NamedSharding(Mesh(np.array(jax.local_devices()),
                                        (DATA_AXIS,)), P(DATA_AXIS))

  def _replicate(self, a):
    return jax.device_put(np.broadcast_to(a, (self.data_shards, *np.shape(a)))
                          if isinstance(a, np.ndarray) else
                          jnp.broadcast_to(a, (self.data_shards, *a.shape)),
                          self._sharding)

  def place(self, state):
    return jax.tree.map(self._replicate, state)

  def host(self, state):
    first = jax.local_devices()[0]
    return jax.tree.map(lambda a: jax.device_put(a[0], first), state)

  def compile(self, fn, placed):
    del placed
    return compiled.pmap(fn, axis_name=DATA_AXIS, donate_argnums=0)

  def resident(self, x):   # one full copy per device
    return self._replicate(x)

  def scan_order(self, order):
    steps, batch = order.shape
    n = self.data_shards
    return jnp.transpose(order.reshape(steps, n, batch // n), (1, 0, 2))

  def batch(self, arrays):
    n = self.data_shards
    split = lambda a: a.reshape(n, a.shape[0] // n, *a.shape[1:])
    return jax.device_put(jax.tree.map(split, arrays), self._sharding)

  def metrics(self, metrics):   # every device holds the averaged values
    return jax.tree.map(lambda m: m[0], metrics)


class Sharded(Placement):
  """`jax.jit` over a mesh: batches split over "data", the state replicated
  or split by rules on its paths; many processes when JAX runs several."""
  mode = "sharded"

  def __init__(self, mesh: Mesh, rules: Sequence[tuple[str, P]] = (),
               fsdp: bool = False):
    self.mesh, self.rules, self.fsdp = mesh, tuple(rules), fsdp
    self.data_shards = mesh.shape[DATA_AXIS]
    self._batch_sharding = NamedSharding(mesh, P(DATA_AXIS))
    self._rows = {}

  @property
  def scan_supported(self):
    # A whole-epoch scan needs the data on every device of one process.
    return jax.process_count() == 1

  def place(self, state):
    shardings = state_shardings(state, self.mesh, rules=self.rules,
                                fsdp=self.fsdp)
    if jax.process_count() > 1:
      return jax.tree.map(_global_from_host, state, shardings)
    return jax.device_put(state, shardings)

  def compile(self, fn, placed):
    out = (jax.tree.map(lambda a: a.sharding, placed),
           NamedSharding(self.mesh, P()))
    return compiled.jit(fn, out_shardings=out, donate_argnums=0)

  def resident(self, x):   # replicated: any row can be gathered anywhere
    return jax.device_put(x, NamedSharding(self.mesh, P()))

  def scan_order(self, order):
    return jax.device_put(order, NamedSharding(self.mesh, P(None, DATA_AXIS)))

  def constrain(self, batch):
    return jax.lax.with_sharding_constraint(batch, self._batch_sharding)

  def batch(self, arrays):
    rows = len(arrays["x"])
    if rows not in self._rows:
      self._rows[rows] = _process_rows(self._batch_sharding, rows)
    lo, hi = self._rows[rows]
    return self.local_batch(jax.tree.map(lambda a: a[lo:hi], arrays))

  def local_batch(self, arrays):
    local = len(arrays["x"])
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(
        self._batch_sharding, a,
        (local * jax.process_count(), *a.shape[1:])), arrays)


# ------------------------------------------------------------------ engine

@dataclasses.dataclass
class Engine:
  """Runs `fit`'s epochs: the one train step, compiled and fed by a
  `Placement`; built by `make_engine`.

  `run_epoch` takes and returns the state in host form (usable by
  `evaluate` and checkpoints) and keeps it placed on the devices in between.
  """
  model: ModelAdapter                    # computing in the policy's dtype
  tx: optax.GradientTransformation       # wrapped for loss scaling if asked
  step: Callable                         # the pure step
  placement: Placement
  _compiled: dict = dataclasses.field(default_factory=dict)
  _resident: dict = dataclasses.field(default_factory=dict)

  @property
  def mode(self) -> str:
    return self.placement.mode

  def check_batch(self, batch_size: int) -> None:
    """ConfigError when a global batch does not split evenly over devices."""
    n = self.placement.data_shards
    if batch_size % n:
      lower = batch_size // n * n
      raise ConfigError(
          f"batch size {batch_size} does not split over the {n} devices of "
          f"parallel={self.mode!r}: use a multiple of {n}, e.g. "
          f"{lower or n} or {lower + n}")

  def _on_devices(self, x: np.ndarray):
    """`x` kept on the devices across epochs."""
    if id(x) not in self._resident:
      # x is kept too, so that its id is not reused while the entry lives.
      self._resident[id(x)] = (x, self.placement.resident(x))
    return self._resident[id(x)][1]

  def _compile(self, kind: str, placed) -> Callable:
    if kind not in self._compiled:
      p = self.placement
      if kind == "epoch":
        def fn(state, arrays, order):
          def body(state, idx):
            return self.step(state, p.constrain(
                jax.tree.map(lambda a: a[idx], arrays)))
          return jax.lax.scan(body, state, order)
      else:
        fn = self.step
      self._compiled[kind] = p.compile(fn, placed)
    return self._compiled[kind]

  def run_epoch(self, state, arrays: dict, order, *,
                use_scan: bool, progress: bool = False, desc: str = "epoch"):
    """Trains one epoch over the rows of `arrays` (a dict of arrays with
    "x" and "y", one row per example) that `order` (steps, batch_size)
    picks.

    Returns the state in host form and the metrics of every step.
    """
    p = self.placement
    if use_scan and p.scan_supported:
      placed = p.place(state)
      run = self._compile("epoch", placed)
      placed, metrics = run(placed, {k: self._on_devices(a)
                                     for k, a in arrays.items()},
                            p.scan_order(order))
      return p.host(placed), p.metrics(metrics)
    order = np.asarray(order)
    batches = (p.batch({k: a[idx] for k, a in arrays.items()}) for idx in order)
    return self.run_steps(state, batches, len(order), progress=progress,
                          desc=desc)

  def run_steps(self, state, batches: Iterable[dict], steps: int, *,
                progress: bool = False, desc: str = "epoch"):
    """Trains `steps` steps on placed batches (see `Placement.batch` and
    `local_batch`), a compiled step each.

    Returns the state in host form and the metrics of every step.
    """
    p = self.placement
    placed = p.place(state)
    step = self._compile("step", placed)
    collected = []
    for i, batch in enumerate(tqdm(prefetch(batches), total=steps,
                                   desc=desc, leave=False, disable=not progress)):
      placed, m = step(placed, batch)
      collected.append(m)
      if (i + 1) % SYNC_EVERY == 0:
        jax.block_until_ready(m)
    metrics = {k: np.stack([np.asarray(p.metrics(m)[k]) for m in collected])
               for k in collected[0]}
    return p.host(placed), metrics


def _process_rows(sharding: NamedSharding, rows: int) -> tuple[int, int]:
  """The rows of a batch split by `sharding` that this process holds."""
  index_map = sharding.addressable_devices_indices_map((rows,))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [rows if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return min(starts), max(stops)


def _global_from_host(leaf, sharding: NamedSharding):
  """A global array from a value every process holds in full."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(leaf)
    data = _global_from_host(jax.random.key_data(leaf), NamedSharding(
        sharding.mesh, P(*sharding.spec, None)))
    return jax.random.wrap_key_data(data, impl=impl)
  value = np.asarray(leaf)
  return jax.make_array_from_callback(value.shape, sharding, lambda i: value[i])


def make_engine(model, tx: optax.GradientTransformation, *,
                mode: str = "none", mesh_shape: Sequence[int] | None = None,
                precision: str = "fp32",
                rules: Sequence[tuple[str, P]] | None = None,
                fsdp: bool = False, task=None, loss_fn: Callable | None = None,
                augment: Callable | None = None,
                skip_nonfinite: bool = True,
                teacher: Callable | None = None,
                devices: Sequence[Any] | None = None) -> Engine:
  """Checks a parallel set-up and builds the engine that runs it.

  Args:
    model: any model `jaxaccel.models.adapt` takes (computing in float32;
      the policy may recast it).
    tx: the optimizer.
    mode: "none", "pmap" or "sharded".
    mesh_shape: for "sharded", `(data,)` or `(data, model)`; default every
      device on "data". For "pmap", `(n,)` with n the local device count.
    precision: "fp32", "bf16" or "fp16" (see `jaxaccel.precision`).
    rules: `(regex, PartitionSpec)` pairs on state paths; default
      `TENSOR_PARALLEL_RULES` when the mesh has a "model" axis.
    fsdp: also split params and optimizer state over "data".
    task, loss_fn, augment, skip_nonfinite, teacher: as in `fit`.
    devices: for "sharded", the devices of the mesh (default: all).
  """
  if mode not in MODES:
    raise ConfigError(f"unknown parallel mode {mode!r}: use one of "
                      f"{', '.join(MODES)}")
  policy = precision_lib.get_policy(precision)
  if mode == "none":
    if mesh_shape is not None or fsdp or rules:
      raise ConfigError("a mesh, sharding rules and fsdp need "
                        "parallel='sharded'; got parallel='none'")
    placement = Placement()
  elif mode == "pmap":
    if fsdp or rules:
      raise ConfigError("sharding rules and fsdp need parallel='sharded'; "
                        "pmap replicates the state")
    if jax.process_count() > 1:
      raise ConfigError("parallel='pmap' runs within one process; use "
                        "parallel='sharded' for a multi-process run")
    n = jax.local_device_count()
    if mesh_shape is not None:
      if len(tuple(mesh_shape)) != 1:
        raise ConfigError(f"pmap splits over one axis; mesh shape "
                          f"{tuple(mesh_shape)} has {len(tuple(mesh_shape))}: "
                          "use parallel='sharded' for a data x model mesh")
      _check_device_count(mesh_shape, n, "pmap over")
    placement = Pmap()
    # Batch statistics over the global batch, as one device computes them.
    model = adapt(model).with_batch_axis(DATA_AXIS)
  else:
    mesh = make_mesh(mesh_shape, devices=devices)
    if rules is None:
      rules = TENSOR_PARALLEL_RULES if MODEL_AXIS in mesh.shape else ()
    placement = Sharded(mesh, rules, fsdp)
  model, tx = precision_lib.apply_policy(model, tx, policy)
  step = make_train_step(model, tx, task=task, loss_fn=loss_fn, augment=augment,
                         skip_nonfinite=skip_nonfinite, teacher=teacher,
                         axis_name=placement.axis_name)
  return Engine(model=model, tx=tx, step=step, placement=placement)
