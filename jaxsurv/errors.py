"""The two kinds of error jaxsurv raises on purpose.

* :class:`UserError`: bad input from the user (a manifest, a config, a
  workdir, a cohort too small for the configured hold-outs). The commands
  print its message alone and exit non-zero, with no traceback (``--debug``
  shows it). It subclasses ``ValueError``, so ``except ValueError`` in user
  code keeps working.
* :class:`TrainingError`: training stopped for a reason found in the run
  itself (e.g. a non-finite loss); the message says where and which
  checkpoint is kept.

Anything else that escapes a command is treated as a bug in jaxsurv and keeps
its traceback.
"""


class UserError(ValueError):
  """Bad input; the message names the patient, file, column, field or site."""


class TrainingError(RuntimeError):
  """Training stopped (e.g. a non-finite loss); the message says where."""
