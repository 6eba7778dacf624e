"""jaxaccel: faster training and smaller models in JAX, as pure functions."""

from jaxaccel import compress, data, models, optim, parallel, precision, sweep
from jaxaccel.data import Dataset, load
from jaxaccel.errors import (CheckpointError, ConfigError, DataError,
                             JaxaccelError, SpecError)
from jaxaccel.models import create as create_model
from jaxaccel.train import (EarlyStopping, FitResult, TrainState, evaluate,
                            fit, init_state, make_eval_step, make_train_step,
                            predict, warm_start)

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "DataError", "Dataset", "EarlyStopping",
    "FitResult", "JaxaccelError", "SpecError", "TrainState", "create_model",
    "data", "evaluate", "fit", "init_state", "load", "make_eval_step",
    "make_train_step", "models", "optim", "parallel", "precision", "predict",
    "sweep", "warm_start", "compress",
]
