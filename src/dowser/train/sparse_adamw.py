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
from torch.distributed.tensor import DTensor

from dowser.errors import DowserError
from dowser.mask import Mask
from dowser.train.distributed import flat_offset, gather_blocks, local, shard_like
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
        self.mask = mask
        self.mask_grads = mask_grads
        self._index: dict[int, torch.Tensor] = {}  # id(param) -> flat indices in its local part
        self._hooks: list = []
        masked = self._masked(model)
        if param_groups is None:
            params = [p for p in model.parameters() if p.requires_grad]
            param_groups = [{"params": params}]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(list(param_groups), defaults)
        self._bind(masked)

    def _masked(self, model: nn.Module) -> dict[str, nn.Parameter]:
        masked = masked_parameters(model, self.mask)
        for p in masked.values():
            p.requires_grad_(True)
            if not local(p).is_contiguous():
                raise DowserError("SparseAdamW needs contiguous weights")
        return masked

    def bind(self, model: nn.Module | None = None) -> SparseAdamW:
        """Follow `model`'s masked weights after a wrapper replaced them (FSDP2's fully_shard).

        Sharding swaps every parameter for a DTensor holding a block of rows; the optimizer's
        parameter groups are updated by the wrapper, the mask's indices and gradient hooks by
        this call, which cuts each mask like its weight. Without `model`, each masked weight
        is found where it was in the parameter groups (wrappers replace parameters in place
        there); `step` and `load_state_dict` do that by themselves, but call it before the
        first backward so that the hooks zero frozen gradients before clipping sees them.
        Binding again to the same parameters changes nothing.
        """
        if model is None:
            groups = self.param_groups
            masked = {n: groups[g]["params"][k] for n, (g, k) in self._slots.items()}
        else:
            masked = self._masked(model)
        held = {id(p) for g in self.param_groups for p in g["params"]}
        lacking = [n for n, p in masked.items() if id(p) not in held]
        if len(masked) - len(lacking) < len(self._index):
            raise DowserError(
                f"SparseAdamW.bind: the optimizer no longer holds the model's {lacking[0]}; "
                "bind it to the model it was made for, once wrapped"
            )
        current = all(id(p) in self._index for p in masked.values() if id(p) in held)
        if current and (self._hooks or not self.mask_grads or not self._index):
            return self  # already bound to these parameters
        if any(self.state.values()):
            raise DowserError("SparseAdamW.bind: call it before the first optimizer step")
        self._bind(masked)
        return self

    def _bind(self, masked: dict[str, nn.Parameter]) -> None:
        # masked weights left out of every parameter group are not trained
        where = {
            id(p): (g, k)
            for g, group in enumerate(self.param_groups)
            for k, p in enumerate(group["params"])
        }
        self.remove_hooks()
        self._index = {}
        self._slots = {}  # name -> (group, position): where a wrapper puts its replacement
        for n, p in masked.items():
            if id(p) not in where:
                continue
            self._slots[n] = where[id(p)]
            part = shard_like(self.mask[n], p)  # this rank's block of the mask
            flat = part.reshape(-1).nonzero().squeeze(1)
            dtype = torch.int32 if part.numel() < 2**31 else torch.int64
            self._index[id(p)] = flat.to(dtype=dtype)
            if self.mask_grads:
                hook = _keep_only(self._index[id(p)])
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def remove_hooks(self) -> None:
        """Remove the gradient hooks that `mask_grads=True` registered on the model."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def is_sparse(self, p: torch.Tensor) -> bool:
        """Whether `p` is updated on its mask's trainable entries only."""
        return id(p) in self._index

    def step(self, closure=None):
        """One AdamW step (see module doc)."""
        # no_grad inside, not as a decorator: mutation testing skips decorated functions
        with torch.no_grad():
            return self._step(closure)

    def _step(self, closure=None):
        held = {id(p) for g in self.param_groups for p in g["params"]}
        if not held.issuperset(self._index):
            # a wrapper replaced the masked weights (FSDP2, or torch's distributed checkpoint
            # initialising state with a zero step): follow them where they were in the groups
            self.bind()
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
            self._init_state(p, local(p.detach()).reshape(-1)[idx.to(local(p).device).long()])
            state["idx"] = idx
        # stored int32 (4 bytes); kernels want int64, made one weight at a time
        flat = local(p.detach()).view(-1)
        idx = state["idx"].to(flat.device).long()
        grad = local(p.grad).reshape(-1).index_select(0, idx).float()
        p.grad = None  # the dense gradient is no longer needed
        x = state["master"] if "master" in state else flat.index_select(0, idx)
        _adamw(x, grad, state, group)
        flat.index_copy_(0, idx, x.to(p.dtype))

    def _dense_step(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        data = local(p.detach())  # a sharded weight: this rank's block, state for it only
        if "exp_avg" not in state:
            self._init_state(p, data)
        grad = local(p.grad).float()
        if "master" in state:
            x = state["master"]
            _adamw(x, grad, state, group)
            data.copy_(x)
        else:
            _adamw(data, grad, state, group)

    def state_dict(self) -> dict:
        """As torch's; for row-sharded weights (FSDP2), the state of the whole weight.

        Sparse state is gathered from every rank (idx as flat indices into the whole
        weight), dense state becomes DTensors, so a checkpoint engine that saves one full
        copy (FSDP's FULL_STATE_DICT) keeps everything. With sharded weights this is a
        collective: every rank must call it. Unsharded: exactly torch's.
        """
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in enumerate(params):  # torch numbers parameters in group order
            saved = sd["state"].get(i)
            if not saved or not isinstance(p, DTensor):
                continue
            saved = dict(saved)  # torch's dict holds the live state tensors: do not touch them
            if "idx" in saved:
                idx = saved["idx"].long() + flat_offset(p)
                whole = gather_blocks(idx, p)
                saved["idx"] = whole.to(torch.int32 if p.numel() < 2**31 else torch.int64)
                for key in _FLOAT_STATE:
                    if key in saved:
                        saved[key] = gather_blocks(saved[key], p)
            else:
                for key in _FLOAT_STATE:
                    if key in saved:
                        saved[key] = DTensor.from_local(
                            saved[key],
                            p.device_mesh,
                            p.placements,
                            shape=p.shape,
                            stride=p.stride(),
                        )
            sd["state"][i] = saved
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps fp32 state fp32 and indices integer for any weight dtype,
        and takes this rank's block of a row-sharded weight's whole state (`state_dict`).
        Weights a wrapper replaced since the optimizer was made are followed first (`bind`)."""
        self.bind()
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        states = dict(state_dict["state"])
        for pid, p in zip(saved_ids, params, strict=True):
            if states.get(pid) and isinstance(p, DTensor):
                states[pid] = _local_state(dict(states[pid]), p)
        super().load_state_dict({**state_dict, "state": states})
        for pid, p in zip(saved_ids, params, strict=True):
            saved = states.get(pid, {})
            for key in _FLOAT_STATE:
                if key in saved:
                    self.state[p][key] = saved[key].to(device=local(p).device, dtype=torch.float32)
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


def _local_state(saved: dict, p: DTensor) -> dict:
    """This rank's block of the whole-weight state that `SparseAdamW.state_dict` wrote."""
    if "idx" in saved:
        idx = saved["idx"].long()
        start = flat_offset(p)
        keep = (idx >= start) & (idx < start + local(p).numel())
        saved["idx"] = idx[keep] - start
        for key in _FLOAT_STATE:
            if key in saved:
                saved[key] = saved[key][keep.to(saved[key].device)]
        return saved
    for key in _FLOAT_STATE:
        value = saved.get(key)
        if isinstance(value, DTensor):
            saved[key] = value.to_local()
        elif isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(p.shape):
            saved[key] = shard_like(value, p)  # a whole tensor from a full state dict
    return saved


def _keep_only(idx: torch.Tensor):
    """A gradient hook that keeps the entries at flat indices `idx` and zeroes the rest."""

    def hook(p: torch.Tensor) -> None:
        flat = local(p.grad).view(-1)
        i = idx.to(flat.device).long()  # no-op unless the model moved after construction
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
