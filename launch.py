r"""Launches a jaxsurv experiment.

  python launch.py --config=configs/mmnn.py --workdir=runs/mmnn
  python launch.py --config=configs/mmnn.py:local --workdir=runs/local --config.num_epochs=5

Intentionally thin: everything lives in the config file; ``--config.x=y``
overrides any field.
"""

import logging

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, results).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  # Libraries (orbax, tfds) log every checkpoint step at INFO through absl;
  # keep their warnings and jaxsurv's own progress messages.
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("jaxsurv").setLevel(logging.INFO)
  import importlib
  config = _CONFIG.value
  # config.trainer names the module whose train_and_evaluate runs the job:
  # "train" (MMNN, the default) or "fusion_train" (HEALNet, CM-MMF, ...).
  trainer = importlib.import_module(f"jaxsurv.{config.get('trainer', 'train')}")
  results = trainer.train_and_evaluate(config, _WORKDIR.value)
  logging.info("results: %s", {k: v for k, v in results.items() if k in ("val", "test")})


if __name__ == "__main__":
  app.run(main)
