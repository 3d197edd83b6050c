"""Re-probing during training: the Dowser mask rebuilt from the current model every k steps.

A static mask is chosen on the pretrained weights; after some steps the model has moved and
its important entries may have moved too. "dowser-refresh" probes the model being trained
again (no data, the same probe settings) at steps k, 2k, ... (k = steps / REFRESH[method],
so REFRESH masks over a run) and trains the new mask's entries from there on: rho of each
matrix at any time, frozen entries' Adam moments zeroed (`GradientMask.swap`), entries
trained earlier keep their values. Its cost is one probe per refresh during training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dowser.train.masking import GradientMask

REFRESH = {"dowser-refresh": 3}  # method -> masks over a run (the first, then refreshes)


def refresher(
    method: str,
    model: nn.Module,
    handle: GradientMask,
    steps: int,
    build: Callable[[nn.Module], object],
) -> Callable[[int, torch.optim.Optimizer], None]:
    """`train_loop`'s on_step: at steps k, 2k, ... < steps, `build(model)` (the current
    model's new mask) is swapped in; `model` is probed in eval mode, then set back to train."""
    every = max(1, steps // REFRESH[method])
    masks = [handle.mask]

    def on_step(done: int, optimizer: torch.optim.Optimizer) -> None:
        if done % every or done >= steps or len(masks) >= REFRESH[method]:
            return
        model.eval()
        try:
            mask = build(model)
        finally:
            model.train()
        handle.swap(mask, optimizer)
        masks.append(mask)

    on_step.masks = masks  # the masks in the order they trained (for analysis)
    return on_step
