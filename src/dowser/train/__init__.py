"""Sparse fine-tuning: which parameters train, gradient masking, SparseAdamW, HF Trainer."""

from dowser.train.masking import GradientMask, mask_gradients, prepare_model
from dowser.train.sparse_adamw import SparseAdamW

__all__ = ["GradientMask", "SparseAdamW", "mask_gradients", "prepare_model"]
