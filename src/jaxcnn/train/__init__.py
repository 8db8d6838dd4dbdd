"""Training: the train state, jit-compiled train and eval steps, the loop, checkpoints and metrics.

``fit(config, workdir)`` is the whole loop and resumes a workdir that holds a checkpoint; ``restore(workdir)``
reads a checkpoint back (the best of an early-stopped run, else the latest); ``load_model(workdir)`` gives a
trained model and the preprocessing of its inputs; ``make_train_step`` gives the compiled step for loops of
your own. ``presets.PRESETS`` holds the named recipes of ``jaxcnn train --preset`` (``"imagenet-resnet50"``).
"""

from jaxcnn._signals import Interrupted, stop_on_signals
from jaxcnn.train import presets  # jaxcnn.train.presets.PRESETS: the named recipes of jaxcnn train --preset
from jaxcnn.train.checkpoint import Checkpointer, CheckpointError
from jaxcnn.train.config import GRADIENTS, OPTIMIZERS, SCHEDULES, Config, make_optimizer, make_schedule
from jaxcnn.train.evaluate import evaluate, make_eval_step
from jaxcnn.train.loop import fit
from jaxcnn.train.preprocess import Preprocess
from jaxcnn.train.progress import NonFiniteError
from jaxcnn.train.restored import evaluate_workdir, load_model, restore, restore_run
from jaxcnn.train.state import TrainState, create_train_state
from jaxcnn.train.step import InputScaling, StepOptions, make_train_step
from jaxcnn.train.workdir import WorkdirBusyError, read_config, read_metrics

__all__ = [
    "GRADIENTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "InputScaling",
    "StepOptions",
    "CheckpointError",
    "Checkpointer",
    "Config",
    "Interrupted",
    "NonFiniteError",
    "Preprocess",
    "TrainState",
    "WorkdirBusyError",
    "create_train_state",
    "evaluate",
    "evaluate_workdir",
    "fit",
    "load_model",
    "make_eval_step",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "presets",
    "read_config",
    "read_metrics",
    "restore",
    "restore_run",
    "stop_on_signals",
]
