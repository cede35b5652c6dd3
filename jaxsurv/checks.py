"""Host-side input checks shared by losses, metrics and the data layer.

The jitted cores stay pure; every public host entry point calls these checks
first so that bad input fails with a message naming the argument and rows,
never with a silent NaN.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _rows(mask: np.ndarray, limit: int = 10) -> str:
  """Formats the indices where ``mask`` is true, e.g. ``rows [3, 17] (2 rows)``."""
  idx = np.flatnonzero(np.asarray(mask).reshape(-1))
  shown = ", ".join(str(i) for i in idx[:limit])
  more = ", ..." if idx.size > limit else ""
  return f"rows [{shown}{more}] ({idx.size} row{'s' if idx.size != 1 else ''})"


def as_float_array(x, name: str) -> np.ndarray:
  """Converts ``x`` to a float64 numpy array, raising ValueError on NaN/inf.

  Raises:
    ValueError: if ``x`` is not numeric, or holds NaN or infinite values
      (the message names ``name`` and the offending rows).
  """
  try:
    arr = np.asarray(x, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name}: expected numbers, got {type(x).__name__}: {e}") from e
  bad = ~np.isfinite(arr)
  if bad.any():
    raise ValueError(f"{name}: NaN or infinite values at {_rows(bad)}")
  return arr


def check_duration(duration, name: str = "duration") -> np.ndarray:
  """Validates durations (any time unit, e.g. days): finite and >= 0.

  Raises:
    ValueError: naming ``name`` and the rows that are NaN, infinite or negative.
  """
  d = as_float_array(duration, name)
  neg = d < 0
  if neg.any():
    raise ValueError(f"{name}: negative durations at {_rows(neg)}")
  return d


def check_event(event, name: str = "event") -> np.ndarray:
  """Validates an event indicator: every value is 0 (censored) or 1 (event).

  Booleans are accepted. Returns a bool array.

  Raises:
    ValueError: naming ``name`` and the rows whose value is not 0 or 1.
  """
  e = np.asarray(event)
  if e.dtype == bool:
    return e
  try:
    ef = e.astype(np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name}: expected 0/1 values: {err}") from err
  bad = ~((ef == 0) | (ef == 1))
  if bad.any():
    raise ValueError(f"{name}: values outside {{0, 1}} at {_rows(bad)}")
  return ef.astype(bool)


def check_same_shape(arrays: Sequence[np.ndarray], names: Sequence[str]) -> None:
  """Raises ValueError if the arrays do not all share one shape."""
  shapes = [np.shape(a) for a in arrays]
  if len(set(shapes)) > 1:
    desc = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
    raise ValueError(f"mismatched shapes: {desc}")


def check_survival(duration, event, risk=None, *, names=("duration", "event", "risk")):
  """Validates a (duration, event[, risk]) triple and returns numpy arrays.

  Args:
    duration: ``[n]`` (or ``[n, outcomes]``) times to event or censoring, >= 0.
    event: same shape, 1 = event observed, 0 = censored.
    risk: optional same shape; higher means higher hazard (earlier event).
    names: argument names used in error messages.

  Returns:
    ``(duration float64, event bool)`` or ``(duration, event, risk float64)``.

  Raises:
    ValueError: on NaN/inf/negative durations, events outside {0, 1}, NaN
      risks or mismatched shapes; the message names the argument and rows.
  """
  d = check_duration(duration, names[0])
  e = check_event(event, names[1])
  if risk is None:
    check_same_shape([d, e], names[:2])
    return d, e
  r = as_float_array(risk, names[2])
  check_same_shape([d, e, r], names)
  return d, e, r
