"""`jaxaccel bench --suite lm`: the byte-level GPT against the loops a user
would otherwise write.

One network, three sides, in one process, on the same bytes of `pycode` in
the same order:

* jaxaccel: `fit` on the registry GPT (`gpt:LAYERS,HEADS,WIDTH`);
* flax_nnx: the same network written the way flax's examples write one:
  `nnx.Embed`, `nnx.LayerNorm`, `nnx.Linear`, `jax.nn.dot_product_attention`
  with `is_causal=True`, a train step under `nnx.jit` with `nnx.Optimizer`;
* torch: the same network in PyTorch eager (`scaled_dot_product_attention`,
  `torch.optim.AdamW`), the optional `bench` extra.

Every side starts from jaxaccel's initial weights (copied), so after the
same steps their validation bits per byte must agree: a gap is a bug on one
side. Generation (batch 1, a 64-byte prompt, 256 new bytes, greedy) times
`jaxaccel.generate` against a PyTorch loop with its own key/value cache, on
a copy of the network whose position table is long enough for both.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxaccel import core, data, models, train
from jaxaccel.bench.common import (_aligned, _steps_per_second, matmul_gflops,
                                   torch_available)
from jaxaccel.errors import ConfigError
from jaxaccel.generate import generate
from jaxaccel.models import registry

BATCH = 32
CONTEXT = 128
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1
PROMPT, NEW_TOKENS = 64, 256
DEFAULT_MODEL = "gpt:4,4,128"
EPS = 1e-6   # flax's LayerNorm epsilon, used by every side


def lm_data(steps: int, *, context: int = CONTEXT) -> data.Dataset:
  """`pycode` windows: enough training bytes for `steps` batches (the same
  windows every epoch), validation and test slices of 256 windows."""
  per_split = max(steps * BATCH, 256) * context
  return data.load_text("pycode", context=context, max_bytes=per_split)


def _tx():
  return optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)


def fused_weights(params: dict) -> dict:
  """The registry GPT's parameters as numpy arrays in one fused layout the
  other sides load: per block `qkv` (width, 3 width), `out` (width, width),
  `fc`, `proj` kernels as (inputs, outputs)."""
  p = jax.tree.map(np.asarray, params)
  width = p["embed"]["embedding"].shape[1]
  blocks = []
  for i in range(sum(k.startswith("block_") for k in p)):
    b = p[f"block_{i}"]
    a = b["attention"]
    blocks.append({
        "ln1": (b["LayerNorm_0"]["scale"], b["LayerNorm_0"]["bias"]),
        "qkv": np.concatenate([a[n]["kernel"].reshape(width, width)
                               for n in ("query", "key", "value")], 1),
        "qkv_bias": np.concatenate([a[n]["bias"].reshape(width)
                                    for n in ("query", "key", "value")]),
        "out": a["out"]["kernel"].reshape(width, width),
        "out_bias": a["out"]["bias"],
        "ln2": (b["LayerNorm_1"]["scale"], b["LayerNorm_1"]["bias"]),
        "fc": b["mlp_in"]["kernel"], "fc_bias": b["mlp_in"]["bias"],
        "proj": b["mlp_out"]["kernel"], "proj_bias": b["mlp_out"]["bias"]})
  return {"embed": p["embed"]["embedding"], "positions": p["positions"],
          "blocks": blocks, "ln": (p["LayerNorm_0"]["scale"],
                                   p["LayerNorm_0"]["bias"])}


# ----------------------------------------------------------------- flax NNX

class NNXBlock(nnx.Module):
  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(width, epsilon=EPS, rngs=rngs)
    self.qkv = nnx.Linear(width, 3 * width, rngs=rngs)
    self.out = nnx.Linear(width, width, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, epsilon=EPS, rngs=rngs)
    self.fc = nnx.Linear(width, 4 * width, rngs=rngs)
    self.proj = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x):
    n, length, width = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    q, k, v = (z.reshape(n, length, self.heads, width // self.heads)
               for z in (q, k, v))
    a = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + self.out(a.reshape(n, length, width))
    return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class NNXGPT(nnx.Module):
  def __init__(self, layers: int, heads: int, width: int, context: int, *,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, width, rngs=rngs)
    self.positions = nnx.Param(jnp.zeros((context, width)))
    self.blocks = nnx.List([NNXBlock(width, heads, rngs=rngs)
                            for _ in range(layers)])
    self.ln = nnx.LayerNorm(width, epsilon=EPS, rngs=rngs)

  def __call__(self, x):
    h = self.embed(x) + self.positions[...][:x.shape[1]]
    for block in self.blocks:
      h = block(h)
    return self.embed.attend(self.ln(h))

  def load(self, w: dict) -> "NNXGPT":
    def norm(layer, sb):
      layer.scale[...], layer.bias[...] = sb
    self.embed.embedding[...] = w["embed"]
    self.positions[...] = w["positions"]
    for block, b in zip(self.blocks, w["blocks"]):
      norm(block.ln1, b["ln1"])
      norm(block.ln2, b["ln2"])
      for name in ("qkv", "out", "fc", "proj"):
        getattr(block, name).kernel[...] = b[name]
        getattr(block, name).bias[...] = b[f"{name}_bias"]
    norm(self.ln, w["ln"])
    return self


def _cross_entropy(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _nnx_loss(model, x, y):
  return _cross_entropy(model(x), y)


def time_nnx(spec: dict, weights: dict, ds: data.Dataset, steps: int,
             epochs: int) -> tuple[float, float]:
  """(tokens/s over the epochs after the first, validation bits per byte)
  of the flax NNX loop, on fit's batch order."""
  model = NNXGPT(**spec, rngs=nnx.Rngs(0)).load(weights)
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  x, y = ds.x_train.astype(np.int32), ds.y_train.astype(np.int32)
  times = []
  for e in range(epochs):
    order = np.asarray(train.epoch_order(0, e, len(x), BATCH))
    t = time.perf_counter()
    for idx in order:
      loss = step(model, optimizer, x[idx], y[idx])
    loss.block_until_ready()
    times.append(time.perf_counter() - t)
  logits = nnx.jit(lambda m, x: m(x))
  vx, vy = ds.x_val.astype(np.int32), ds.y_val.astype(np.int32)
  nll = np.mean([float(_cross_entropy(logits(model, vx[i:i + BATCH]),
                                    vy[i:i + BATCH]))
                 for i in range(0, len(vx), BATCH)])
  return (_tokens_per_second(steps, times, x.shape[1]),
          nll / math.log(2))


def _tokens_per_second(steps: int, times: list[float], context: int) -> float:
  return _steps_per_second(steps, times) * BATCH * context


# ------------------------------------------------------------------ PyTorch

def torch_gpt(weights: dict, heads: int):
  """The same network in PyTorch eager, loaded with `weights`."""
  import torch
  from torch import nn
  F = torch.nn.functional
  t = lambda a: torch.from_numpy(np.array(a))   # a writable copy

  def linear(kernel, bias):
    layer = nn.Linear(*kernel.shape)
    layer.weight.data, layer.bias.data = t(kernel.T), t(bias)
    return layer

  def norm(sb):
    layer = nn.LayerNorm(sb[0].shape[0], eps=EPS)
    layer.weight.data, layer.bias.data = t(sb[0]), t(sb[1])
    return layer

  class Block(nn.Module):
    def __init__(self, b):
      super().__init__()
      self.ln1, self.ln2 = norm(b["ln1"]), norm(b["ln2"])
      self.qkv = linear(b["qkv"], b["qkv_bias"])
      self.out = linear(b["out"], b["out_bias"])
      self.fc = linear(b["fc"], b["fc_bias"])
      self.proj = linear(b["proj"], b["proj_bias"])

    def attend(self, x, cache=None):
      n, length, width = x.shape
      q, k, v = (z.view(n, length, heads, -1).transpose(1, 2)
                 for z in self.qkv(self.ln1(x)).split(width, -1))
      if cache is not None:   # [keys, values] of the positions before
        if cache[0] is not None:
          k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        cache[0], cache[1] = k, v
      causal = cache is None or length > 1
      a = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
      return self.out(a.transpose(1, 2).reshape(n, length, width))

    def forward(self, x, cache=None):
      x = x + self.attend(x, cache)
      return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

  class GPT(nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = nn.Parameter(t(weights["embed"]))
      self.positions = nn.Parameter(t(weights["positions"]))
      self.blocks = nn.ModuleList([Block(b) for b in weights["blocks"]])
      self.ln = norm(weights["ln"])

    def forward(self, x, caches=None, start: int = 0):
      h = self.embed[x] + self.positions[start:start + x.shape[1]]
      for i, block in enumerate(self.blocks):
        h = block(h, None if caches is None else caches[i])
      return self.ln(h) @ self.embed.T

  return GPT()


def time_torch(weights: dict, heads: int, ds: data.Dataset, steps: int,
               epochs: int) -> tuple[float, float]:
  """(tokens/s over the epochs after the first, validation bits per byte)
  of the PyTorch eager loop, on fit's batch order."""
  import torch
  F = torch.nn.functional
  net = torch_gpt(weights, heads)
  opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE,
                          weight_decay=WEIGHT_DECAY)
  x = torch.from_numpy(ds.x_train.astype(np.int64))
  y = torch.from_numpy(ds.y_train.astype(np.int64))
  times = []
  for e in range(epochs):
    order = torch.from_numpy(np.asarray(
        train.epoch_order(0, e, len(x), BATCH)).astype(np.int64))
    t = time.perf_counter()
    for idx in order:
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(net(x[idx]).flatten(0, 1), y[idx].flatten())
      loss.backward()
      opt.step()
    loss.item()
    times.append(time.perf_counter() - t)
  vx = torch.from_numpy(ds.x_val.astype(np.int64))
  vy = torch.from_numpy(ds.y_val.astype(np.int64))
  with torch.no_grad():
    nll = np.mean([F.cross_entropy(net(vx[i:i + BATCH]).flatten(0, 1),
                                   vy[i:i + BATCH].flatten()).item()
                   for i in range(0, len(vx), BATCH)])
  return (_tokens_per_second(steps, times, x.shape[1]),
          nll / math.log(2))


def torch_generate(net, prompt: np.ndarray, tokens: int) -> np.ndarray:
  """Greedy decoding with a key/value cache: the prompt in one pass, then
  one position per step."""
  import torch
  caches = [[None, None] for _ in net.blocks]
  ids = torch.from_numpy(prompt.astype(np.int64))[None]
  out = []
  with torch.no_grad():
    logits = net(ids, caches, 0)
    for i in range(tokens):
      token = logits[0, -1].argmax()
      out.append(int(token))
      if i + 1 < tokens:
        logits = net(token.view(1, 1), caches, len(prompt) + i)
  return np.asarray(out)


# -------------------------------------------------------------- the suite

def _spec(model_spec: str) -> dict:
  name, kwargs = registry.parse_model_spec(model_spec)
  if name != "gpt":
    raise ConfigError(f"the lm suite benchmarks a gpt:LAYERS,HEADS,WIDTH; "
                      f"got {model_spec!r}")
  return {"layers": kwargs["layers"], "heads": kwargs["heads"],
          "width": kwargs["width"]}


def time_generation(spec: dict, prompt: np.ndarray, *, repeats: int,
                    torch_peer: bool, new_tokens: int = NEW_TOKENS) -> dict:
  """Greedy tokens/s at batch 1 of `jaxaccel.generate` (compiled once
  first) and the PyTorch cache loop, on one network of context
  prompt + new tokens; best of `repeats`, interleaved."""
  context = len(prompt) + new_tokens
  model = models.create("gpt", num_classes=256, context=context, **spec)
  variables = model.init(jax.random.key(0), np.zeros((1, context), np.int32))
  text = bytes(prompt.astype(np.uint8).tolist())
  first = generate(model, variables, text, tokens=new_tokens)   # compiles
  net = torch_gpt(fused_weights(variables["params"]), spec["heads"]) \
      if torch_peer else None
  best = {"jaxaccel": 0.0, "torch": 0.0}
  same = None
  for _ in range(repeats):
    best["jaxaccel"] = max(best["jaxaccel"], generate(
        model, variables, text, tokens=new_tokens)["tokens_per_second"])
    if net is not None:
      t = time.perf_counter()
      ids = torch_generate(net, prompt, new_tokens)
      best["torch"] = max(best["torch"], new_tokens / (time.perf_counter() - t))
      same = float(np.mean(ids == first["ids"][len(prompt):]))
  out = {"tokens_per_second": round(best["jaxaccel"], 1),
         "prompt": len(prompt), "new_tokens": new_tokens}
  if net is not None:
    out.update(torch_tokens_per_second=round(best["torch"], 1),
               ratio_vs_torch=round(best["jaxaccel"] / best["torch"], 3),
               greedy_agreement_with_torch=same)
  return out


def run_lm_suite(*, model_spec: str = DEFAULT_MODEL, steps: int = 40,
                 epochs: int = 3, repeats: int = 3, torch_peer: bool = True,
                 context: int = CONTEXT, prompt: int = PROMPT,
                 new_tokens: int = NEW_TOKENS, progress: bool = True) -> dict:
  """Training tokens/s and validation bits per byte of the three sides
  after `epochs` x `steps` steps (the first epoch, which compiles, is not
  timed); then generation tokens/s (`prompt` bytes, then `new_tokens`)."""
  spec = _spec(model_spec)
  torch_missing = torch_peer and not torch_available()
  torch_peer = torch_peer and not torch_missing
  full = lm_data(steps, context=context)
  n = steps * BATCH
  ds = dataclasses.replace(full, x_train=full.x_train[:n],
                           y_train=full.y_train[:n], x_val=full.x_val[:256],
                           y_val=full.y_val[:256])
  model = models.create("gpt", num_classes=256, context=context, **spec)
  variables, _ = core.init_variables(model, (context,), dtype=jnp.int32)
  weights = fused_weights(variables["params"])
  say = print if progress else (lambda *a, **k: None)

  say(f"lm suite: {model_spec}, context {context}, batch {BATCH}, "
      f"{epochs} x {steps} steps per side", flush=True)
  result = train.fit(model, _tx(), ds, epochs=epochs, batch_size=BATCH,
                     progress=False)
  ours = {"tokens_per_second": result.steps_per_second * BATCH * context,
          "val_bits_per_byte": train.evaluate(
              model, result.state, ds.x_val, ds.y_val)["bits_per_byte"]}
  say(f"  jaxaccel {ours['tokens_per_second']:.0f} tokens/s", flush=True)
  nnx_tps, nnx_bpb = time_nnx({**spec, "context": context}, weights, ds,
                              steps, epochs)
  say(f"  flax NNX {nnx_tps:.0f} tokens/s", flush=True)
  gpt = {"tokens_per_second": round(ours["tokens_per_second"], 1),
         "flax_tokens_per_second": round(nnx_tps, 1),
         "ratio_vs_flax": round(ours["tokens_per_second"] / nnx_tps, 3),
         "val_bits_per_byte": round(ours["val_bits_per_byte"], 4),
         "flax_val_bits_per_byte": round(nnx_bpb, 4)}
  if torch_peer:
    torch_tps, torch_bpb = time_torch(weights, spec["heads"], ds, steps, epochs)
    say(f"  PyTorch eager {torch_tps:.0f} tokens/s", flush=True)
    gpt.update(torch_tokens_per_second=round(torch_tps, 1),
               ratio_vs_torch=round(ours["tokens_per_second"] / torch_tps, 3),
               torch_val_bits_per_byte=round(torch_bpb, 4))
  flops = _step_flops(model, (context,))
  gpt["gflops"] = round(flops * ours["tokens_per_second"]
                        / (BATCH * context) / 1e9, 1)
  text = ds.x_val[0, :prompt].astype(np.int32)
  gpt["generation"] = time_generation(spec, text, repeats=repeats,
                                      torch_peer=torch_peer,
                                      new_tokens=new_tokens)
  return {"suite": "lm", "dataset": "pycode", "context": context,
          "batch_size": BATCH, "steps": steps * epochs,
          "timed_steps": steps * (epochs - 1),
          "optimizer": f"adamw({LEARNING_RATE}, weight_decay={WEIGHT_DECAY})",
          "matmul_gflops": round(matmul_gflops(), 1),
          "torch_missing": torch_missing,
          "models": {"gpt": {"spec": model_spec, **gpt}}}


def _step_flops(model, input_shape) -> float:
  state = core.init_state(model, _tx(), input_shape, dtype=jnp.int32)
  batch = {"x": jnp.zeros((BATCH, *input_shape), jnp.int32),
           "y": jnp.zeros((BATCH, *input_shape), jnp.int32)}
  step = jax.jit(core.make_train_step(model, _tx(), task="lm"))
  cost = step.lower(state, batch).cost_analysis()   # no second compile
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0))


def format_lm_report(r: dict) -> str:
  """The lm suite for people: each side's tokens/s and bits per byte."""
  g = r["models"]["gpt"]
  rows = [["jaxaccel fit", f"{g['tokens_per_second']:.0f}", "1.00",
           f"{g['val_bits_per_byte']:.3f}"],
          ["flax NNX (nnx.jit)", f"{g['flax_tokens_per_second']:.0f}",
           f"{g['ratio_vs_flax']:.2f}", f"{g['flax_val_bits_per_byte']:.3f}"]]
  if "torch_tokens_per_second" in g:
    rows.append(["PyTorch eager", f"{g['torch_tokens_per_second']:.0f}",
                 f"{g['ratio_vs_torch']:.2f}",
                 f"{g['torch_val_bits_per_byte']:.3f}"])
  lines = [f"{g['spec']} on pycode, context {r['context']}, batch "
           f"{r['batch_size']}, {r['optimizer']}, {r['steps']} steps "
           f"({r['timed_steps']} timed)", ""]
  lines += _aligned(["side", "tokens/s", "jaxaccel x", "val bits/byte"],
                          rows)
  lines.append(f"\njaxaccel: {g['gflops']} GFLOP/s of {r['matmul_gflops']} "
               "(this machine's float32 matmul rate)")
  gen = g["generation"]
  line = (f"generation, batch 1, {gen['prompt']}-byte prompt, "
          f"{gen['new_tokens']} new bytes (greedy): jaxaccel "
          f"{gen['tokens_per_second']:.0f} tokens/s")
  if "torch_tokens_per_second" in gen:
    line += (f", PyTorch with its cache {gen['torch_tokens_per_second']:.0f} "
             f"({gen['ratio_vs_torch']:.2f}x); greedy tokens equal on "
             f"{gen['greedy_agreement_with_torch']:.0%}")
  lines.append(line)
  if r.get("torch_missing"):
    lines.append("PyTorch is not installed: pip install 'jaxaccel[bench]' "
                 "for its side")
  return "\n".join(lines)
