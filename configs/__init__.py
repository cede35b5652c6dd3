"""Experiment configs (ml-collections). One file per experiment."""
