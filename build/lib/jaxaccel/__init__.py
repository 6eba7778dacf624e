"""jaxaccel: faster training and smaller models in JAX, as pure functions."""

from jaxaccel import (compress, core, data, models, optim, parallel, precision,
                      sweep, tasks, train)
from jaxaccel.generate import generate
from jaxaccel.core import (TrainState, init_state, make_eval_step,
                           make_train_step, warm_start)
from jaxaccel.data import Dataset, load
from jaxaccel.errors import (CheckpointError, ConfigError, DataError,
                             JaxaccelError, SpecError)
from jaxaccel.models import adapt, from_functions
from jaxaccel.models import create as create_model
from jaxaccel.core import Callback, EarlyStopping, TensorBoard
from jaxaccel.tasks import Task
from jaxaccel.train import FitConfig, FitResult, evaluate, fit, load_run, predict

__version__ = "0.1.0"

__all__ = [
    "Callback", "CheckpointError", "ConfigError", "DataError", "Dataset", "EarlyStopping",
    "FitConfig", "FitResult", "JaxaccelError", "SpecError", "TrainState", "adapt",
    "compress", "core", "create_model", "data", "evaluate", "fit",
    "from_functions", "generate", "init_state", "load", "load_run", "make_eval_step",
    "make_train_step", "models", "optim", "parallel", "precision", "predict",
    "sweep", "Task", "tasks", "TensorBoard", "train", "warm_start",
]
