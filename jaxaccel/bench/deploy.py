"""`jaxaccel bench --suite deploy`: one trained model served eight ways.

The same trained LeNet-300-100 (and CNN) is run by flax in float32, by
jaxaccel's int8 program on XLA, by jaxaccel's ONNX artifacts (float32 and
int8) in ONNX Runtime, by its StableHLO artifacts (float32 and int8) loaded
as `jaxaccel predict --artifact` loads them, and by PyTorch in float32 and
with its dynamic int8 quantization (`torch.ao.quantization.quantize_dynamic`,
Linear layers), the PyTorch side holding the very same weights. Each side is timed at batch 1
and batch 1024 in interleaved blocks in this process (median ms a call) and
scored on the whole test set. The ONNX and StableHLO artifacts' sizes are
reported too, and the size of the int8 ONNX artifact of the same model
pruned to 90% (global magnitude, one shot; size only, the compress bench
measures accuracy after fine-tuning) written gzip compressed.

A model name `gpt` (or `gpt:LAYERS,HEADS,WIDTH`) adds the language model,
served by its cached decoder (`jaxaccel.bench.serve`).
"""

from __future__ import annotations

import os
import pathlib
import tempfile

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxaccel import core, data, export, models, onnx_graph, optim, train
from jaxaccel.bench import lm
from jaxaccel.bench.common import bench_data, interleaved_ms, torch_available
from jaxaccel.compress import int8, report

BATCHES = (1, 1024)
EPOCHS = {"mlp": 10, "cnn": 2}
SPECS = {"mlp": dict(widths=(300, 100)), "cnn": dict(features=(32, 64),
                                                     hidden=128)}
# Calls a timed block makes, by batch size: enough that a block lasts tens
# of milliseconds at batch 1.
BLOCK = {1: 200, 1024: 10}


def torch_mirror(params: dict, input_shape):
  """The registry MLP or CNN as a PyTorch module holding the same weights."""
  import torch
  import torch.nn as tnn
  t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))
  convs = sorted((k for k in params if k.startswith("Conv_")),
                 key=lambda k: int(k.split("_")[1]))
  denses = sorted((k for k in params if k.startswith("Dense_")),
                  key=lambda k: int(k.split("_")[1]))
  layers = []
  h, w, c = input_shape
  for name in convs:
    kernel = np.asarray(params[name]["kernel"])          # HWIO
    conv = tnn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[:2],
                      padding="same")
    conv.weight.data = t(kernel.transpose(3, 2, 0, 1))
    conv.bias.data = t(params[name]["bias"])
    layers += [conv, tnn.ReLU(), tnn.MaxPool2d(2)]
    h, w, c = h // 2, w // 2, kernel.shape[3]
  layers.append(tnn.Flatten())
  for i, name in enumerate(denses):
    kernel = np.asarray(params[name]["kernel"])
    if i == 0 and convs:      # flax flattens (h, w, c), PyTorch (c, h, w)
      kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(
          h * w * c, -1)
    dense = tnn.Linear(*kernel.shape)
    dense.weight.data = t(kernel.T)
    dense.bias.data = t(params[name]["bias"])
    layers += [dense, tnn.ReLU()]
  return tnn.Sequential(*layers[:-1]).eval()


def _accuracy(fn, x, y, batch: int = 1024) -> float:
  return report.accuracy(np.concatenate(
      [fn(x[i:i + batch]) for i in range(0, len(x), batch)]), y)


def _sides(name: str, model, variables, ds, calibration,
           folder: pathlib.Path, torch_peer: bool):
  """name -> (call on raw inputs, artifact path or None)."""
  adapter = models.adapt(model)
  normalize = lambda x: data.preprocess(x, ds.stats)
  program = int8.convert(model, variables, calibration)
  flax_f32 = jax.jit(lambda x: adapter.logits(variables, x))
  sides = {
      "flax float32": (lambda x: np.asarray(flax_f32(normalize(x))), None),
      "jaxaccel int8 (XLA)": (lambda x: np.asarray(program(normalize(x))),
                              None)}
  paths = {}
  for fmt in ("stablehlo", "onnx"):
    for q in (False, True):
      paths[fmt, q] = export.export(
          model, variables, input_shape=ds.input_shape,
          num_classes=ds.num_classes, format=fmt, normalization=ds.stats,
          int8=q, calibration=calibration,
          out=folder / f"{name}{'-int8' if q else ''}.{fmt}")
  for q, label in ((True, "jaxaccel int8 (ONNX Runtime)"),
                   (False, "ONNX Runtime float32")):
    sess = onnx_graph.session(paths["onnx", q].read_bytes())
    sides[label] = ((lambda s: lambda x: s.run(None, {"x": x})[0])(sess),
                    paths["onnx", q])
  for q, label in ((True, "jaxaccel int8 (StableHLO artifact)"),
                   (False, "StableHLO float32 artifact")):
    sides[label] = (export.load(paths["stablehlo", q]), paths["stablehlo", q])
  if torch_peer:
    import torch
    net = torch_mirror(variables["params"], ds.input_shape)
    dyn = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear},
                                                 dtype=torch.qint8)
    layout = ((lambda x: x.transpose(0, 3, 1, 2)) if len(ds.input_shape) == 3
              else (lambda x: x))

    def torch_side(module):
      def run(x):
        with torch.inference_mode():
          return module(torch.from_numpy(np.ascontiguousarray(
              layout(normalize(x))))).numpy()
      return run
    sides["PyTorch float32"] = (torch_side(net), None)
    sides["PyTorch dynamic int8"] = (torch_side(dyn), None)
  return sides, paths, program


PRUNED = "onnx int8 90%-pruned gzip"


def _pruned_int8_gzip(model, variables, ds, calibration,
                      out: pathlib.Path) -> int:
  """Bytes of the int8 ONNX artifact of `variables` pruned to 90% (global
  magnitude), written as `.onnx.gz`."""
  from jaxaccel.compress import pruning
  pruned, _ = pruning.prune(variables["params"], 0.9, scope="global")
  return export.export(
      model, {**variables, "params": pruned}, input_shape=ds.input_shape,
      num_classes=ds.num_classes, format="onnx", normalization=ds.stats,
      int8=True, calibration=calibration, out=out).stat().st_size


def run_deploy_suite(*, dataset: str = "auto", model_names=("mlp", "cnn"),
                     rounds: int = 5, epochs: int | None = None,
                     torch_peer: bool = True, progress: bool = True,
                     gpt_steps: int = 200) -> dict:
  """Serves each model every way; see the module docstring. JSON keys per
  model: `accuracy` per side, `bytes` per artifact, and per batch size
  `ms` per side and `speedup_vs_torch_dynamic_int8` (jaxaccel's fastest int8
  side against PyTorch's dynamic int8). The GPT's keys are
  `run_gpt_serving`'s (trained `gpt_steps` steps)."""
  torch_peer = torch_peer and torch_available()
  gpts = [n for n in model_names if n.split(":")[0] == "gpt"]
  model_names = [n for n in model_names if n not in gpts]
  ds = bench_data(dataset)
  # raw inputs, as a user's request brings them (bench data is only scaled)
  raw_test = (ds.x_test * np.float32(ds.stats["scale"])).astype(np.float32)
  out = {"suite": "deploy", "dataset": ds.name, "cpu_count": os.cpu_count(),
         "torch": torch_peer, "rounds": rounds, "models": {}}
  bar = tqdm(total=len(model_names) * (1 + len(BATCHES)), desc="deploy bench",
             disable=not progress, leave=False)
  with tempfile.TemporaryDirectory() as folder:
    for name in model_names:
      bar.set_postfix(model=name, stage="train")
      model = models.create(name, num_classes=ds.num_classes, **SPECS[name])
      n_epochs = epochs or EPOCHS[name]
      steps = len(ds.x_train) // 128 * n_epochs
      result = train.fit(model, optim.cosine_adam(1e-3, steps), ds,
                         epochs=n_epochs, batch_size=128, progress=False)
      variables = core.variables_of(result.state)
      calibration = export.calibration_inputs(ds.x_train, None)
      sides, paths, program = _sides(name, model, variables, ds, calibration,
                                     pathlib.Path(folder), torch_peer)
      figures = {
          "int8_layers": program.summary()["int8"],
          "accuracy": {k: round(_accuracy(f, raw_test, ds.y_test), 4)
                       for k, (f, _) in sides.items()},
          "bytes": {f"{fmt}{' int8' if q else ''}": p.stat().st_size
                    for (fmt, q), p in paths.items()}}
      figures["bytes"][PRUNED] = _pruned_int8_gzip(
          model, variables, ds, calibration,
          pathlib.Path(folder) / f"{name}-p90.onnx.gz")
      figures["pruned_int8_gzip_vs_onnx_float32"] = round(
          figures["bytes"]["onnx"] / figures["bytes"][PRUNED], 2)
      bar.update()
      for b in BATCHES:
        bar.set_postfix(model=name, stage=f"batch {b}")
        x = np.resize(raw_test, (b, *ds.input_shape)).astype(np.float32)
        block = BLOCK.get(b, 10)
        ms = interleaved_ms({k: (lambda f: lambda: f(x))(f)
                                   for k, (f, _) in sides.items()},
                                  repeats=rounds * block, block=block)
        entry = {"ms": {k: round(v, 4) for k, v in ms.items()}}
        entry["int8_artifact_speedup"] = {
            "stablehlo": round(ms["StableHLO float32 artifact"]
                               / ms["jaxaccel int8 (StableHLO artifact)"], 3),
            "onnx": round(ms["ONNX Runtime float32"]
                          / ms["jaxaccel int8 (ONNX Runtime)"], 3)}
        if torch_peer:
          ours = min(v for k, v in ms.items() if k.startswith("jaxaccel int8"))
          entry["speedup_vs_torch_dynamic_int8"] = round(
              ms["PyTorch dynamic int8"] / ours, 3)
        figures[f"batch_{b}"] = entry
        bar.update()
      out["models"][name] = figures
    for name in gpts:
      from jaxaccel.bench import serve
      out["models"]["gpt"] = serve.run_gpt_serving(
          pathlib.Path(folder), spec=name if ":" in name else lm.DEFAULT_MODEL,
          steps=gpt_steps, rounds=rounds, torch_peer=torch_peer,
          say=bar.write if progress else (lambda *a: None))
  bar.close()
  return out


def format_deploy_report(r: dict) -> str:
  lines = [f"deploy bench on {r['dataset']} ({r['cpu_count']} CPUs): median "
           f"ms a call, {r['rounds']} interleaved rounds; inputs are raw, "
           "every side normalizes them"]
  for name, m in r["models"].items():
    if name == "gpt":
      from jaxaccel.bench import serve
      lines += serve.format_gpt_serving(m)
      continue
    sides = list(m["accuracy"])
    lines.append(f"\n{name}: int8 layers {', '.join(m['int8_layers'])}")
    header = ["side", "accuracy"] + [f"batch {b} ms" for b in BATCHES]
    rows = [[k, f"{m['accuracy'][k]:.4f}"]
            + [f"{m[f'batch_{b}']['ms'][k]:.3f}" for b in BATCHES]
            for k in sides]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for row in [header] + rows:
      lines.append("  " + "  ".join(str(c).ljust(w) for c, w in
                                     zip(row, widths)))
    for b in BATCHES:
      a = m[f"batch_{b}"]["int8_artifact_speedup"]
      lines.append(f"  batch {b}: int8 artifact / float32 artifact speed: "
                   f"StableHLO {a['stablehlo']:.2f}x, ONNX {a['onnx']:.2f}x")
      s = m[f"batch_{b}"].get("speedup_vs_torch_dynamic_int8")
      if s is not None:
        lines.append(f"  batch {b}: jaxaccel's fastest int8 / PyTorch dynamic "
                     f"int8 = {s:.2f}x (target >= 1.0)")
    lines.append("  artifact bytes: " + ", ".join(
        f"{k} {v:,}" for k, v in m["bytes"].items()))
    lines.append(f"  {PRUNED} (one-shot, size only) is "
                 f"{m['pruned_int8_gzip_vs_onnx_float32']:.1f}x smaller than "
                 "the float32 ONNX file (target >= 8x)")
  return "\n".join(lines)
