import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaccel import data
from jaxaccel.errors import DataError

from conftest import requires_fashion_mnist


def test_digits_shapes_ranges_and_split(digits):
  assert digits.x_train.shape == (1350, 8, 8, 1)
  assert digits.x_val.shape == (150, 8, 8, 1)
  assert digits.x_test.shape == (297, 8, 8, 1)
  assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
  assert digits.num_classes == 10
  assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
  assert set(np.unique(digits.y_train)) == set(range(10))


def test_load_is_deterministic_per_seed():
  a, b = data.load("digits", seed=3), data.load("digits", seed=3)
  c = data.load("digits", seed=4)
  np.testing.assert_array_equal(a.x_val, b.x_val)
  assert not np.array_equal(a.y_val, c.y_val)
  np.testing.assert_array_equal(a.x_test, c.x_test)   # test split is fixed


def test_standardize_uses_train_statistics():
  ds = data.load("digits", normalize="standardize")
  np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
  varying = ds.x_train.std(axis=0) > 0.5
  np.testing.assert_allclose(ds.x_train.std(axis=0)[varying], 1.0, atol=1e-3)
  raw = data.load_raw("digits")
  np.testing.assert_allclose(data.preprocess(raw["x_test"], ds.stats),
                             ds.x_test, rtol=1e-5, atol=1e-5)


def test_clean_drop_impute_raise():
  x = np.array([[1.0, 2.0], [np.nan, 4.0], [5.0, np.inf], [3.0, 6.0]])
  y = np.array([0, 1, 2, 3])
  xd, yd, rep = data.clean(x, y, policy="drop")
  np.testing.assert_array_equal(xd, [[1, 2], [3, 6]])
  np.testing.assert_array_equal(yd, [0, 3])
  assert rep == {"policy": "drop", "rows": 2, "values": 2}
  xi, yi, _ = data.clean(x, y, policy="impute")
  np.testing.assert_allclose(xi, [[1, 2], [3, 4], [5, 4], [3, 6]])
  np.testing.assert_array_equal(yi, y)
  with pytest.raises(DataError, match="2 rows hold NaN or inf"):
    data.clean(x, y, policy="raise")


def test_label_range():
  data.check_labels(np.array([2, 0]), 3, "labels")
  with pytest.raises(DataError, match=r"must lie in \[0, 3\).*from 0 to 3"):
    data.check_labels(np.array([0, 3]), 3, "labels")


def test_npz_roundtrip_adds_channel_and_scales(tiny_npz):
  ds = data.load(str(tiny_npz), validation=0.25)
  assert ds.x_train.shape == (192, 12, 12, 1) and ds.x_val.shape == (64, 12, 12, 1)
  assert ds.num_classes == 2


@pytest.mark.parametrize("arrays, message", [
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(4, int), x_test=np.zeros((2, 2))),
     "missing key.*y_test"),
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(3, int),
          x_test=np.zeros((2, 2)), y_test=np.zeros(2, int)),
     "x_train has 4 rows but y_train has shape"),
    (dict(x_train=np.array([list("ab")] * 4), y_train=np.zeros(4, int),
          x_test=np.zeros((2, 2)), y_test=np.zeros(2, int)),
     "x_train has dtype <U1; give numbers"),
    (dict(x_train=np.zeros((4, 2)), y_train=np.array(list("abab")),
          x_test=np.zeros((2, 2)), y_test=np.zeros(2, int)),
     r"y_train has shape \(4,\) and dtype <U1; give one class index"),
    (dict(x_train=np.zeros((4, 2)), y_train=np.zeros(4, int),
          x_test=np.zeros((2, 3)), y_test=np.zeros(2, int)),
     r"rows have shape \(2,\) but x_test rows \(3,\)"),
    (dict(x_train=np.zeros((4, 2)), y_train=np.array([0, -1, 0, 1]),
          x_test=np.zeros((2, 2)), y_test=np.zeros(2, int)),
     r"must lie in \[0, 2\)"),
])
def test_bad_npz(tmp_path, arrays, message):
  path = tmp_path / "bad.npz"
  np.savez(path, **arrays)
  with pytest.raises(DataError, match=message):
    data.load(str(path))


def test_npz_float_targets_load_as_a_regression(tmp_path):
  x = np.random.default_rng(0).uniform(size=(40, 3)).astype(np.float32)
  path = tmp_path / "reg.npz"
  np.savez(path, x_train=x[:30], y_train=x[:30, 0] + 0.5, x_test=x[30:],
           y_test=x[30:, 0] + 0.5)
  ds = data.load(str(path), validation=0.2)
  assert ds.num_classes is None and ds.y_train.dtype == np.float32
  np.testing.assert_allclose(np.sort(np.concatenate([ds.y_train, ds.y_val])),
                             np.sort(x[:30, 0] + 0.5))
  # Whole-number floats are class labels unless the load says regression.
  np.savez(path, x_train=x[:30], y_train=np.ones(30), x_test=x[30:],
           y_test=np.zeros(10))
  assert data.load(str(path)).num_classes == 2
  assert data.rebuild(data.load(str(path), regression=True).description
                      ).y_train.dtype == np.float32


def test_unknown_and_missing_data_sets(tmp_path):
  with pytest.raises(DataError, match="unknown data set 'mnist'"):
    data.load("mnist")
  with pytest.raises(DataError, match=f"looked in {tmp_path}.*apt-get install "
                     "dataset-fashion-mnist"):
    data.load("fashion_mnist", data_dir=tmp_path)
  with pytest.raises(DataError, match="does not exist"):
    data.load(str(tmp_path / "nope.npz"))


def test_fashion_mnist_from_a_given_directory(tmp_path, monkeypatch):
  import gzip, struct
  rng = np.random.default_rng(0)
  for key, fname in data.FASHION_MNIST_FILES.items():
    n = 20 if "train" in key else 10
    arr = (rng.integers(0, 256, (n, 28, 28)) if key.startswith("x")
           else rng.integers(0, 10, n)).astype(np.uint8)
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(
        ">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(tmp_path / fname, "wb") as f:
      f.write(head + arr.tobytes())
  monkeypatch.setenv("JAXACCEL_DATA_DIR", str(tmp_path))
  ds = data.load("fashion_mnist", validation=0.0, num_classes=10)
  assert ds.x_train.shape == (20, 28, 28, 1) and ds.x_test.shape == (10, 28, 28, 1)
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


@requires_fashion_mnist
def test_fashion_mnist_real_files():
  ds = data.load("fashion_mnist", validation=0.1)
  assert ds.x_train.shape == (54000, 28, 28, 1)
  assert ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.num_classes == 10
  assert np.bincount(ds.y_test).tolist() == [1000] * 10


def test_random_flip_and_shift_are_exact(key):
  img = jnp.arange(16.0).reshape(1, 4, 4, 1)
  imgs = jnp.repeat(img, 64, axis=0)
  flipped = data.random_flip(key, imgs)
  for f in flipped:   # each image is either itself or its mirror
    assert bool(jnp.all(f == img[0])) or bool(jnp.all(f == img[0, :, ::-1]))
  n_flipped = sum(not bool(jnp.all(f == img[0])) for f in flipped)
  assert 16 < n_flipped < 48
  shifted = np.asarray(data.random_shift(key, imgs, max_shift=1))
  padded = np.pad(np.asarray(img[0, :, :, 0]), 1)
  candidates = {(dy, dx): padded[1 - dy:5 - dy, 1 - dx:5 - dx]
                for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
  used = set()
  for s in shifted:   # each image is one of the nine zero-filled shifts
    match = [k for k, c in candidates.items() if np.array_equal(s[..., 0], c)]
    assert len(match) == 1
    used.add(match[0])
  assert len(used) >= 6


def test_noise_std_and_augment_composition(key):
  x = jnp.zeros((64, 8, 8, 1))
  noisy = data.gaussian_noise(key, x, std=0.1)
  assert abs(float(noisy.std()) - 0.1) < 0.01
  aug = jax.jit(data.make_augment(["flip", "shift", "noise"]))
  assert aug(key, x).shape == x.shape
  with pytest.raises(DataError, match="unknown augmentation 'rotate'"):
    data.make_augment(["rotate"])


# ------------------------------------------- the run remembers its data

@pytest.fixture(scope="module")
def standardized_run(tmp_path_factory):
  """The issue's scenario, from Python: standardized digits, an MLP trained
  20 epochs at batch 32 into a run directory."""
  from jaxaccel import models, train
  ds = data.load("digits", normalize="standardize")
  model = models.create("mlp", num_classes=10, widths=(64, 64))
  run = tmp_path_factory.mktemp("std") / "run"
  result = train.fit(model, "adam(1e-3)", ds, epochs=20, batch_size=32,
                     out=run, progress=False)
  return run, model, ds, result.state


def test_a_python_run_records_and_rebuilds_its_normalized_data(standardized_run):
  from jaxaccel import train
  from jaxaccel.checkpoint import RunDir
  run, _, ds, _ = standardized_run
  config = RunDir(run).read_config()
  assert config["data"]["normalize"] == "standardize"
  assert config["data"]["source"] == "digits"
  rebuilt = train.load_run_data(config)
  for split in data.SPLITS:
    np.testing.assert_array_equal(rebuilt.arrays(split)["x"], ds.arrays(split)["x"])
    np.testing.assert_array_equal(rebuilt.arrays(split)["y"], ds.arrays(split)["y"])


def test_int8_export_of_a_python_run_calibrates_on_its_own_scaling(
    standardized_run, tmp_path):
  """The int8 artifact, fed raw test images, stays within a point of the
  float artifact (it lost 6.7 points when calibrated on unit-scaled data)."""
  pytest.importorskip("onnxruntime")
  from jaxaccel import export
  run, _, ds, _ = standardized_run
  raw = data.load_raw("digits")
  labels = raw["y_test"]
  accuracy = {}
  for int8 in (False, True):
    path = export.export_run(run, out=tmp_path / f"m{int8}.onnx", format="onnx",
                             int8=int8)
    logits = export.load(path)(raw["x_test"])
    accuracy[int8] = float(np.mean(logits.argmax(-1) == labels))
  assert accuracy[False] > 0.95
  assert abs(accuracy[True] - accuracy[False]) <= 0.01


def test_compress_run_fine_tunes_and_measures_on_the_runs_own_data(standardized_run):
  from jaxaccel import train
  from jaxaccel.compress import stages
  run, model, ds, state = standardized_run
  out = stages.compress_run(run, [{"stage": "prune", "sparsity": 0.5, "epochs": 1}],
                            settings=stages.Settings(progress=False, latency=False))
  # "before" is measured on the rebuilt test split: standardized as trained.
  expected = train.evaluate(model, state, ds.x_test, ds.y_test)["accuracy"]
  assert out["test_accuracy_before"] == pytest.approx(expected, abs=1e-6)
  assert out["test_accuracy_after"] >= expected - 0.01


def test_data_built_in_python_or_cut_after_loading_is_refused_by_name(
    standardized_run, tmp_path):
  import dataclasses
  from jaxaccel import export, models, train
  from jaxaccel.compress import stages
  run, _, ds, _ = standardized_run
  model = models.create("mlp", num_classes=10, widths=(16,))
  arrays = data.from_arrays({"x": ds.x_train, "y": ds.y_train})
  train.fit(model, "adam(1e-3)", arrays, epochs=1, out=tmp_path / "a",
            progress=False)
  with pytest.raises(DataError, match="built in Python .*pass it, e.g. "
                                      r"export_run\(run, ..., data=ds\)"):
    export.export_run(tmp_path / "a", out=tmp_path / "a.onnx", format="onnx",
                      int8=True)
  cut = dataclasses.replace(ds, x_train=ds.x_train[:256], y_train=ds.y_train[:256])
  train.fit(model, "adam(1e-3)", cut, epochs=1, out=tmp_path / "cut",
            progress=False)
  with pytest.raises(DataError, match="changed copy of 'digits'"):
    stages.compress_run(tmp_path / "cut", [{"stage": "quantize"}])
  # Given the data, both go ahead.
  out = stages.compress_run(tmp_path / "cut", [{"stage": "quantize"}], data=cut,
                            settings=stages.Settings(progress=False, latency=False))
  assert out["dataset"] == "digits"
  assert abs(out["test_accuracy_after"] - out["test_accuracy_before"]) < 0.05


def test_from_arrays_keeps_dtypes_and_refuses_bad_arrays():
  x = np.arange(40, dtype=np.int32).reshape(10, 4) % 7
  ds = data.from_arrays({"x": x, "y": x, "mask": np.ones((10, 4), np.float32)},
                        validation=0.2, seed=1)
  assert ds.x_train.dtype == np.int32 and ds.num_classes == 7
  assert ds.arrays("val")["mask"].shape == (2, 4) and len(ds.x_test) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([ds.x_train, ds.x_val])[:, 0]),
                                np.sort(x[:, 0]))
  with pytest.raises(DataError, match="'x' has dtype <U1; give numbers"):
    data.from_arrays({"x": np.array(list("abc")), "y": np.zeros(3)})
  with pytest.raises(DataError, match="'y' has shape \\(2,\\) but 'x' has 3 rows"):
    data.from_arrays({"x": np.zeros((3, 2)), "y": np.zeros(2)})
  with pytest.raises(DataError, match="1 train rows hold NaN"):
    data.from_arrays({"x": np.array([[0.0], [np.nan]]), "y": np.zeros(2)})
  dropped = data.from_arrays({"x": np.array([[0.0], [np.nan], [1.0]]),
                              "y": np.zeros(3)}, nan_policy="drop", validation=0)
  assert len(dropped.x_train) == 2
