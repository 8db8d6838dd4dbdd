"""Training: the train state, jit-compiled train and eval steps, the loop, checkpoints and metrics.

``fit(config, workdir)`` is the whole loop and resumes a workdir that holds a checkpoint; ``restore(workdir)``
reads the latest checkpoint back; ``make_train_step`` gives the compiled step for loops of your own.
"""

from jaxcnn._signals import Interrupted, stop_on_signals
from jaxcnn.train.checkpoint import Checkpointer, CheckpointError
from jaxcnn.train.config import GRADIENTS, OPTIMIZERS, SCHEDULES, Config, make_optimizer, make_schedule
from jaxcnn.train.loop import (
    NonFiniteError,
    evaluate_workdir,
    fit,
    read_config,
    read_metrics,
    restore,
    restore_run,
)
from jaxcnn.train.state import TrainState, create_train_state
from jaxcnn.train.step import evaluate, make_eval_step, make_train_step
from jaxcnn.train.workdir import WorkdirBusyError

__all__ = [
    "GRADIENTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "CheckpointError",
    "Checkpointer",
    "Config",
    "Interrupted",
    "NonFiniteError",
    "TrainState",
    "WorkdirBusyError",
    "create_train_state",
    "evaluate",
    "evaluate_workdir",
    "fit",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "read_config",
    "read_metrics",
    "restore",
    "restore_run",
    "stop_on_signals",
]
