"""Cohort data layer: manifests, validation, MRI preprocessing, public cohorts,
demo cohorts, splits and input pipelines."""
