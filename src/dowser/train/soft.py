"""Soft masks: each entry's optimizer update scaled by its own factor in [0, 1].

A hard mask trains an entry at the full learning rate or not at all; a soft mask gives each
entry a scale s_ij (0 = frozen) and, around every optimizer step,

    W <- W_before + s * (W_after - W_before)          (elementwise, each scaled weight)

which is a per-entry learning rate for any optimizer (Adam's update does not scale with the
gradient, so scaling gradients would do nothing). Scales are kept as uint8 levels (1 byte per
entry, as a bool mask); each step holds one transient copy of the scaled weights. Entries with
s = 0 stay bit-identical. Use with `dowser.mask_gradients(model, pool)` for the pool of
entries that may move, and `dowser.ranking.soft_scale` for scales from importance scores.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from dowser.errors import DowserError

LEVELS = 255  # uint8 levels: s = level / 255


class UpdateScale:
    """Scale every optimizer step of the named weights by per-entry factors (see module doc).

    with UpdateScale(model, scales).attach(optimizer):
        ...train...
    """

    def __init__(self, model: nn.Module, scales: Mapping[str, torch.Tensor]):
        params = dict(model.named_parameters())
        self.params: dict[str, nn.Parameter] = {}
        self.levels: dict[str, torch.Tensor] = {}
        for name, s in scales.items():
            if name not in params or tuple(params[name].shape) != tuple(s.shape):
                raise DowserError(f"update scales for {name!r} do not fit the model's weights")
            if not torch.isfinite(s).all() or s.min() < 0 or s.max() > 1:
                raise DowserError(f"update scales for {name!r} must lie in [0, 1]")
            self.params[name] = params[name]
            self.levels[name] = (s.float() * LEVELS).round().to(torch.uint8)
        self._handles: list = []
        self._saved: list[torch.Tensor] | None = None

    def scale(self, name: str) -> torch.Tensor:
        """The float scale of weight `name` (what the uint8 levels stand for)."""
        return self.levels[name].float() / LEVELS

    def attach(self, optimizer: torch.optim.Optimizer) -> UpdateScale:
        """Hook `optimizer` so that each step moves every entry by its scale only."""
        self._handles.append(optimizer.register_step_pre_hook(self._save))
        self._handles.append(optimizer.register_step_post_hook(self._rescale))
        return self

    @torch.no_grad()
    def _save(self, optimizer, args, kwargs) -> None:
        self._saved = [p.detach().clone() for p in self.params.values()]

    @torch.no_grad()
    def _rescale(self, optimizer, args, kwargs) -> None:
        if self._saved is None:
            return
        for (n, p), old in zip(self.params.items(), self._saved, strict=True):
            s = self.levels[n].to(p.device).float().div_(LEVELS)
            p.copy_(torch.where(s == 0, old, old + s * (p.detach() - old)))
        self._saved = None

    def remove(self) -> None:
        """Remove the optimizer hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> UpdateScale:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
