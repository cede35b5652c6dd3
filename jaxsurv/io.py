"""Atomic writers of run outputs (JSON, CSV, PNG) and the matplotlib backend.

Every file a command writes goes through a temporary file in the same folder
and ``os.replace``, so a crash or a full disk never leaves a half-written
``results.json``, ``predictions.csv`` or plot behind (POSIX rename is atomic
within a file system). Nothing here reads pickles.

In a multi-process run (``jaxsurv.distributed``) only process 0 writes: on
the other processes these functions return without touching the disk, so
the processes never race on one file.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pandas as pd

from jaxsurv import distributed


def write_json_atomic(obj, path: os.PathLike) -> None:
  """Writes JSON via a temporary file and an atomic rename.

  A file that already holds exactly this JSON is left untouched (a resumed
  run does not rewrite what it recorded before).
  """
  if not distributed.is_primary():
    return
  path = pathlib.Path(path)
  text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default)
  if path.is_file() and path.read_text() == text:
    return
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def write_csv_atomic(df: pd.DataFrame, path: os.PathLike) -> None:
  """Writes a table as CSV (no index) via a temporary file and an atomic rename."""
  if not distributed.is_primary():
    return
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  df.to_csv(tmp, index=False)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def pyplot():
  """``matplotlib.pyplot`` with the non-interactive Agg backend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_png_atomic(fig, path: os.PathLike) -> None:
  """Saves a matplotlib figure as PNG via a temporary file and an atomic rename."""
  if not distributed.is_primary():
    return
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  try:
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
