r"""Launches a jaxsurv experiment.

  python launch.py --config=configs/mmnn.py --workdir=runs/mmnn
  python launch.py --config=configs/mmnn.py:local --workdir=runs/local --config.num_epochs=5

Intentionally thin: everything lives in the config file; ``--config.x=y``
overrides any field. The same command again resumes the run in ``--workdir``;
a workdir that holds a run of another config or cohort is refused before any
work (the message lists the changed fields), unless ``--allow_changed_config``
continues it (``jaxsurv.runs.open_run``). Errors end as ``jaxsurv.cli``
describes (one message for bad input, ``--debug`` for the traceback).
"""

import logging

from absl import flags
from ml_collections import config_flags

from jaxsurv import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, results).")
_ALLOW_CHANGED = flags.DEFINE_boolean(
    "allow_changed_config", False,
    "Continue a run in --workdir although its config or cohort changed (the old config is kept "
    "as config.<k>.json and listed in run.json's history).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # cli.run keeps the libraries' absl logging at WARNING; jaxsurv's progress shows.
  logging.getLogger("jaxsurv").setLevel(logging.INFO)
  import importlib
  from jaxsurv.models import registry
  config = cli.config_value(_CONFIG)
  # config.model.name picks the family; its driver prepares the data around
  # the shared trainer (jaxsurv.train for MMNN, jaxsurv.fusion_train for the zoo).
  driver = importlib.import_module(registry.get(config.model.name).driver)
  results = driver.train_and_evaluate(config, _WORKDIR.value,
                                      allow_changed_config=_ALLOW_CHANGED.value)
  logging.info("results: %s", {k: v for k, v in results.items() if k in ("val", "test")})


if __name__ == "__main__":
  cli.run(main)
