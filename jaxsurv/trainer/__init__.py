"""The one training stack of jaxsurv: every model family trains through it.

* ``optim``: ``make_optimizer`` (``sgd``, ``adam``, ``adamw``; each name means
  one thing) and ``lr_schedule``;
* ``step``: ``TrainState`` and the pure, jitted, data-parallel
  ``train_step`` / ``predict_fn``, parametrised by a model adapter
  (``jaxsurv.models.registry``) and a task (``jaxsurv.tasks``);
* ``loop``: ``Trainer`` (batches, ``fit`` with selection, early stopping,
  non-finite checks, Orbax latest + best checkpoints and exact resume).

The run drivers (``jaxsurv.train`` for MMNN, ``jaxsurv.fusion_train`` for
the fusion zoo) only prepare data and write their reports.
"""

from jaxsurv.trainer.loop import (ConstantArgs, FitResult, Part, Trainer, checkpoint_manager,
                                  epoch_order)
from jaxsurv.trainer.optim import lr_schedule, make_optimizer
from jaxsurv.trainer.step import TrainState, predict_fn, train_step

__all__ = ["ConstantArgs", "FitResult", "Part", "TrainState", "Trainer", "checkpoint_manager",
           "epoch_order", "lr_schedule", "make_optimizer", "predict_fn", "train_step"]
