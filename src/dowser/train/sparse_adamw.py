"""SparseAdamW: AdamW that touches only the trainable entries and keeps state only for them.

For a masked weight with n trainable entries (flat indices idx) the state is

    idx         (n,) int32 (int64 past 2^31 entries)
    exp_avg     (n,) float32           m
    exp_avg_sq  (n,) float32           v
    master      (n,) float32           only for bf16/fp16 weights: the fp32 values being learned

so 12 bytes per trainable entry for an fp32 weight (dense AdamW: 8 bytes per entry, i.e.
1.5 rho x dense at ratio rho) and 16 for a bf16 one. Each step, with g = grad[idx]:

    x  <- x (1 - lr wd)                                 decoupled decay, trainable entries only
    m  <- b1 m + (1 - b1) g
    v  <- b2 v + (1 - b2) g^2
    x  <- x - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
    W[idx] <- x

exactly torch.optim.AdamW's update (amsgrad off). Frozen entries are never written, so they
stay bit-identical whatever lr, decay or gradient. The dense gradient of a masked weight is
freed (grad = None) as soon as its entries are read.

With `mask_grads=True` (default) a gradient hook also zeroes the frozen entries' gradients
during backward (from the indices; no dense bool mask is kept), so that gradient clipping and
gradient-norm logging see exactly the trainable parameters, as under gradient masking; the two
modes then follow the same trajectory. Parameters outside the mask with
requires_grad=True are updated densely with the same AdamW math (fp32 state and master copy
for low-precision weights).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.mask import Mask
from dowser.train.masking import masked_parameters

_FLOAT_STATE = ("exp_avg", "exp_avg_sq", "master")


class SparseAdamW(torch.optim.Optimizer):
    """AdamW over the trainable entries of masked weights plus other trainable parameters.

    Args:
        model: the model being fine-tuned (call `dowser.prepare_model(model, mask)` first, so
            that only the masked weights and the tuned layers' norms require grad).
        mask: which entries of which weights train.
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        param_groups: optional list of dicts {"params": [...], "lr": ..., ...} to use instead
            of one group of all trainable parameters; masked weights found in any group are
            updated sparsely.
        mask_grads: zero frozen entries' gradients in backward (see module doc); the hooks
            are removed by `remove_hooks()`.
    """

    def __init__(
        self,
        model: nn.Module,
        mask: Mask,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        param_groups: Iterable[dict] | None = None,
        mask_grads: bool = True,
    ):
        if not lr >= 0 or not eps >= 0 or not weight_decay >= 0:
            raise DowserError(f"lr={lr}, eps={eps}, weight_decay={weight_decay} must be >= 0")
        if not all(0 <= b < 1 for b in betas):
            raise DowserError(f"betas={betas} must lie in [0, 1)")
        masked = masked_parameters(model, mask)
        for p in masked.values():
            p.requires_grad_(True)
            if not p.is_contiguous():
                raise DowserError("SparseAdamW needs contiguous weights")
        # flat indices of trainable entries, by parameter identity
        self._index: dict[int, torch.Tensor] = {}
        for n, p in masked.items():
            flat = mask[n].reshape(-1).nonzero().squeeze(1)
            dtype = torch.int32 if p.numel() < 2**31 else torch.int64
            self._index[id(p)] = flat.to(device=p.device, dtype=dtype)
        if param_groups is None:
            params = [p for p in model.parameters() if p.requires_grad]
            param_groups = [{"params": params}]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(list(param_groups), defaults)
        self._hooks = []
        if mask_grads:
            for p in masked.values():
                self._hooks.append(
                    p.register_post_accumulate_grad_hook(_keep_only(self._index[id(p)]))
                )

    def remove_hooks(self) -> None:
        """Remove the gradient hooks that `mask_grads=True` registered on the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def is_sparse(self, p: torch.Tensor) -> bool:
        """Whether `p` is updated on its mask's trainable entries only."""
        return id(p) in self._index

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step (see module doc)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise DowserError("SparseAdamW takes dense gradients")
                if self.is_sparse(p):
                    self._sparse_step(p, group)
                else:
                    self._dense_step(p, group)
        return loss

    def _init_state(self, p: torch.Tensor, values: torch.Tensor) -> dict:
        state = self.state[p]
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(values, dtype=torch.float32)
        state["exp_avg_sq"] = torch.zeros_like(values, dtype=torch.float32)
        if p.dtype != torch.float32:
            state["master"] = values.float()  # learn in fp32, store rounded
        return state

    def _sparse_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "idx" not in state:
            idx = self._index[id(p)]
            self._init_state(p, p.detach().reshape(-1)[idx])
            state["idx"] = idx
        # stored int32 (4 bytes); kernels want int64, made one weight at a time
        idx = state["idx"].to(p.device).long()
        grad = p.grad.reshape(-1).index_select(0, idx).float()
        p.grad = None  # the dense gradient is no longer needed
        flat = p.data.view(-1)
        x = state["master"] if "master" in state else flat.index_select(0, idx)
        _adamw(x, grad, state, group)
        flat.index_copy_(0, idx, x.to(p.dtype))

    def _dense_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "exp_avg" not in state:
            self._init_state(p, p.detach())
        grad = p.grad.float()
        if "master" in state:
            x = state["master"]
            _adamw(x, grad, state, group)
            p.data.copy_(x)
        else:
            _adamw(p.data, grad, state, group)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps fp32 state fp32 and indices integer for any weight dtype."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(pid, {})
            for key in _FLOAT_STATE:
                if key in saved:
                    self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32)
            if "idx" in saved:
                if not torch.equal(saved["idx"].cpu().long(), self._index[id(p)].cpu().long()):
                    raise DowserError(
                        "the optimizer state was saved with another mask; resume with the same mask"
                    )
                # torch casts every state tensor to the weight's dtype: indices must stay ints
                self.state[p]["idx"] = self._index[id(p)]

    def state_bytes(self) -> int:
        """Bytes held in optimizer state (indices, moments, master copies)."""
        return sum(
            t.numel() * t.element_size()
            for s in self.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor)
        )


def _keep_only(idx: torch.Tensor):
    """A gradient hook that keeps the entries at flat indices `idx` and zeroes the rest."""

    def hook(p: torch.Tensor) -> None:
        i = idx.to(p.grad.device).long()  # no-op unless the model moved after construction
        flat = p.grad.view(-1)
        kept = flat.index_select(0, i)
        flat.zero_()
        flat.index_copy_(0, i, kept)

    return hook


def _adamw(x: torch.Tensor, grad: torch.Tensor, state: dict, group: dict) -> None:
    """torch.optim.AdamW's single-tensor update of x in place (amsgrad off)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    state["step"] += 1
    step = float(state["step"])
    if wd != 0:
        x.mul_(1 - lr * wd)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(grad, 1 - beta1)
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias1 = 1 - beta1**step
    bias2_sqrt = math.sqrt(1 - beta2**step)
    denom = (v.sqrt() / bias2_sqrt).add_(eps)
    x.addcdiv_(m, denom, value=-lr / bias1)
