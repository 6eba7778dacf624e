import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaccel import core, models, train
from jaxaccel.checkpoint import RunDir
from jaxaccel.errors import CheckpointError


def test_save_restore_round_trip_keeps_keys_and_structure(tmp_path):
  model = models.create("mlp", num_classes=3, widths=(4,))
  tx = optax.adam(1e-2)
  state = core.init_state(model, tx, (5,), seed=7)
  state = state._replace(step=jnp.int32(11),
                         rng=jax.random.fold_in(state.rng, 3))
  run = RunDir(tmp_path)
  run.save(2, state, {"epoch": 2, "best": 0.5, "bad_epochs": 1})
  like = core.init_state(model, tx, (5,), seed=0)
  restored, progress = run.restore(like)
  assert progress == {"epoch": 2, "best": 0.5, "bad_epochs": 1}
  assert int(restored.step) == 11
  np.testing.assert_array_equal(jax.random.key_data(restored.rng),
                                jax.random.key_data(state.rng))
  jax.tree.map(np.testing.assert_array_equal, restored.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, restored.opt_state, state.opt_state)
  variables = run.restore_variables()
  jax.tree.map(np.testing.assert_array_equal, variables["params"], state.params)
  run.close()


def test_metrics_cut_by_a_kill_are_dropped_on_read(tmp_path):
  run = RunDir(tmp_path)
  run.path.mkdir(exist_ok=True)
  for e in (1, 2, 3):
    run.append_metrics({"epoch": e, "train_loss": 1.0 / e})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"epoch": 4, "train_lo')          # a line cut short
  assert [r["epoch"] for r in run.read_metrics()] == [1, 2, 3]
  kept = run.truncate_metrics(2)
  assert [r["epoch"] for r in kept] == [1, 2]
  assert [r["epoch"] for r in run.read_metrics()] == [1, 2]


def test_missing_checkpoint_and_config_errors(tmp_path):
  run = RunDir(tmp_path / "empty")
  assert run.latest_epoch() is None
  with pytest.raises(CheckpointError, match="no checkpoint in .*train first"):
    run.restore_variables()
  with pytest.raises(CheckpointError, match="config.json is missing"):
    run.read_config()
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "config.json").write_text("{oops")
  with pytest.raises(CheckpointError, match="is corrupt"):
    RunDir(tmp_path / "bad").read_config()


def test_restoring_into_a_different_model_is_a_clear_error(tmp_path):
  tx = optax.sgd(0.1)
  small = core.init_state(models.create("mlp", num_classes=3, widths=(4,)), tx, (5,))
  RunDir(tmp_path).save(1, small, {"epoch": 1, "best": None, "bad_epochs": 0})
  bigger = core.init_state(models.create("mlp", num_classes=3, widths=(6,)), tx, (5,))
  with pytest.raises(CheckpointError, match=r"from a different model or optimizer \(array \d+ is \(\(4,\)"):
    RunDir(tmp_path).restore(bigger)


def test_a_reader_sees_checkpoints_written_after_it_looked(tmp_path):
  tx = optax.sgd(0.1)
  state = core.init_state(models.create("mlp", num_classes=3, widths=(4,)), tx, (5,))
  writer = RunDir(tmp_path, max_to_keep=2)
  writer.save(1, state, {"epoch": 1, "best": None, "bad_epochs": 0})
  reader = RunDir(tmp_path)
  assert reader.latest_epoch() == 1
  for epoch in (2, 3):   # epoch 1 is deleted: two are kept
    writer.save(epoch, state._replace(step=jnp.int32(epoch)),
                {"epoch": epoch, "best": None, "bad_epochs": 0})
  assert reader.latest_epoch() == 3
  restored, progress = reader.restore(state)
  assert progress["epoch"] == 3 and int(restored.step) == 3
  writer.close()
  reader.close()
