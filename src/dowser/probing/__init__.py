"""Data-free probing: synthetic inputs, activation and output-sensitivity statistics."""

from dowser.probing.outputs import peak_memory
from dowser.probing.probe import ESTIMATORS, probe

__all__ = ["ESTIMATORS", "peak_memory", "probe"]
