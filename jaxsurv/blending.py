"""Gradient blending: per-head loss weights from overfitting vs generalisation.

Wang, Tran & Feiszli, "What Makes Training Multi-Modal Classification Networks
Hard?", CVPR 2020 (Section 3). A multimodal model has several heads k (the
fused head and one head per modality); training minimises sum_k w_k L_k.
Between two checkpoints N and N + n, with L^T the training loss and L^V a
held-out loss:

* generalisation   dG_k = L^V_N - L^V_{N+n}   (decrease of held-out loss);
* overfitting      O    = L^V - L^T,   dO_k = O_{N+n} - O_N;
* optimal blend    w_k  proportional to dG_k / dO_k^2, normalised to sum 1
  (the paper's practical estimate of w*_k = <grad L*, v_k> / sigma_k^2).

jaxsurv's default ("sum" mode) follows the paper with the clamps of the tsai
implementation (``tsai/callback/gblend.py``): dG is clamped at 0 (a head whose
held-out loss rose gets weight 0) and dO^2 at ``eps_o2`` (no division by 0).
If every dG <= 0 there is no evidence to blend on, so the previous weights are
kept (a jaxsurv choice, not from the paper).

``mode="softmax"`` reproduces the MMNN code (DigITs-AIML/MMNN_STS
``losses/GradientBlender.py``) for comparison:
w = softmax(dG / dO^2) with no clamps. It saturates to one-hot when dO is
small and never gives a head weight 0, even when its held-out loss rose; it is
off by default.

Everything here runs on the host in numpy. The weights come back as a float32
array ordered like the head names, so a jitted train step can take them as an
array argument and never recompiles when they change (see the JAX
documentation of ``jax.jit``: only static arguments are compile-time
constants).

What the losses should be (the trainer's job): each head's full loss (e.g.
Cox_OS + Cox_DM) over a whole split, computed in eval mode at super-epoch
boundaries, with the held-out split carved from the training set, not the
model-selection validation set (Wang et al. 2020, Section 3; likewise the
tsai and MultiBench implementations).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from jaxsurv.checks import as_float_array

HEADS = ("mm", "image", "clinical")
MODES = ("sum", "softmax")


class BlendResult(NamedTuple):
  """Output of ``blend_weights``.

  Attributes:
    weights: ``[n_heads]`` float32 weights summing to 1.
    updated: False when the previous weights were kept (every dG <= 0).
    delta_g: ``[n_heads]`` float64 dG = L^V_prev - L^V_cur, before clamping.
    delta_o: ``[n_heads]`` float64 dO = O_cur - O_prev.
  """
  weights: np.ndarray
  updated: bool
  delta_g: np.ndarray
  delta_o: np.ndarray


def _softmax(z: np.ndarray) -> np.ndarray:
  e = np.exp(z - z.max())  # Shift by the max for overflow-free exp.
  return e / e.sum()


def _check_weights(w, n: int, name: str) -> np.ndarray:
  w = as_float_array(w, name)
  if w.shape != (n,):
    raise ValueError(f"{name}: expected shape ({n},), got {w.shape}")
  if (w < 0).any() or not np.isclose(w.sum(), 1.0, atol=1e-5):
    raise ValueError(f"{name}: expected non-negative weights summing to 1, "
                     f"got {w.tolist()}")
  return w


def blend_weights(prev_train, prev_val, cur_train, cur_val, *,
                  prev_weights=None, eps_o2: float = 1e-8, floor: float = 0.0,
                  mode: str = "sum") -> BlendResult:
  """Gradient-blending weights from two checkpoints' per-head losses.

  Args:
    prev_train: ``[n_heads]`` training losses L^T at the previous checkpoint N.
    prev_val: ``[n_heads]`` held-out losses L^V at N.
    cur_train: ``[n_heads]`` training losses at the current checkpoint N + n.
    cur_val: ``[n_heads]`` held-out losses at N + n.
    prev_weights: ``[n_heads]`` weights to keep when every dG <= 0 (default
      uniform). Must be non-negative and sum to 1.
    eps_o2: lower clamp on dO^2 ("sum" mode), > 0.
    floor: minimum weight per head ("sum" mode), in [0, 1 / n_heads]. The
      normalised weights w become floor + (1 - n_heads * floor) * w, which
      keeps the sum at 1; a floor > 0 stops a head from being switched off
      for good.
    mode: "sum" (paper + clamps, default) or "softmax" (MMNN's variant: no
      clamps, no keep-previous rule, ``floor`` must be 0).

  Returns:
    ``BlendResult(weights, updated, delta_g, delta_o)``; see its docstring.
    Example (sum mode): dG = [0.2, -0.1, 0.1] and dO = [0.2, 0.6, 0.1] give
    ratios [5, 0, 10] and weights [1/3, 0, 2/3].

  Raises:
    ValueError: on NaN/inf or mismatched shapes of the losses, a bad
      ``prev_weights``, ``eps_o2 <= 0``, ``floor`` outside [0, 1/n_heads],
      an unknown ``mode``, or, in softmax mode, dO = 0 for some head
      (MMNN would produce NaN weights there).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  names = ("prev_train", "prev_val", "cur_train", "cur_val")
  arrays = [as_float_array(a, n) for a, n in
            zip((prev_train, prev_val, cur_train, cur_val), names)]
  shapes = {a.shape for a in arrays}
  if len(shapes) != 1 or arrays[0].ndim != 1 or arrays[0].size == 0:
    raise ValueError("losses must be non-empty 1-D arrays of one shape "
                     "[n_heads], got " + ", ".join(
                         f"{n} {a.shape}" for n, a in zip(names, arrays)))
  lt_prev, lv_prev, lt_cur, lv_cur = arrays
  n = lt_prev.size
  if not eps_o2 > 0:
    raise ValueError(f"eps_o2 must be > 0, got {eps_o2}")
  if not 0.0 <= floor <= 1.0 / n:
    raise ValueError(f"floor must be in [0, 1/{n}], got {floor}")
  if mode == "softmax" and floor != 0:
    raise ValueError(f"floor applies to mode='sum' only, got floor={floor} "
                     "with mode='softmax'")
  prev_w = (np.full(n, 1.0 / n) if prev_weights is None
            else _check_weights(prev_weights, n, "prev_weights"))

  delta_g = lv_prev - lv_cur
  delta_o = (lv_cur - lt_cur) - (lv_prev - lt_prev)
  if mode == "softmax":
    zero = delta_o == 0
    if zero.any():
      raise ValueError("softmax mode: dO = 0 (no clamp, as in MMNN) for heads "
                       f"{np.flatnonzero(zero).tolist()}")
    z = delta_g / delta_o ** 2
    if not np.isfinite(z).all():
      raise ValueError(f"softmax mode: dG / dO^2 overflows ({z.tolist()})")
    w = _softmax(z)
    return BlendResult(w.astype(np.float32), True, delta_g, delta_o)

  ratio = np.maximum(delta_g, 0.0) / np.maximum(delta_o ** 2, eps_o2)
  total = ratio.sum()
  if not total > 0:  # Every dG <= 0: nothing generalised; keep the weights.
    return BlendResult(prev_w.astype(np.float32), False, delta_g, delta_o)
  w = ratio / total
  w = floor + (1.0 - n * floor) * w
  return BlendResult(w.astype(np.float32), True, delta_g, delta_o)


@dataclasses.dataclass(frozen=True)
class BlendRecord:
  """One ``GradientBlender.update`` call.

  Attributes:
    epoch: the training epoch the losses were measured at.
    status: "reference" (warm-up: losses stored, weights uniform), "updated"
      or "kept" (every dG <= 0, previous weights kept).
    weights: head -> weight in force after this update.
    train_losses: head -> training loss L^T.
    val_losses: head -> held-out loss L^V.
    delta_g: head -> dG (None for the reference record).
    delta_o: head -> dO (None for the reference record).
  """
  epoch: int
  status: str
  weights: dict
  train_losses: dict
  val_losses: dict
  delta_g: Optional[dict] = None
  delta_o: Optional[dict] = None


class GradientBlender:
  """Online gradient blending with host-side state (Wang et al. 2020).

  Call ``update`` at every super-epoch boundary (e.g. every 5 epochs) with each
  head's training and held-out losses. The first call only stores them as the
  reference and returns uniform weights (warm-up); each later call computes
  new weights from the (previous, current) pair with ``blend_weights`` and
  then makes the current losses the new reference, also when the weights are
  kept.

  Example::

    blender = GradientBlender(("mm", "image", "clinical"))
    w = blender.weights                     # float32 [3], uniform
    ...                                     # train n epochs with loss w @ L
    w = blender.update(epoch, train_losses={"mm": .., "image": .., ...},
                       val_losses={...})
    blender.to_csv(workdir / "gblend_weights_history.csv")

  Attributes:
    heads: head names; fixes the order of the weight array.
    history: list of ``BlendRecord``, one per ``update``.
  """

  def __init__(self, heads: Sequence[str] = HEADS, *, mode: str = "sum",
               eps_o2: float = 1e-8, floor: float = 0.0):
    """Creates a blender with uniform weights.

    Raises:
      ValueError: empty or repeated head names, or an invalid ``mode``,
        ``eps_o2`` or ``floor`` (checked as in ``blend_weights``).
    """
    heads = tuple(heads)
    if not heads or len(set(heads)) != len(heads):
      raise ValueError(f"heads must be non-empty and unique, got {heads}")
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not eps_o2 > 0:
      raise ValueError(f"eps_o2 must be > 0, got {eps_o2}")
    if not 0.0 <= floor <= 1.0 / len(heads):
      raise ValueError(f"floor must be in [0, 1/{len(heads)}], got {floor}")
    if mode == "softmax" and floor != 0:
      raise ValueError("floor applies to mode='sum' only")
    self.heads = heads
    self.mode = mode
    self.eps_o2 = eps_o2
    self.floor = floor
    self.history: list[BlendRecord] = []
    self._weights = np.full(len(heads), 1.0 / len(heads))
    self._ref: Optional[tuple[np.ndarray, np.ndarray]] = None

  @property
  def weights(self) -> np.ndarray:
    """Current weights, ``[n_heads]`` float32 in ``heads`` order (a copy)."""
    return self._weights.astype(np.float32)

  def weights_dict(self) -> dict:
    """Current weights as ``{head: float}``."""
    return {h: float(w) for h, w in zip(self.heads, self._weights)}

  def _losses(self, losses: Mapping[str, Any], name: str) -> np.ndarray:
    missing = [h for h in self.heads if h not in losses]
    extra = [k for k in losses if k not in self.heads]
    if missing or extra:
      raise ValueError(f"{name}: expected keys {list(self.heads)}, missing "
                       f"{missing}, unexpected {extra}")
    values = []
    for h in self.heads:
      v = np.asarray(losses[h])
      if v.size != 1:
        raise ValueError(f"{name}[{h!r}]: expected a scalar loss, got shape "
                         f"{v.shape}")
      values.append(v.reshape(()))
    return as_float_array(values, name)

  def update(self, epoch: int, train_losses: Mapping[str, Any],
             val_losses: Mapping[str, Any]) -> np.ndarray:
    """Records one super-epoch boundary and returns the weights to train with.

    Args:
      epoch: training epoch of the measurement; must increase between calls.
      train_losses: head -> scalar training loss (float or 0-d array).
      val_losses: head -> scalar held-out loss.

    Returns:
      ``[n_heads]`` float32 weights in ``heads`` order, summing to 1.

    Raises:
      ValueError: keys differ from ``heads``, a loss is NaN/inf, or ``epoch``
        does not increase.
    """
    lt = self._losses(train_losses, "train_losses")
    lv = self._losses(val_losses, "val_losses")
    if self.history and epoch <= self.history[-1].epoch:
      raise ValueError(f"epoch must increase: got {epoch} after "
                       f"{self.history[-1].epoch}")
    as_dict = lambda a: {h: float(x) for h, x in zip(self.heads, a)}
    if self._ref is None:
      status, dg, do = "reference", None, None
      self._weights = np.full(len(self.heads), 1.0 / len(self.heads))
    else:
      res = blend_weights(self._ref[0], self._ref[1], lt, lv,
                          prev_weights=self._weights, eps_o2=self.eps_o2,
                          floor=self.floor, mode=self.mode)
      status = "updated" if res.updated else "kept"
      if res.updated:
        self._weights = res.weights.astype(np.float64)
      dg, do = as_dict(res.delta_g), as_dict(res.delta_o)
    self._ref = (lt, lv)
    self.history.append(BlendRecord(int(epoch), status, self.weights_dict(),
                                    as_dict(lt), as_dict(lv), dg, do))
    return self.weights

  def history_rows(self) -> list[dict]:
    """History as flat dicts: epoch, status, weight_/train_/val_/delta_g_/
    delta_o_ + head (delta columns empty for the reference row)."""
    return history_rows(self.history, self.heads)

  def to_csv(self, path) -> str:
    """Writes ``history_rows()`` to ``path`` (CSV with a header); returns it."""
    rows = self.history_rows()
    fields = _columns(self.heads)
    from jaxsurv import distributed  # pylint: disable=import-outside-toplevel
    if not distributed.is_primary():  # Process 0 writes in a multi-process run.
      return os.fspath(path)
    with open(path, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=fields)
      writer.writeheader()
      writer.writerows(rows)
    return os.fspath(path)

  def to_dict(self) -> dict:
    """JSON-serialisable state (config, weights, reference, history), so the
    host-side blending state can be saved next to a model checkpoint."""
    return dict(
        heads=list(self.heads), mode=self.mode, eps_o2=self.eps_o2,
        floor=self.floor, weights=self._weights.tolist(),
        reference=None if self._ref is None else [r.tolist() for r in self._ref],
        history=[dataclasses.asdict(r) for r in self.history])

  @classmethod
  def from_dict(cls, state: Mapping[str, Any]) -> "GradientBlender":
    """Rebuilds a blender from ``to_dict()`` output (e.g. after JSON).

    Raises:
      ValueError: invalid config or weights (as in ``__init__``).
    """
    b = cls(state["heads"], mode=state["mode"], eps_o2=state["eps_o2"],
            floor=state["floor"])
    b._weights = _check_weights(state["weights"], len(b.heads), "weights")
    ref = state["reference"]
    b._ref = None if ref is None else (np.asarray(ref[0], np.float64),
                                       np.asarray(ref[1], np.float64))
    b.history = [BlendRecord(**r) for r in state["history"]]
    return b

  # PyTorch-style names for the same pair.
  state_dict = to_dict
  from_state_dict = from_dict


def _columns(heads: Sequence[str]) -> list[str]:
  cols = ["epoch", "status"]
  for prefix in ("weight", "train", "val", "delta_g", "delta_o"):
    cols += [f"{prefix}_{h}" for h in heads]
  return cols


def history_rows(history: Sequence[BlendRecord],
                 heads: Optional[Sequence[str]] = None) -> list[dict]:
  """Flattens ``BlendRecord``s to dicts (one per record) for CSV/pandas.

  ``heads`` defaults to the first record's weight keys. Delta columns are None
  for the reference record.
  """
  if heads is None:
    heads = list(history[0].weights) if history else []
  rows = []
  for r in history:
    row = {"epoch": r.epoch, "status": r.status}
    for prefix, d in (("weight", r.weights), ("train", r.train_losses),
                      ("val", r.val_losses), ("delta_g", r.delta_g),
                      ("delta_o", r.delta_o)):
      for h in heads:
        row[f"{prefix}_{h}"] = None if d is None else d[h]
    rows.append(row)
  return rows


def plot_history(history, path) -> str:
  """Plots blending weights and per-head losses over epochs to a PNG.

  Top panel: each head's weight after every update. Bottom panel: training
  (dashed) and held-out (solid) loss per head. Uses matplotlib's Agg canvas
  directly, so the global pyplot backend is left alone.

  Args:
    history: a ``GradientBlender`` or its ``history`` (list of BlendRecord).
    path: output file (PNG).

  Returns:
    ``path`` as a string.

  Raises:
    ValueError: if the history is empty.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  records = history.history if isinstance(history, GradientBlender) else history
  records = list(records)
  if not records:
    raise ValueError("plot_history: history is empty")
  heads = list(records[0].weights)
  epochs = [r.epoch for r in records]
  fig = Figure(figsize=(6.4, 6.4), layout="constrained")
  FigureCanvasAgg(fig)
  ax_w, ax_l = fig.subplots(2, 1, sharex=True)
  for i, h in enumerate(heads):
    color = f"C{i}"
    ax_w.plot(epochs, [r.weights[h] for r in records], "o-", color=color,
              label=h)
    ax_l.plot(epochs, [r.train_losses[h] for r in records], "--", color=color,
              label=f"{h} train")
    ax_l.plot(epochs, [r.val_losses[h] for r in records], "-", color=color,
              label=f"{h} held-out")
  kept = [r.epoch for r in records if r.status == "kept"]
  for e in kept:  # Mark updates where the previous weights were kept.
    ax_w.axvline(e, color="0.8", lw=1, zorder=0)
  ax_w.set_ylabel("blend weight")
  ax_w.set_ylim(-0.02, 1.02)
  ax_w.legend(loc="best", fontsize="small")
  ax_l.set_xlabel("epoch")
  ax_l.set_ylabel("loss")
  ax_l.legend(loc="best", fontsize="small", ncol=2)
  from jaxsurv import io as io_lib  # pylint: disable=import-outside-toplevel
  io_lib.save_png_atomic(fig, path)
  return os.fspath(path)
