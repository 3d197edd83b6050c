"""The methods Dowser is compared with, each from its authors' definition, for any HF model.

masks.py    random, magnitude and Wanda masks (same ratio and layers as Dowser's)
lora.py     LoRA on the same matrices (PEFT)
"""

from dowser.baselines.lora import lora_config, tuned_modules
from dowser.baselines.masks import (
    magnitude_mask,
    magnitude_scores,
    random_mask,
    random_scores,
    wanda_mask,
    wanda_scores,
)

__all__ = [
    "lora_config",
    "magnitude_mask",
    "magnitude_scores",
    "random_mask",
    "random_scores",
    "tuned_modules",
    "wanda_mask",
    "wanda_scores",
]
