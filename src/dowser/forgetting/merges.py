"""The three merges of the benchmark: full-ft's model of a setting, post-processed so that only
rho of each tuned matrix keeps its change (see `dowser.forgetting.methods` for the list)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dowser.baselines.merging import InputCovariance, dare, graft, model_tailor
from dowser.forgetting.methods import Setting, _input_batches, tuned_mask
from dowser.forgetting.train import Examples
from dowser.probing.capture import text_mask

TAILOR_EXAMPLES = 512  # downstream training examples for Model Tailor's input covariance


@torch.no_grad()
def merge(
    method: str, base: nn.Module, tuned: nn.Module, data: Examples, setting: Setting
) -> nn.Module:
    """`tuned` (full-ft of the same setting) post-processed by a merging method."""
    names = list(tuned_mask(base, setting))
    before = base.state_dict()
    after = tuned.state_dict()
    rho = setting.update_ratio
    if method == "dare":
        merged = dare(before, after, drop=1 - rho, names=names, seed=setting.seed)
    elif method == "grafting":
        merged = graft(before, after, keep=rho, names=names)
    elif method == "model-tailor":
        modules = [n.removesuffix(".weight") for n in names]
        with InputCovariance(tuned, modules) as cov:
            for batch in _input_batches(data, TAILOR_EXAMPLES):
                cov.attention_mask = text_mask(batch)
                tuned(**batch)
            hessians = cov.hessians()
        merged = model_tailor(before, after, hessians, keep=rho, names=names)
    else:
        raise ValueError(f"unknown merge {method!r}")
    model = copy.deepcopy(tuned)
    model.load_state_dict(merged, strict=False)
    return model.eval()
