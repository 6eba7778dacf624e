"""`jaxaccel bench --suite compress`: the shipped recipes on the MLP and
CNN, against jaxpruner's schedule and qwix int8."""

from __future__ import annotations

import dataclasses
import os
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxaccel import core, data, models, optim, train
from jaxaccel.bench.common import BATCH, _jitted_call, bench_data, interleaved_ms
from jaxaccel.bench.peers import qwix_int8

# ------------------------------------------------------------ compress suite

def _cosine_adam(epochs: int, steps_per_epoch: int, lr: float = 1e-3):
  return optim.cosine_adam(lr, epochs * steps_per_epoch)


def _mlp_name(widths) -> str:
  return "mlp_" + "_".join(str(w) for w in widths)


# The default run's share of each recipe's fine-tuning (epochs and
# min_steps), so the suite ends within 10 minutes on a 2-core CPU; --full
# runs the recipes as shipped.
REDUCED = 0.25
MLP_RECIPES = ("prune-90", "int8", "prune-90-int8", "lowrank", "shrink-50")


def _scaled(stages: list[dict], share: float) -> list[dict]:
  """A recipe's stages with `share` of their training (epochs, min_steps,
  max_steps)."""
  out = []
  for st in stages:
    st = dict(st)
    for key in ("epochs", "min_steps", "max_steps"):
      if st.get(key):
        st[key] = max(0 if key == "min_steps" else 1,
                      int(round(st[key] * share)))
    out.append(st)
  return out


def polynomial_schedule_gap(params, schedule: dict, target: float) -> dict:
  """`prune_gradually`'s realized global sparsity after each mask update
  against jaxpruner's published schedule (its PolynomialSchedule: Zhu &
  Gupta's s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))^3, power 3,
  written here from the formula: jaxpruner is not on the package index).
  The weights get no gradient, so the masks alone move the sparsity."""
  from jaxaccel.compress import pruning
  t0, t1, every = schedule["begin_step"], schedule["end_step"], schedule["every"]
  tx = pruning.prune_gradually(target, begin_step=t0, end_step=t1, every=every,
                               scope="global")
  kernels = lambda p: [k for k in jax.tree.leaves(p) if k.ndim >= 2]
  total = sum(k.size for k in kernels(params))
  zeros = jax.tree.map(jnp.zeros_like, params)

  @jax.jit
  def run(params):
    def body(carry, _):
      p, st = carry
      u, st = tx.update(zeros, st, p)
      p = optax.apply_updates(p, u)
      return (p, st), sum(jnp.sum(k == 0) for k in kernels(p)) / total
    return jax.lax.scan(body, (params, tx.init(params)), None,
                        length=t1 + 1)[1]
  realized = np.asarray(run(params))
  updates = range(t0, t1 + 1, every)
  published = [target * (1 - (1 - (t - t0) / max(t1 - t0, 1)) ** 3)
               for t in updates]
  gap = max(abs(float(realized[t]) - s) for t, s in zip(updates, published))
  return {"updates": len(updates), "max_abs_difference": gap,
          "final_sparsity": round(float(realized[t1]), 6),
          "by_update": [[t, round(float(realized[t]), 6), round(s, 6)]
                        for t, s in zip(updates, published)]}


def _recipe_figures(records: list[dict], base: dict) -> dict:
  """One recipe's figures from `compress.run`'s records: the last stage's
  against the dense model's."""
  last = records[-1]
  return {"accuracy": last["accuracy"],
          "loss_points": round(100 * (base["accuracy"] - last["accuracy"]), 3),
          "size_bytes": last["size_bytes"],
          "ratio": round(base["size_bytes"] / last["size_bytes"], 2),
          "parameters": last["parameters"], "sparsity": last["sparsity"],
          "latency_ms": last["latency_ms"],
          "seconds": round(sum(r.get("seconds", 0) for r in records), 1),
          "stages": records[1:]}


def int8_against_float32(model, variables, ds: data.Dataset, *, rounds: int,
                         repeats: int, extra: dict | None = None) -> list[dict]:
  """Batch-1024 ms of the model's float32 forward pass ("float32") and of
  its int8 program ("int8"; calibrated as the int8 recipe calibrates),
  plus any `extra` jitted forward passes, in `rounds` of interleaved
  timing in this process: one {side: ms} dict a round."""
  from jaxaccel.compress import int8
  program = int8.convert(model, variables, int8.calibration_batches(
      ds.x_train), percentile=99.99)
  f32 = jax.jit(lambda x: models.adapt(model).logits(variables, x))
  xb = np.resize(ds.x_test, (1024, *ds.input_shape))
  calls = {k: _jitted_call(f, xb) for k, f in
           {"float32": f32, "int8": program.forward, **(extra or {})}.items()}
  return [interleaved_ms(calls, repeats=repeats, block=min(10, repeats))
          for _ in range(rounds)]


def _median_ms(by_round: list[dict]) -> dict:
  return {k: round(statistics.median(r[k] for r in by_round), 3)
          for k in by_round[0]}


def _peer_figures(model, variables, ds, figures: dict, rounds: int,
                  repeats: int) -> dict:
  """jaxaccel beside the peer libraries: the int8 recipe against qwix's PTQ
  (accuracy, seconds, batch-1024 ms in interleaved rounds), the prune-90
  recipe's schedule against jaxpruner's formula."""
  out = {}
  prune = figures["prune-90"]["stages"][0]
  out["jaxpruner_schedule"] = polynomial_schedule_gap(
      variables["params"], prune["schedule"], prune["options"]["sparsity"])
  peer = qwix_int8(model, variables, ds)
  if peer is None:
    out["qwix_int8"] = None
    return out
  qwix_figures, qwix_forward = peer
  ms = _median_ms(int8_against_float32(model, variables, ds, rounds=rounds,
                                       repeats=repeats,
                                       extra={"qwix int8": qwix_forward}))
  ms["jaxaccel int8"] = ms.pop("int8")
  out["qwix_int8"] = {"qwix": qwix_figures,
                      "jaxaccel": {"accuracy": figures["int8"]["accuracy"],
                                   "seconds": figures["int8"]["seconds"]},
                      "float32_accuracy": figures["dense"]["accuracy"],
                      "latency_ms_batch_1024": ms}
  return out


def run_compress_suite(*, dataset: str = "auto", model_names=("mlp", "cnn"),
                       full: bool = False, epochs: int | None = None,
                       seeds: int | None = None, share: float | None = None,
                       teacher_widths=(1200, 1200), latency_rounds: int = 5,
                       latency_repeats: int = 20, stage_latency: bool = True,
                       progress: bool = True) -> dict:
  """Measures the compression targets with the shipped recipes.

  Every figure comes from `compress.run` with a recipe file, as `jaxaccel
  compress --from RUN --recipe NAME` runs it, against a dense model trained
  in this run (Adam, cosine decay, standardized inputs): LeNet-300-100
  through prune-90, int8, prune-90-int8, lowrank, shrink-50; a wide MLP
  (`teacher_widths`) through distill, against the same student trained on
  labels alone; the CNN through int8, its integer convolutions timed against
  float32.

  Args:
    full: the recipes as shipped, 10 dense epochs, 3 seeds (the README's
      figures). By default the recipes' fine-tuning is cut to a quarter, the
      dense models train 5 epochs (the CNN 2) and students use one seed.
    epochs, seeds, share: override the dense epochs, the student seeds and
      the share of the recipes' fine-tuning.
    latency_rounds: interleaved rounds of the CNN's int8/float32 timing.
    latency_repeats: timed batch-1024 calls of each side a round.
    stage_latency: each stage record's batch-1 and batch-1024 latency.
  """
  from jaxaccel.compress import stages as cstages
  share = share or (1.0 if full else REDUCED)
  epochs = epochs or (10 if full else 5)
  seeds = seeds or (3 if full else 1)
  ds = bench_data(dataset, normalize="standardize")
  per_epoch = len(ds.x_train) // BATCH
  settings = cstages.Settings(batch_size=BATCH, progress=False,
                              latency=stage_latency)
  out = {"suite": "compress", "dataset": ds.name, "batch_size": BATCH,
         "epochs": epochs, "seeds": seeds, "full": full,
         "recipe_share": share, "backend": jax.default_backend(),
         "cpu_count": os.cpu_count()}
  todo = (["dense"] + list(MLP_RECIPES) + ["peers", "labels only", "teacher",
                                           "distill"]
          + (["cnn", "cnn int8"] if "cnn" in model_names else []))
  bar = tqdm(total=len(todo), desc="compress bench", disable=not progress,
             leave=False)

  def trained(model, n_epochs, seed=0):
    result = train.fit(model, _cosine_adam(n_epochs, per_epoch), ds,
                       epochs=n_epochs, batch_size=BATCH, seed=seed,
                       progress=False)
    return core.variables_of(result.state)

  def recipe(name, model, variables, seed=0, **options):
    bar.set_postfix(stage=name)
    stages = _scaled(cstages.load_recipe(name)["stages"], share)
    stages = [{**st, **options} for st in stages]
    _, _, records = cstages.run(model, variables, ds, stages,
                                settings=dataclasses.replace(settings, seed=seed))
    return records

  bar.set_postfix(stage="dense")
  lenet = models.create("mlp", num_classes=ds.num_classes, widths=(300, 100))
  dense = trained(lenet, epochs)
  bar.update()
  base = None
  out["mlp"] = {}
  for name in MLP_RECIPES:
    records = recipe(name, lenet, dense)
    bar.update()
    base = base or records[0]
    out["mlp"][name] = _recipe_figures(records, base)
  out["mlp"]["dense"] = {k: base[k] for k in ("accuracy", "size_bytes",
                                              "parameters", "latency_ms")}
  bar.set_postfix(stage="peers")
  out["mlp"]["peers"] = _peer_figures(lenet, dense, ds, out["mlp"],
                                      latency_rounds, latency_repeats)

  # Distillation: a 784-64-64-10 student taught by a wide MLP against the
  # same student trained on labels alone (its best mean over 1x, 2x and 4x
  # the dense epochs, chosen on the test set, which favours it).
  student_spec = "mlp:64,64"
  bar.set_postfix(stage="labels only")
  student = models.create("mlp", num_classes=ds.num_classes, widths=(64, 64))
  labels_only = {}
  for e in (epochs, 2 * epochs, 4 * epochs):
    labels_only[e] = [train.evaluate(student, trained(student, e, s), ds.x_test,
                                     ds.y_test)["accuracy"]
                      for s in range(seeds)]
  best_e = max(labels_only, key=lambda e: np.mean(labels_only[e]))
  a_alone = float(np.mean(labels_only[best_e]))
  bar.update()
  bar.set_postfix(stage="teacher")
  wide = models.create("mlp", num_classes=ds.num_classes,
                       widths=tuple(teacher_widths))
  wide_vars = trained(wide, epochs)
  bar.update()
  runs = [recipe("distill", wide, wide_vars, seed=s, student=student_spec)
          for s in range(seeds)]
  bar.update()
  taught = [records[-1]["accuracy"] for records in runs]
  t_acc = runs[0][0]["accuracy"]
  gap = t_acc - a_alone
  a_kd = float(np.mean(taught))
  out["mlp"]["distill"] = {
      "student": student_spec, "teacher": _mlp_name(teacher_widths),
      "teacher_accuracy": t_acc, "student_distilled": a_kd,
      "student_labels_only": a_alone, "labels_only_epochs": best_e,
      "labels_only_by_epochs": {str(e): v for e, v in labels_only.items()},
      "distilled_by_seed": taught,
      "gap_closed": round((a_kd - a_alone) / gap, 3) if gap > 0 else None,
      "agreement": runs[0][-1]["agreement"],
      "seconds": round(sum(r.get("seconds", 0) for r in runs[0]), 1),
      "stages": runs[0][1:]}

  if "cnn" in model_names:
    bar.set_postfix(stage="cnn")
    cnn = models.create("cnn", num_classes=ds.num_classes)
    cnn_vars = trained(cnn, 3 if full else 2)
    bar.update()
    records = recipe("int8", cnn, cnn_vars)
    bar.update()
    figures = _recipe_figures(records, records[0])
    # int8 against float32 at batch 1024, interleaved rounds in this process.
    q = records[-1]
    by_round = int8_against_float32(cnn, cnn_vars, ds, rounds=latency_rounds,
                                    repeats=latency_repeats)
    ms = {k: statistics.median(r[k] for r in by_round) for k in by_round[0]}
    figures.update(
        int8_layers=q["int8_layers"], float_layers=q["float_layers"],
        latency_ms_batch_1024={k: round(v, 3) for k, v in ms.items()},
        speedup_batch_1024=round(ms["float32"] / ms["int8"], 3),
        speedup_batch_1024_by_round=[round(r["float32"] / r["int8"], 3)
                                     for r in by_round])
    out["cnn"] = {"dense": {k: records[0][k] for k in ("accuracy", "size_bytes",
                                                      "latency_ms")},
                  "int8": figures}
  bar.close()
  return out


def format_compress_report(r: dict) -> str:
  """The compress suite: each figure beside its target."""
  m = r["mlp"]
  yes = lambda ok: "met" if ok else "NOT met"
  mode = ("recipes as shipped" if r["full"] else
          f"reduced: {r['recipe_share']:g} of each recipe's fine-tuning, "
          f"{r['epochs']} dense epochs, {r['seeds']} seed(s); --full for "
          "the README figures")
  lines = [f"compression of LeNet-300-100 on {r['dataset']} ({mode})",
           f"  dense: {m['dense']['accuracy']:.4f}, "
           f"{m['dense']['size_bytes']:,} bytes float32"]
  targets = {"prune-90": ("loss", 0.5), "int8": ("loss", 0.3),
             "prune-90-int8": ("ratio", 20.0), "shrink-50": ("loss", 1.0)}
  for name in MLP_RECIPES:
    f = m[name]
    kind, bar_ = targets.get(name, (None, None))
    target = ""
    if kind == "loss":
      target = f"; target <= {bar_:g} pt: {yes(f['loss_points'] <= bar_)}"
    elif kind == "ratio":
      target = f"; target >= {bar_:g}x: {yes(f['ratio'] >= bar_)}"
    lat = f["latency_ms"] or {}
    speed = (f", batch-1024 {m['dense']['latency_ms']['batch_1024'] / lat['batch_1024']:.2f}x"
             " the dense latency" if lat and m["dense"]["latency_ms"] else "")
    lines.append(f"  --recipe {name}: {f['accuracy']:.4f} "
                 f"({-f['loss_points']:+.2f} pt), {f['size_bytes']:,} bytes = "
                 f"{f['ratio']:.1f}x smaller, {f['parameters']:,} parameters"
                 f"{speed}{target} [{f['seconds']:.0f} s]")
  peers = m["peers"]
  q = peers["qwix_int8"]
  if q is None:
    lines.append("  peer int8: qwix not installed (pip install "
                 "'jaxaccel[bench]')")
  else:
    ms = q["latency_ms_batch_1024"]
    lines.append(
        f"  peer int8 PTQ: jaxaccel {q['jaxaccel']['accuracy']:.4f} in "
        f"{q['jaxaccel']['seconds']:.1f} s (static calibrated scales), "
        f"{ms['jaxaccel int8']:.2f} ms at batch 1024; qwix "
        f"{q['qwix']['version']} {q['qwix']['accuracy']:.4f} in "
        f"{q['qwix']['seconds']:.1f} s (per-batch activation scales), "
        f"{ms['qwix int8']:.2f} ms; float32 {q['float32_accuracy']:.4f}, "
        f"{ms['float32']:.2f} ms")
  sched = peers["jaxpruner_schedule"]
  lines.append(
      f"  peer pruning schedule: prune-90's sparsity after each of its "
      f"{sched['updates']} mask updates against jaxpruner's polynomial "
      f"schedule (power 3): largest difference {sched['max_abs_difference']:.1e}"
      f" (jaxpruner is not on the package index: the formula, not its code)")
  d = m["distill"]
  gap = d["gap_closed"]
  lines.append(
      f"  --recipe distill ({d['student']} from {d['teacher']}, "
      f"{d['teacher_accuracy']:.4f}): {d['student_distilled']:.4f} against "
      f"{d['student_labels_only']:.4f} on labels alone (best of "
      f"{'/'.join(d['labels_only_by_epochs'])} epochs: "
      f"{d['labels_only_epochs']}); gap closed "
      + (f"{100 * gap:.0f}% (target >= 40%: {yes(gap >= 0.4)})"
         if gap is not None else "n/a (student not below teacher)")
      + f", agreement {d['agreement']:.3f}")
  if "cnn" in r:
    c = r["cnn"]["int8"]
    lines.append(
        f"  CNN --recipe int8: {c['accuracy']:.4f} against "
        f"{r['cnn']['dense']['accuracy']:.4f} ({-c['loss_points']:+.2f} pt; "
        f"target <= 1: {yes(c['loss_points'] <= 1.0)}); integer layers "
        f"{', '.join(c['int8_layers'])}"
        + (f"; float: {', '.join(c['float_layers'])}" if c["float_layers"] else "")
        + f"; batch 1024 {c['latency_ms_batch_1024']['int8']:.2f} ms vs "
        f"float32 {c['latency_ms_batch_1024']['float32']:.2f} ms = "
        f"{c['speedup_batch_1024']:.2f}x (target > 1: "
        f"{yes(c['speedup_batch_1024'] > 1.0)})")
  return "\n".join(lines)


