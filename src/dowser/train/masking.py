"""Which parameters train, and gradient masking (the reference's way of freezing entries).

`prepare_model` sets `requires_grad`: True for every masked weight and, by default, for the
norms of the decoder layers the mask reaches (the reference trains those densely); False
for everything else (embeddings, vision tower, projector, untouched layers, biases).

`mask_gradients` then zeroes the gradient of every frozen entry with a tensor hook, as the
reference does. Zero gradients alone do not keep a weight still: AdamW's decoupled weight
decay (p <- p (1 - lr wd)) moves every entry, and so does momentum left over from earlier
steps. `GradientMask.attach(optimizer)` closes that gap: around each optimizer step it puts
the frozen entries back exactly as they were (one transient copy of the masked weights per
step), so frozen entries stay bit-identical whatever the optimizer and its settings.
"""

from __future__ import annotations

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.mask import Mask
from dowser.targets import find_decoder_layers
from dowser.train.distributed import local, shard_like


def masked_parameters(model: nn.Module, mask: Mask) -> dict[str, nn.Parameter]:
    """The model's parameters named in `mask`, after checking names and shapes."""
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in mask if n not in params]
    if missing:
        raise DowserError(
            f"the mask names {len(missing)} weights this model does not have (e.g. {missing[0]}); "
            "it was built for another model"
        )
    for n, m in mask.items():
        if tuple(params[n].shape) != tuple(m.shape):
            raise DowserError(
                f"mask for {n} has shape {tuple(m.shape)}, the model's weight {tuple(params[n].shape)}"
            )
    return {n: params[n] for n in mask}


def tuned_norms(model: nn.Module, mask: Mask) -> dict[str, nn.Parameter]:
    """Parameters of normalisation layers inside the decoder layers that `mask` reaches."""
    dec = find_decoder_layers(model)
    layers = {mask.info[n].get("layer") for n in mask} - {None}
    if dec is None or not layers:
        return {}
    path, blocks = dec
    out = {}
    for i in sorted(layers):
        if i >= len(blocks):
            continue
        for mname, module in blocks[i].named_modules():
            if "norm" not in type(module).__name__.lower():
                continue
            for pname, p in module.named_parameters(recurse=False):
                out[".".join(x for x in (path, str(i), mname, pname) if x)] = p
    return out


def prepare_model(model: nn.Module, mask: Mask, *, train_norms: bool = True) -> dict[str, bool]:
    """Set requires_grad for sparse fine-tuning; return the previous flags (name -> bool).

    True: the masked weights (their trainable entries learn) and, with `train_norms`, the
    norms of the decoder layers the mask reaches (trained densely, as the reference).
    False: every other parameter.
    """
    masked = masked_parameters(model, mask)
    dense = tuned_norms(model, mask) if train_norms else {}
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*masked.values(), *dense.values()]:
        p.requires_grad_(True)
    return before


class GradientMask:
    """Handle of `mask_gradients`: hooks that zero frozen entries' gradients.

    Use as a context manager, or call `remove()`; both remove every hook and restore the
    previous requires_grad flags.
    """

    def __init__(self, model: nn.Module, mask: Mask, *, train_norms: bool = True):
        self.model = model
        self.mask = mask
        self._flags = prepare_model(model, mask, train_norms=train_norms)
        self._grad_hooks: list = []
        self._handles: list = []  # optimizer hooks
        self._attached: list = []  # the optimizers they are on
        self._saved: list[torch.Tensor] | None = None
        self.bind(model)

    def bind(self, model: nn.Module) -> GradientMask:
        """Hook `model`'s masked weights again after a wrapper replaced them (FSDP2).

        Each weight's frozen mask is cut like the weight (a sharded weight: this rank's
        block of rows), so hooks and the restore step work on the local part only.
        """
        self.params = masked_parameters(model, self.mask)
        # bool masks on each weight's device, 1 byte per entry as the reference keeps; the
        # frozen one is kept inverted so the hook is a single masked_fill
        self._frozen = {n: ~shard_like(self.mask[n], p) for n, p in self.params.items()}
        for h in self._grad_hooks:
            h.remove()
        self._grad_hooks = [
            p.register_post_accumulate_grad_hook(self._zero_frozen(n))
            for n, p in self.params.items()
        ]
        return self

    def frozen(self, name: str, device: torch.device) -> torch.Tensor:
        """The frozen-entry mask of weight `name` (its local part) on `device` (moved once if
        the model moved, e.g. when the Trainer puts it on the GPU after the hooks were made)."""
        m = self._frozen[name]
        if m.device != device:
            m = self._frozen[name] = m.to(device)
        return m

    def _zero_frozen(self, name: str):
        # After accumulation, in place on p.grad: no new gradient-sized tensor per backward,
        # and idempotent under gradient accumulation.
        def hook(p: torch.Tensor) -> None:
            g = local(p.grad)
            g.masked_fill_(self.frozen(name, g.device), 0)

        return hook

    def attach(self, optimizer: torch.optim.Optimizer) -> GradientMask:
        """Keep frozen entries bit-identical through `optimizer.step()` (see module doc).

        Adam and AdamW without weight decay need nothing: a gradient that was zero from the
        first step leaves both moments, and so the update, exactly zero. Any other optimizer
        or setting gets the save-and-restore hooks.
        """
        if _moves_only_with_gradient(optimizer, self.params.values()):
            return self
        if any(o is optimizer for o in self._attached):
            return self  # attached already (a second train() call)
        self._attached.append(optimizer)
        self._handles.append(optimizer.register_step_pre_hook(self._save))
        self._handles.append(optimizer.register_step_post_hook(self._restore))
        return self

    def _save(self, optimizer, args, kwargs) -> None:
        self._saved = [local(p.detach()).clone() for p in self.params.values()]  # detached

    def _restore(self, optimizer, args, kwargs) -> None:
        if self._saved is None:
            return
        with torch.no_grad():  # a block, not a decorator: mutation testing skips those
            for (n, p), old in zip(self.params.items(), self._saved, strict=True):
                x = local(p.detach())
                x.copy_(torch.where(self.frozen(n, x.device), old, x))
        self._saved = None

    def swap(self, mask: Mask, optimizer: torch.optim.Optimizer | None = None) -> GradientMask:
        """Train `mask`'s entries from now on (masks refreshed during training).

        `mask` must cover the same weights as the current one. Entries trained so far keep
        their values. The optimizer's per-entry state (Adam's moments: every state tensor
        shaped like the weight) is zeroed at the entries `mask` freezes, so Adam without
        weight decay leaves them exactly still, as for entries frozen from the start; entries
        that become trainable start from zero moments (at the optimizer's current step).
        """
        if set(mask) != set(self.mask):
            raise DowserError(
                "a swapped-in mask must cover the same weights as the current one "
                f"({len(mask)} against {len(self.mask)} weights)"
            )
        masked_parameters(self.model, mask)  # shapes checked before anything changes
        self.mask = mask
        self.bind(self.model)
        if optimizer is not None:
            with torch.no_grad():
                for n, p in self.params.items():
                    for v in optimizer.state.get(p, {}).values():
                        x = local(v) if isinstance(v, torch.Tensor) else None
                        if x is not None and x.shape == local(p).shape:
                            x.masked_fill_(self.frozen(n, x.device), 0)
        return self

    def remove(self) -> None:
        """Remove all hooks and restore the requires_grad flags from before."""
        for h in [*self._grad_hooks, *self._handles]:
            h.remove()
        self._grad_hooks.clear()
        self._handles.clear()
        self._attached.clear()
        for n, p in self.model.named_parameters():
            if n in self._flags:
                p.requires_grad_(self._flags[n])

    def __enter__(self) -> GradientMask:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _moves_only_with_gradient(optimizer: torch.optim.Optimizer, params) -> bool:
    """True for Adam/AdamW whose groups holding `params` have no weight decay."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    ids = {id(p) for p in params}
    return all(
        g.get("weight_decay", 0) == 0
        for g in optimizer.param_groups
        if any(id(p) in ids for p in g["params"])
    )


def mask_gradients(model: nn.Module, mask: Mask, *, train_norms: bool = True) -> GradientMask:
    """Freeze by gradient masking (reference): only the mask's trainable entries learn.

    Sets requires_grad as `prepare_model`, and zeroes the gradient of every frozen entry of
    the masked weights with a hook that runs after each gradient accumulation (so it works
    with gradient accumulation and checkpointing, and before any optimizer or clipping). With weight decay > 0 or a momentum
    optimizer, frozen entries would still move: call `.attach(optimizer)` to keep them exact.

        with dowser.mask_gradients(model, mask) as gm:
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
            gm.attach(opt)
            ...train...
    """
    return GradientMask(model, mask, train_norms=train_norms)
