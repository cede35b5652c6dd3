"""Pure survival losses: Cox partial likelihood and discrete-time (logistic hazard) NLL.

All functions are pure JAX, work under ``jit``, ``grad`` and ``vmap``, and on
arrays sharded across devices. Under ``jit`` with a batch sharded over a data
mesh, the Cox risk set is the **global** batch (sorting is a global operation),
never one device's slice.

Conventions:
  * ``risk`` is the log-hazard (log relative risk) ``eta``: higher means a
    higher hazard, i.e. an earlier event.
  * ``duration`` is the time to event or censoring (any unit, e.g. days).
  * ``event`` is the event indicator: 1 = event observed, 0 = censored.
  * ``mask`` (optional) marks real rows (1) versus padding (0) so fixed-shape
    batches work; a masked row is removed entirely, from the risk sets too.

When called eagerly on concrete arrays, the losses validate their input on the
host (NaN or negative durations, events outside {0, 1}, mismatched shapes raise
ValueError naming the argument and rows). Inside ``jit`` they stay pure and do
no checks, unless ``cox_ph_loss(..., check=True)`` / ``checked_cox_ph_loss``
is used: those check on the device with ``jax.experimental.checkify``.

Duration precision: the Cox partial likelihood depends on the durations only
through their order and ties. Host durations (numpy, lists, pandas) are
replaced by their exact dense ranks (:func:`duration_ranks`) before anything
is cast, so the tie groups are those of float64 ranking, as in
``jaxsurv.metrics.concordance_index``. Durations that are already
``jax.Array``s or tracers are compared in their own dtype (float32 unless x64
is enabled); see :func:`cox_ph_loss`.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np

from jaxsurv import checks

Array = jax.Array


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs if x is not None)


def _gather_batch(x: Array) -> Array:
  """Replicates an array whose batch axis is sharded over an Explicit mesh axis.

  The Cox risk set spans the whole batch, so the sort must see every row. On
  an Auto mesh (``jax.sharding.Mesh``) XLA inserts the gather itself; on an
  Explicit mesh (``jax.make_mesh``'s default) ``sort`` rejects an operand
  sharded along the sorted axis, so we reshard to replicated first. The
  result is identical to the single-device loss either way.
  """
  sharding = getattr(jax.typeof(x), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if not spec or spec[0] is None:
    return x
  mesh = sharding.mesh
  explicit = jax.sharding.AxisType.Explicit
  names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
  axis_type = dict(zip(mesh.axis_names, mesh.axis_types))
  if any(axis_type.get(n) == explicit for n in names):
    return jax.sharding.reshard(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  return x


def _host_mask(mask, shape, duration_name: str = "duration") -> np.ndarray | None:
  """Broadcasts a concrete ``[batch]`` or full-shape mask to ``shape`` (bool)."""
  if mask is None:
    return None
  m = np.asarray(mask).astype(bool)
  if m.shape != tuple(shape) and m.shape != tuple(shape[:1]):
    raise ValueError(f"mask: shape {m.shape} matches neither {duration_name} {tuple(shape)} "
                     f"nor its batch dimension {tuple(shape[:1])}")
  return np.broadcast_to(m.reshape(m.shape + (1,) * (len(shape) - m.ndim)), shape)


def _validate_host(risk, duration, event, mask, names):
  """Host-side checks for eager calls; masked (padding) rows are not checked."""
  d = np.asarray(duration, dtype=np.float64)
  e = np.asarray(event)
  r = np.asarray(risk, dtype=np.float64)
  shapes = {names[0]: r.shape, names[1]: d.shape, names[2]: e.shape}
  if len({tuple(s) for s in shapes.values()}) > 1:
    raise ValueError("mismatched shapes: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
  m = _host_mask(mask, d.shape, names[1])
  if m is not None:
    d, e, r = np.where(m, d, 0.0), np.where(m, e, 0), np.where(m, r, 0.0)
  checks.check_duration(d, names[1])
  checks.check_event(e, names[2])
  checks.as_float_array(r, names[0])


def _dense_ranks(values: np.ndarray) -> np.ndarray:
  """Dense ranks (0, 1, ... in increasing order, equal values share one) as int32.

  Ranks in the array's own precision: integers exactly, floats in their dtype
  (float64 for python floats), anything else converted to float64 first.
  NaNs share the largest rank (``np.unique`` collapses them); only masked
  rows may hold them. Ranks are taken over all entries, so in a ``[batch,
  outcomes]`` array each column keeps its order and ties.
  """
  a = np.asarray(values)
  if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
    a = a.astype(np.float64)
  uniq, inverse = np.unique(a.reshape(-1), return_inverse=True)
  if uniq.size > np.iinfo(np.int32).max:
    raise ValueError(f"duration: {uniq.size} distinct values do not fit int32 ranks")
  return inverse.reshape(a.shape).astype(np.int32)


def duration_ranks(duration) -> np.ndarray:
  """Exact dense ranks of host durations, for passing to ``cox_ph_loss`` under ``jit``.

  The Cox partial likelihood depends on the durations only through their
  order and their ties (Cox 1972; the risk set of time t is {j : T_j >= t}),
  so replacing the durations by any strictly increasing function of them,
  such as these ranks, leaves the loss and its gradient unchanged. Computing
  the ranks on the host in float64 (or exactly, for integer days) keeps
  durations that are closer than one float32 step apart (about 0.001 at
  12,345 days) distinct, where a float32 duration array would tie them.
  Rank a whole cohort once and slice batches from the result: a subset of
  ranks keeps the order and ties of the subset's durations.

  Args:
    duration: ``[n]`` or ``[n, outcomes]`` host array-like (numpy, list,
      pandas) of times to event or censoring, any unit, finite and >= 0.

  Returns:
    int32 numpy array of the same shape: 0 for the smallest duration, equal
    durations share a rank, consecutive distinct durations get consecutive
    ranks. Ranks are taken over all entries, so every column of a 2-D array
    keeps its order and ties.

  Raises:
    TypeError: ``duration`` is a JAX tracer (rank on the host, outside
      ``jit``).
    ValueError: NaN, infinite or negative durations (naming the rows), or
      more than 2^31 - 1 distinct values.
  """
  if isinstance(duration, jax.core.Tracer):
    raise TypeError("duration_ranks needs concrete durations: compute the ranks on the host, "
                    "outside jit, and pass them into the jitted function")
  a = np.asarray(duration)
  checks.check_duration(a, "duration")
  return _dense_ranks(a)


def _host_invalid_durations(d: np.ndarray) -> np.ndarray:
  """Bool mask of NaN, infinite or negative host durations (for ``check=True``)."""
  if np.issubdtype(d.dtype, np.integer):
    return d < 0
  try:
    f = np.asarray(d, dtype=np.float64)
  except (TypeError, ValueError):
    return np.ones(d.shape, bool)
  with np.errstate(invalid="ignore"):
    return ~np.isfinite(f) | (f < 0)


def _device_checks(risk: Array, duration: Array, event: Array, mask: Array,
                   bad_duration: Optional[np.ndarray]) -> None:
  """``checkify.check`` of every unmasked entry (see ``cox_ph_loss(check=True)``)."""
  def first(bad, what):
    flat = bad.reshape(-1)
    idx = jnp.argmax(flat)
    count = jnp.sum(flat)
    if bad.ndim == 2:
      checkify.check(~jnp.any(flat), f"cox_ph_loss: {what} at row {{}} (outcome {{}}); "
                     "{} entries in all", idx // bad.shape[1], idx % bad.shape[1], count)
    else:
      checkify.check(~jnp.any(flat), f"cox_ph_loss: {what} at row {{}}; {{}} rows in all",
                     idx, count)

  if bad_duration is not None:  # Host durations, replaced by ranks: flags from the host.
    bad_d = jnp.asarray(bad_duration)
  elif jnp.issubdtype(duration.dtype, jnp.floating):
    bad_d = ~jnp.isfinite(duration) | (duration < 0)
  elif jnp.issubdtype(duration.dtype, jnp.signedinteger):
    bad_d = duration < 0
  else:
    bad_d = jnp.zeros(duration.shape, bool)
  first(bad_d & mask, "duration: NaN, infinite or negative value")
  if event.dtype != jnp.bool_:
    # Doubled braces: the message is a str.format template.
    first(((event != 0) & (event != 1)) & mask, "event: value outside {{0, 1}}")
  if jnp.issubdtype(risk.dtype, jnp.inexact):
    first(~jnp.isfinite(risk) & mask, "risk: NaN or infinite value")


def _cox_nll_1d(risk: Array, duration: Array, event: Array, mask: Array,
                efron: bool) -> tuple[Array, Array]:
  """Negative log partial likelihood of one outcome: returns (sum, n_events).

  O(n log n): one sort by duration, a reverse log-cumsum-exp for the risk
  sets, and the first index of each tie group so every member of a tied group
  shares the risk set {j : T_j >= t}, censored subjects at t included.
  """
  dtype = jnp.result_type(risk.dtype, jnp.float32)
  risk = jnp.where(mask, risk.astype(dtype), 0.0)  # Padding may hold NaN.
  ev = jnp.logical_and(event.astype(bool), mask)
  # Padding sorts first (key -inf, or the integer minimum for integer keys,
  # e.g. the ranks of duration_ranks), so it never enters a real risk set.
  # Durations are compared in their own dtype (at least float32), never in
  # the dtype of the risk scores.
  if jnp.issubdtype(duration.dtype, jnp.signedinteger):
    key = jnp.where(mask, duration, jnp.array(jnp.iinfo(duration.dtype).min, duration.dtype))
  else:
    kdtype = (jnp.promote_types(duration.dtype, jnp.float32)
              if jnp.issubdtype(duration.dtype, jnp.floating) else dtype)
    key = jnp.where(mask, duration.astype(kdtype), -jnp.inf)
  # One sort on a single key carries eta and the events along (no
  # gathers); the order inside a tie group does not matter below.
  t, eta, d = jax.lax.sort((key, risk, ev.astype(dtype)), num_keys=1)
  d = d > 0
  n = eta.shape[0]
  pos = jnp.arange(n)
  # log sum_{j >= i} exp(eta_j); an associative scan is faster than
  # lax.cumlogsumexp on CPU and as stable (logaddexp is exact-shifted).
  log_risk_set = jax.lax.associative_scan(jnp.logaddexp, eta, reverse=True)
  # First index of each tie group in O(n): running max of the group starts.
  starts = jnp.concatenate([jnp.ones((1,), bool), t[1:] != t[:-1]])
  first = jax.lax.cummax(jnp.where(starts, pos, 0))
  log_r = log_risk_set[first]
  terms = eta - log_r
  if efron:
    # Tie group k is identified by its first index; D_k = sum of exp(eta)
    # over the events of the group, computed stably with a group max.
    neg_inf = jnp.array(-jnp.inf, dtype)
    eta_ev = jnp.where(d, eta, neg_inf)
    gmax = jax.ops.segment_max(eta_ev, first, num_segments=n)
    gmax = jnp.where(jnp.isfinite(gmax), gmax, 0.0)
    # exp of a safe argument: an unselected branch of `where` must not be inf,
    # or its zero cotangent times inf gives a NaN gradient.
    shifted = jnp.where(d, eta - jax.lax.stop_gradient(gmax)[first], 0.0)
    scaled = jnp.where(d, jnp.exp(shifted), 0.0)
    dsum = jax.ops.segment_sum(scaled, first, num_segments=n)
    m = jax.ops.segment_sum(d.astype(dtype), first, num_segments=n)[first]
    # Rank 0..m-1 of each event among its group's events.
    cum = jnp.cumsum(d.astype(jnp.int32))
    rank = (cum - 1 - (cum[first] - d[first].astype(jnp.int32))).astype(dtype)
    log_d = jnp.log(jnp.where(d, dsum[first], 1.0)) + jax.lax.stop_gradient(gmax)[first]
    frac = jnp.where(d, rank / jnp.maximum(m, 1.0), 0.0)
    # log(R - (r/m) D) = log R + log1p(-(r/m) D/R); D <= R and r/m < 1, so the
    # argument of log1p is > -1 whenever the term is used.
    ratio = jnp.exp(jnp.minimum(log_d - log_r, 0.0))
    terms = terms - jnp.log1p(-frac * ratio)
  total = -jnp.sum(jnp.where(d, terms, 0.0))
  return total, jnp.sum(d).astype(dtype)


@functools.partial(jax.jit, static_argnames=("efron",))
def _cox_nll(risk: Array, duration: Array, event: Array, mask: Array,
             efron: bool) -> tuple[Array, Array]:
  """``_cox_nll_1d`` of each outcome column, compiled as one program (an
  eager call runs one compiled program, not each operation; inside a caller's
  ``jit`` it is inlined)."""
  fn = functools.partial(_cox_nll_1d, efron=efron)
  if risk.ndim == 2:
    fn = jax.vmap(fn, in_axes=1)
  return fn(risk, duration, event, mask)


def cox_ph_loss(risk, duration, event, *, ties: str = "breslow",
                mask=None, reduction: str = "mean", check: bool = False) -> Array:
  """Negative log Cox partial likelihood with exact Breslow or Efron ties.

  Breslow (Breslow 1974, Biometrics 30:89-99; Cox 1972, J. R. Stat. Soc. B
  34:187-220), with distinct event times xi_k, the events H_k at xi_k (m_k of
  them) and the risk set R(t) = {j : T_j >= t}:

    -l = -sum_k [ sum_{i in H_k} eta_i - m_k log sum_{j in R(xi_k)} exp(eta_j) ]

  Efron (Efron 1977, JASA 72:557-565) replaces the m_k identical log terms by
  ``sum_{r=0}^{m_k-1} log(sum_{R(xi_k)} exp(eta) - r/m_k sum_{H_k} exp(eta))``.

  Cost O(n log n) per outcome (one sort, a reverse log-cumsum-exp and
  segment sums). Finite loss and gradient for risk scores up to +-1e4 in
  float32. A batch (or outcome) with no events gives 0 and a zero gradient.

  **Tie groups and duration precision.** The loss depends on the durations
  only through their order and ties, and two durations are tied iff they
  compare equal:

  * host durations (numpy arrays, lists, pandas; also when closed over as
    constants inside ``jit``) are first replaced by their exact dense ranks
    (``duration_ranks``, int32), so the tie groups are those of float64
    ranking (exact for integer days), the same as
    ``jaxsurv.metrics.concordance_index``; this is exact, not an
    approximation;
  * durations that are already ``jax.Array``s, or traced (passed as ``jit``
    / ``vmap`` arguments), are compared in their own dtype. In JAX's default
    float32 mode that means float32 resolution: durations that round to the
    same float32 fall into one tie group. The float32 spacing at t is
    2^(floor(log2 t) - 23), e.g. 2^-10 ~= 0.001 day for t in [8192, 16384)
    days, so 12345.0 and 12345.0004 days tie and the loss differs from the
    float64 one. To avoid it, compute ``r = duration_ranks(durations)`` once
    on the host (e.g. for the whole cohort; any subset keeps its order) and
    pass ``r`` in place of the durations, or enable x64 and pass float64
    durations. Integer durations (e.g. whole days, or the ranks) are compared
    exactly.

  **Checks.** Eager calls on concrete inputs are validated on the host and
  raise ``ValueError``; host durations are also checked on the host under
  ``jit`` when the mask is concrete (they are known at trace time). With
  ``check=True`` the unmasked entries are also checked on the device with
  ``jax.experimental.checkify``, which works under ``jit``: NaN, infinite or
  negative durations, events outside {0, 1} and NaN or infinite risks. The
  call must then be functionalised by ``checkify.checkify``, e.g.::

    f = jax.jit(checkify.checkify(
        lambda r, d, e: cox_ph_loss(r, d, e, check=True)))
    err, loss = f(risk, duration, event)
    err.throw()  # JaxRuntimeError naming the argument and the first row

  or simply ``err, loss = jax.jit(checked_cox_ph_loss)(risk, duration,
  event)``. Staging ``check=True`` under ``jit`` without ``checkify``
  raises ``ValueError`` ("Cannot abstractly evaluate a checkify.check which
  was not functionalized"). ``check=False`` (default) adds no work.

  Args:
    risk: ``[batch]`` or ``[batch, outcomes]`` log-hazard (higher = earlier
      event).
    duration: same shape as ``risk``; time to event or censoring (any unit,
      e.g. days), >= 0; or its ranks from ``duration_ranks``.
    event: same shape; 1 = event, 0 = censored.
    ties: ``"breslow"`` or ``"efron"``.
    mask: optional ``[batch]`` or same shape as ``risk``; 1 = real row, 0 =
      padding (removed from the loss and from every risk set). A per-outcome
      mask drops a patient from one outcome only (e.g. a missing endpoint).
    reduction: ``"mean"`` divides by the number of (unmasked) events;
      ``"sum"`` returns the negative log partial likelihood itself.
    check: add ``checkify`` checks of the inputs (see above).

  Returns:
    A scalar for 1-D inputs, else ``[outcomes]``: one loss per outcome.

  Raises:
    ValueError: for an unknown ``ties``/``reduction``, wrong ranks, or (eager
      calls, and host durations under ``jit``) NaN/negative durations, events
      outside {0, 1}, NaN risks or mismatched shapes, naming the argument and
      rows.
    jax.experimental.checkify.JaxRuntimeError: ``check=True`` only, from
      ``err.throw()`` (or at once in an eager call outside ``checkify``).

  Example:
    >>> cox_ph_loss(jnp.array([0.5, -0.3, 1.2]), jnp.array([1., 1., 2.]),
    ...             jnp.array([0, 1, 1]), reduction="sum")  # 2.0422
  """
  if ties not in ("breslow", "efron"):
    raise ValueError(f"ties must be 'breslow' or 'efron', got {ties!r}")
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  # Host durations are ranked before anything casts them (e.g. to float32).
  host_duration = None if isinstance(duration, jax.Array) else np.asarray(duration)
  risk, event = jnp.asarray(risk), jnp.asarray(event)
  if risk.ndim not in (1, 2):
    raise ValueError(f"risk must be [batch] or [batch, outcomes], got shape {risk.shape}")
  if host_duration is not None:
    if _is_concrete(risk, event, mask):
      _validate_host(risk, host_duration, event, mask, ("risk", "duration", "event"))
    elif risk.shape != host_duration.shape or risk.shape != event.shape:
      raise ValueError(f"mismatched shapes: risk {risk.shape}, duration {host_duration.shape}, "
                       f"event {event.shape}")
    elif not isinstance(mask, jax.core.Tracer):
      m = _host_mask(mask, host_duration.shape)
      checks.check_duration(host_duration if m is None else np.where(m, host_duration, 0),
                                "duration")
    bad_duration = _host_invalid_durations(host_duration) if check else None
    duration = jnp.asarray(_dense_ranks(host_duration))
  else:
    bad_duration = None
    if _is_concrete(risk, duration, event, mask):
      _validate_host(risk, duration, event, mask, ("risk", "duration", "event"))
    elif risk.shape != duration.shape or risk.shape != event.shape:
      raise ValueError(f"mismatched shapes: risk {risk.shape}, duration {duration.shape}, "
                       f"event {event.shape}")
  if mask is None:
    mask = jnp.ones(risk.shape, bool)
  else:
    mask = jnp.asarray(mask).astype(bool)
    if mask.ndim < risk.ndim:
      mask = jnp.broadcast_to(mask[:, None], risk.shape)
  if check:
    _device_checks(risk, duration, event, mask, bad_duration)
  risk, duration, event, mask = map(_gather_batch, (risk, duration, event, mask))
  total, n_events = _cox_nll(risk, duration, event, mask, efron=(ties == "efron"))
  if reduction == "sum":
    return total
  return total / jnp.maximum(n_events, 1.0)


def checked_cox_ph_loss(risk, duration, event, *, ties: str = "breslow", mask=None,
                        reduction: str = "mean") -> tuple[checkify.Error, Array]:
  """``cox_ph_loss(..., check=True)`` functionalised by ``checkify``: ``(err, loss)``.

  Works eagerly and under ``jit`` (``ties`` and ``reduction`` are static),
  e.g. ``err, loss = jax.jit(checked_cox_ph_loss, static_argnames=("ties",
  "reduction"))(risk, duration, event)`` then ``err.throw()``, which raises
  ``JaxRuntimeError`` naming the argument and the first bad row if any
  unmasked entry has a NaN, infinite or negative duration, an event outside
  {0, 1}, or a NaN or infinite risk (``err.get()`` returns the message or
  None). Checking costs a few elementwise reductions.

  Args / shapes: as :func:`cox_ph_loss`.

  Returns:
    ``(err, loss)``: a ``jax.experimental.checkify.Error`` and the loss
    (scalar, or ``[outcomes]``).

  Raises:
    ValueError: as :func:`cox_ph_loss` for bad arguments, and for invalid
      concrete inputs in an eager call (validated on the host first).
  """
  # Closed over, not passed: host durations must stay host arrays to be
  # ranked exactly (checkify would turn arguments into tracers).
  return checkify.checkify(lambda: cox_ph_loss(risk, duration, event, ties=ties, mask=mask,
                                               reduction=reduction, check=True))()


def discrete_time_nll(logits, bin_index, event, *, alpha: float = 0.0,
                      bin_weights=None, mask=None) -> Array:
  """Discrete-time (logistic hazard) negative log-likelihood, mean over patients.

  With hazard h_k = sigmoid(logit_k) in bin k and y_i the patient's bin
  (Zadeh & Schmid, "Bias in cross-entropy-based training of deep survival
  networks", IEEE TPAMI 2021; ``nll_loss`` of
  github.com/mahmoodlab/PORPOISE and mahmoodlab/MCAT ``utils/utils.py``,
  and of konst-int-i/healnet ``healnet/models/survival_loss.py``):

    uncensored_i = -e_i [log h_{i,y_i} + sum_{l<y_i} log(1 - h_il)]
    censored_i   = -(1 - e_i) sum_{l<=y_i} log(1 - h_il)
    loss_i       = (1 - alpha) w_i (uncensored_i + censored_i) + alpha uncensored_i

  computed from the logits with log h = -softplus(-logit) and
  log(1 - h) = -softplus(logit), so no clamp ever zeroes the gradient (the
  peers clamp S and h at 1e-7 after sigmoid/cumprod, which does).

  Args:
    logits: ``[batch, bins]`` hazard logits.
    bin_index: ``[batch]`` int, the time bin of each duration (see
      ``jaxsurv.survival.TimeBins``), in ``[0, bins)``.
    event: ``[batch]`` 1 = event in that bin, 0 = censored in that bin.
    alpha: weight on the uncensored term (PORPOISE/MCAT default 0.0; HEALNet
      0.4).
    bin_weights: optional ``[bins]`` per-bin weights; w_i = bin_weights[y_i] /
      sum(bin_weights), HEALNet's inverse-frequency weighting (applied to the
      ``(1 - alpha)`` term only, as HEALNet does). ``None`` means w_i = 1.
    mask: optional ``[batch]``, 1 = real row, 0 = padding.

  Returns:
    Scalar mean loss over unmasked patients (0 if there are none).

  Raises:
    ValueError: on wrong ranks or (eager calls) events outside {0, 1} or bin
      indices outside ``[0, bins)``, naming the rows.
  """
  logits = jnp.asarray(logits)
  bin_index = jnp.asarray(bin_index)
  event = jnp.asarray(event)
  if logits.ndim != 2:
    raise ValueError(f"logits must be [batch, bins], got shape {logits.shape}")
  n, k = logits.shape
  if bin_index.shape != (n,) or event.shape != (n,):
    raise ValueError(f"bin_index {bin_index.shape} and event {event.shape} must be [{n}]")
  if _is_concrete(logits, bin_index, event, mask):
    m = np.ones(n, bool) if mask is None else np.asarray(mask).astype(bool)
    checks.check_event(np.where(m, np.asarray(event), 0), "event")
    b = np.asarray(bin_index)
    bad = m & ((b < 0) | (b >= k))
    if bad.any():
      raise ValueError(f"bin_index: values outside [0, {k}) at rows {np.flatnonzero(bad)[:10].tolist()}")
  mask = jnp.ones((n,), bool) if mask is None else jnp.asarray(mask).astype(bool)
  logits = jnp.where(mask[:, None], logits, 0.0)
  log_h = -jax.nn.softplus(-logits)
  log_1mh = -jax.nn.softplus(logits)
  cum = jnp.cumsum(log_1mh, axis=1)  # log S_k = sum_{l<=k} log(1 - h_l)
  y = jnp.clip(bin_index.astype(jnp.int32), 0, k - 1)
  log_s_upto = jnp.take_along_axis(cum, y[:, None], axis=1)[:, 0]
  log_h_y = jnp.take_along_axis(log_h, y[:, None], axis=1)[:, 0]
  log_1mh_y = jnp.take_along_axis(log_1mh, y[:, None], axis=1)[:, 0]
  e = event.astype(logits.dtype)
  uncensored = -e * (log_h_y + log_s_upto - log_1mh_y)  # sum over l < y.
  censored = -(1.0 - e) * log_s_upto
  if bin_weights is None:
    w = 1.0
  else:
    bw = jnp.asarray(bin_weights, logits.dtype)
    w = bw[y] / jnp.sum(bw)
  per = (1.0 - alpha) * w * (uncensored + censored) + alpha * uncensored
  per = jnp.where(mask, per, 0.0)
  return jnp.sum(per) / jnp.maximum(jnp.sum(mask), 1).astype(logits.dtype)
