"""The methods Dowser is compared with, each from its authors' definition, for any HF model.

masks.py    random, magnitude and Wanda masks (same ratio and layers as Dowser's)
lora.py     LoRA on the same matrices (PEFT)
spider.py   SPIDER: per-step interpolation between W0 and W from gradient importance
merging/    post-hoc merging, one file per method: dare.py, grafting.py, model_tailor.py
            (with covariance.py, the input covariances Model Tailor needs)
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
from dowser.baselines.merging import InputCovariance, dare, graft, model_tailor
from dowser.baselines.spider import Spider, spider

__all__ = [
    "InputCovariance",
    "Spider",
    "dare",
    "graft",
    "lora_config",
    "magnitude_mask",
    "magnitude_scores",
    "model_tailor",
    "random_mask",
    "random_scores",
    "spider",
    "tuned_modules",
    "wanda_mask",
    "wanda_scores",
]
