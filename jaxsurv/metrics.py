"""Survival metrics: Harrell's and Uno's concordance, time-dependent AUC, Brier score, bootstrap.

Risk convention (as everywhere in jaxsurv): a higher risk score means a higher
hazard, i.e. an earlier expected event. Durations are in any time unit (e.g.
days); events are 1 (observed) or 0 (censored).

What lives here:

* ``concordance_index`` / ``concordance_counts``: Harrell's C and its counts,
  with exactly the semantics of ``sksurv.metrics.concordance_index_censored``
  (scikit-survival 0.28). The core is pure JAX, O(n log n), with no Python loop
  over patients: about 0.1 s at n = 10^5 and 1.5 s at 10^6 on 2 shared CPU
  cores, 20x faster than lifelines (benchmarks/RESULTS.md).
* ``harrell_c``: the same core as a jittable function for evaluation inside
  JAX code (returns a 0-d array; NaN when there is no comparable pair).
* ``concordance_index_ipcw`` (Uno's C): the same fast core with
  inverse-probability-of-censoring weights from scikit-survival's
  ``CensoringDistributionEstimator``.
* ``cumulative_dynamic_auc``, ``brier_score``, ``integrated_brier_score``:
  thin, validated wrappers around scikit-survival (a well-kept reference
  implementation; no reason to re-derive them).
* ``bootstrap_cindex``: all bootstrap replicates of Harrell's C at once, as
  multinomial case weights (no loop per resample); ``bootstrap``: a generic
  (looping) patient-level bootstrap for any metric.

How the fast concordance works. A pair (i, j) is comparable iff event_i and
(T_i < T_j or (T_i == T_j and not event_j)). Sort patients by (time ascending,
events first within a tied time); then the partners of event i are exactly the
suffix of that order starting at c_i, the first censored patient at T_i (or
the next time). Counting the partners whose risk is lower (concordant) or
within ``tied_tol`` (tied) is a 2-D dominance count: "how many entries of a
suffix have risk rank below q". We answer all n queries at once with a
wavelet matrix (Claude & Navarro, "The wavelet matrix", SPIRE 2012) built over
the risk ranks in time order: log2(n) levels, each one stable partition by one
bit (a cumulative sum and a scatter) plus two gathers per query. Total work is
O(n log n), every step vectorised over patients, so it suits GPUs too. The
bootstrap reuses the same structure with per-resample case weights.

On CPU the sorts dominate, and XLA:CPU sorts one integer array 5-10x faster
than floats or several arrays at once, so with x64 the orders come from
single int64 sorts of packed keys (high bits of the value, then the index),
with exact fix-ups where values share those high bits. Tie windows are found
by galloping from the runs of exactly equal risks, using sksurv's own float
test |risk_j - risk_i| <= tied_tol.

scikit-survival is imported lazily (only by the functions that wrap it), so
the JAX core works where scikit-survival is not installed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxsurv import validation

Array = jax.Array

__all__ = [
    "NoComparablePairsError",
    "ConcordanceCounts",
    "BootstrapResult",
    "concordance_index",
    "concordance_counts",
    "harrell_c",
    "concordance_index_ipcw",
    "cumulative_dynamic_auc",
    "brier_score",
    "integrated_brier_score",
    "bootstrap_weights",
    "weighted_concordance_index",
    "bootstrap_cindex",
    "bootstrap",
]


class NoComparablePairsError(ValueError):
  """Raised when the data hold no comparable pair, so C is undefined.

  Mirrors ``sksurv.exceptions.NoComparablePairException`` (also a ValueError).
  """


class ConcordanceCounts(NamedTuple):
  """Harrell's (or Uno's) C with its pair counts, ordered like scikit-survival's tuple.

  Attributes:
    cindex: the concordance index, in [0, 1].
    concordant: comparable pairs where the earlier event has the higher risk.
    discordant: comparable pairs where it has the lower risk.
    tied_risk: comparable pairs whose risks differ by at most ``tied_tol``
      (each counts 1/2 in ``cindex``).
    tied_time: comparable pairs with equal times (an event and a censored
      patient at the same time).
  """
  cindex: float
  concordant: int
  discordant: int
  tied_risk: int
  tied_time: int


# -----------------------------------------------------------------------------
# JAX core.
# -----------------------------------------------------------------------------


def _nbits(n: int) -> int:
  """Bits needed for the integers 0..n (thresholds can equal n)."""
  return max(1, int(n).bit_length())


def _cumsum(x: Array) -> Array:
  """Inclusive cumulative sum along the last axis.

  For long arrays ``lax.associative_scan`` is 3-8x faster than ``lax.cumsum``
  on XLA:CPU (10^6 int32: ~5 ms vs 30-60 ms) and the wavelet matrix takes one
  cumulative sum per level; for short ones the plain op compiles faster.
  """
  if x.shape[-1] >= 2**16:
    return lax.associative_scan(jnp.add, x, axis=x.ndim - 1)
  return lax.cumsum(x, axis=x.ndim - 1)


def _exclusive_cumsum(x: Array) -> Array:
  """``[..., n]`` -> ``[..., n + 1]`` with a leading 0: sums of x[:k] for k = 0..n."""
  zero = jnp.zeros(x.shape[:-1] + (1,), x.dtype)
  return jnp.concatenate([zero, _cumsum(x)], axis=-1)


def _sortable_int(x: Array) -> Array:
  """Order-preserving map of a float (or int) array to signed integers of the same width.

  XLA:CPU sorts a single integer array 5-10x faster than floats or several
  operands (measured at 10^6: ~0.05-0.18 s vs 0.35-0.65 s), so sorts go
  through integer keys. For IEEE floats the bit pattern read as a signed
  integer is monotone for x >= 0; flipping the magnitude bits of negative
  numbers makes it monotone everywhere. -0.0 is first turned into +0.0 so that
  the two compare equal, as floats do. Inputs must not be NaN.
  """
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.int64 if _x64() else jnp.int32)
  itype = {2: jnp.int16, 4: jnp.int32, 8: jnp.int64}[x.dtype.itemsize]
  b = lax.bitcast_convert_type(x + jnp.zeros((), x.dtype), itype)
  return jnp.where(b < 0, b ^ jnp.iinfo(itype).max, b)


def _from_sortable_int(k: Array, dtype) -> Array:
  """Inverse of ``_sortable_int`` for floats (the magnitude flip is an involution)."""
  b = jnp.where(k < 0, k ^ jnp.iinfo(k.dtype).max, k)
  return lax.bitcast_convert_type(b, dtype)


def _count_where(pred: Callable[[Array], Array], n: int, num_queries: int) -> Array:
  """Vectorised binary search: for each query k, the number of m with pred(m)[k].

  ``pred(m)`` takes int32 indices ``[num_queries]`` into a length-n array and
  returns a bool ``[num_queries]`` that, for each query, is monotone in m
  (True for a prefix, then False).
  """
  def body(_, state):
    lo, hi = state
    mid = (lo + hi) // 2
    active = lo < hi
    p = pred(jnp.minimum(mid, n - 1)) & active
    return jnp.where(p, mid + 1, lo), jnp.where(active & ~p, mid, hi)

  lo = jnp.zeros((num_queries,), jnp.int32)
  hi = jnp.full((num_queries,), n, jnp.int32)
  lo, _ = lax.fori_loop(0, _nbits(n), body, (lo, hi))
  return lo


def _gallop_count(pred: Callable[[Array], Array], hint: Array, upward: bool, n: int) -> Array:
  """Binary search started from a close guess (exponential/galloping search).

  For each query k, returns c[k] = #{m : pred(m)[k]} for a predicate that is
  True on a prefix of 0..n-1, given ``hint`` with c >= hint (``upward``) or
  c <= hint (not ``upward``). Probes at distance 1, 2, 4, ... from the hint
  bracket c, then a bisection inside the bracket finishes. The loops stop when
  every query is done, so the cost is O(log distance), not O(log n): tie
  windows are usually within a few entries of the exact-tie runs.
  """
  one = jnp.ones_like(hint)

  def probe_at(j):
    return hint + (one << j) - 1 if upward else hint - (one << j)

  def keep_going(j):
    p = probe_at(j)
    inside = (p < n) if upward else (p >= 0)
    hit = pred(jnp.clip(p, 0, n - 1))
    return inside & (hit if upward else ~hit)

  def exp_body(state):
    j, active = state
    active = active & keep_going(j)
    return jnp.where(active, j + 1, j), active

  j, _ = lax.while_loop(lambda s: jnp.any(s[1]), exp_body,
                        (jnp.zeros_like(hint), jnp.ones(hint.shape, bool)))
  # Bracket from the last two probes (see the docstring's invariant).
  half = jnp.where(j > 0, one << jnp.maximum(j - 1, 0), 0)
  if upward:
    lo = hint + half
    hi = jnp.minimum(n, hint + (one << j) - 1)
  else:
    lo = jnp.maximum(0, hint - (one << j) + 1)
    hi = hint - half

  def bisect(state):
    lo, hi = state
    active = lo < hi
    mid = (lo + hi) // 2
    p = pred(jnp.clip(mid, 0, n - 1)) & active
    return jnp.where(p, mid + 1, lo), jnp.where(active & ~p, mid, hi)

  lo, _ = lax.while_loop(lambda s: jnp.any(s[0] < s[1]), bisect, (lo, hi))
  return lo


def _group_bounds(same_as_prev: Array):
  """``(start, end)`` of runs in a sorted array, per position, given ``a[k] == a[k-1]`` for k >= 1."""
  n = same_as_prev.shape[0] + 1
  iota = lax.iota(jnp.int32, n)
  new = jnp.concatenate([jnp.ones((1,), bool), ~same_as_prev])
  last = jnp.concatenate([~same_as_prev, jnp.ones((1,), bool)])
  start = lax.cummax(jnp.where(new, iota, 0))
  end = lax.cummin(jnp.where(last, iota + 1, n), reverse=True)
  return start, end


def _time_order(duration: Array, censored: Array):
  """Stable order by (time ascending, events first): ``(perm, time_key, censored)`` sorted.

  ``time_key`` is equal exactly for equal times. The fast path (x64 only)
  packs the time key's high bits, the censored flag and the original index
  into one int64 and sorts that single array. It is exact unless two distinct
  times agree in those high bits (relative gap below ~1e-9, never for day or
  month counts); then the result is detected as unsorted and the exact path
  runs instead: dense ranks (a sort plus a binary search) packed the same way.
  Without x64 (no int64) a 3-operand sort is used, slower on CPU but exact.
  """
  n = duration.shape[0]
  iota = lax.iota(jnp.int32, n)
  key = _sortable_int(duration)
  if key.dtype != jnp.int64 or n >= 2**30:
    ks, cens, perm = lax.sort((key, censored.astype(jnp.int32), iota), num_keys=2)
    return perm, ks, cens.astype(bool)
  ib = _nbits(n - 1)
  low = (1 << ib) - 1
  cens64 = censored.astype(jnp.int64)

  def unpack(packed):
    perm = (packed & low).astype(jnp.int32)
    return perm, ((packed >> ib) & 1).astype(bool)

  # Fast path: arithmetic shifts keep the order of the (signed) keys.
  perm, cens = unpack(lax.sort((((key >> (ib + 1)) << 1 | cens64) << ib) | iota))
  ks = key[perm]

  def exact(_):
    skey = lax.sort(key)
    rank = _count_where(lambda m: skey[m] < key, n, n).astype(jnp.int64)
    perm, cens = unpack(lax.sort((((rank << 1) | cens64) << ib) | iota))
    return perm, key[perm], cens

  ok = jnp.all(ks[1:] >= ks[:-1])
  return lax.cond(ok, lambda _: (perm, ks, cens), exact, None)


def _risk_values(risk: Array, perm_t: Array):
  """Sorted risks and, per time position, the number of strictly smaller risks.

  Returns ``(rs [n] sorted risks, value_t [n] int32)``. With x64 this avoids a
  binary search per patient (random memory access, the slowest step at 10^6):
  one sort of the exact keys, plus one sort of (key high bits, index) packed
  in an int64, which orders patients exactly except inside groups sharing the
  high bits; a patient's value is its group's start in the exact order, plus
  (only in groups holding several distinct risks, which are rare) a short
  bisection inside the group.
  """
  n = risk.shape[0]
  rkey = _sortable_int(risk)
  skey = lax.sort(rkey)
  rs = _from_sortable_int(skey, risk.dtype)
  if rkey.dtype != jnp.int64 or n >= 2**30:
    akey = rkey[perm_t]
    return rs, _count_where(lambda m: skey[m] < akey, n, n)
  iota = lax.iota(jnp.int32, n)
  ib = _nbits(n - 1)
  packed = lax.sort(((rkey >> ib) << ib) | iota)
  perm_a = (packed & ((1 << ib) - 1)).astype(jnp.int32)
  high = packed >> ib
  start, end = _group_bounds(high[1:] == high[:-1])
  # The high bits order groups exactly, so group k occupies positions
  # [start, end) of the exact sort too, and skey[start] is its smallest key.
  akey = rkey[perm_a]
  lo = jnp.where(skey[start] == akey, start, start + 1)
  hi = jnp.where(skey[start] == akey, start, end)

  def bisect(state):
    lo, hi = state
    active = lo < hi
    mid = (lo + hi) // 2
    p = (skey[jnp.clip(mid, 0, n - 1)] < akey) & active
    return jnp.where(p, mid + 1, lo), jnp.where(active & ~p, mid, hi)

  value, _ = lax.while_loop(lambda s: jnp.any(s[0] < s[1]), bisect, (lo, hi))
  value = jnp.zeros((n,), jnp.int32).at[perm_a].set(value, unique_indices=True)
  return rs, value[perm_t]


class _Structure(NamedTuple):
  """Everything the counting needs, derived from (duration, event, risk).

  "Time order" sorts patients by (time ascending, events first); every array
  here is indexed by time position.
  """
  perm_t: Array     # [n] int32, original index at each time position
  event_t: Array    # [n] bool, event indicator (False for masked rows)
  start_t: Array    # [n] int32, first comparable partner position (c)
  gend_t: Array     # [n] int32, one past the last position with the same time
  value_t: Array    # [n] int32, #risks strictly below this patient's risk
  lohi_t: Array     # [2, n] int32, #risks below the tie window (concordant
                    # partners lie there), #risks up to the window's top


def _structure(duration: Array, event: Array, risk: Array,
               risk_lo: Optional[Array], mask: Optional[Array],
               tied_tol) -> _Structure:
  """Sorts and tie windows shared by the unweighted and weighted counts.

  Args:
    duration: ``[n]`` float or int time keys (only their order matters).
    event: ``[n]`` bool/int, 1 = event.
    risk: ``[n]`` float risk scores (the high part if ``risk_lo`` is given).
    risk_lo: optional ``[n]`` low parts of a double-float split of float64
      risks, so float32 runs keep float64 ordering and tie decisions.
    mask: optional ``[n]`` bool, False for padding rows. A padding row is made
      censored and moved before every real time, so it is never anyone's
      partner and never asks a query.
    tied_tol: risks within this absolute distance count as tied.
  """
  n = duration.shape[0]
  ev = event.astype(bool)
  if mask is not None:
    mask = mask.astype(bool)
    ev = ev & mask
    low = -jnp.inf if jnp.issubdtype(duration.dtype, jnp.floating) else jnp.iinfo(duration.dtype).min
    duration = jnp.where(mask, duration, low)
    risk = jnp.where(mask, risk, jnp.zeros((), risk.dtype))
    if risk_lo is not None:
      risk_lo = jnp.where(mask, risk_lo, jnp.zeros((), risk_lo.dtype))

  # Time order: ascending time, events before censored at a tied time, so that
  # the comparable partners of an event form a suffix of this order.
  perm_t, tkey, cens_t = _time_order(duration, ~ev)
  event_t = ~cens_t
  gstart, gend = _group_bounds(tkey[1:] == tkey[:-1])
  ev_before = _exclusive_cumsum(event_t.astype(jnp.int32))
  # Events come first in a time group, so the first partner of an event is the
  # group start plus the number of events in the group.
  start_t = gstart + (ev_before[gend] - ev_before[gstart])

  # Sorted risks (no permutation needed: the wavelet matrix accepts tied
  # values, and a patient's "rank" is the number of strictly smaller risks).
  if risk_lo is None:
    rs, value_t = _risk_values(risk, perm_t)
    same = rs[1:] == rs[:-1]
    diff = lambda m: rs[m] - rs
  else:
    rs, rs_lo = lax.sort((risk, risk_lo), num_keys=2)
    a, a_lo = risk[perm_t], risk_lo[perm_t]
    value_t = _count_where(lambda m: (rs[m] < a) | ((rs[m] == a) & (rs_lo[m] < a_lo)), n, n)
    same = (rs[1:] == rs[:-1]) & (rs_lo[1:] == rs_lo[:-1])
    diff = lambda m: (rs[m] - rs) + (rs_lo[m] - rs_lo)
  # Runs of exactly equal risks in sorted order.
  run_start, run_end = _group_bounds(same)
  tol = jnp.asarray(tied_tol, rs.dtype)
  # For the risk a = rs[k], d_m = fl(rs[m] - a) is monotone in m. sksurv calls
  # (i, j) tied iff |d| <= tol and concordant iff est_j < est_i and not tied,
  # i.e. iff d < -tol. Both sets are prefixes of the sorted risks, so their
  # sizes are searches with sksurv's own float test (a search for a - tol
  # could round differently from sksurv at the boundary). The window extends
  # the run of exact ties, so galloping from the run ends is cheap.
  lo = _gallop_count(lambda m: diff(m) < -tol, run_start, False, n)
  hi = _gallop_count(lambda m: diff(m) <= tol, run_end, True, n)
  # Every patient's value is the start of its run, where lo/hi are its own.
  lohi_t = jnp.stack([lo[value_t], hi[value_t]])
  return _Structure(perm_t, event_t, start_t, gend, value_t, lohi_t)


def _prefix_count_less(seq: Array, end: Array, thresholds: Array,
                       weights: Optional[Array] = None):
  """Wavelet-matrix dominance counts over prefixes of ``seq``.

  Args:
    seq: ``[n]`` int32 values in 0..n-1 (risk ranks in time order; may repeat).
    end: ``[n]`` int32 prefix lengths, one per query.
    thresholds: ``[t, n]`` int32 in 0..n.
    weights: optional ``[n]`` float weights attached to the entries of ``seq``.

  Returns:
    ``counts [t, n]`` int32 with counts[t, k] = #{m < end[k] : seq[m] <
    thresholds[t, k]}, and (if ``weights``) the same sums of weights ``[t, n]``.
  """
  n = seq.shape[0]
  # Values are < n, so n - 1 sets the bit count; a threshold of 2^nbits (only
  # q = n when n is a power of two) counts the whole prefix and is done apart.
  nbits = _nbits(n - 1)
  full = thresholds >= (1 << nbits)
  thresholds = jnp.where(full, 0, thresholds)
  iota = lax.iota(jnp.int32, n)
  lo = jnp.zeros_like(thresholds)
  hi = jnp.broadcast_to(end, thresholds.shape)
  counts = jnp.zeros_like(thresholds)
  wsum = None if weights is None else jnp.zeros(thresholds.shape, weights.dtype)

  def level(s, state):
    seq, lo, hi, counts, wseq, wsum = state
    shift = nbits - 1 - s
    bit = (seq >> shift) & 1
    zeros_before = _exclusive_cumsum(1 - bit)            # [n + 1]
    num_zeros = zeros_before[n]
    qbit = ((thresholds >> shift) & 1) == 1
    lo0, hi0 = zeros_before[lo], zeros_before[hi]
    # Entries whose bit is 0 while the threshold's bit is 1 are smaller than
    # the threshold (the higher bits agree on the current path): count them.
    counts = counts + jnp.where(qbit, hi0 - lo0, 0)
    if wseq is not None:
      wz = _exclusive_cumsum(jnp.where(bit == 0, wseq, 0))
      wsum = wsum + jnp.where(qbit, wz[..., hi] - wz[..., lo], 0)
    # Follow the threshold's bit to the next level's sub-range.
    lo = jnp.where(qbit, num_zeros + lo - lo0, lo0)
    hi = jnp.where(qbit, num_zeros + hi - hi0, hi0)
    # Stable partition: zero bits first, then ones (the wavelet-matrix layout).
    dest = jnp.where(bit == 0, zeros_before[:n], num_zeros + iota - zeros_before[:n])
    seq = jnp.zeros_like(seq).at[dest].set(seq, unique_indices=True)
    if wseq is not None:
      wseq = jnp.zeros_like(wseq).at[..., dest].set(wseq, unique_indices=True)
    return seq, lo, hi, counts, wseq, wsum

  state = (seq, lo, hi, counts, weights, wsum)
  *_, counts, _, wsum = lax.fori_loop(0, nbits, level, state)
  counts = jnp.where(full, end, counts)
  if weights is not None:
    wsum = jnp.where(full, _exclusive_cumsum(weights)[end], wsum)
  return counts, wsum


def _patient_counts(duration, event, risk, risk_lo, mask, tied_tol) -> Array:
  """Per-patient pair counts, ``[4, n]`` int32 in the input order.

  Rows: concordant, tied_risk, comparable, tied_time, counted over the
  comparable pairs in which the patient is the earlier event (all zero for a
  censored or masked patient). Each entry is at most n - 1.
  """
  st = _structure(duration, event, risk, risk_lo, mask, tied_tol)
  n = duration.shape[0]
  below, _ = _prefix_count_less(st.value_t, st.start_t, st.lohi_t)
  # A threshold q in lohi counts the q smallest risks, and value_j < q exactly
  # for those patients; so over all n patients q values lie below it, and the
  # count over the partner suffix [start, n) is q minus the prefix count.
  in_suffix = st.lohi_t - below
  conc = in_suffix[0]
  tied = in_suffix[1] - in_suffix[0]
  comparable = n - st.start_t
  tied_time = st.gend_t - st.start_t
  counts_t = jnp.where(st.event_t, jnp.stack([conc, tied, comparable, tied_time]), 0)
  return jnp.zeros_like(counts_t).at[:, st.perm_t].set(counts_t, unique_indices=True)


def _dense_patient_counts(duration, event, risk, risk_lo, mask, tied_tol) -> Array:
  """The same ``[4, n]`` int32 per-patient counts by brute force over all n^2 pairs.

  No sort and no loop, so it compiles in a fraction of the tree core's time
  and is as fast for small n (the default up to 256 patients). Memory
  stays O(n) per row block because XLA fuses the pair tests into the sums.
  """
  ev = event.astype(bool)
  if mask is not None:
    ev = ev & mask.astype(bool)
    valid_j = mask.astype(bool)[None, :]
  else:
    valid_j = True
  ti, tj = duration[:, None], duration[None, :]
  comp = ev[:, None] & ((ti < tj) | ((ti == tj) & ~ev[None, :])) & valid_j
  d = risk[None, :] - risk[:, None]            # fl(risk_j - risk_i), as sksurv
  if risk_lo is not None:
    d = d + (risk_lo[None, :] - risk_lo[:, None])
  tol = jnp.asarray(tied_tol, d.dtype)
  tied = jnp.abs(d) <= tol
  conc = d < -tol
  count = lambda x: jnp.sum(x, axis=1, dtype=jnp.int32)
  return jnp.stack([count(comp & conc), count(comp & tied), count(comp),
                    count(comp & (ti == tj))])


_jit_dense_patient_counts = jax.jit(_dense_patient_counts)


def _chunk(n: int) -> int:
  """Largest power-of-two chunk whose int32 sum of per-patient counts (< n each) cannot overflow."""
  c = 1
  while 2 * c * max(n, 1) < 2**31 - 1 and 2 * c <= n:
    c *= 2
  return c


@jax.jit
def _chunked_totals(duration, event, risk, risk_lo, mask, tied_tol) -> Array:
  """``[4, n_chunks]`` int32 partial sums of the per-patient counts.

  Summing them on the host in int64 is exact at any n (10^6 patients give
  about 5e11 pairs, beyond int32 and float32) without needing x64 in JAX.
  """
  counts = _patient_counts(duration, event, risk, risk_lo, mask, tied_tol)
  n = counts.shape[1]
  c = _chunk(n)
  pad = (-n) % c
  counts = jnp.pad(counts, ((0, 0), (0, pad)))
  return counts.reshape(4, -1, c).sum(axis=2, dtype=jnp.int32)


_jit_patient_counts = jax.jit(_patient_counts)


def harrell_c(duration: Array, event: Array, risk: Array, *,
              mask: Optional[Array] = None, tied_tol: float = 1e-8) -> Array:
  """Harrell's concordance index as a pure, jittable JAX function.

  Same pair semantics as ``concordance_index`` (and scikit-survival), O(n log n)
  with no Python loop. For use inside jitted evaluation code: it does no input
  validation and returns NaN (not an error) when there is no comparable pair.
  The pair counts are exact int32 partial sums; the final ratio is computed in
  the default float dtype (float32 unless x64 is enabled, i.e. ~1e-7 relative).

  Args:
    duration: ``[n]`` times to event or censoring (float or int, e.g. days).
    event: ``[n]`` event indicator (1 = event, 0 = censored).
    risk: ``[n]`` risk scores, higher = earlier event.
    mask: optional ``[n]`` bool, False marks padding rows to ignore.
    tied_tol: risks within this absolute distance count as tied (1/2).

  Returns:
    0-d float array, the C-index (NaN if no pair is comparable).

  Source: Harrell et al., Stat. Med. 15(4):361-387 (1996); tie rules of
  ``sksurv.metrics.concordance_index_censored``.
  """
  totals = _chunked_totals(duration, event, risk, None, mask, tied_tol)
  f = jnp.result_type(float)
  t = totals.astype(f).sum(axis=1)
  return (t[0] + 0.5 * t[1]) / t[2]


# -----------------------------------------------------------------------------
# Host wrappers for Harrell's C.
# -----------------------------------------------------------------------------


def _x64() -> bool:
  return bool(jax.config.jax_enable_x64)


def _bucket(n: int) -> int:
  """Padded length, so that calls with different n share compiled code.

  Powers of two up to 4096 (work there is trivial next to a recompile, which
  takes ~1-3 s), then 8 sizes per power of two (<= 12.5% padding).
  """
  if n <= 4096:
    return max(64, 1 << (n - 1).bit_length())
  step = 1 << (n.bit_length() - 4)
  return -(-n // step) * step


def _check_1d(arrays: Sequence[np.ndarray], names: Sequence[str]) -> None:
  for a, name in zip(arrays, names):
    if a.ndim != 1:
      raise ValueError(f"{name}: expected a 1-D array [n_patients], got shape {a.shape}")


def _check_tol(tied_tol) -> float:
  tol = float(tied_tol)
  if not (math.isfinite(tol) and tol >= 0):
    raise ValueError(f"tied_tol: must be a finite number >= 0, got {tied_tol!r}")
  return tol


def _validated(duration, event, risk, names=("duration", "event", "risk")):
  """Host validation shared by the concordance wrappers; returns numpy arrays."""
  d, e, r = validation.check_survival(duration, event, risk, names=names)
  _check_1d((d, e, r), names)
  if d.shape[0] < 2:
    raise ValueError(f"{names[0]}: need at least two patients, got {d.shape[0]}")
  if not e.any():
    raise ValueError(f"{names[1]}: all {e.shape[0]} patients are censored; "
                     "the concordance index needs at least one event")
  return d, e, r


def _device_inputs(d: np.ndarray, e: np.ndarray, r: np.ndarray):
  """Pads to a bucket size and picks dtypes that keep the counts exact.

  With x64 enabled everything stays float64. Without x64 the times become
  int32 dense ranks (exact order and equality), and each float64 risk is split
  into float32 high and low parts whose lexicographic order equals the float64
  order, so rounding to float32 cannot merge or reorder distinct risks.
  """
  n = d.shape[0]
  m = _bucket(n)
  mask = np.zeros(m, bool)
  mask[:n] = True
  pad = lambda a, dtype: np.concatenate([a.astype(dtype), np.zeros(m - n, dtype)])
  if _x64():
    # +0.0 turns -0.0 into 0.0 so equal times compare equal in the sort.
    return pad(d + 0.0, np.float64), pad(e, bool), pad(r, np.float64), None, mask
  _, t_rank = np.unique(d, return_inverse=True)
  big = np.abs(r) > np.finfo(np.float32).max
  if big.any():
    raise ValueError(f"risk: values beyond the float32 range at {validation._rows(big)}; "
                     "enable x64 (jax.config.update('jax_enable_x64', True)) for such scores")
  r_hi = r.astype(np.float32)
  r_lo = (r - r_hi.astype(np.float64)).astype(np.float32)
  lo = pad(r_lo, np.float32) if r_lo.any() else None
  return pad(t_rank.reshape(-1), np.int32), pad(e, bool), pad(r_hi, np.float32), lo, mask


_DENSE_COUNTS_MAX = 256


def _per_patient(d, e, r, tol, method: str = "auto") -> np.ndarray:
  """``[4, n]`` int64 per-patient counts (see ``_patient_counts``) for validated arrays."""
  args = _device_inputs(d, e, r)
  if method == "auto":
    method = "dense" if args[0].shape[0] <= _DENSE_COUNTS_MAX else "tree"
  if method == "tree":
    out = _jit_patient_counts(*args, tol)
  elif method == "dense":
    out = _jit_dense_patient_counts(*args, tol)
  else:
    raise ValueError(f"method: expected 'auto', 'tree' or 'dense', got {method!r}")
  return np.asarray(out).astype(np.int64)[:, : d.shape[0]]


def _no_pairs(what: str = "Harrell's C") -> NoComparablePairsError:
  return NoComparablePairsError(
      f"{what}: the data hold no comparable pair (every event is at the latest "
      "time, or tied in time with the other events only), so the concordance "
      "index is undefined")


def concordance_counts(duration, event, risk, *, tied_tol: float = 1e-8,
                       method: str = "auto") -> ConcordanceCounts:
  """Harrell's C and its pair counts, exactly as scikit-survival computes them.

  Equals ``sksurv.metrics.concordance_index_censored(event, duration, risk,
  tied_tol)`` (note jaxsurv's argument order: duration first). A pair (i, j)
  is comparable iff event_i and (T_i < T_j, or T_i == T_j and j is censored);
  it is concordant iff risk_i > risk_j, and risks with |risk_i - risk_j| <=
  tied_tol count 1/2. Copies of one patient (e.g. in a bootstrap resample) are
  never comparable to each other.

  The counting runs in JAX: in O(n log n) with a wavelet matrix (see the
  module docstring), or for small n by brute force over the n^2 pairs, which
  compiles faster. Counts are exact integers in any precision mode: per-patient
  counts are int32 in JAX (each < n) and are summed in int64 on the host. With x64 enabled all
  arithmetic is float64 like sksurv; without it, times are ranked on the host
  and risks split into two float32 parts, which keeps the float64 order (tie
  decisions then use float32 arithmetic on the parts, which can differ from
  float64 only for risk gaps within ~1e-7 relative of ``tied_tol``).

  Args:
    duration: ``[n]`` times to event or censoring (e.g. days), finite, >= 0.
    event: ``[n]`` event indicator, 1/True = event, 0/False = censored.
    risk: ``[n]`` risk scores, higher = higher hazard = earlier event.
    tied_tol: absolute tolerance for tied risks (sksurv's default 1e-8).
    method: "tree" (O(n log n)), "dense" (O(n^2) pairs) or "auto" (dense up
      to 256 patients after padding, else tree). Results are identical.

  Returns:
    ``ConcordanceCounts(cindex, concordant, discordant, tied_risk, tied_time)``.

  Raises:
    ValueError: NaN/inf/negative durations, events outside {0, 1}, NaN risks,
      mismatched shapes or non-1-D input (naming the argument and rows), fewer
      than two patients, no event at all, or a negative ``tied_tol``.
    NoComparablePairsError: (a ValueError) if no pair is comparable.

  Source: Harrell et al., Stat. Med. 15(4):361-387 (1996);
  ``sksurv.metrics.concordance_index_censored`` (scikit-survival 0.28).
  """
  tol = _check_tol(tied_tol)
  d, e, r = _validated(duration, event, risk)
  totals = _per_patient(d, e, r, tol, method).sum(axis=1)
  conc, tied, comparable, tied_time = (int(x) for x in totals)
  if comparable == 0:
    raise _no_pairs()
  # (conc + tied / 2) is a multiple of 1/2 below 2^53: exact in float64, so the
  # ratio is bit-identical to sksurv's running float sum.
  cindex = (conc + 0.5 * tied) / comparable
  return ConcordanceCounts(float(cindex), conc, comparable - conc - tied, tied, tied_time)


def concordance_index(duration, event, risk, *, tied_tol: float = 1e-8,
                      method: str = "auto") -> float:
  """Harrell's concordance index as a Python float.

  See ``concordance_counts`` for the exact semantics, shapes and errors; this
  returns only its ``cindex``. lifelines' ``concordance_index(duration, -risk,
  event)`` gives the same number when no two risks are within ``tied_tol``
  without being equal (lifelines treats only exact equality as a tie and reads
  scores as survival-like, hence the minus sign).
  """
  return concordance_counts(duration, event, risk, tied_tol=tied_tol, method=method).cindex


# -----------------------------------------------------------------------------
# Metrics with inverse-probability-of-censoring weights (scikit-survival).
# -----------------------------------------------------------------------------


def _surv(event: np.ndarray, duration: np.ndarray):
  from sksurv.util import Surv  # Lazy: scikit-survival is optional for the JAX core.
  return Surv.from_arrays(event=event.astype(bool), time=duration)


def _censoring_km(train_duration, train_event):
  """Validated training arrays and sksurv's Kaplan-Meier censoring estimator fitted on them."""
  from sksurv.nonparametric import CensoringDistributionEstimator
  td, te = validation.check_survival(train_duration, train_event,
                                     names=("train_duration", "train_event"))
  _check_1d((td, te), ("train_duration", "train_event"))
  if not te.any():
    raise ValueError("train_event: all training patients are censored; the censoring "
                     "distribution (and scikit-survival) needs at least one event")
  cens = CensoringDistributionEstimator().fit(_surv(te, td))
  return td, te, cens


def _rows_of(idx: np.ndarray, n: int) -> str:
  """``rows [..] (k rows)`` for integer row numbers ``idx`` out of n."""
  m = np.zeros(n, bool)
  m[idx] = True
  return validation._rows(m)


def _censoring_survival(cens, times: np.ndarray, rows: np.ndarray, n: int, what: str,
                        hint: str, allow_zero: bool = False) -> np.ndarray:
  """G(t) from the fitted censoring KM, with clear errors where scikit-survival fails.

  Args:
    cens: fitted ``CensoringDistributionEstimator``.
    times: ``[k]`` query times.
    rows: ``[k]`` row numbers of the queries in the argument ``what`` (length n).
    n: length of ``what`` (for messages).
    what: the argument the rows belong to (for messages).
    hint: how to fix it (for messages).
    allow_zero: accept G(t) = 0 (the Brier score gives such rows weight 0).
  """
  last = cens.unique_time_[-1]
  if cens.prob_[-1] > 0:
    beyond = times > last
    if beyond.any():
      raise ValueError(
          f"{what}: times after the last training duration {last:g} at "
          f"{_rows_of(rows[beyond], n)}; the censoring distribution is unknown there, "
          f"so the allowed times are <= {last:g}. {hint}")
  g = cens.predict_proba(times)
  zero = g == 0
  if zero.any() and not allow_zero:
    raise ValueError(
        f"{what}: the censoring survival function G(t), estimated on the training set, "
        f"is 0 at the times of {_rows_of(rows[zero], n)}, so their inverse-probability "
        f"weights are infinite. {hint}")
  return g


def concordance_index_ipcw(train_duration, train_event, duration, event, risk, *,
                           tau: Optional[float] = None,
                           tied_tol: float = 1e-8) -> ConcordanceCounts:
  """Uno's inverse-probability-of-censoring weighted concordance index.

  C_tau = sum_{i,j} w_i comparable_ij (concordant_ij + tied_ij / 2) /
  sum_{i,j} w_i comparable_ij, with w_i = 1 / G(T_i)^2 for events with T_i <
  tau (0 otherwise), where G is the Kaplan-Meier estimate of the censoring
  survival function on the *training* set. Pair rules as in Harrell's C.
  Agrees with ``sksurv.metrics.concordance_index_ipcw`` (to ~1e-15; tested to
  1e-6); the pair counting is jaxsurv's O(n log n) core instead of sksurv's
  O(n_events * n) loop, and G comes from sksurv's
  ``CensoringDistributionEstimator``. The returned counts are the unweighted
  Harrell counts over all events, as in sksurv.

  Args:
    train_duration: ``[n_train]`` training times (e.g. days), used only for G.
    train_event: ``[n_train]`` training event indicator.
    duration: ``[n]`` test times.
    event: ``[n]`` test event indicator.
    risk: ``[n]`` test risk scores (higher = earlier event).
    tau: truncation time; only events before tau carry weight. Needed when
      test events occur after the last training time (G is unknown there).
    tied_tol: absolute tolerance for tied risks.

  Returns:
    ``ConcordanceCounts(cindex, concordant, discordant, tied_risk, tied_time)``.

  Raises:
    ValueError: invalid arrays (named, with rows); test events before tau
      after the last training time (the message gives the allowed range) or at
      times where G = 0; no training event; see also ``concordance_counts``.
    NoComparablePairsError: if the weighted denominator is 0 (e.g. tau below
      every event time).

  Source: Uno et al., Stat. Med. 30(10):1105-1117 (2011), eq. for C_tau;
  ``sksurv.metrics.concordance_index_ipcw`` (scikit-survival 0.28).
  """
  tol = _check_tol(tied_tol)
  _, _, cens = _censoring_km(train_duration, train_event)
  d, e, r = _validated(duration, event, risk)
  if tau is not None:
    tau = float(tau)
    if not math.isfinite(tau):
      raise ValueError(f"tau: must be finite, got {tau}")
  weighted = e & (d < tau) if tau is not None else e
  rows = np.flatnonzero(weighted)
  hint = ("Pass tau <= the last training duration (events at or after tau are "
          "ignored) or use training data with longer follow-up.")
  w = np.zeros(d.shape[0])
  if rows.size:
    g = _censoring_survival(cens, d[rows], rows, d.shape[0], "duration", hint)
    w[rows] = 1.0 / np.square(g)
  counts = _per_patient(d, e, r, tol)
  conc, tied, comparable, tied_time = counts.sum(axis=1)
  numerator = float(np.sum(w * (counts[0] + 0.5 * counts[1])))
  denominator = float(np.sum(w * counts[2]))
  if denominator == 0:
    raise _no_pairs("Uno's C" + (f" (tau={tau:g})" if tau is not None else ""))
  return ConcordanceCounts(numerator / denominator, int(conc), int(comparable - conc - tied),
                           int(tied), int(tied_time))


def _check_times(times, d: np.ndarray, name: str = "times") -> np.ndarray:
  """Evaluation times: 1-D, finite, strictly increasing, inside [min(d), max(d))."""
  t = validation.as_float_array(np.atleast_1d(times), name)
  if t.ndim != 1:
    raise ValueError(f"{name}: expected a 1-D array, got shape {t.shape}")
  if t.size > 1 and np.any(np.diff(t) <= 0):
    raise ValueError(f"{name}: must be strictly increasing (column k of the predictions "
                     f"belongs to times[k]); got {t}")
  lo, hi = d.min(), d.max()
  bad = (t < lo) | (t >= hi)
  if bad.any():
    raise ValueError(f"{name}: {t[bad]} outside the test follow-up range; allowed times "
                     f"are in [{lo:g}, {hi:g}) (min duration inclusive, max duration exclusive)")
  return t


def _check_predictions(pred, n: int, n_times: int, name: str, allow_1d: bool) -> np.ndarray:
  p = validation.as_float_array(pred, name)
  if p.ndim == 1 and allow_1d:
    if p.shape[0] != n:
      raise ValueError(f"{name}: expected {n} rows, got shape {p.shape}")
    return p
  if p.ndim == 1 and n_times == 1 and p.shape[0] == n:
    return p.reshape(n, 1)
  if p.shape != (n, n_times):
    raise ValueError(f"{name}: expected shape ({n}, {n_times}) = (patients, times)"
                     f"{' or (' + str(n) + ',)' if allow_1d else ''}, got {p.shape}")
  return p


def cumulative_dynamic_auc(train_duration, train_event, duration, event, risk, times, *,
                           tied_tol: float = 1e-8):
  """Cumulative/dynamic time-dependent AUC with IPCW, via scikit-survival.

  AUC(t) = P(risk_i > risk_j | T_i <= t, event_i, T_j > t): cases are events
  up to t (weighted 1 / G(T_i), G the training censoring KM), controls are
  patients still at risk after t. Wraps ``sksurv.metrics.cumulative_dynamic_auc``
  after validation; the results are sksurv's.

  Args:
    train_duration: ``[n_train]`` training times (only for G).
    train_event: ``[n_train]`` training event indicator.
    duration: ``[n]`` test times; event: ``[n]`` test event indicator.
    risk: ``[n]`` risk scores, or ``[n, len(times)]`` time-dependent scores
      (e.g. cumulative hazards), higher = earlier event. Not survival
      probabilities (pass ``1 - S`` or ``-S`` instead).
    times: ``[k]`` strictly increasing times in [min(duration), max(duration)).
    tied_tol: absolute tolerance for tied risks.

  Returns:
    ``(auc [k] float64, mean_auc float)``; mean_auc integrates AUC(t) against
    the test Kaplan-Meier estimate (sksurv's definition).

  Raises:
    ValueError: invalid arrays (named, with rows), times not strictly
      increasing or outside the allowed range (stated in the message), test
      event times after the last training time or where G = 0.

  Source: Uno et al., JASA 102:527-537 (2007); Hung & Chiang, Can. J. Stat.
  38(1):8-26 (2010); ``sksurv.metrics.cumulative_dynamic_auc``.
  """
  from sksurv import metrics as skm
  tol = _check_tol(tied_tol)
  td, te, cens = _censoring_km(train_duration, train_event)
  d, e = validation.check_survival(duration, event)
  _check_1d((d, e), ("duration", "event"))
  if not e.any():
    raise ValueError(f"event: all {e.shape[0]} test patients are censored; AUC needs events")
  t = _check_times(times, d)
  p = _check_predictions(risk, d.shape[0], t.shape[0], "risk", allow_1d=True)
  rows = np.flatnonzero(e)
  _censoring_survival(cens, d[rows], rows, d.shape[0], "duration",
                      "Drop those test patients or use training data with longer follow-up.")
  with np.errstate(invalid="ignore", divide="ignore"):
    auc, mean_auc = skm.cumulative_dynamic_auc(_surv(te, td), _surv(e, d), p, t, tied_tol=tol)
  auc = np.asarray(auc, np.float64)
  if not np.all(np.isfinite(auc)):
    bad = t[~np.isfinite(auc)]
    raise ValueError(f"times: AUC is undefined at {bad}: no case (event up to t) or no "
                     "control (still at risk after t) there")
  return auc, float(mean_auc)


def brier_score(train_duration, train_event, duration, event, surv_prob, times):
  """Time-dependent Brier score with IPCW (Graf et al.), via scikit-survival.

  BS(t) = mean_i [ 1(T_i <= t, event_i) S_i(t)^2 / G(T_i)
                   + 1(T_i > t) (1 - S_i(t))^2 / G(t) ],
  with G the training censoring Kaplan-Meier estimate. Wraps
  ``sksurv.metrics.brier_score`` after validation.

  Args:
    train_duration: ``[n_train]`` training times (only for G).
    train_event: ``[n_train]`` training event indicator.
    duration: ``[n]`` test times; event: ``[n]`` test event indicator.
    surv_prob: ``[n, k]`` predicted survival probabilities S_i(times[j]) in
      [0, 1] (``[n]`` allowed when k = 1). Not risk scores.
    times: ``[k]`` strictly increasing times in [min(duration), max(duration)).

  Returns:
    ``(times [k], brier [k])`` float64 arrays.

  Raises:
    ValueError: invalid arrays (named, with rows), probabilities outside
      [0, 1], times not strictly increasing or outside the allowed range
      (stated in the message), test times after the last training time or
      where G = 0.

  Source: Graf et al., Stat. Med. 18(17-18):2529-2545 (1999);
  ``sksurv.metrics.brier_score``.
  """
  from sksurv import metrics as skm
  td, te, cens = _censoring_km(train_duration, train_event)
  d, e = validation.check_survival(duration, event)
  _check_1d((d, e), ("duration", "event"))
  t = _check_times(times, d)
  p = _check_predictions(surv_prob, d.shape[0], t.shape[0], "surv_prob", allow_1d=False)
  out = (p < 0) | (p > 1)
  if out.any():
    raise ValueError(f"surv_prob: survival probabilities must lie in [0, 1]; "
                     f"{validation._rows(out.any(axis=1))} have values outside")
  # sksurv evaluates G at every test time (events and censored) and at `times`,
  # and fails beyond the training follow-up; G = 0 there just gives weight 0.
  hint = "Use test data within the training follow-up or training data with longer follow-up."
  _censoring_survival(cens, d, np.arange(d.shape[0]), d.shape[0], "duration", hint, True)
  _censoring_survival(cens, t, np.arange(t.shape[0]), t.shape[0], "times", hint, True)
  t_out, bs = skm.brier_score(_surv(te, td), _surv(e, d), p, t)
  return np.asarray(t_out, np.float64), np.asarray(bs, np.float64)


def integrated_brier_score(train_duration, train_event, duration, event, surv_prob,
                           times) -> float:
  """Integrated Brier score: the trapezoid integral of BS(t) over times, / (t_k - t_1).

  Wraps ``sksurv.metrics.integrated_brier_score`` after the validation of
  ``brier_score`` (same arguments, shapes and errors), plus: at least two
  times are required.

  Returns:
    The IBS as a Python float (lower is better; 0.25 = an uninformative 0.5
    prediction).

  Source: Graf et al. (1999); ``sksurv.metrics.integrated_brier_score``.
  """
  if np.atleast_1d(np.asarray(times)).shape[0] < 2:
    raise ValueError("times: the integrated Brier score needs at least two time points")
  t, bs = brier_score(train_duration, train_event, duration, event, surv_prob, times)
  return float(np.trapezoid(bs, t) / (t[-1] - t[0]))


# -----------------------------------------------------------------------------
# Bootstrap.
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
  """A patient-level bootstrap of a metric.

  Attributes:
    estimate: the metric on the full data (not the mean of the replicates).
    sd: standard deviation of the valid replicates (ddof=1), the bootstrap SE.
    ci_low, ci_high: percentile interval at ``confidence``.
    replicates: ``[n_resamples, ...]`` metric per resample (NaN where the
      resample was invalid, e.g. had no comparable pair).
    n_invalid: number of NaN replicates (excluded from sd and the interval).
    confidence: the interval's nominal coverage, e.g. 0.95.
  """
  estimate: Any
  sd: Any
  ci_low: Any
  ci_high: Any
  replicates: np.ndarray
  n_invalid: int
  confidence: float


def _summarise(estimate, replicates: np.ndarray, confidence: float) -> BootstrapResult:
  reps = np.asarray(replicates, np.float64)
  invalid = ~np.isfinite(reps)
  flat_invalid = invalid.reshape(reps.shape[0], -1).any(axis=1)
  valid = reps[~flat_invalid]
  if valid.shape[0] < 2:
    raise ValueError(f"bootstrap: only {valid.shape[0]} of {reps.shape[0]} resamples gave a "
                     "valid metric; the data are too small or degenerate to bootstrap")
  alpha = (1.0 - confidence) / 2
  lo, hi = np.quantile(valid, [alpha, 1 - alpha], axis=0)
  sd = valid.std(axis=0, ddof=1)
  scalar = lambda x: float(x) if np.ndim(x) == 0 else x
  return BootstrapResult(scalar(estimate), scalar(sd), scalar(lo), scalar(hi), reps,
                         int(flat_invalid.sum()), confidence)


def _check_bootstrap_args(n_resamples, confidence):
  if int(n_resamples) != n_resamples or n_resamples < 2:
    raise ValueError(f"n_resamples: need an integer >= 2, got {n_resamples!r}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")


_WEIGHT_BLOCK = 64


def bootstrap_weights(n: int, n_resamples: int, seed: int = 0, *, first: int = 0) -> np.ndarray:
  """The resample counts that ``bootstrap_cindex`` uses: ``[n_resamples, n]`` int32.

  Row b holds how often each patient appears in resample ``first + b`` (n
  draws with replacement); each row sums to n. Materialise resample b as
  ``np.repeat(np.arange(n), w[b])``. Replicates are drawn in fixed blocks of
  64 (block k from ``numpy.random.default_rng([seed, k])``, all its indices in
  one call), so a replicate does not depend on how callers chunk the work.
  Drawing on the host costs no compile and is as fast as on a CPU device.
  """
  n, count, first = int(n), int(n_resamples), int(first)
  out = np.empty((count, n), np.int32)
  for block in range(first // _WEIGHT_BLOCK, -(-(first + count) // _WEIGHT_BLOCK)):
    rng = np.random.default_rng([int(seed), block])
    idx = rng.integers(0, n, (_WEIGHT_BLOCK, n))
    lo = max(first, block * _WEIGHT_BLOCK)
    hi = min(first + count, (block + 1) * _WEIGHT_BLOCK)
    rows = np.arange(lo, hi) - block * _WEIGHT_BLOCK
    # One bincount for all rows: offset row r's indices by r * n.
    flat = (idx[rows] + (np.arange(rows.size) * n)[:, None]).ravel()
    out[lo - first:hi - first] = np.bincount(flat, minlength=rows.size * n).reshape(rows.size, n)
  return out


def _dense_matrices(d: np.ndarray, e: np.ndarray, r: np.ndarray, tol: float):
  """Host-side pieces of the GEMM bootstrap, built in float64 numpy like sksurv.

  Returns:
    ``m_ev [k, n]`` float32: for the k events i (rows) and all patients j,
    comparable_ij * (concordant_ij + tied_ij / 2), entries in {0, 1/2, 1};
    ``ev_idx [k]`` the events' indices; ``order [n]`` the time order (time
    ascending, events first); ``start [k]`` the position in that order where
    each event's comparable partners begin (they form a suffix).
  """
  ev_idx = np.flatnonzero(e)
  di, dj = d[ev_idx, None], d[None, :]
  comp = (di < dj) | ((di == dj) & ~e[None, :])
  delta = r[None, :] - r[ev_idx, None]            # fl(risk_j - risk_i), as in sksurv
  tied = np.abs(delta) <= tol
  conc = (delta < 0) & ~tied
  m_ev = np.where(comp, conc + 0.5 * tied, 0.0).astype(np.float32)
  order = np.lexsort((~e, d))
  ev_times = np.sort(d[e])
  n_ev_same = (np.searchsorted(ev_times, d[ev_idx], "right")
               - np.searchsorted(ev_times, d[ev_idx], "left"))
  start = np.searchsorted(d[order], d[ev_idx], "left") + n_ev_same
  return m_ev, ev_idx, order, start


@jax.jit
def _dense_replicates(m_ev, ev_idx, order, start, weights):
  """Numerators and denominators of C_b = (w_b^T M w_b) / (w_b^T C w_b).

  Harrell's C of a case-weighted resample is this ratio of two quadratic
  forms in the weights (derived here from scikit-survival's pair counting in
  ``concordance_index_censored``; not taken from a paper).

  One GEMM over the event rows gives M w_b for all replicates; it is exact in
  float32 (weights are small integers, M holds halves, every partial sum is a
  multiple of 1/2 below 2^23), HIGHEST precision keeps GPUs off TF32, and the
  final products are summed in the default float dtype. The denominator needs
  no GEMM: C_ij = 1 exactly for j in event i's suffix of the time order, so
  w_b^T C w_b = sum_i w_bi * (suffix sum of w_b from start_i).
  """
  f = jnp.result_type(float)
  w = weights.astype(f)
  w_ev = w[:, ev_idx]
  mw = jnp.dot(w_ev.astype(jnp.float32), m_ev, precision=lax.Precision.HIGHEST)
  num = jnp.sum(mw.astype(f) * w, axis=1)
  suffix = _exclusive_cumsum(w[:, order][:, ::-1])[:, ::-1]   # [B, n + 1]
  den = jnp.sum(w_ev * suffix[:, start], axis=1)
  return num, den


@jax.jit
def _tree_replicates(duration, event, risk, risk_lo, mask, tied_tol, weights):
  """Weighted Harrell sums for each row of ``weights [B, n]`` in O(B n log n).

  The sorts, tie windows and wavelet paths do not depend on the weights, so
  under ``vmap`` they are computed once; only the weight prefix sums are
  batched.
  """
  st = _structure(duration, event, risk, risk_lo, mask, tied_tol)
  f = jnp.result_type(float)

  def one(w):
    w = w.astype(f)
    if mask is not None:
      w = jnp.where(mask, w, 0)
    w_t = w[st.perm_t]
    _, below = _prefix_count_less(st.value_t, st.start_t, st.lohi_t, w_t)
    # Weight of all patients with value < q, from a histogram over values.
    hist = jnp.zeros_like(w_t).at[st.value_t].add(w_t)
    below_all = _exclusive_cumsum(hist)[st.lohi_t]
    in_suffix = below_all - below
    # suffix_w[k] = sum of w over time positions >= k, for k = 0..n (start can be n).
    suffix_w = _exclusive_cumsum(w_t[::-1])[::-1]
    comp = suffix_w[st.start_t]
    wi = jnp.where(st.event_t, w_t, 0)
    num = jnp.sum(wi * (in_suffix[0] + 0.5 * (in_suffix[1] - in_suffix[0])))
    den = jnp.sum(wi * comp)
    return num, den

  return jax.vmap(one)(weights)


_DENSE_MAX = 4096


def weighted_concordance_index(duration, event, risk, weights, *, tied_tol: float = 1e-8,
                               method: str = "auto") -> np.ndarray:
  """Harrell's C under case weights, one value per weight row: ``[B]`` float64.

  With integer weights w (copies per patient) this equals Harrell's C on the
  materialised data set ``np.repeat(..., w)``: copies of one patient are never
  comparable (same time; either censored, or both events). C_b = sum_ij w_bi
  w_bj M_ij / sum_ij w_bi w_bj C_ij with M = comparable * (concordant + tied/2)
  and C = comparable.

  Args:
    duration, event, risk: ``[n]`` as in ``concordance_counts``.
    weights: ``[B, n]`` non-negative case weights (e.g. bootstrap counts) or ``[n]``.
    tied_tol: absolute tolerance for tied risks.
    method: "dense" builds the event-by-patient pair matrix on the host and
      uses one GEMM (the quadratic form of ``_dense_replicates``; O(B n^2)
      work, O(n^2) memory);
      "tree" uses the O(n log n) wavelet core per row (O(B n log n) work,
      O(B n) memory). "auto" picks dense up to 4096 patients: on 2 CPU cores
      at n = 1000, B = 1000 dense takes ~0.1 s and tree ~1 s.

  Returns:
    ``[B]`` C per row (``[1]`` for 1-D weights); NaN where a row has no
    comparable pair. Exact in float64 with x64 enabled; float32 (~1e-7
    relative) otherwise.

  Raises:
    ValueError: invalid survival arrays (see ``concordance_counts``), weights
      of the wrong shape, negative or non-finite weights, unknown method.
  """
  tol = _check_tol(tied_tol)
  d, e, r = _validated(duration, event, risk)
  w = validation.as_float_array(weights, "weights")
  w = w.reshape(1, -1) if w.ndim == 1 else w
  if w.ndim != 2 or w.shape[1] != d.shape[0]:
    raise ValueError(f"weights: expected shape [B, {d.shape[0]}], got {np.shape(weights)}")
  if (w < 0).any():
    raise ValueError(f"weights: negative values in {validation._rows((w < 0).any(axis=1))}")
  if method == "auto":
    method = "dense" if d.shape[0] <= _DENSE_MAX else "tree"
  if method == "dense":
    num, den = _dense_replicates(*_dense_matrices(d, e, r, tol), w)
  elif method == "tree":
    args = _device_inputs(d, e, r)
    wp = np.zeros((w.shape[0], args[0].shape[0]))
    wp[:, : d.shape[0]] = w
    num, den = _tree_replicates(*args, tol, wp)
  else:
    raise ValueError(f"method: expected 'auto', 'dense' or 'tree', got {method!r}")
  num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def bootstrap_cindex(duration, event, risk, *, n_resamples: int = 1000, seed: int = 0,
                     confidence: float = 0.95, tied_tol: float = 1e-8,
                     method: str = "auto", chunk: Optional[int] = None) -> BootstrapResult:
  """Patient-level bootstrap of Harrell's C, all replicates vectorised.

  Each replicate resamples the n patients with replacement; replicate b is
  Harrell's C on that resample exactly as scikit-survival computes it on the
  materialised copy (copies of one patient never form a comparable pair).
  Resamples are multinomial case weights (``bootstrap_weights``), and all
  replicates of a chunk are evaluated at once: one GEMM pair for small n
  (the quadratic form of ``_dense_replicates``), or the vmapped O(n log n)
  weighted core for larger n.
  There is no Python loop per resample (only per chunk of replicates).

  Args:
    duration, event, risk: ``[n]`` as in ``concordance_counts``.
    n_resamples: number of bootstrap replicates B (>= 2).
    seed: integer seed for ``jax.random.key``.
    confidence: coverage of the percentile interval.
    tied_tol: absolute tolerance for tied risks.
    method: "auto", "dense" or "tree" (see ``weighted_concordance_index``).
    chunk: replicates per vectorised batch; default keeps the weight matrix
      around 2^24 entries. Results do not depend on it.

  Returns:
    ``BootstrapResult`` (estimate = C on the full data; sd; percentile
    ci_low/ci_high; replicates ``[B]``; n_invalid replicates without a
    comparable pair, which are excluded).

  Raises:
    ValueError: invalid input (see ``concordance_counts``), bad n_resamples
      or confidence, or fewer than two valid replicates.
  """
  _check_bootstrap_args(n_resamples, confidence)
  estimate = concordance_index(duration, event, risk, tied_tol=tied_tol)
  n, b_total = np.shape(duration)[0], int(n_resamples)
  if chunk is None:
    chunk = max(1, min(b_total, (1 << 24) // max(n, 1)))
  reps = []
  for first in range(0, b_total, chunk):
    # Every chunk has the same shape (the last one computes a few extra
    # replicates and drops them), so the vectorised code compiles once.
    w = bootstrap_weights(n, chunk, seed, first=first)
    c = weighted_concordance_index(duration, event, risk, w, tied_tol=tied_tol, method=method)
    reps.append(c[: min(chunk, b_total - first)])
  return _summarise(estimate, np.concatenate(reps), confidence)


def bootstrap(metric_fn: Callable[..., Any], duration, event, *arrays, n_resamples: int = 200,
              seed: int = 0, confidence: float = 0.95, **kwargs) -> BootstrapResult:
  """Generic patient-level bootstrap for any metric, one call per resample.

  Resamples patients (rows) with replacement and calls
  ``metric_fn(duration[idx], event[idx], *[a[idx] for a in arrays], **kwargs)``.
  Unlike ``bootstrap_cindex`` this loops in Python over resamples, because the
  metrics it serves (Uno's C, AUC, Brier, IBS) wrap scikit-survival; expect
  milliseconds per resample at n ~ 10^3. Training data for IPCW metrics stay
  fixed: close over them, e.g.
  ``bootstrap(lambda d, e, r: concordance_index_ipcw(td, te, d, e, r).cindex, d, e, r)``.

  A resample on which the metric raises ValueError (e.g. no comparable pair,
  or times outside its follow-up) becomes a NaN replicate and is counted in
  ``n_invalid``; other exceptions propagate.

  Args:
    metric_fn: returns a float or a fixed-shape array (e.g. Brier at k times).
    duration: ``[n]`` times; event: ``[n]`` event indicator.
    *arrays: per-patient arrays with leading dimension n (risks, ``[n, k]``
      survival probabilities, ...).
    n_resamples: number of replicates B (>= 2).
    seed: seed for ``numpy.random.default_rng``; resample b uses the b-th
      draw of ``rng.integers(0, n, n)``.
    confidence: coverage of the percentile interval.
    **kwargs: passed to ``metric_fn``.

  Returns:
    ``BootstrapResult`` with ``replicates [B, ...]``.

  Raises:
    ValueError: arrays whose first dimension is not n, bad n_resamples or
      confidence, the metric failing on the full data, or fewer than two
      valid replicates.
  """
  _check_bootstrap_args(n_resamples, confidence)
  d, e = validation.check_survival(duration, event)
  n = d.shape[0]
  arrs = [np.asarray(a) for a in arrays]
  for k, a in enumerate(arrs):
    if a.ndim == 0 or a.shape[0] != n:
      raise ValueError(f"arrays[{k}]: expected leading dimension {n} (patients), got shape {a.shape}")
  estimate = np.asarray(metric_fn(d, e, *arrs, **kwargs), np.float64)
  rng = np.random.default_rng(seed)
  reps = np.full((int(n_resamples),) + estimate.shape, np.nan)
  for b in range(int(n_resamples)):
    idx = rng.integers(0, n, n)
    try:
      reps[b] = np.asarray(metric_fn(d[idx], e[idx], *[a[idx] for a in arrs], **kwargs))
    except ValueError:
      pass  # Recorded as an invalid (NaN) replicate; see the docstring.
  return _summarise(estimate, reps, confidence)
