"""Data-free probing: synthetic inputs, activation and output-sensitivity statistics."""

from dowser.probing.probe import ESTIMATORS, probe

__all__ = ["ESTIMATORS", "probe"]
