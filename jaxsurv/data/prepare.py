"""Prepared once: each cohort becomes a versioned TFDS dataset, read back in memory or with grain.

A cohort is validated, preprocessed (``jaxsurv.data.mri.preprocess_case``) and
written once as a TensorFlow Datasets (TFDS) dataset in ArrayRecord format
(``file_format="array_record"``; TensorFlow is not needed to write or read it,
see "TFDS for Jax and PyTorch", https://www.tensorflow.org/datasets/tfless_tfds).
Later runs read the prepared files instead of redoing the work:

* ``prepare_cohort(name_or_manifest, ...)`` prepares if needed and returns a
  ``PreparedCohort`` with every patient in memory (table + image arrays);
* ``prepare_dataset(...)`` only prepares and returns the dataset's folder;
* ``load_prepared(dataset_dir)`` reads a prepared folder back;
* ``grain_batches(...)`` streams shuffled batches with grain for cohorts that
  do not fit in memory;
* ``python -m jaxsurv.data prepare NAME`` is the command-line entry point
  (see ``jaxsurv/data/__main__.py``).

This module holds no code of its own: it re-exports the public names of the
three modules that do, so callers import them all from here. Where the code
lives:

* ``jaxsurv.data.cohorts``: the cohort registry: the known cohort names
  (``DEMO_COHORTS``, ``TABULAR_COHORTS``, ``KNOWN_COHORTS``,
  ``DEMO_DEFAULT_N``), their default preprocessing (``DEFAULT_PREPROCESS``,
  ``ROTTERDAM_RENDERED_PREPROCESS``, ``default_preprocess``), their
  ``cohort_spec``, a spec's JSON form (``spec_to_json``, ``spec_from_json``),
  the demo cohorts' files (``demo_manifest``) and ``describe_known_cohorts``.
* ``jaxsurv.data.tfds_build``: TFDS building: the builder (``JaxsurvCohort``,
  ``CohortConfig``, ``DATASET_NAME``, ``SPLIT``), the preprocessing plan and
  its workers (``PreprocessingError``), the stored features and versioning,
  and ``prepare_dataset``.
* ``jaxsurv.data.prepared``: read-back: ``PreparedCohort``,
  ``load_prepared``, ``prepare_cohort``, ``data_source``, ``grain_batches``
  (``SelectFields``), ``list_prepared`` and ``dataset_bytes``.
"""

from __future__ import annotations

from jaxsurv.data.cohorts import (DEFAULT_PREPROCESS, DEMO_COHORTS, DEMO_DEFAULT_N, KNOWN_COHORTS,
                                  ROTTERDAM_RENDERED_PREPROCESS, TABULAR_COHORTS, cohort_spec,
                                  default_preprocess, demo_manifest, describe_known_cohorts,
                                  spec_from_json, spec_to_json)
from jaxsurv.data.prepared import (PreparedCohort, SelectFields, data_source, dataset_bytes,
                                   grain_batches, list_prepared, load_prepared, prepare_cohort)
from jaxsurv.data.tfds_build import (DATASET_NAME, SPLIT, CohortConfig, JaxsurvCohort, PathLike,
                                     PreprocessingError, prepare_dataset)
