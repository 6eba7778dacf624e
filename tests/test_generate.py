"""Language models: text corpora, the registry GPT trained through fit, and
generation with a key/value cache inside one compiled loop."""

import jax
import numpy as np
import pytest

import jaxaccel as ja
from jaxaccel import data, models, train
from jaxaccel.errors import ConfigError, DataError

from jaxaccel.checkpoint import RunDir

from conftest import (jaxaccel_cmd, last_json, requires_fortunes, run_cli,
                      run_until_killed)

CONTEXT = 32


@pytest.fixture(scope="session")   # kept while its xdist group's worker lives
def tiny_gpt():
  """A one-block GPT trained 3 epochs on 100 kB of the standard library's
  sources (about 280 steps): (model, data, result)."""
  ds = data.load_text("pycode", context=CONTEXT, max_bytes=100_000)
  model = models.create("gpt", num_classes=256, layers=1, heads=2, width=32,
                        context=CONTEXT)
  result = train.fit(model, "adamw(3e-3, weight_decay=0.1)", ds, epochs=3,
                     batch_size=32, progress=False)
  return model, ds, result


@pytest.mark.xdist_group("tiny_gpt")   # one worker builds tiny_gpt once
def test_a_tiny_gpt_learns_python_source(tiny_gpt):
  _, ds, result = tiny_gpt
  first, last = result.history[0], result.history[-1]
  # Uniform bytes cost 8 bits; the corpus's byte frequencies alone about 5.
  assert last["val_bits_per_byte"] < 3.6
  assert last["val_bits_per_byte"] < first["val_bits_per_byte"]
  assert last["val_perplexity"] == pytest.approx(2 ** last["val_bits_per_byte"],
                                                 rel=1e-4)
  assert ds.description["python"] and ds.description["files"] > 500


@pytest.mark.xdist_group("tiny_gpt")   # one worker builds tiny_gpt once
def test_a_users_nnx_gpt_trains_and_generates(tiny_gpt):
  """An NNX GPT written by hand goes through the same fit and generation
  (no cache: it runs its window again each step)."""
  from flax import nnx
  import model_zoo as zoo
  _, ds, reference = tiny_gpt
  model = zoo.NNXGPT(context=CONTEXT, rngs=nnx.Rngs(0))
  result = train.fit(model, "adamw(3e-3, weight_decay=0.1)", ds, epochs=3,
                     batch_size=32, progress=False)
  assert result.history[-1]["val_bits_per_byte"] < 3.8
  out = ja.generate(model, result.state, "def ", tokens=8)
  assert out["text"].startswith("def ") and len(out["ids"]) == 12
  _int8_keeps_bits_per_byte(model, result.state, ds)


def _int8_keeps_bits_per_byte(model, state, ds):
  """The int8 recipe's stage, calibrated on 512 windows: every Linear int8,
  the two attention products float and listed, test bits per byte within
  0.02 of float32 (on 512 windows; measured +0.0004 for the registry GPT,
  +0.0015 for the NNX one, calibrated on 5,000)."""
  import dataclasses
  from jaxaccel import compress, core
  ds = dataclasses.replace(ds, x_test=ds.x_test[:512], y_test=ds.y_test[:512])
  _, _, records = compress.run(model, core.variables_of(state), ds,
                               [{**compress.load_recipe("int8")["stages"][0],
                                 "calibration_examples": 512}],
                               settings=compress.Settings(latency=False))
  assert records[-1]["float_layers"] == ["a product of two activations"] * 2
  assert len(records[-1]["int8_layers"]) == 7   # q, k, v, out, MLP in, out, head
  assert records[-1]["bits_per_byte"] < records[0]["bits_per_byte"] + 0.02


@pytest.mark.xdist_group("tiny_gpt")   # one worker builds tiny_gpt once
def test_a_gpt_sweep_ranks_learning_rates_by_validation_bits_per_byte(tiny_gpt):
  """Three learning rates x two seeds, one vmapped program, 20 steps each on
  a slice; the lowest bits per byte first."""
  import dataclasses
  from jaxaccel import sweep
  model, ds, _ = tiny_gpt
  ds = dataclasses.replace(ds, x_train=ds.x_train[:640], y_train=ds.y_train[:640],
                           x_val=ds.x_val[:128], y_val=ds.y_val[:128])
  out = sweep.sweep(model, "adamw(1e-3, weight_decay=0.1)", ds, epochs=1,
                    grid={"learning_rate": [1e-4, 1e-3, 1e-2]}, seeds=(0, 1),
                    batch_size=32, progress=False)
  assert out.metric == "val_bits_per_byte" and not out.maximize
  assert len(out.results) == 6
  bpb = {(r["hyperparams"]["learning_rate"], r["seed"]): r["val_bits_per_byte"]
         for r in out.results}
  assert out.best["val_bits_per_byte"] == min(bpb.values())
  # 20 steps at 1e-4 barely leave uniform bytes (8 bits); 1e-2 learns most.
  for seed in (0, 1):
    assert bpb[(1e-4, seed)] > 7.0 > bpb[(1e-3, seed)] > bpb[(1e-2, seed)]
  assert out.best["hyperparams"]["learning_rate"] == 1e-2


@pytest.mark.xdist_group("tiny_gpt")   # one worker builds tiny_gpt once
def test_cached_greedy_generation_equals_running_the_whole_window(tiny_gpt):
  model, _, result = tiny_gpt
  cached = ja.generate(model, result.state, "def ", tokens=24)
  plain = ja.generate(model, result.state, "def ", tokens=24, cache=False)
  assert cached["ids"].tolist() == plain["ids"].tolist()
  assert cached["text"].startswith("def ") and len(cached["ids"]) == 28
  # Another prompt length runs the same compiled loop.
  assert len(ja.generate(model, result.state, "import o", tokens=3)["ids"]) == 11
  sampled = [ja.generate(model, result.state, "def ", tokens=16,
                               temperature=1.0, top_k=5, seed=s)["text"]
             for s in (0, 0, 1)]
  assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


@pytest.mark.xdist_group("tiny_gpt")   # one worker builds tiny_gpt once
def test_an_exported_decoder_generates_what_the_model_does(tiny_gpt, tmp_path):
  """The decoder takes a prompt in one call and a token per call after it:
  its logits equal the forward pass's; exported to StableHLO it generates
  the model's greedy tokens (float), and int8 (calibrated on 128 training
  windows) picks the float model's next byte at >= 95% of the test text's
  positions (measured 98.8%; free-running text parts at the first flip)."""
  from jaxaccel import export
  from jaxaccel.generate import decoder, init_cache
  model, ds, result = tiny_gpt
  variables = {"params": result.state.params}
  ids = ds.x_test[:2]
  step = decoder(model)
  head, cache = step(variables, ids[:, :20], init_cache(model, 2))
  tail, cache = step(variables, ids[:, 20:], cache)
  np.testing.assert_allclose(np.concatenate([head, tail], 1),
                             model.apply(variables, ids), atol=1e-5)
  assert int(cache["position"]) == CONTEXT
  expected = ja.generate(model, variables, "def ", tokens=24)["ids"]
  path = export.export_decoder(model, variables, out=tmp_path / "f.stablehlo")
  assert export.load(path).generate("def ", tokens=24)["ids"].tolist() == \
      expected.tolist()
  path = export.export_decoder(model, variables, out=tmp_path / "q.stablehlo",
                               int8=True, calibration=[ds.x_train[:128]])
  artifact = export.load(path)
  assert artifact.header["float_layers"] == ["a product of two activations"] * 2
  assert len(artifact.header["int8_layers"]) == 7
  logits, _ = artifact.step(ds.x_test[:64], artifact.init_cache(64))
  float_logits = model.apply(variables, ds.x_test[:64])
  assert np.mean(np.argmax(logits, -1) == np.argmax(float_logits, -1)) >= 0.95
  assert artifact.generate("def ", tokens=24)["text"].startswith("def ")


@pytest.mark.parametrize("prompt, tokens, message", [
    ("", 4, "the prompt is empty"),
    ("x" * CONTEXT, 1, f"the prompt has {CONTEXT} bytes, but the model reads at "
                       f"most {CONTEXT}"),
    ("abc", CONTEXT, f"exceed the model's context of {CONTEXT}: ask for at most "
                     f"{CONTEXT - 3} tokens"),
])
@pytest.mark.xdist_group("tiny_gpt")   # one worker builds tiny_gpt once
def test_bad_prompts_are_refused_in_one_line(tiny_gpt, prompt, tokens, message):
  model, _, result = tiny_gpt
  with pytest.raises(ConfigError, match=message):
    ja.generate(model, result.state, prompt, tokens=tokens)


def test_text_is_split_by_file_and_rebuilt_from_its_description(tmp_path):
  for i in range(10):
    (tmp_path / "corpus" / f"part{i}").mkdir(parents=True)
    (tmp_path / "corpus" / f"part{i}" / "t.txt").write_text(f"file {i} " * 40)
  ds = data.load_text(str(tmp_path / "corpus"), context=16, validation=0.2,
                      test=0.2)
  texts = {split: {bytes(row).decode()[:6] for row in ds.arrays(split)["x"]}
           for split in ("train", "val", "test")}
  # Files 0..9 dealt whole: each file's windows sit in one split only.
  digits = {s: {t[5] for t in v if t.startswith("file ")} for s, v in texts.items()}
  assert sum(len(v) for v in digits.values()) == 10
  assert not digits["train"] & digits["val"] and not digits["val"] & digits["test"]
  again = data.rebuild(data.describe(ds))
  np.testing.assert_array_equal(again.x_train, ds.x_train)
  (tmp_path / "corpus" / "part0" / "t.txt").write_text("changed " * 40)
  with pytest.raises(DataError, match="differs from the one the run trained on"):
    data.rebuild(data.describe(ds))
  with pytest.raises(DataError, match="make no window of 17"):
    data.load_text(str(tmp_path / "corpus" / "part1" / "t.txt"), context=16,
                   max_bytes=10)


def test_train_and_generate_from_the_command_line(tmp_path, capsys):
  import sysconfig, pathlib
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  text = "".join((stdlib / f).read_text() for f in ("textwrap.py", "string.py"))
  (tmp_path / "code.txt").write_text(text)
  args = ["train", "--dataset", str(tmp_path / "code.txt"), "--model",
          "gpt:1,2,32", "--context", str(CONTEXT), "--steps", "60",
          "--batch-size", "32", "--optimizer", "adam(3e-3)", "--json",
          "--no-progress"]
  code, out, err = run_cli(capsys, *args, "--out", str(tmp_path / "r"))
  assert code == 0, err
  result = last_json(out)
  assert result["task"] == "lm" and result["test_bits_per_byte"] < 5.5
  # 60 steps of 24 an epoch: two whole epochs and one of 12 steps.
  assert (result["steps"], result["epochs"]) == (60, 3)
  # The same command SIGKILLed after its first checkpoint and run again
  # with --resume ends where the uninterrupted run did, bit for bit.
  resumed = [*args, "--out", str(tmp_path / "k"), "--resume"]
  run_until_killed(jaxaccel_cmd(*resumed),
                   lambda: (tmp_path / "k" / "checkpoint" / "1").exists(),
                   settle=0.05)
  assert RunDir(tmp_path / "k").latest_epoch() in (1, 2)
  code, out, err = run_cli(capsys, *resumed)
  assert code == 0 and "fresh run" not in err, err
  jax.tree.map(np.testing.assert_array_equal,
               RunDir(tmp_path / "r").restore_variables(),
               RunDir(tmp_path / "k").restore_variables())
  assert [m["step"] for m in RunDir(tmp_path / "k").read_metrics()] == [24, 48, 60]
  assert result["tokens_per_second"] == pytest.approx(
      result["steps_per_second"] * 32 * CONTEXT, rel=0.01)
  code, out, err = run_cli(capsys, "generate", "--run", str(tmp_path / "r"),
                           "--prompt", "def ", "--tokens", "12", "--json")
  assert code == 0, err
  gen = last_json(out)
  assert gen["text"].startswith("def ") and gen["new_tokens"] == 12
  code, _, err = run_cli(capsys, "generate", "--run", str(tmp_path / "r"),
                         "--prompt", "", "--tokens", "3")
  assert code == 2 and err.strip() == (
      "jaxaccel: error: the prompt is empty: give at least one byte to continue")
  # The run's cached decoder, exported, continues the prompt as the run
  # does, in a process that needs no model code.
  code, out, err = run_cli(capsys, "export", "--run", str(tmp_path / "r"),
                           "--format", "stablehlo", "--out",
                           str(tmp_path / "d.stablehlo"), "--json")
  assert code == 0, err
  assert last_json(out)["kind"] == "decoder" and len(last_json(out)["cache"]) == 3
  code, out, err = run_cli(capsys, "generate", "--artifact",
                           str(tmp_path / "d.stablehlo"), "--prompt", "def ",
                           "--tokens", "12", "--json")
  assert code == 0 and last_json(out)["text"] == gen["text"], err
  # What a careless user tries next, refused in one line before any work.
  code, _, err = run_cli(capsys, "export", "--run", str(tmp_path / "r"),
                         "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
  assert code == 2 and "in StableHLO only: use --format stablehlo" in err
  code, _, err = run_cli(capsys, "predict", "--artifact",
                         str(tmp_path / "d.stablehlo"), "--input", "x.npy")
  assert code == 2 and "is a language model's decoder" in err
  code, _, err = run_cli(capsys, "train", "--dataset", str(tmp_path / "code.txt"),
                         "--model", "mlp", "--context", str(CONTEXT))
  assert code == 2 and "use a sequence model such as --model gpt" in err
  code, _, err = run_cli(capsys, "train", "--model", "gpt:1,2,32")
  assert code == 2 and "model 'gpt' reads sequences of token ids" in err
  code, _, err = run_cli(capsys, *args, "--epochs", "2")
  assert code == 2 and err.strip() == ("jaxaccel: error: --epochs 2 and --steps "
                                       "60: give one (the length of the run)")


@requires_fortunes
def test_the_fortunes_corpus_loads_as_text():
  ds = data.load_text("fortunes", context=64)
  assert ds.description["source"] == "fortunes" and ds.description["files"] > 10
  assert min(len(ds.x_train), len(ds.x_val), len(ds.x_test)) > 100
  assert ds.x_train.dtype == np.uint8 and ds.num_classes == 256
  np.testing.assert_array_equal(ds.x_train[0, 1:], ds.y_train[0, :-1])


@pytest.mark.xdist_group("tiny_gpt")   # one worker builds tiny_gpt once
def test_the_compression_stages_take_the_gpt(tiny_gpt):
  """The stages of the shrink-50, prune-50, int8 and distill recipes on the
  tiny GPT, each training cut to 60 steps by `max_steps` (an epoch here is
  97): shrink halves each block's MLP, prune halves every projection kernel
  and leaves the tied embedding whole, both within 0.05 bits per byte; a
  student GPT learns from the teacher's next-byte distributions."""
  import dataclasses
  from jaxaccel import compress, core
  model, ds, result = tiny_gpt
  ds = dataclasses.replace(ds, x_val=ds.x_val[:512], y_val=ds.y_val[:512],
                           x_test=ds.x_test[:512], y_test=ds.y_test[:512])
  variables = core.variables_of(result.state)
  settings = compress.Settings(latency=False)
  small, small_vars, records = compress.run(
      model, variables, ds, [{"stage": "shrink", "fraction": 0.5, "epochs": 10,
                              "max_steps": 60}], settings=settings)
  before, after = records[0]["bits_per_byte"], records[-1]["bits_per_byte"]
  assert (small.mlp, records[-1]["name"]) == (64, "shrunk to 64 +60 steps")
  assert small_vars["params"]["block_0"]["mlp_out"]["kernel"].shape == (64, 32)
  assert after < before + 0.05, (before, after)
  greedy = [ja.generate(small, small_vars, "def ", tokens=12, cache=c)["text"]
            for c in (True, False)]
  assert greedy[0] == greedy[1]
  # what a record with latency gets: 16 test bytes as the prompt, 16 new
  assert compress.stages._generation_speed(small, small_vars, ds) > 0

  _, pruned, records = compress.run(
      model, variables, ds, [{"stage": "prune", "sparsity": 0.5,
                              "schedule": "gradual", "scope": "layer",
                              "epochs": 10, "max_steps": 60}], settings=settings)
  p = pruned["params"]
  zeros = {name: float(np.mean(np.asarray(leaf) == 0)) for name, leaf in
           zip(compress.pruning.leaf_names(p), jax.tree.leaves(p))}
  kernels = [n for n in zeros if n.startswith("block_0/") and n.endswith("kernel")]
  assert len(kernels) == 6   # query, key, value, out, mlp_in, mlp_out
  assert all(zeros[n] == pytest.approx(0.5, abs=0.01) for n in kernels), zeros
  assert zeros["embed/embedding"] == 0.0 and zeros["positions"] == 0.0
  assert records[-1]["name"] == "pruned 0.5 gradually over 60 steps"
  assert records[-1]["bits_per_byte"] < records[0]["bits_per_byte"] + 0.05
  _int8_keeps_bits_per_byte(model, result.state, ds)

  # distillation into a narrower GPT on the teacher's next-byte distributions
  student, _, records = compress.run(
      model, variables, ds, [{"stage": "distill", "student": "gpt:1,2,16",
                              "epochs": 10, "max_steps": 60, "temperature": 1.0,
                              "alpha": 1.0, "learning_rate": 1e-2}],
      settings=settings)
  assert (student.width, student.context) == (16, CONTEXT)
  assert records[-1]["name"] == "student gpt:1,2,16 60 steps"
  # 60 steps from scratch: 4.52 bits per byte (a byte's frequency alone is
  # worth about 5) and the teacher's next byte 37% of the time
  assert records[-1]["bits_per_byte"] < 5.0
  assert records[-1]["agreement"] > 0.25
  # distill-lm's student: the teacher's GPT with half its blocks
  assert compress.stages._half_gpt(models.create(
      "gpt", num_classes=256, layers=4, heads=4, width=64)) == "gpt:2,4,64"
  assert compress.load_recipe("distill-lm")["stages"][0]["student"] == "half"
  # it starts from the teacher's embeddings, final norm and blocks 0 and 2
  assert compress.stages._every_other_block(
      {f"block_{i}": i for i in range(4)} | {"embed": "e", "LayerNorm_0": "n"}
  ) == {"block_0": 0, "block_1": 2, "embed": "e", "LayerNorm_0": "n"}
  with pytest.raises(ConfigError, match="halves a registry gpt's blocks"):
    compress.stages._half_gpt(models.create("mlp", num_classes=3))
  with pytest.raises(ConfigError, match="token ids"):   # the image recipe's mixup
    compress.run(model, variables, ds, [
        {"stage": "distill", "student": "gpt:1,2,16", "temperature": 1.0,
         "alpha": 1.0, "mixup": 1.0}], settings=settings)
