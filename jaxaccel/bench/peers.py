"""The peers a user would otherwise pick, imported only when a suite runs
them: PyTorch eager mirrors of the registry models and qwix int8."""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxaccel import data
from jaxaccel.bench.common import BATCH, LEARNING_RATE, _steps_per_second


def torch_model(name: str):
  """The bench models in PyTorch, layer for layer (NCHW)."""
  import torch.nn as tnn
  if name == "mlp":
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(784, 300), tnn.ReLU(),
                          tnn.Linear(300, 100), tnn.ReLU(), tnn.Linear(100, 10))
  if name == "cnn":
    return tnn.Sequential(
        tnn.Conv2d(1, 32, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(32, 64, 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Flatten(), tnn.Linear(64 * 7 * 7, 128), tnn.ReLU(),
        tnn.Linear(128, 10))
  if name == "resnet18":
    return _torch_resnet18()
  raise ValueError(name)


def _torch_resnet18(width: int = 64, num_classes: int = 10):
  """`models.ResNet`'s layout: 3x3 stem, no max pool, four stages of two
  basic blocks, batch norm with flax's momentum 0.9 (PyTorch's 0.1)."""
  import torch.nn as tnn

  def bn(c):
    return tnn.BatchNorm2d(c, momentum=0.1, eps=1e-5)

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = bn(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = bn(cout)
      self.shortcut = (tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                      bn(cout))
                       if stride != 1 or cin != cout else tnn.Identity())

    def forward(self, x):
      y = self.bn1(self.conv1(x)).relu()
      return (self.bn2(self.conv2(y)) + self.shortcut(x)).relu()

  layers = [tnn.Conv2d(1, width, 3, 1, 1, bias=False), bn(width), tnn.ReLU()]
  cin = width
  for i in range(4):
    for j in range(2):
      cout = width * 2 ** i
      layers.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
      cin = cout
  layers += [tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, num_classes)]
  return tnn.Sequential(*layers)


def time_torch(name: str, ds: data.Dataset, steps: int, epochs: int = 3, *,
               batch: int = BATCH) -> tuple[float, None]:
  """Steps/s of the usual PyTorch eager loop on the CPU (its own
  initialization and order: no loss to compare)."""
  import torch
  torch.manual_seed(0)
  net = torch_model(name)
  opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE)
  x = torch.from_numpy(np.ascontiguousarray(
      ds.x_train[:steps * batch].transpose(0, 3, 1, 2)))   # NCHW
  y = torch.from_numpy(ds.y_train[:steps * batch].astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()
  times = []
  for _ in range(epochs):
    perm = torch.randperm(len(x))
    t = time.perf_counter()
    for i in range(steps):
      idx = perm[i * batch:(i + 1) * batch]
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(net(x[idx]), y[idx])
      loss.backward()
      opt.step()
    loss.item()
    times.append(time.perf_counter() - t)
  return _steps_per_second(steps, times), None


def qwix_int8(model, variables: dict, ds: data.Dataset):
  """The same post-training int8 done with qwix, the JAX quantization
  library a user would otherwise pick: int8 weights (per output channel,
  absmax) and int8 activations quantized per batch (qwix's dynamic-range
  PTQ; jaxaccel's int8 recipe calibrates static activation scales instead).
  Returns ({accuracy, seconds, version}, jitted forward), or None when qwix
  is not installed (`pip install 'jaxaccel[bench]'`)."""
  try:
    import qwix
  except ImportError:
    return None
  from importlib.metadata import version
  t = time.perf_counter()
  rules = [qwix.QtRule(module_path=".*", weight_qtype="int8",
                       act_qtype="int8")]
  qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules))
  abstract = jax.eval_shape(qmodel.init, jax.random.key(0), ds.x_train[:1])
  qparams = qwix.quantize_params(variables["params"], abstract["params"])
  rest = {k: v for k, v in variables.items() if k != "params"}
  forward = jax.jit(lambda x: qmodel.apply({"params": qparams, **rest}, x))
  from jaxaccel.compress.report import accuracy
  logits = np.concatenate([np.asarray(forward(ds.x_test[i:i + 1024]))
                           for i in range(0, len(ds.x_test), 1024)])
  figures = {"accuracy": round(accuracy(logits, ds.y_test), 4),
             "seconds": round(time.perf_counter() - t, 2),
             "version": version("qwix")}
  return figures, forward


