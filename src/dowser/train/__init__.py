"""Sparse fine-tuning: which parameters train, gradient masking, SparseAdamW, HF Trainer."""

from dowser.train.artifacts import apply_delta, save_delta, save_merged
from dowser.train.masking import GradientMask, mask_gradients, prepare_model
from dowser.train.sparse_adamw import SparseAdamW

__all__ = [
    "GradientMask",
    "SparseAdamW",
    "apply_delta",
    "mask_gradients",
    "prepare_model",
    "save_delta",
    "save_merged",
]
