"""Data-free probing: synthetic inputs, activation and output-sensitivity statistics."""

from dowser.probing.probe import ESTIMATORS, peak_memory, probe

__all__ = ["ESTIMATORS", "peak_memory", "probe"]
