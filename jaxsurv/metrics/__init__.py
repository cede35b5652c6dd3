"""Survival metrics: Harrell's and Uno's concordance, time-dependent AUC, Brier score, bootstrap.

Risk convention (as everywhere in jaxsurv): a higher risk score means a higher
hazard, i.e. an earlier expected event. Durations are in any time unit (e.g.
days); events are 1 (observed) or 0 (censored).

Every name below is importable from ``jaxsurv.metrics``; the code lives in
one module per topic:

* ``concordance``: Harrell's C. ``concordance_index`` / ``concordance_counts``
  have exactly the semantics of ``sksurv.metrics.concordance_index_censored``
  (scikit-survival 0.28); the core is pure JAX, O(n log n), with no Python
  loop over patients: about 0.1 s at n = 10^5 and 1.5 s at 10^6 on 2 shared
  CPU cores, 20x faster than lifelines (benchmarks/RESULTS.md). ``harrell_c``
  is the same core as a jittable function for evaluation inside JAX code
  (returns a 0-d array; NaN when there is no comparable pair). Also
  ``ConcordanceCounts`` and ``NoComparablePairsError``.
* ``ipcw``: metrics with inverse-probability-of-censoring weights from the
  training set's censoring Kaplan-Meier estimate. ``concordance_index_ipcw``
  (Uno's C) runs the same fast core with scikit-survival's
  ``CensoringDistributionEstimator`` weights; ``cumulative_dynamic_auc``,
  ``brier_score`` and ``integrated_brier_score`` are thin, validated wrappers
  around scikit-survival (a well-kept reference implementation; no reason to
  re-derive them).
* ``bootstrapping``: ``bootstrap_cindex``, all bootstrap replicates of
  Harrell's C at once, as multinomial case weights (``bootstrap_weights``,
  ``weighted_concordance_index``; no loop per resample); ``bootstrap``, a
  generic (looping) patient-level bootstrap for any metric; ``BootstrapResult``.

scikit-survival is imported lazily (only by the functions that wrap it), so
the JAX core works where scikit-survival is not installed.
"""

from jaxsurv.metrics.bootstrapping import (BootstrapResult, bootstrap, bootstrap_cindex,
                                           bootstrap_weights, weighted_concordance_index)
from jaxsurv.metrics.concordance import (Array, ConcordanceCounts, NoComparablePairsError,
                                         concordance_counts, concordance_index, harrell_c)
from jaxsurv.metrics.ipcw import (brier_score, concordance_index_ipcw, cumulative_dynamic_auc,
                                  integrated_brier_score)

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
