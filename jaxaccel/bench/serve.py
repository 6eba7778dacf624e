"""The GPT in `jaxaccel bench --suite deploy`: a trained language model
served six ways.

One registry GPT (context = prompt + new tokens), trained `steps` steps on
`pycode`, is served by jaxaccel's compiled generation loop in float32 and
with its int8 decoder (`compress.int8.convert_function` of
`generate.decoder`), by its exported StableHLO decoders (float32 and int8,
loaded as `jaxaccel generate --artifact` loads them), and by PyTorch eager
in float32 and with its dynamic int8 quantization of the same weights'
`nn.Linear` layers, with a key/value cache written for it. Each side is
timed interleaved in this process on:

- generation at batch 1: a 64-byte prompt in one call, then 256 greedy
  tokens one call each (new tokens per second);
- prefill at batch 32: 128-byte windows from an empty cache (tokens per
  second);

and scored on validation windows (bits per byte). ONNX decoders are not
written (`export` says so), so ONNX Runtime has no side here.
"""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np

from jaxaccel import core, export, models, train
from jaxaccel.bench import lm
from jaxaccel.bench.common import interleaved_ms, torch_available
from jaxaccel.compress import int8
from jaxaccel.generate import decoder, generate, init_cache

PREFILL_BATCH, PREFILL_LENGTH = 32, 128
INT8_SIDES = ("jaxaccel int8 (XLA)", "jaxaccel int8 (StableHLO artifact)")


def _torch_sides(params: dict, heads: int) -> dict:
  """name -> a PyTorch GPT holding `params`: float32 and dynamic int8."""
  import torch
  net = lm.torch_gpt(lm.fused_weights(params), heads).eval()
  dyn = torch.ao.quantization.quantize_dynamic(net, {torch.nn.Linear},
                                               dtype=torch.qint8)
  return {"PyTorch float32": net, "PyTorch dynamic int8": dyn}


def _torch_prefill(net):
  import torch

  def run(ids):
    with torch.inference_mode():
      caches = [[None, None] for _ in net.blocks]
      return net(torch.from_numpy(ids.astype(np.int64)), caches, 0).numpy()
  return run


def _bits_per_byte(prefill, x: np.ndarray, y: np.ndarray) -> float:
  """Mean next-byte cross entropy in bits of `prefill`'s logits."""
  nats = []
  for i in range(0, len(x), PREFILL_BATCH):
    logits = np.asarray(prefill(x[i:i + PREFILL_BATCH]), np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nats.append(-np.take_along_axis(logp, y[i:i + PREFILL_BATCH, ..., None],
                                    -1).mean())
  return float(np.mean(nats) / math.log(2))


def run_gpt_serving(folder: pathlib.Path, *, spec: str = lm.DEFAULT_MODEL,
                    steps: int = 200, prompt: int = lm.PROMPT,
                    new_tokens: int = lm.NEW_TOKENS, rounds: int = 3,
                    torch_peer: bool = True, say=lambda *a: None) -> dict:
  """The GPT's deploy figures (see the module docstring)."""
  torch_peer = torch_peer and torch_available()
  shape = lm._spec(spec)
  context = prompt + new_tokens
  ds = lm.lm_data(steps, context=context)
  model = models.create("gpt", num_classes=256, context=context, **shape)
  say(f"deploy bench: training {spec} (context {context}) {steps} steps")
  result = train.fit(model, lm._tx(), ds, steps=steps,
                     batch_size=lm.BATCH, progress=False)
  variables = core.variables_of(result.state)
  step = decoder(model)
  windows = [np.asarray(ds.x_train[i:i + 64], np.int32)
             for i in range(0, 256, 64)]
  program = int8.convert_function(
      step, variables, [(w, init_cache(model, len(w))) for w in windows])
  int8_step = lambda _, ids, cache: program.forward(ids, cache)
  paths = {q: export.export_decoder(
      model, variables, out=folder / f"gpt{'-int8' if q else ''}.stablehlo",
      int8=q, calibration=windows) for q in (False, True)}
  artifacts = {q: export.load(p) for q, p in paths.items()}
  text = bytes(ds.x_val[0, :prompt].astype(np.uint8).tolist())
  float_prefill = jax.jit(lambda ids: step(
      variables, ids, init_cache(model, ids.shape[0]))[0])
  int8_prefill = jax.jit(lambda ids: program.forward(
      ids, init_cache(model, ids.shape[0]))[0])

  def artifact_prefill(a):
    return lambda ids: a.step(ids, a.init_cache(len(ids)))[0]

  # name -> (generate the continuation's ids, prefill logits of ids)
  sides = {
      "jaxaccel float32 (XLA)": (
          lambda: generate(model, variables, text, tokens=new_tokens)["ids"],
          float_prefill),
      "jaxaccel int8 (XLA)": (
          lambda: generate(model, variables, text, tokens=new_tokens,
                           step=int8_step)["ids"], int8_prefill),
      "StableHLO float32 artifact": (
          lambda: artifacts[False].generate(text, tokens=new_tokens)["ids"],
          artifact_prefill(artifacts[False])),
      "jaxaccel int8 (StableHLO artifact)": (
          lambda: artifacts[True].generate(text, tokens=new_tokens)["ids"],
          artifact_prefill(artifacts[True])),
  }
  if torch_peer:
    ids = np.frombuffer(text, np.uint8).astype(np.int32)
    for name, net in _torch_sides(variables["params"], shape["heads"]).items():
      sides[name] = ((lambda n: lambda: np.concatenate(
          [ids, lm.torch_generate(n, ids, new_tokens)]))(net),
          _torch_prefill(net))
  say("deploy bench: scoring and timing the GPT's sides")
  x_val, y_val = ds.x_val[:64], ds.y_val[:64]
  batch = np.asarray(ds.x_val[:PREFILL_BATCH, :PREFILL_LENGTH], np.int32)
  reference = sides["jaxaccel float32 (XLA)"][0]()
  figures = {"spec": spec, "context": context, "steps": steps,
             "prompt": prompt, "new_tokens": new_tokens,
             "prefill_shape": list(batch.shape),
             "int8_layers": program.summary()["int8"],
             "float_products": program.summary()["float"],
             "bytes": {("stablehlo int8" if q else "stablehlo"):
                       p.stat().st_size for q, p in paths.items()},
             "val_bits_per_byte": {}, "greedy_agreement": {}}
  for name, (gen, prefill) in sides.items():
    figures["val_bits_per_byte"][name] = round(
        _bits_per_byte(prefill, x_val, y_val), 4)
    figures["greedy_agreement"][name] = round(float(np.mean(
        gen()[prompt:] == reference[prompt:])), 3)
  gen_ms = interleaved_ms({k: g for k, (g, _) in sides.items()},
                          repeats=rounds, block=1)
  prefill_ms = interleaved_ms(
      {k: (lambda f: lambda: np.asarray(f(batch)))(p)
       for k, (_, p) in sides.items()}, repeats=rounds * 5, block=5)
  figures["generation_tokens_per_second"] = {
      k: round(new_tokens / ms * 1e3, 1) for k, ms in gen_ms.items()}
  figures["prefill_tokens_per_second"] = {
      k: round(batch.size / ms * 1e3, 1)
      for k, ms in prefill_ms.items()}
  if torch_peer:
    for key in ("generation", "prefill"):
      tps = figures[f"{key}_tokens_per_second"]
      figures[f"{key}_vs_torch_dynamic_int8"] = round(
          max(tps[k] for k in INT8_SIDES) / tps["PyTorch dynamic int8"], 3)
  return figures


def format_gpt_serving(g: dict) -> list[str]:
  """The GPT's rows of the deploy report."""
  sides = list(g["val_bits_per_byte"])
  n, length = g["prefill_shape"]
  header = ["side", "val bits/byte", "greedy = float", "gen tok/s (batch 1)",
            f"prefill tok/s (batch {n})"]
  rows = [[k, f"{g['val_bits_per_byte'][k]:.4f}",
           f"{g['greedy_agreement'][k]:.1%}",
           f"{g['generation_tokens_per_second'][k]:,.0f}",
           f"{g['prefill_tokens_per_second'][k]:,.0f}"] for k in sides]
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  lines = [f"\ngpt ({g['spec']}, context {g['context']}, trained {g['steps']} "
           f"steps on pycode): {g['new_tokens']} greedy tokens after a "
           f"{g['prompt']}-byte prompt, prefill of {length}-byte windows; "
           "int8 layers "
           f"{len(g['int8_layers'])}, float: {', '.join(g['float_products'])}"]
  lines += ["  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths))
            for row in [header] + rows]
  for key in ("generation", "prefill"):
    s = g.get(f"{key}_vs_torch_dynamic_int8")
    if s is not None:
      lines.append(f"  {key}: jaxaccel's fastest int8 / PyTorch dynamic int8 "
                   f"= {s:.2f}x (target >= 1.0)")
  lines.append("  artifact bytes: " + ", ".join(
      f"{k} {v:,}" for k, v in g["bytes"].items()))
  return lines
