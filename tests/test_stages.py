"""Compression stages and recipes (jaxaccel/compress/stages.py)."""

import jax
import numpy as np
import pytest
from flax import nnx

import model_zoo as zoo
from jaxaccel import core, models, train
from jaxaccel.compress import pruning, quantization, stages
from jaxaccel.errors import ConfigError

NO_LATENCY = stages.Settings(latency=False)


@pytest.fixture(scope="module")
def mlp(digits):
  model = models.create("mlp", num_classes=10, widths=(32,))
  result = train.fit(model, "adam(3e-3)", digits, epochs=8, batch_size=32,
                     progress=False)
  return model, core.variables_of(result.state)


def test_every_shipped_recipe_loads_and_checks():
  for name in stages.list_recipes():
    recipe = stages.load_recipe(name)
    assert recipe["description"] and recipe["stages"]
    assert stages.check_recipe(recipe["stages"])[0][0] in stages.STAGES


def test_one_shot_stage_equals_the_pruning_function(mlp, digits):
  model, variables = mlp
  _, out, records = stages.run(
      model, variables, digits,
      [{"stage": "prune", "sparsity": 0.7, "scope": "global"}],
      settings=NO_LATENCY)
  want, _ = pruning.prune(variables["params"], 0.7, scope="global",
                          key=jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, out["params"], want)
  assert [r["name"] for r in records] == ["original", "pruned 0.7"]
  assert records[1]["stage"] == "prune" and records[1]["seconds"] > 0
  kernels = 64 * 32 + 32 * 10
  assert records[1]["sparsity"] == pytest.approx(
      round(0.7 * kernels) / kernels, abs=1e-6)   # of the kernels
  logits = train.predict(model, out, digits.x_test)
  assert records[1]["accuracy"] == pytest.approx(
      float(np.mean(logits.argmax(-1) == digits.y_test)))


def test_finetune_keeps_zeros_and_quantize_stores_int8(mlp, digits):
  model, variables = mlp
  _, out, records = stages.run(
      model, variables, digits,
      [{"stage": "prune", "sparsity": 0.5},
       {"stage": "finetune", "epochs": 2},
       {"stage": "quantize", "bits": "int8"}], settings=NO_LATENCY)
  kernel = out["params"]["Dense_0"]["kernel"]
  assert quantization.is_qarray(kernel) and kernel.values.dtype == np.int8
  assert records[2]["sparsity"] == records[1]["sparsity"]   # zeros held
  assert records[3]["inference"] == "int8 products"
  assert records[3]["accuracy"] > records[0]["accuracy"] - 0.05


def test_stages_run_on_an_nnx_model(digits):
  model = zoo.NNXMLP(64, (64,), 10, rngs=nnx.Rngs(0))
  result = train.fit(model, "adam(3e-3)", digits, epochs=5, batch_size=32,
                     progress=False)
  variables = core.variables_of(result.state)
  _, out, records = stages.run(
      model, variables, digits,
      [{"stage": "prune", "sparsity": 0.5, "epochs": 2},
       {"stage": "quantize", "bits": "int8"}], settings=NO_LATENCY)
  assert records[1]["sparsity"] > 0.45
  assert records[2]["inference"] == "int8 products"
  assert records[2]["int8_layers"] == ["hidden/0/kernel", "out/kernel"]
  assert records[2]["accuracy"] > records[0]["accuracy"] - 0.05


@pytest.mark.parametrize("recipe, message", [
    ([], "a recipe needs at least one stage"),
    ([{"sparsity": 0.5}], "each stage is a table with a 'stage' key"),
    ([{"stage": "prune", "sparsity": 1.5}], r"sparsity must lie in \[0, 1\).*got 1.5"),
    ([{"stage": "prune", "sparsity": "0.5"}], "sparsity = '0.5' is not a number"),
    ([{"stage": "prune", "sparsity": 0.5, "schedule": "gradual"}],
     "epochs must be a positive integer; got 0"),
    ([{"stage": "prune", "sparsity": 0.5, "epochs": True}], "epochs = True is not a int"),
    ([{"stage": "distill"}], "needs a student model spec"),
    ([{"stage": "factorize"}], "needs exactly one of energy or rank"),
    ([{"stage": "quantize", "bits": "int3"}], "unsupported quantization 'int3'"),
    ([{"stage": "finetune", "epochs": 1, "min_steps": -5}],
     "min_steps must be a non-negative integer; got -5"),
    ([{"stage": "shrink", "max_steps": 0}],
     "max_steps must be a positive integer; got 0"),
    ([{"stage": "prune", "sparsity": 0.5, "epochs": 1, "min_steps": 300,
       "max_steps": 200}], r"min_steps \(300\) exceeds max_steps \(200\)"),
])
def test_bad_recipes_name_the_stage_and_value(recipe, message):
  with pytest.raises(ConfigError, match=message):
    stages.check_recipe(recipe)


def test_the_shorthand_flags_build_the_shipped_recipes_stages():
  """`--prune 0.9 --quantize int8` is prune-90-int8: same stages, same
  options; what the recipe leaves out is the stage's own default."""
  import inspect
  flags = stages.recipe_from_flags(prune=0.9, quantize="int8")
  recipe = stages.load_recipe("prune-90-int8")["stages"]
  assert [s["stage"] for s in flags] == [s["stage"] for s in recipe]
  for got, want in zip(flags, recipe):
    defaults = {k: p.default for k, p in inspect.signature(
        stages.STAGES[want["stage"]].run).parameters.items()
        if p.default is not inspect.Parameter.empty}
    assert {**defaults, **got} == {**defaults, **want}, (got, want)
  one_shot = stages.recipe_from_flags(prune=0.5, prune_schedule="one-shot")
  assert (one_shot[0]["schedule"], one_shot[0]["epochs"]) == ("one-shot", 0)
  with pytest.raises(ConfigError, match="unknown pruning schedule 'cubic'"):
    stages.recipe_from_flags(prune=0.5, prune_schedule="cubic")


def test_the_prune_stage_takes_the_weights_the_forward_pass_multiplies(digits):
  """A transformer loses half of its kernels' weights (attention projections
  included) and keeps its positional table, norms and biases whole; `paths`
  picks leaves by name instead."""
  model = zoo.ViT(rngs=nnx.Rngs(0))
  params, state = models.adapt(model).init(jax.random.key(0), digits.x_train[:1])
  variables = {"params": params, **state}
  plan = [{"stage": "prune", "sparsity": 0.5, "schedule": "one-shot"}]
  _, pruned, _ = stages.run(model, variables, digits, plan, settings=NO_LATENCY)
  names = pruning.leaf_names(pruned["params"])
  zeros = {n: float(np.mean(np.asarray(x) == 0))
           for n, x in zip(names, jax.tree.leaves(pruned["params"]))}
  kernels = [n for n in names if n.endswith("kernel")]
  assert "blocks/0/attention/query/kernel" in kernels and len(kernels) == 14
  assert all(zeros[n] > 0.2 for n in kernels), zeros
  before = dict(zip(names, jax.tree.leaves(params)))
  for n, x in zip(names, jax.tree.leaves(pruned["params"])):
    if n not in kernels:        # position, norms, biases: as they were
      np.testing.assert_array_equal(x, before[n])
  only = [{"stage": "prune", "sparsity": 0.5, "schedule": "one-shot",
           "paths": "^position$"}]
  _, pruned, _ = stages.run(model, variables, digits, only, settings=NO_LATENCY)
  leaves = dict(zip(names, jax.tree.leaves(pruned["params"])))
  assert float(np.mean(np.asarray(leaves["position"]) == 0)) == 0.5
  assert float(np.mean(np.asarray(leaves["head/kernel"]) == 0)) == 0
  with pytest.raises(ConfigError, match=r"paths '\(' is not a regular expression"):
    stages.check_recipe([{"stage": "prune", "sparsity": 0.5, "paths": "("}])
