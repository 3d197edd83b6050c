"""The one training loop every method goes through: same data order, schedule and steps.

AdamW without weight decay (the reference setting), a cosine schedule with 3 % linear
warm-up, loss on the answer tokens. What differs between methods is only which parameters the
optimizer gets and what is attached to it (a gradient mask, SPIDER's hooks), set up by the
caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import nn

WARMUP = 0.03  # fraction of the steps spent warming the learning rate up


class Examples(Protocol):
    """Encoded training data: `Encoded` (vision-language) or `SpeechEncoded` (speech)."""

    def __len__(self) -> int: ...

    def batch(self, rows: Sequence[int] | torch.Tensor) -> dict: ...


def train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    data: Examples,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    attach: Callable[[torch.optim.Optimizer], object] | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    desc: str = "fine-tuning",
    progress: bool = True,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> list[float]:
    """Train `params` of `model` on `data` for `steps` steps; return the loss of every step.

    Batches are drawn without replacement from a permutation of `data` seeded by `seed`, a
    fresh permutation each epoch. `attach(optimizer)` runs once the optimizer exists (to hook
    a mask or SPIDER onto it); a returned object with `remove()` is removed at the end.
    `loss_fn(model, batch)` gives the loss (default: `model(**batch).loss`).
    `on_step(done, optimizer)` runs after each step (`done` steps finished), e.g. to refresh
    a mask.
    """
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, round(WARMUP * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    handle = attach(opt) if attach is not None else None
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=gen)
    pos, losses = 0, []
    model.train()
    try:
        for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
            if pos + batch_size > len(order):
                order, pos = torch.randperm(len(data), generator=gen), 0
            rows = order[pos : pos + batch_size]
            pos += batch_size
            batch = to_device(data.batch(rows), device)
            loss = model(**batch).loss if loss_fn is None else loss_fn(model, batch)
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, opt)
    finally:
        if handle is not None and hasattr(handle, "remove"):
            handle.remove()
        model.eval()
    return losses


def to_device(batch: dict, device: torch.device) -> dict:
    """Tensors of `batch` (also inside tuples, e.g. encoder_outputs) moved to `device`."""

    def move(v):
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v

    return {k: move(v) for k, v in batch.items()}
