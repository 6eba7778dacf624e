import dataclasses
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxaccel import data, models, parallel, train
from jaxaccel.checkpoint import RunDir
from jaxaccel.errors import ConfigError

TINY_MODELS = {
    "mlp": dict(widths=(32,)),
    "cnn": dict(features=(4, 8), hidden=16),
    "resnet18": dict(stage_sizes=(1, 1), width=4),
}


@pytest.fixture(scope="module")
def small(digits):
  """256 training rows of digits: 4 steps of 64 per epoch."""
  return dataclasses.replace(digits, x_train=digits.x_train[:256],
                             y_train=digits.y_train[:256],
                             x_val=digits.x_val[:0], y_val=digits.y_val[:0])


def assert_same(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(lambda u, v: np.testing.assert_allclose(
      np.asarray(u), np.asarray(v), rtol=rtol, atol=atol), a, b)


def fit_tiny(name, ds, **kwargs):
  model = models.create(name, num_classes=10, **TINY_MODELS[name])
  return train.fit(model, optax.adam(1e-3), ds, epochs=2, batch_size=64,
                   progress=False, **kwargs)


# Every mode with each epoch mode for the MLP; one pairing each for the
# models that compile slowly (the pairings swap between the two).
RUNS = {
    "mlp": [("pmap", "scan"), ("pmap", "stream"), ("sharded", "scan"),
            ("sharded", "stream")],
    "cnn": [("pmap", "scan"), ("sharded", "stream")],
    "resnet18": [("pmap", "stream"), ("sharded", "scan")],
}


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_none_pmap_and_sharded_give_the_same_parameters(small, name):
  ref = fit_tiny(name, small)
  assert jax.device_count() == 8
  for mode, epoch_mode in RUNS[name]:
    got = fit_tiny(name, small, parallel=mode, epoch_mode=epoch_mode)
    assert int(got.state.step) == int(ref.state.step) == 8
    assert_same(got.state.params, ref.state.params)
    assert_same(got.state.model_state, ref.state.model_state)
    assert got.history[-1]["train_loss"] == pytest.approx(
        ref.history[-1]["train_loss"], rel=1e-5)
