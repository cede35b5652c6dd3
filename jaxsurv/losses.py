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
no checks.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxsurv import validation

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


def _validate_host(risk, duration, event, mask, names):
  """Host-side checks for eager calls; masked (padding) rows are not checked."""
  m = None if mask is None else np.asarray(mask).astype(bool)
  d = np.asarray(duration, dtype=np.float64)
  e = np.asarray(event)
  r = np.asarray(risk, dtype=np.float64)
  shapes = {names[0]: r.shape, names[1]: d.shape, names[2]: e.shape}
  if len({tuple(s) for s in shapes.values()}) > 1:
    raise ValueError("mismatched shapes: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
  if m is not None:
    if m.shape != d.shape and m.shape != d.shape[:1]:
      raise ValueError(f"mask: shape {m.shape} matches neither {names[1]} {d.shape} "
                       f"nor its batch dimension {d.shape[:1]}")
    m = np.broadcast_to(m.reshape(m.shape + (1,) * (d.ndim - m.ndim)), d.shape)
    d, e, r = np.where(m, d, 0.0), np.where(m, e, 0), np.where(m, r, 0.0)
  validation.check_duration(d, names[1])
  validation.check_event(e, names[2])
  validation.as_float_array(r, names[0])


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
  # Padding sorts first with key -inf, so it never enters a real risk set.
  key = jnp.where(mask, duration.astype(dtype), -jnp.inf)
  # One sort on a single float key carries eta and the events along (no
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


def cox_ph_loss(risk, duration, event, *, ties: str = "breslow",
                mask=None, reduction: str = "mean") -> Array:
  """Negative log Cox partial likelihood with exact Breslow or Efron ties.

  Breslow (Breslow 1974; PERF.md §2.1), with distinct event times xi_k, the
  events H_k at xi_k (m_k of them) and the risk set R(t) = {j : T_j >= t}:

    -l = -sum_k [ sum_{i in H_k} eta_i - m_k log sum_{j in R(xi_k)} exp(eta_j) ]

  Efron (Efron 1977) replaces the m_k identical log terms by
  ``sum_{r=0}^{m_k-1} log(sum_{R(xi_k)} exp(eta) - r/m_k sum_{H_k} exp(eta))``.

  Cost O(n log n) per outcome (one sort, a reverse log-cumsum-exp and
  segment sums). Finite loss and gradient for risk scores up to +-1e4 in
  float32. A batch (or outcome) with no events gives 0 and a zero gradient.

  Args:
    risk: ``[batch]`` or ``[batch, outcomes]`` log-hazard (higher = earlier
      event).
    duration: same shape as ``risk``; time to event or censoring (e.g. days),
      >= 0.
    event: same shape; 1 = event, 0 = censored.
    ties: ``"breslow"`` or ``"efron"``.
    mask: optional ``[batch]`` or same shape as ``risk``; 1 = real row, 0 =
      padding (removed from the loss and from every risk set). A per-outcome
      mask drops a patient from one outcome only (e.g. a missing endpoint).
    reduction: ``"mean"`` divides by the number of (unmasked) events;
      ``"sum"`` returns the negative log partial likelihood itself.

  Returns:
    A scalar for 1-D inputs, else ``[outcomes]``: one loss per outcome.

  Raises:
    ValueError: for an unknown ``ties``/``reduction``, wrong ranks, or (eager
      calls only) NaN/negative durations, events outside {0, 1}, NaN risks or
      mismatched shapes, naming the argument and rows.

  Example:
    >>> cox_ph_loss(jnp.array([0.5, -0.3, 1.2]), jnp.array([1., 1., 2.]),
    ...             jnp.array([0, 1, 1]), reduction="sum")  # 2.0422
  """
  if ties not in ("breslow", "efron"):
    raise ValueError(f"ties must be 'breslow' or 'efron', got {ties!r}")
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
  risk, duration, event = jnp.asarray(risk), jnp.asarray(duration), jnp.asarray(event)
  if risk.ndim not in (1, 2):
    raise ValueError(f"risk must be [batch] or [batch, outcomes], got shape {risk.shape}")
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
  risk, duration, event, mask = map(_gather_batch, (risk, duration, event, mask))
  fn = functools.partial(_cox_nll_1d, efron=(ties == "efron"))
  if risk.ndim == 2:
    fn = jax.vmap(fn, in_axes=1)
  total, n_events = fn(risk, duration, event, mask)
  if reduction == "sum":
    return total
  return total / jnp.maximum(n_events, 1.0)


def discrete_time_nll(logits, bin_index, event, *, alpha: float = 0.0,
                      bin_weights=None, mask=None) -> Array:
  """Discrete-time (logistic hazard) negative log-likelihood, mean over patients.

  With hazard h_k = sigmoid(logit_k) in bin k and y_i the patient's bin
  (Zadeh & Schmid 2020; PORPOISE/MCAT/HEALNet ``nll_loss``; PERF.md §2.4):

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
    validation.check_event(np.where(m, np.asarray(event), 0), "event")
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
