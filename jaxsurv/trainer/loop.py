"""The one training loop of jaxsurv: batches, fit, selection, checkpoints, resume.

``Trainer`` holds the compiled step and forward pass of one (model, task,
optimiser) setting on a ``("data",)`` mesh of all devices; ``Trainer.fit``
trains on one training part and selects on one validation part:

1. every epoch, a permutation of the training rows drawn from ``(seed,
   epoch)`` (so a resumed run sees the same order) in fixed-size global
   batches (the last one padded with masked rows, or dropped with
   ``config.drop_remainder``);
2. a non-finite training loss stops the run (``TrainingError``) every
   ``config.log_every_steps`` steps and at the end of each epoch;
3. after every epoch: eval-mode outputs on the whole validation part, its
   data loss (``task.part_loss``) and Harrell's C per outcome, then the
   controller's epoch end (e.g. gradient blending);
4. selection (``config.selection``): ``"val_loss"`` (lowest validation
   data loss), ``"val_cindex"`` (highest Harrell's C of the first outcome)
   or ``"last"`` (the final epoch); early stopping after
   ``config.early_stopping.patience`` epochs without improvement (0: off);
   the test part is never seen;
5. with a checkpoint directory, Orbax keeps the latest and the best epoch
   (state plus a JSON record of history, selection and controller state),
   written synchronously and atomically; a run restarted with the same
   arguments resumes after the last completed epoch and ends exactly like an
   uninterrupted one. Without one (cross-validation), the best parameters
   are kept as a host copy.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import pathlib
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsurv import distributed, metrics
from jaxsurv.errors import TrainingError, UserError
from jaxsurv.models import conv, pretrained
from jaxsurv.trainer import optim
from jaxsurv.trainer.step import TrainState, predict_fn, train_step

log = logging.getLogger("jaxsurv")

SELECTIONS = ("val_loss", "val_cindex", "last")


# ----------------------------------------------------------------------------
# Parts: a view of some rows of host arrays.
# ----------------------------------------------------------------------------


class Part:
  """Rows ``rows`` of a pytree of host arrays (leading axis = patients).

  Taking a batch indexes the full arrays directly, so a part never copies
  the cohort (3D volumes stay in one array).

  Args:
    arrays: ``{"inputs": {m: [N, ...]}, "presence": {m: bool [N]}, targets
      ...}`` host arrays.
    rows: int ``[n]`` positions of this part's patients (default: all).
  """

  def __init__(self, arrays: Mapping[str, Any], rows: np.ndarray | None = None):
    self.arrays = arrays
    n_all = len(jax.tree.leaves(arrays)[0])
    self.rows = np.arange(n_all) if rows is None else np.asarray(rows, np.int64)

  def __len__(self) -> int:
    return len(self.rows)

  def take(self, sel: np.ndarray) -> dict:
    """The pytree at positions ``sel`` of this part (host copies)."""
    idx = self.rows[np.asarray(sel, np.int64)]
    return jax.tree.map(lambda a: a[idx], dict(self.arrays))

  def __getitem__(self, key: str):
    """One top-level field for all rows of the part (e.g. ``"duration"``)."""
    return jax.tree.map(lambda a: a[self.rows], self.arrays[key])

  def subset(self, sel: np.ndarray) -> "Part":
    return Part(self.arrays, self.rows[np.asarray(sel, np.int64)])


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The training rows' order in ``epoch``: a permutation drawn from ``(seed, epoch)``."""
  return np.random.default_rng([seed, epoch]).permutation(n)


# ----------------------------------------------------------------------------
# Controllers: the task's host-side state between epochs.
# ----------------------------------------------------------------------------


class ConstantArgs:
  """Task arguments fixed for the whole run (e.g. a fold's time-bin weights)."""

  def __init__(self, args):
    self._args = np.asarray(args, np.float32)

  def args(self) -> np.ndarray:
    return self._args

  def end_epoch(self, epoch: int, predict: Callable) -> dict:
    del epoch, predict
    return {}

  def state_dict(self) -> dict:
    return {}

  def load_state_dict(self, d: Mapping) -> None:
    del d


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


def checkpoint_manager(directory: pathlib.Path, *, create: bool = True) -> ocp.CheckpointManager:
  """A run's Orbax manager: keeps the latest checkpoint and the selected one.

  Checkpoints are numbered by epoch; each holds ``state`` (``TrainState``)
  and ``meta`` (JSON: epoch, history, selection, controller state). The
  selected ("best") epoch is recorded in ``meta["best_epoch"]``; the
  preservation policy keeps the most recent epoch that was a new best (the
  metric is ``-epoch`` for a new best and ``1e30`` otherwise). Saves are
  synchronous; Orbax writes to a temporary folder and renames it when
  complete, so an interrupted save leaves the previous checkpoint intact. A
  relative ``directory`` is taken from the current directory (Orbax accepts
  only absolute paths). ``jaxsurv.predict`` opens runs with ``create=False``.
  """
  directory = pathlib.Path(directory).absolute()
  from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
  # Runs of the earlier MMNN loop (jaxsurv <= 6d0ca36) recorded "val_loss"
  # (lower is better, as here): predict still finds their best checkpoint.
  metric = lambda m: m["new_best"] if "new_best" in m else m["val_loss"]
  options = ocp.CheckpointManagerOptions(
      best_fn=metric, best_mode="min", create=create,
      preservation_policy=pp.AnyPreservationPolicy(
          [pp.LatestN(n=1), pp.BestN(get_metric_fn=metric, reverse=True, n=1)]),
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(
      directory, options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


def abstract_state(tree, sharding):
  """Shapes, dtypes and the target sharding of ``tree`` (for Orbax restore)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
                      if hasattr(a, "shape") else a, tree)


def restore(mngr: ocp.CheckpointManager, epoch: int, like: TrainState, sharding) -> tuple:
  """``(state, meta)`` of checkpoint ``epoch``.

  Raises:
    UserError: the checkpoint cannot be read (truncated or corrupt files, a
      state of another shape); the message names the folder.
  """
  try:
    restored = mngr.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state(like, sharding)),
        meta=ocp.args.JsonRestore()))
  except (ValueError, KeyError, OSError, RuntimeError) as e:
    raise UserError(f"cannot restore checkpoint {epoch} in {mngr.directory}: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                    "(the files are incomplete or were written by another config; use a new "
                    "--workdir)") from e
  return restored["state"], restored["meta"]


# ----------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
  """The outcome of ``Trainer.fit``.

  Attributes:
    params, batch_stats: the selected epoch's variables (host numpy).
    best_epoch: the selected epoch.
    history: per-epoch records (``train_loss``, ``val_loss``,
      ``val_cindex_<outcome>``, ``lr``, ``seconds`` (training time up to
      the end of the epoch, across resumes), ``selection_score``,
      controller fields such as ``blend_weights``).
    seconds: wall time of the training loop (this process).
    resumed_from: the first epoch trained after resuming from a checkpoint
      (None: trained from scratch).
  """
  params: Any
  batch_stats: Any
  best_epoch: int
  history: list
  seconds: float
  resumed_from: int | None = None


@functools.lru_cache(maxsize=64)
def _compiled(model, call, opt_spec: tuple, task, augment, l1: float, l1_include: str,
              summarize, compiler_options: tuple = ()):
  """``(tx, jitted step, jitted predict, jitted init)`` per static setting.

  Cached on the hashable model and settings, so trainers that differ only in
  epochs, selection or data (cross-validation folds) share one compilation.
  ``compiler_options``: ``(name, value)`` pairs of XLA options for all three
  (``jaxsurv.models.conv.cpu_compiler_options``).
  """
  tx = optim.optimizer_from_spec(opt_spec)
  step = functools.partial(train_step, model=model, call=call, tx=tx, task=task,
                           augment=augment, l1=l1, l1_include=l1_include)
  init = functools.partial(call.init, model)
  jit = functools.partial(jax.jit, compiler_options=dict(compiler_options) or None)
  return (tx, jit(step, donate_argnums=(0,)),
          jit(functools.partial(predict_fn, model=model, call=call, summarize=summarize)),
          jit(init))


def compiler_options(config) -> dict:
  """The XLA options of a config's compiled programs: ``config.xla_cpu_convolutions``
  (``"xla"`` when absent; ``jaxsurv.models.conv.cpu_compiler_options``).

  Raises:
    UserError: an unknown ``xla_cpu_convolutions``.
  """
  try:
    return conv.cpu_compiler_options(config.get("xla_cpu_convolutions", "xla"))
  except ValueError as e:
    raise UserError(f"config.{e}") from None


class Trainer:
  """Compiled step and forward pass of one (model, task, optimiser) setting.

  Args:
    config: the run config (``batch_size``, ``eval_batch_size``,
      ``num_epochs``, ``optimizer``, ``grad_accum_steps``, ``selection``,
      ``early_stopping``, ``drop_remainder``, ``log_every_steps``,
      ``progress_bar``, ``seed``, ``xla_cpu_convolutions``; ``loss.l1`` and
      ``loss.l1_include``).
    model: a Flax module; ``call`` its adapter (``jaxsurv.models.registry``).
    task: a task (``jaxsurv.tasks``).
    augment: training-time input transform (static, hashable) or None.
    summarize: ``summarize(aux) -> dict`` added to eval outputs, or None.

  Raises:
    UserError: bad config values (optimiser, selection, batch sizes not
      positive multiples of the number of devices).
  """

  def __init__(self, config: ml_collections.ConfigDict, model, call, task, *,
               augment=None, summarize=None):
    self.config = config
    self.model = model
    self.task = task
    devices = jax.devices()
    self.mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self.repl = NamedSharding(self.mesh, P())
    self.data_sh = NamedSharding(self.mesh, P("data"))
    for name in ("batch_size", "eval_batch_size"):
      if config[name] < 1 or config[name] % len(devices):
        raise UserError(f"config.{name}={config[name]} must be a positive multiple of the "
                        f"{len(devices)} devices")
    self.selection = config.get("selection", "val_loss")
    if self.selection not in SELECTIONS:
      raise UserError(f"config.selection must be one of {SELECTIONS}, got {self.selection!r}")
    lc = config.get("loss", ml_collections.ConfigDict())
    self.tx, self.train_step, self.predict, self._init = _compiled(
        model, call, optim.optimizer_spec(config), task, augment,
        float(lc.get("l1", 0.0) or 0.0), lc.get("l1_include", "all"), summarize,
        tuple(sorted(compiler_options(config).items())))

  # -- data ------------------------------------------------------------------

  def batch(self, part: Part, sel: np.ndarray, size: int) -> dict:
    """A fixed-size global batch of positions ``sel`` of ``part``, padded with
    masked copies of the first row, sharded over the ``("data",)`` mesh.

    Every process passes the same ``sel`` and reads only its own block of
    the rows (``distributed.local_rows``); the result is one global array
    per leaf over the devices of all processes."""
    n = len(sel)
    if n == 0 or n > size:
      raise ValueError(f"batch of {n} rows for size {size}")
    full = np.concatenate([np.asarray(sel, np.int64), np.repeat(sel[:1], size - n)])
    rows = distributed.local_rows(size)
    b = part.take(full[rows])
    b["mask"] = (np.arange(size) < n)[rows]
    return distributed.global_batch(b, self.data_sh, size)

  def init_state(self, rng: jax.Array, part: Part) -> TrainState:
    """Fresh variables (from one batch's shapes) and optimiser state, replicated."""
    b = self.batch(part, np.arange(min(self.config.batch_size, len(part))),
                   self.config.batch_size)
    variables = self._init(rng, b["inputs"], b["presence"])
    params = variables["params"]
    return self.state_from(params, variables.get("batch_stats", {}))

  def state_from(self, params, batch_stats) -> TrainState:
    """A step-0 state with fresh optimiser state around given variables."""
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       batch_stats=batch_stats or {}, opt_state=self.tx.init(params))
    return jax.device_put(state, self.repl)

  def predict_part(self, params, batch_stats, part: Part) -> dict:
    """Eval-mode outputs over a whole part, in ``eval_batch_size`` chunks (host numpy)."""
    bs = self.config.eval_batch_size
    n = len(part)
    chunks = []
    for start in range(0, n, bs):
      sel = np.arange(start, min(start + bs, n))
      b = self.batch(part, sel, bs)
      out = distributed.to_host(self.predict(params, batch_stats, b["inputs"], b["presence"]))
      chunks.append(jax.tree.map(lambda a: a[:len(sel)], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *chunks)

  def cindex(self, outputs, part: Part) -> dict:
    """Harrell's C per outcome of ``outputs`` on ``part`` (NaN where undefined)."""
    risk = self.task.risk(outputs)
    duration, event, omask = self.task.targets(part)
    res = {}
    for j, o in enumerate(self.task.outcomes):
      m = omask[:, j]
      try:
        res[o] = metrics.concordance_index(duration[m, j], event[m, j], risk[m, j])
      except ValueError:
        res[o] = float("nan")
    return res

  def steps_per_epoch(self, n_train: int) -> int:
    bs = self.config.batch_size
    if self.config.get("drop_remainder", False):
      return n_train // bs
    return math.ceil(n_train / bs)

  # -- training --------------------------------------------------------------

  def fit(self, train: Part, val: Part, *, seed: int | None = None, controller=None,
          checkpoint_dir: pathlib.Path | str | None = None, progress: bool | None = None,
          desc: str = "train", init_params: Callable[[Any], Any] | None = None) -> FitResult:
    """Trains on ``train``, selects on ``val``; never sees a test part.

    Args:
      train, val: the training and validation parts (``val`` non-empty).
      seed: RNG seed of initialisation, data order and dropout (default
        ``config.seed``).
      controller: the task's host state between epochs (default: constant
        ``task_args`` of one 0; see ``ConstantArgs``): ``args()``,
        ``end_epoch(epoch, predict) -> dict``, ``state_dict()``,
        ``load_state_dict(d)``.
      checkpoint_dir: Orbax folder (latest + best, resume); None keeps the
        best parameters in memory.
      progress: a tqdm bar (default ``config.progress_bar``).
      desc: the bar's label.
      init_params: optional ``f(params) -> params`` applied to fresh
        parameters (e.g. an output bias at the marginal hazards).

    Returns:
      :class:`FitResult`.

    Raises:
      UserError: an empty validation part, a training part smaller than one
        batch, an unreadable checkpoint.
      TrainingError: a non-finite training or validation loss; the last good
        checkpoint is kept.
    """
    from tqdm.auto import tqdm
    c = self.config
    seed = c.seed if seed is None else seed
    if len(val) == 0:
      raise UserError("the split has no validation part; model selection needs one (the test "
                      "part is never used for it)")
    if len(train) < c.batch_size:
      raise UserError(f"the training part has {len(train)} patients, fewer than "
                      f"config.batch_size={c.batch_size}")
    controller = controller if controller is not None else ConstantArgs(np.zeros(1))
    steps = self.steps_per_epoch(len(train))
    schedule = optim.lr_schedule(c, steps)
    es = c.get("early_stopping", ml_collections.ConfigDict())
    patience = int(es.get("patience", 0))
    min_epochs = int(es.get("min_epochs", 0))
    min_delta = float(es.get("min_delta", 0.0))

    rng_init, rng_loop = jax.random.split(jax.random.key(seed))
    state = self.init_state(rng_init, train)
    if init_params is not None:
      state = self.state_from(init_params(state.params), state.batch_stats)
    history: list[dict] = []
    best_epoch, best_score, best_host = -1, math.inf, None
    start_epoch, resumed_from = 0, None
    mngr = checkpoint_manager(pathlib.Path(checkpoint_dir)) if checkpoint_dir else None
    try:
      if mngr is not None and mngr.latest_step() is not None:
        state, meta = restore(mngr, mngr.latest_step(), state, self.repl)
        if "best_epoch" not in meta:
          raise UserError(f"{mngr.directory} was written by an earlier jaxsurv training loop "
                          "and cannot be resumed by this one; train into a new --workdir")
        start_epoch = resumed_from = meta["epoch"] + 1
        history = meta["history"]
        best_epoch, best_score = meta["best_epoch"], meta["best_score"]
        controller.load_state_dict(meta["controller"])
        log.info("resumed after epoch %d (step %d)", meta["epoch"], int(state.step))
      elif pretrained.init_from(c):  # Fresh start only: config.model.image.init_from.
        state = self.state_from(*pretrained.load_from_config(c, state.params, state.batch_stats))
      stopped = bool(history) and self._should_stop(history[-1]["epoch"], best_epoch, patience,
                                                    min_epochs)
      show = c.get("progress_bar", True) if progress is None else progress
      bar = tqdm(total=steps * c.num_epochs, initial=start_epoch * steps, desc=desc,
                 unit="step", dynamic_ncols=True, disable=not show, leave=False)
      t0 = time.time()
      seconds_before = history[-1]["seconds"] if history else 0.0  # Before a resume.
      for epoch in range(start_epoch, c.num_epochs):
        if stopped:
          break
        state, means, lr = self.train_epoch(state, train, seed=seed, epoch=epoch, rng=rng_loop,
                                            schedule=schedule, task_args=controller.args(),
                                            bar=bar)
        out = self.predict_part(state.params, state.batch_stats, val)
        val_loss = self.task.part_loss(out, val, controller.args())
        if not math.isfinite(val_loss):
          raise TrainingError(f"non-finite validation loss after epoch {epoch} (step "
                              f"{int(state.step)})")
        cidx = self.cindex(out, val)
        rec = {"epoch": epoch, "step": int(state.step), "train_loss": means["loss"],
               "train_data_loss": means["data_loss"], "train_l1": means["l1"],
               "grad_norm": means["grad_norm"], "val_loss": val_loss,
               "val_cindex": cidx[self.task.outcomes[0]],
               **{f"val_cindex_{o}": v for o, v in cidx.items()},
               **{f"train_{k}": v for k, v in means.items()
                  if k not in ("loss", "data_loss", "l1", "grad_norm")},
               "lr": lr, "task_args": np.asarray(controller.args()).tolist(),
               "seconds": seconds_before + time.time() - t0}
        rec.update(controller.end_epoch(
            epoch, lambda p: self.predict_part(state.params, state.batch_stats, p)))
        score = self._score(rec)
        rec["selection_score"] = score
        new_best = best_epoch < 0 or score < best_score - min_delta
        if new_best:
          best_epoch, best_score = epoch, score
          if mngr is None:  # Deep host copy: the device buffers are donated.
            best_host = jax.tree.map(lambda a: np.array(a, copy=True),
                                     (state.params, state.batch_stats))
        history.append(rec)
        log.info("epoch %d: %s", epoch, {k: (round(v, 4) if isinstance(v, float) else v)
                                         for k, v in rec.items() if k != "task_args"})
        if mngr is not None:
          meta = {"epoch": epoch, "history": history, "best_epoch": best_epoch,
                  "best_score": best_score, "controller": controller.state_dict()}
          mngr.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(meta)),
                    metrics={"new_best": -float(epoch) if new_best else 1e30})
          mngr.wait_until_finished()
        bar.set_postfix(loss=f"{means['loss']:.3f}", val=f"{val_loss:.3f}")
        stopped = self._should_stop(epoch, best_epoch, patience, min_epochs)
      bar.close()
      if mngr is not None:
        best_state, _ = restore(mngr, best_epoch, state, self.repl)
        best_host = jax.tree.map(np.asarray, (best_state.params, best_state.batch_stats))
    finally:
      if mngr is not None:
        mngr.close()
    return FitResult(params=best_host[0], batch_stats=best_host[1], best_epoch=best_epoch,
                     history=history, seconds=time.time() - t0, resumed_from=resumed_from)

  def train_epoch(self, state: TrainState, train: Part, *, seed: int, epoch: int,
                  rng: jax.Array, schedule: Callable[[int], float], task_args,
                  bar=None) -> tuple[TrainState, dict, float]:
    """One epoch of jitted steps over ``train`` in ``epoch_order(seed, epoch)``.

    ``fit`` runs it every epoch; a federated client runs it for its local
    epochs from the round's global parameters (``jaxsurv.federated``).

    Args:
      state: the ``TrainState`` (donated to the step).
      train: the training part (at least one batch).
      seed, epoch: the data order's seed and epoch number.
      rng: the loop key (folded with the step number inside the step).
      schedule: learning rate per optimiser update.
      task_args: the task's array argument.
      bar: optional tqdm bar, advanced once per step.

    Returns:
      ``(state, means, lr)``: the new state, the epoch's mean measurements
      (``loss``, ``data_loss``, ``l1``, ``grad_norm``, the task's) and the
      last learning rate.

    Raises:
      TrainingError: a non-finite loss or measurement.
    """
    c = self.config
    steps = self.steps_per_epoch(len(train))
    accum = int(c.get("grad_accum_steps", 1))
    log_every = int(c.get("log_every_steps", 0) or 0)
    order = epoch_order(seed, epoch, len(train))
    task_args = jnp.asarray(task_args, jnp.float32)
    sums: dict = {}
    lr = 0.0
    for s in range(steps):
      sel = order[s * c.batch_size:(s + 1) * c.batch_size]
      lr = float(schedule(int(state.step) // accum))
      state, meas = self.train_step(state, self.batch(train, sel, c.batch_size), rng,
                                    jnp.asarray(lr, jnp.float32), task_args)
      for k, v in meas.items():
        sums[k] = sums.get(k, 0.0) + v
      if log_every and ((s + 1) % log_every == 0 or s + 1 == steps):
        loss = float(meas["loss"])
        self._check_finite(loss, state, epoch)
        if bar is not None:
          bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
      if bar is not None:
        bar.update(1)
    means = {k: float(v) / steps for k, v in sums.items()}
    bad = {k: v for k, v in means.items() if not math.isfinite(v)}
    if bad:
      self._check_finite(means["loss"], state, epoch)
      raise TrainingError(f"non-finite training measurements {bad} in epoch {epoch} (step "
                          f"{int(state.step)}); the last good checkpoint (epoch "
                          f"{epoch - 1}) is kept if the run has a workdir")
    return state, means, lr

  # -- helpers ---------------------------------------------------------------

  def _score(self, rec: Mapping) -> float:
    """Selection score of an epoch record: lower is better."""
    if self.selection == "val_loss":
      return rec["val_loss"]
    if self.selection == "val_cindex":
      return -rec["val_cindex"] if math.isfinite(rec["val_cindex"]) else math.inf
    return -float(rec["epoch"])  # "last": every epoch replaces the previous one.

  @staticmethod
  def _should_stop(epoch: int, best_epoch: int, patience: int, min_epochs: int) -> bool:
    return patience > 0 and epoch >= min_epochs and epoch - best_epoch >= patience

  @staticmethod
  def _check_finite(loss: float, state: TrainState, epoch: int) -> None:
    if not math.isfinite(loss):
      raise TrainingError(
          f"non-finite training loss {loss} at step {int(state.step)} (epoch {epoch}); the "
          f"last good checkpoint (epoch {epoch - 1}) is kept if the run has a workdir")
