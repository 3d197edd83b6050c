"""model-dowser: data-free importance probing and sparse fine-tuning that limits forgetting.

scores = dowser.probe(model, tokenizer=tok)          # once per base model, no data
mask = dowser.build_mask(model, scores, update_ratio=0.1, last_layers=20)
mask.save("mask.safetensors")
"""

from dowser.errors import DowserError
from dowser.mask import Mask, build_mask
from dowser.probing import ESTIMATORS, probe
from dowser.scores import Scores
from dowser.train import GradientMask, SparseAdamW, mask_gradients, prepare_model
from dowser.version import __version__

__all__ = [
    "ESTIMATORS",
    "DowserError",
    "GradientMask",
    "Mask",
    "Scores",
    "SparseAdamW",
    "__version__",
    "build_mask",
    "mask_gradients",
    "prepare_model",
    "probe",
]
