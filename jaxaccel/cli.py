"""The `jaxaccel` command: parses arguments, calls the library, prints.

Every command takes `--json`; then its last stdout line is one JSON object.
Bad input ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys

from jaxaccel.errors import ConfigError, DataError, JaxaccelError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
  """argparse that reports mistakes in one line, without the usage block."""

  def error(self, message):
    sys.stderr.write(f"jaxaccel: error: {message} (see `{self.prog} --help`)\n")
    sys.exit(EXIT_BAD_INPUT)


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
  if value <= 0:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
  return value


def _non_negative_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
  return value


def _fraction(text: str) -> float:
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
  if not 0.0 <= value < 1.0:
    raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value}")
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="jaxaccel", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  def common(p):
    p.add_argument("--json", action="store_true",
                   help="end with one JSON object on the last stdout line")
    p.add_argument("--no-progress", action="store_true",
                   help="hide progress bars")

  def data_args(p):
    p.add_argument("--dataset", default="digits",
                   help="digits, fashion_mnist, PATH.npz, DIR of train/, val/ "
                        "and test/ .npy arrays (streamed from disk), or text: "
                        "pycode, fortunes, PATH.txt, a folder of text files "
                        "(default: digits)")
    p.add_argument("--context", type=_positive_int, default=128,
                   help="text: bytes per window, the model's context "
                        "(default 128)")
    p.add_argument("--task", choices=("classification", "lm", "regression"),
                   help="what the model is trained for (default: from the "
                        "targets: integer labels classify, floats regress)")
    p.add_argument("--data-dir", help="directory of the Fashion-MNIST files")
    p.add_argument("--validation", type=_fraction, default=0.1,
                   help="fraction of training rows held out (default 0.1)")
    p.add_argument("--normalize", choices=("unit", "standardize"), default="unit")
    p.add_argument("--nan-policy", choices=("drop", "impute", "raise"),
                   default="drop", help="rows with NaN/inf (default: drop)")
    p.add_argument("--num-classes", type=_positive_int,
                   help="number of classes (default: from the labels)")

  p = sub.add_parser("train", help="train a model")
  common(p)
  data_args(p)
  p.add_argument("--model", default="mlp",
                 help="mlp, cnn or resnet18, optionally with widths: mlp:300,100")
  p.add_argument("--optimizer", default="adam(learning_rate=1e-3)",
                 help="optax chain spec, e.g. 'clip_by_global_norm(1.0) | adam(1e-3)'"
                      " or a .toml file")
  p.add_argument("--epochs", type=_positive_int,
                 help="passes over the training set (default 10)")
  p.add_argument("--steps", type=_positive_int,
                 help="train this many steps in all instead of --epochs (the "
                      "last epoch stops short)")
  p.add_argument("--batch-size", type=_positive_int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--augment", default="",
                 help="comma-separated: flip, shift, noise")
  p.add_argument("--early-stopping", type=_positive_int, metavar="PATIENCE",
                 help="stop after PATIENCE epochs without val accuracy gain")
  p.add_argument("--epoch-mode", choices=("auto", "scan", "stream"),
                 default="auto")
  p.add_argument("--out", help="run directory (default: runs/<time>-<model>)")
  p.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its last checkpoint; "
                      "with none there yet, start it (safe for requeued jobs)")
  p.add_argument("--tensorboard", action="store_true",
                 help="also write each epoch's metrics as TensorBoard scalars "
                      "to OUT/tensorboard")
  p.add_argument("--parallel", choices=("none", "pmap", "sharded"),
                 default="none", help="data parallelism over the devices")
  p.add_argument("--mesh", help="with --parallel sharded: DATA or DATAxMODEL "
                 "device mesh, e.g. 8 or 2x4 (dense layers split over MODEL)")
  p.add_argument("--fsdp", action="store_true",
                 help="with --parallel sharded: split params and optimizer "
                      "state over the data axis too")
  p.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                 default="fp32", help="compute dtype; params stay float32")
  p.add_argument("--coordinator", metavar="HOST:PORT",
                 help="multi-process run: process 0's address, or 'auto' to "
                      "detect the cluster")
  p.add_argument("--num-processes", type=_positive_int,
                 help="multi-process run: how many processes take part")
  p.add_argument("--process-id", type=int,
                 help="multi-process run: this process's index, 0..N-1")
  p.add_argument("--coordinator-timeout", type=_positive_int, default=120,
                 metavar="SECONDS", help="give up joining after this long")
  p.add_argument("--init-from", metavar="RUN",
                 help="start from a trained run's variables where path and "
                      "shape match (transfer learning; freeze the body with "
                      "'... | freeze(PATTERN)' in --optimizer)")

  p = sub.add_parser("sweep", help="train many optimizer configs at once")
  common(p)
  data_args(p)
  p.add_argument("--model", default="mlp", help="as for train")
  p.add_argument("--optimizer", action="append", metavar="SPEC",
                 help="chain spec; repeat for several optimizer families "
                      "(default: adam(1e-3))")
  p.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2",
                 help="hyperparameter values to sweep, e.g. "
                      "learning_rate=1e-4,1e-3,1e-2; repeat for more names")
  p.add_argument("--seeds", type=_positive_int, default=1,
                 help="seeds per configuration (0 .. N-1)")
  p.add_argument("--epochs", type=_positive_int, default=10)
  p.add_argument("--batch-size", type=_positive_int, default=128)
  p.add_argument("--halving-every", type=_positive_int, metavar="EPOCHS",
                 help="successive halving: keep the better half every EPOCHS")
  p.add_argument("--sequential-sample", type=_non_negative_int, default=2,
                 metavar="N",
                 help="configs timed one after another with fit to estimate "
                      "the sequential time (0: skip)")
  p.add_argument("--batch-sizes", metavar="B1,B2",
                 help="search batch sizes instead (learning rate scaled "
                      "linearly from --batch-size), ranked by time to accuracy")
  p.add_argument("--target", type=float,
                 help="validation accuracy of the batch-size search "
                      "(default: 99%% of the best reached)")
  p.add_argument("--plot", metavar="PNG", help="save a heat map (or, with "
                 "--batch-sizes, accuracy and throughput bars)")

  p = sub.add_parser("predict", help="predict classes with a trained run "
                     "or an exported artifact")
  common(p)
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--run", help="run directory of `train`")
  which.add_argument("--artifact", help="a file written by `jaxaccel export` "
                     "(runs without the model's code)")
  p.add_argument("--input", required=True,
                 help=".npy of raw inputs in the data set's units, rows first")
  p.add_argument("--output", help="write the predicted classes (other tasks: "
                 "the outputs) to this .npy")

  p = sub.add_parser("generate", help="continue a prompt with a trained "
                     "language model")
  common(p)
  which = p.add_mutually_exclusive_group(required=True)
  which.add_argument("--run", help="run directory of a language model "
                     "trained with `train` (text data, e.g. --model gpt)")
  which.add_argument("--artifact", help="a decoder written by `jaxaccel "
                     "export --run RUN` of a language model (runs without "
                     "the model's code)")
  p.add_argument("--prompt", required=True, help="the text to continue")
  p.add_argument("--tokens", type=_positive_int, default=100,
                 help="bytes to add (default 100; prompt and continuation "
                      "fit in the model's context)")
  p.add_argument("--temperature", type=float, default=0.0,
                 help="0: the most likely byte each step (default); above 0 "
                      "samples")
  p.add_argument("--top-k", type=_positive_int, help="sample among the K most "
                 "likely bytes")
  p.add_argument("--seed", type=int, default=0)

  p = sub.add_parser("export", help="write a run's model as a StableHLO or "
                     "ONNX file that runs without its Python code")
  common(p)
  p.add_argument("--run", required=True, help="run directory of `train`")
  p.add_argument("--format", required=True, help="stablehlo or onnx")
  p.add_argument("--int8", action="store_true",
                 help="int8 x int8 -> int32 products for every matmul and "
                      "convolution on a weight, calibrated on training inputs")
  p.add_argument("--out", required=True,
                 help="the file to write; a name ending in .gz writes it "
                      "gzip compressed (pruned weights shrink most)")

  p = sub.add_parser("compress", help="prune, quantize or distill a trained run")
  common(p)
  p.add_argument("--from", dest="from_dir",
                 help="run directory of `jaxaccel train`")
  p.add_argument("--recipe", metavar="NAME|PATH.toml",
                 help="a shipped recipe (see --list-recipes) or a TOML file "
                      "of [[stages]]; the flags below are a shorthand for one")
  p.add_argument("--list-recipes", action="store_true",
                 help="print the shipped recipes and stop")
  p.add_argument("--prune", type=float, metavar="SPARSITY",
                 help="fraction of weights set to zero, in [0, 1)")
  p.add_argument("--prune-method", default="magnitude",
                 help="magnitude, saliency, taylor or random (default magnitude)")
  p.add_argument("--prune-scope",
                 help="global or layer (default: global, as the recipes; "
                 "layer for channel and N:M patterns)")
  p.add_argument("--prune-schedule", choices=("gradual", "one-shot"),
                 help="gradual (default: over the fine-tuning, as the "
                 "prune-90 recipe) or one-shot (then --finetune-epochs)")
  p.add_argument("--prune-pattern", default="unstructured",
                 help="unstructured, channel, or N:M such as 2:4")
  p.add_argument("--quantize", help="int8 or int4")
  p.add_argument("--distill-student", metavar="MODEL",
                 help="train this student from the run, e.g. mlp:64,64")
  p.add_argument("--distill-epochs", type=_positive_int, default=10)
  p.add_argument("--temperature", type=float, default=4.0)
  p.add_argument("--alpha", type=float, default=0.9)
  p.add_argument("--mixup", type=float, metavar="CONCENTRATION",
                 help="distill on inputs mixed with Beta(C, C) weights, the "
                      "teacher labelling them (needs --alpha 1)")
  p.add_argument("--finetune-epochs", type=int, default=None,
                 help="epochs of fine-tuning with the pruning masks held "
                 "(default 10 for gradual pruning, 0 for one-shot)")
  p.add_argument("--learning-rate", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", help="write params.npz, report.json and the "
                 "compressed model as a run directory (for predict --run and "
                 "export --run) here")
  p.add_argument("--plot", metavar="PATH",
                 help="save an accuracy-vs-size chart of every stage")

  p = sub.add_parser("demo", help="train a small model on digits and report")
  common(p)
  p.add_argument("--epochs", type=_positive_int, default=30)

  p = sub.add_parser("bench", help="side-by-side throughput against peers")
  common(p)
  p.add_argument("--suite", choices=("train", "sweep", "compress", "parallel",
                                     "deploy", "lm"),
                 default="train")
  p.add_argument("--dataset", default="auto",
                 help="fashion_mnist (digits when absent) or a data set name")
  p.add_argument("--models", help="comma-separated (default: mlp,cnn,resnet18 "
                                  "for the train suite, mlp,cnn otherwise; "
                                  "lm: one gpt:LAYERS,HEADS,WIDTH, default "
                                  "gpt:4,4,128)")
  p.add_argument("--steps", type=_positive_int,
                 help="steps per timed epoch at batch 128 (lm: at batch 32, "
                      "default 40; otherwise default: 400 for "
                      "mlp, 60 for cnn, 2 for resnet18)")
  p.add_argument("--repeats", type=_positive_int, default=3,
                 help="runs per side, interleaved; the best is kept")
  p.add_argument("--no-torch", action="store_true",
                 help="skip the PyTorch peer")
  p.add_argument("--full", action="store_true",
                 help="compress suite: the recipes as shipped and 3 seeds (the "
                      "README figures; about an hour on 2 cores); by default "
                      "their fine-tuning is cut to a quarter")
  return parser


# ----------------------------------------------------------------- commands

def _emit(args, human: str, payload: dict) -> None:
  """Prints the readable report; with --json, the JSON object last."""
  print(human)
  if args.json:
    print(json.dumps(payload, default=_json_default))


def _json_default(v):
  if hasattr(v, "tolist"):
    return v.tolist()
  raise TypeError(f"not JSON serializable: {type(v).__name__}")


@dataclasses.dataclass
class _TrainingData:
  """What `train` trains on: a loaded data set's splits, or streams of the
  arrays of a directory on disk."""
  train: object                 # a Dataset, or a Stream of the train split
  val: object                   # what `fit` validates on (None: the Dataset's)
  test: object                  # what the result is tested on, or None
  input_shape: tuple
  outputs: int                  # the model's outputs: classes, or values
  task: str | None
  streamed: bool


def _training_data(args) -> _TrainingData:
  import numpy as np
  from jaxaccel import data, tasks
  if data.is_text(args.dataset):
    ds = data.load_text(args.dataset, context=args.context,
                        validation=args.validation, seed=args.seed)
    return _TrainingData(train=ds, val=None, test=ds.arrays("test"),
                         input_shape=ds.input_shape, outputs=256,
                         task=args.task or "lm", streamed=False)
  if pathlib.Path(args.dataset).is_dir():
    files = data.split_files(args.dataset)
    columns = files["train"].columns
    if "y" not in columns:
      raise DataError(f"{args.dataset}/train holds no y.npy (the targets)")
    y = columns["y"]
    task = args.task or tasks.infer(y[:1])
    if task == "classification":
      outputs = args.num_classes or int(y.max()) + 1
    else:
      outputs = int(np.prod(y.shape[1:], dtype=int))
    stream = data.from_grain(files["train"], batch_size=args.batch_size,
                             seed=args.seed, name=args.dataset)
    return _TrainingData(train=stream, val=files.get("val"),
                         test=files.get("test"), input_shape=columns["x"].shape[1:],
                         outputs=outputs, task=task, streamed=True)
  ds = data.load(args.dataset, data_dir=args.data_dir,
                 validation=args.validation, seed=args.seed,
                 normalize=args.normalize, nan_policy=args.nan_policy,
                 num_classes=args.num_classes,
                 regression=args.task == "regression")
  outputs = (ds.num_classes if ds.num_classes is not None
             else int(np.prod(ds.y_train.shape[1:], dtype=int)))
  return _TrainingData(train=ds, val=None, test=ds.arrays("test"),
                       input_shape=ds.input_shape, outputs=outputs,
                       task=args.task, streamed=False)


def cmd_train(args) -> None:
  from jaxaccel import core, data, models, optim, parallel, train
  if args.steps and args.epochs:
    raise ConfigError(f"--epochs {args.epochs} and --steps {args.steps}: give "
                      "one (the length of the run)")
  # Joins the other processes before anything touches a device.
  parallel.initialize(args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id,
                      timeout_seconds=args.coordinator_timeout)
  mesh_shape = parallel.parse_mesh(args.mesh) if args.mesh else None
  calls = optim.parse(args.optimizer)            # spec errors before any work
  spec = optim.to_string(calls)
  name, kwargs = models.parse_model_spec(args.model)
  augment = (data.make_augment([a for a in args.augment.split(",") if a])
             if args.augment else None)
  if args.resume and not args.out:
    raise ConfigError("--resume needs --out DIR, the run to continue")
  training = _training_data(args)
  models.check_input(name, training.input_shape)
  if name in models.SEQUENCE_MODELS:
    kwargs.setdefault("context", training.input_shape[0])
  model = models.create(name, num_classes=training.outputs, **kwargs)
  out = args.out or os.path.join(
      "runs", f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{name}-"
      f"{pathlib.Path(args.dataset).stem}")
  early = (core.EarlyStopping(patience=args.early_stopping)
           if args.early_stopping else None)
  run_config = {"command": "train", "augment": args.augment,
                "model_name": args.model}
  import jax
  callbacks = ([core.TensorBoard(pathlib.Path(out) / "tensorboard")]
               if args.tensorboard else [])
  state = None
  if args.init_from:
    _, source, _ = train.load_run(args.init_from)
    variables, copied = core.warm_start(model, source, training.input_shape,
                                         seed=args.seed)
    from jaxaccel import precision
    _, tx = precision.apply_policy(model, optim.build(calls), args.precision)
    state = core.init_state(model, tx, training.input_shape, seed=args.seed,
                             variables=variables)
    run_config["init_from"] = {"run": args.init_from, "copied": copied}
    if not args.no_progress:
      print(f"warm start from {args.init_from}: copied {', '.join(copied)}")
  result = train.fit(model, calls, training.train,
                     epochs=None if args.steps else args.epochs or 10,
                     steps=args.steps,
                     val_data=training.val, task=training.task,
                     **({} if training.streamed else {"batch_size": args.batch_size}),
                     seed=args.seed, out=out,
                     resume=args.resume, early_stopping=early, augment=augment,
                     epoch_mode=args.epoch_mode, progress=not args.no_progress,
                     run_config=run_config, state=state, parallel=args.parallel,
                     mesh_shape=mesh_shape, precision=args.precision,
                     fsdp=args.fsdp, callbacks=callbacks)
  task = train.resolve_task(training.task, training.train)
  test = (train.evaluate(model, result.state, training.test, task=task)
          if training.test is not None else {})
  if not parallel.is_main_process():
    return
  last = result.history[-1] if result.history else {}
  metric = task.metric
  payload = {
      **{f"test_{k}": v for k, v in test.items()}, "task": task.name,
      "train_loss": last.get("train_loss"),
      f"val_{metric}": last.get(f"val_{metric}"),
      "epochs": last.get("epoch", 0), "steps": last.get("step", 0),
      "stopped_early": result.stopped_early,
      "skipped_steps": sum(r["skipped_steps"] for r in result.history),
      "steps_per_second": round(result.steps_per_second, 2),
      "wall_seconds": round(result.wall_seconds, 3),
      "parameters": models.count_params(result.state.params),
      "devices": jax.device_count(), "processes": jax.process_count(),
      "parallel": args.parallel, "precision": args.precision,
      "optimizer": spec, "model": args.model,
      "dataset": args.dataset, "out": str(out),
  }
  if task.name == "lm":   # a window's every position is a token trained on
    payload["tokens_per_second"] = round(
        result.steps_per_second * args.batch_size * training.input_shape[0], 1)
  shown = (f"test {metric.replace('_', ' ')} {test[metric]:.4f}" if test
           else "no test split")
  human = (f"{args.model} on {args.dataset}: {shown}, "
           f"train loss {payload['train_loss']:.4f}, {payload['epochs']} epochs, "
           f"{payload['steps_per_second']:.0f} steps/s, "
           f"{payload['parameters']:,} parameters, {payload['wall_seconds']:.1f} s"
           f"\nrun saved in {out}")
  _emit(args, human, payload)


def _read_npy(path: pathlib.Path):
  import numpy as np
  if not path.is_file():
    raise DataError(f"input file {path} does not exist; give a .npy of inputs")
  try:
    return np.load(path, allow_pickle=False)
  except Exception as e:
    raise DataError(f"cannot read {path} as .npy ({type(e).__name__}: {e}); "
                    "save it with numpy.save") from None


def cmd_predict(args) -> None:
  import numpy as np
  path = pathlib.Path(args.input)
  if args.artifact:
    from jaxaccel import export
    artifact = export.load(args.artifact)
    if isinstance(artifact, export.DecoderArtifact):
      raise ConfigError(f"{args.artifact} is a language model's decoder: "
                        f"continue text with jaxaccel generate --artifact "
                        f"{args.artifact} --prompt TEXT")
    num_classes = artifact.header["num_classes"]
    logits = artifact(_read_npy(path))
  else:
    from jaxaccel import data, train
    from jaxaccel.checkpoint import RunDir
    model, variables, config = train.load_run(args.run)
    x = data.check_rows(_read_npy(path), config["input_shape"], "the run")
    stats = RunDir(args.run).read_normalization()
    logits = train.predict(model, variables, data.preprocess(x, stats))
    num_classes = config["num_classes"]
    if config.get("task", "classification") != "classification":
      # The outputs themselves: a regression's values, a sequence's logits.
      payload = {"count": int(len(logits)), "task": config["task"]}
      if args.output:
        np.save(args.output, logits)
        payload["output"] = args.output
      else:
        payload["outputs"] = logits.tolist()
      _emit(args, f"{len(logits)} outputs of shape {logits.shape[1:]}"
            + (f" written to {args.output}" if args.output else ""), payload)
      return
  classes = logits.argmax(-1).astype(np.int32)
  payload = {"count": int(len(classes))}
  if args.output:
    np.save(args.output, classes)
    payload["output"] = args.output
  else:
    payload["predictions"] = classes.tolist()
  counts = np.bincount(classes, minlength=num_classes)
  human = (f"{len(classes)} predictions"
           + (f" written to {args.output}" if args.output else
              f": {classes[:20].tolist()}{' ...' if len(classes) > 20 else ''}")
           + f"\nper class: {counts.tolist()}")
  _emit(args, human, payload)


def cmd_generate(args) -> None:
  from jaxaccel import train
  from jaxaccel.generate import generate
  sampling = dict(tokens=args.tokens, temperature=args.temperature,
                  top_k=args.top_k, seed=args.seed)
  if args.artifact:
    from jaxaccel import export
    artifact = export.load(args.artifact)
    if not isinstance(artifact, export.DecoderArtifact):
      raise ConfigError(f"{args.artifact} is a classifier, not a language "
                        "model's decoder: run it with jaxaccel predict "
                        f"--artifact {args.artifact} --input X.npy")
    out = artifact.generate(args.prompt, **sampling)
    _emit(args, out["text"], {"text": out["text"], "new_tokens":
                              out["new_tokens"], "tokens_per_second":
                              out["tokens_per_second"]})
    return
  model, variables, config = train.load_run(args.run)
  if config.get("task") != "lm":
    raise ConfigError(f"{args.run} is not a language model (its task is "
                      f"{config.get('task', 'classification')}): train one on "
                      "text, e.g. --dataset pycode --model gpt:4,4,128")
  out = generate(model, variables, args.prompt, **sampling)
  payload = {"text": out["text"], "new_tokens": out["new_tokens"],
             "tokens_per_second": out["tokens_per_second"]}
  _emit(args, out["text"], payload)


def cmd_export(args) -> None:
  from jaxaccel import export
  out = export.export_run(args.run, format=args.format, int8=args.int8,
                          out=args.out)
  payload = {**export.describe(out), "out": str(out)}
  layers = (f", int8 layers: {', '.join(payload['int8_layers'])}"
            + (f"; float: {', '.join(payload['float_layers'])}"
               if payload["float_layers"] else "")
            if payload["int8"] else "")
  encoding = " gzip" if payload["encoding"] == "gzip" else ""
  if payload.get("kind") == "decoder":
    human = (f"{args.format} decoder {out}: {payload['bytes']:,} bytes"
             f"{encoding}, context {payload['context']}, (batch, length) "
             f"byte ids and {len(payload['cache'])} cache arrays in, logits "
             f"and the cache out{layers}\n"
             f"run it: jaxaccel generate --artifact {out} --prompt TEXT")
    _emit(args, human, payload)
    return
  human = (f"{args.format} artifact {out}: {payload['bytes']:,} bytes"
           f"{encoding}, input "
           f"(batch, {', '.join(map(str, payload['input_shape']))}) float32 "
           f"raw, {payload['num_classes']} logits{layers}\n"
           f"run it: jaxaccel predict --artifact {out} --input X.npy")
  _emit(args, human, payload)


def cmd_demo(args) -> None:
  import tempfile
  import jax
  from jaxaccel import data, models, train
  ds = data.load("digits", validation=0.1, seed=0)
  model = models.create("mlp", num_classes=ds.num_classes, widths=(64, 64))
  with tempfile.TemporaryDirectory() as out:
    result = train.fit(model, "adam(learning_rate=1e-3)", ds, epochs=args.epochs,
                       batch_size=32, seed=0, out=out,
                       progress=not args.no_progress)
  test = train.evaluate(model, result.state, ds.x_test, ds.y_test)
  params = models.count_params(result.state.params)
  size = sum(x.nbytes for x in jax.tree.leaves(result.state.params))
  rows = [("dense float32 MLP 64-64-64-10", test["accuracy"], params, size)]
  compressed = _demo_compression_rows(model, result.state, ds,
                                      progress=not args.no_progress)
  rows += [(r["name"], r["accuracy"], r["parameters"], r["size_bytes"])
           for r in compressed]
  table = _table(["model", "test acc", "params", "bytes"],
                 [(r[0], f"{r[1]:.4f}", f"{r[2]:,}", f"{r[3]:,}") for r in rows])
  human = (f"digits (1500 train / 297 test), {args.epochs} epochs of Adam in "
           f"{result.wall_seconds:.1f} s\n{table}")
  last = compressed[-1]
  payload = {"test_accuracy_before": test["accuracy"],
             "size_bytes_before": size, "parameters": params,
             "test_accuracy_after": last["accuracy"],
             "size_bytes_after": last["size_bytes"],
             "compression_ratio": round(size / last["size_bytes"], 3),
             "sparsity": last["sparsity"],
             "wall_seconds": round(result.wall_seconds, 3),
             "rows": [dict(zip(("model", "test_accuracy", "parameters",
                                "size_bytes"), r)) for r in rows]}
  _emit(args, human, payload)


def _grid(items: list[str]) -> dict:
  grid = {}
  for item in items:
    name, sep, values = item.partition("=")
    try:
      if not sep or not name.isidentifier():
        raise ValueError
      grid[name] = [float(v) for v in values.split(",")]
    except ValueError:
      raise ConfigError(f"--grid {item!r}: write NAME=V1,V2,... with numbers, "
                        "e.g. learning_rate=1e-4,1e-3") from None
  return grid


def cmd_sweep(args) -> None:
  from jaxaccel import data, models, optim, sweep
  specs = args.optimizer or ["adam(learning_rate=1e-3)"]
  for spec in specs:
    optim.build(spec)                       # spec errors before any work
  grid = _grid(args.grid)
  name, kwargs = models.parse_model_spec(args.model)
  if args.batch_sizes:
    try:
      sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
      raise ConfigError(f"--batch-sizes {args.batch_sizes!r}: write whole "
                        "numbers such as 32,64,128") from None
  if args.batch_sizes and (len(specs) > 1 or grid):
    raise ConfigError("--batch-sizes searches one --optimizer without --grid")
  ds = data.load(args.dataset, data_dir=args.data_dir,
                 validation=args.validation, seed=0,
                 normalize=args.normalize, nan_policy=args.nan_policy,
                 num_classes=args.num_classes,
                 regression=args.task == "regression")
  models.check_input(name, ds.input_shape)
  model = models.create(name, num_classes=ds.num_classes or 1, **kwargs)
  if args.batch_sizes:
    out = sweep.sweep_batch_sizes(model, specs[0], ds, batch_sizes=sizes,
                                  base_batch_size=args.batch_size,
                                  epochs=args.epochs, target=args.target,
                                  progress=not args.no_progress)
    rows = [(r["batch_size"], f"{r['learning_rate']:.3g}",
             f"{r['examples_per_second']:.0f}", f"{r['val_accuracy']:.4f}",
             "-" if r["seconds_to_target"] is None
             else f"{r['seconds_to_target']:.2f}") for r in out["results"]]
    best = out["best"]["batch_size"] if out["best"] else "none"
    human = (_table(("batch", "lr", "examples/s", "val acc",
                     f"s to {out['target']:.4f}"), rows)
             + f"\nbest by time to accuracy: batch {best}")
    if args.plot:
      sweep.plot_batch_sizes(out).figure.savefig(args.plot, dpi=120,
                                                 bbox_inches="tight")
    _emit(args, human, out)
    return
  result = sweep.sweep(model, specs, ds, epochs=args.epochs, grid=grid,
                       seeds=range(args.seeds), batch_size=args.batch_size,
                       halving_every=args.halving_every,
                       sequential_sample=args.sequential_sample,
                       task=args.task, progress=not args.no_progress)
  metric = result.metric
  rows = [(r["spec"], r["seed"], r["epochs"], f"{r[metric]:.4f}")
          for r in result.results]
  human = _table(("spec", "seed", "epochs", metric.replace("_", " ")), rows)
  human += (f"\nbest: {result.best['spec']} (seed {result.best['seed']}), "
            f"{metric.replace('_', ' ')} {result.best[metric]:.4f}; "
            f"{len(result.results)} configs in {result.wall_seconds:.1f} s")
  if result.sequential_estimate_seconds:
    human += (f", one after another ~{result.sequential_estimate_seconds:.1f} s "
              f"({result.sequential_estimate_seconds / result.wall_seconds:.1f}x)")
  if args.plot:
    sweep.plot_sweep(result).figure.savefig(args.plot, dpi=120,
                                            bbox_inches="tight")
  payload = {"results": result.results, "best": result.best,
             "wall_seconds": round(result.wall_seconds, 3),
             "sequential_estimate_seconds": result.sequential_estimate_seconds,
             "model": args.model, "dataset": ds.name}
  _emit(args, human, payload)
def _demo_compression_rows(model, state, ds, *, progress: bool) -> list[dict]:
  """The demo's compressed rows: 80% pruned and fine-tuned, int8, both."""
  import optax
  from jaxaccel import train
  from jaxaccel.compress import int8, pruning, quantization, report
  x, y = ds.x_test, ds.y_test
  params = state.params
  pruned, masks = pruning.prune(params, 0.8)
  tx = optax.chain(optax.adam(1e-3), pruning.keep_masks(masks))
  tuned = train.fit(model, tx, ds, epochs=5, batch_size=32, seed=0,
                    progress=progress,
                    state=state._replace(params=pruned,
                                         opt_state=tx.init(pruned)))
  pruned = tuned.state.params
  calib = int8.calibration_batches(ds.x_train, examples=1000, batch_size=500)
  rows = [report.measure("80% pruned, 5 epochs fine-tuned", pruned,
                         lambda xb: model.apply({"params": pruned}, xb), x, y,
                         latency=False)]
  for name, p in (("int8 (int8 matmuls)", params),
                  ("80% pruned + int8", pruned)):
    program = int8.convert(model, {"params": p}, calib)
    rows.append(report.measure(name, quantization.quantize(p, bits=8), program,
                               x, y, latency=False))
  return rows


def cmd_compress(args) -> None:
  from jaxaccel.compress import report, stages
  if args.list_recipes:
    recipes = stages.list_recipes()
    human = "\n".join(f"{name:14s} {text}" for name, text in recipes.items())
    _emit(args, human, {"recipes": recipes})
    return
  if not args.from_dir:
    raise ConfigError("give the run to compress: --from DIR (the --out of "
                      "`jaxaccel train`)")
  flags = dict(prune=args.prune, prune_method=args.prune_method,
               prune_scope=args.prune_scope, prune_pattern=args.prune_pattern,
               prune_schedule=args.prune_schedule,
               quantize=args.quantize, distill_student=args.distill_student,
               distill_epochs=args.distill_epochs,
               temperature=args.temperature, alpha=args.alpha,
               mixup=args.mixup, finetune_epochs=args.finetune_epochs,
               learning_rate=args.learning_rate)
  if args.recipe:
    given = [f"--{k.replace('_', '-')}" for k in ("prune", "quantize", "mixup",
                                                  "prune_schedule",
                                                  "finetune_epochs")
             if flags[k] is not None]
    if given:
      raise ConfigError(f"--recipe {args.recipe} and {', '.join(given)}: give "
                        "a recipe or the shorthand flags, not both")
    recipe = stages.load_recipe(args.recipe)["stages"]
    if args.distill_student:     # the distill recipe takes the student
      recipe = [dict(s, student=args.distill_student)
                if s["stage"] == "distill" else s for s in recipe]
  else:
    recipe = stages.recipe_from_flags(**flags)
  # A shipped recipe as it is goes by its name (recorded in the output).
  named = args.recipe if args.recipe and not args.distill_student else None
  result = stages.compress_run(
      args.from_dir, named or recipe, out=args.out,
      settings=stages.Settings(seed=args.seed, progress=not args.no_progress))
  result["recipe"] = args.recipe or recipe
  for key in ("compressed_model", "compressed_variables"):
    del result[key]
  if args.out:
    result["out"] = args.out
  if args.plot:
    report.plot_accuracy_vs_size(result["stages"], args.plot,
                                 title=f"{args.from_dir} on {result['dataset']}")
    result["plot"] = args.plot
  metric = report.metric_of(result["stages"][0])
  human = (f"{result['dataset']}: {metric.replace('_', ' ')} "
           f"{result[f'test_{metric}_before']:.4f}"
           f" -> {result[f'test_{metric}_after']:.4f}, "
           f"{result['size_bytes_before']:,} -> {result['size_bytes_after']:,} "
           f"bytes ({result['compression_ratio']:.1f}x smaller)\n"
           + report.format_table(result["stages"]))
  _emit(args, human, result)


def cmd_bench(args) -> None:
  from jaxaccel import bench
  if args.suite == "lm":
    from jaxaccel.bench import lm as bench_lm
    report = bench_lm.run_lm_suite(
        model_spec=args.models or bench_lm.DEFAULT_MODEL,
        steps=args.steps or 40, repeats=args.repeats,
        torch_peer=not args.no_torch, progress=not args.no_progress)
    _emit(args, bench_lm.format_lm_report(report), report)
    return
  if args.models is None:
    args.models = "mlp,cnn,resnet18" if args.suite == "train" else "mlp,cnn"
  if args.suite == "sweep":
    report = bench.run_sweep_suite(progress=not args.no_progress,
                                   repeats=args.repeats)
    _emit(args, bench.format_sweep_report(report), report)
    return
  if args.suite == "compress":
    report = bench.run_compress_suite(
        dataset=args.dataset, model_names=args.models.split(","),
        full=args.full, progress=not args.no_progress)
    _emit(args, bench.format_compress_report(report), report)
    return
  if args.suite == "deploy":
    from jaxaccel.bench import deploy as bench_deploy
    report = bench_deploy.run_deploy_suite(
        dataset=args.dataset, model_names=args.models.split(","),
        torch_peer=not args.no_torch, progress=not args.no_progress)
    _emit(args, bench_deploy.format_deploy_report(report), report)
    return
  if args.suite == "parallel":
    report = bench.run_parallel_suite(
        dataset=args.dataset, model_names=args.models.split(","),
        steps=args.steps, repeats=args.repeats, progress=not args.no_progress)
    _emit(args, bench.format_parallel_report(report), report)
    return
  report = bench.run_train_suite(
      dataset=args.dataset, model_names=args.models.split(","),
      steps=args.steps, repeats=args.repeats, torch_peer=not args.no_torch,
      progress=not args.no_progress)
  _emit(args, bench.format_train_report(report), report)


def _table(header, rows) -> str:
  widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
  line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])]
                   + [line(r) for r in rows])


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "export": cmd_export,
            "generate": cmd_generate,
            "demo": cmd_demo, "sweep": cmd_sweep, "bench": cmd_bench, "compress": cmd_compress}


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    COMMANDS[args.command](args)
  except JaxaccelError as e:
    sys.stderr.write(f"jaxaccel: error: {e}\n")
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    sys.stderr.write("jaxaccel: interrupted\n")
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
