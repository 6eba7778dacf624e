"""The training core: the train state, the one train step and eval step.

Everything here is a pure function over pytrees; models are seen only
through `jaxaccel.models.adapt`, devices only through `jaxaccel.parallel`.
"""

from jaxaccel.core.callbacks import (Callback, EarlyStopping, FitLoop,
                                     PlateauSignal, RunDirectory, TensorBoard)
from jaxaccel.core.state import (TrainState, init_state, init_variables,
                                 state_from_variables, variables_of,
                                 warm_start)
from jaxaccel.core.step import (all_finite, cross_entropy, make_eval_step,
                                make_train_step)

__all__ = ["Callback", "EarlyStopping", "FitLoop", "PlateauSignal",
           "RunDirectory", "TensorBoard", "TrainState", "all_finite", "cross_entropy", "init_state",
           "init_variables", "make_eval_step", "make_train_step",
           "state_from_variables",
           "variables_of", "warm_start"]
