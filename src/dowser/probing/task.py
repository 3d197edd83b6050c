"""`dowser.task_gradients`: how much each weight entry matters to the downstream task.

A few batches of the user's fine-tuning data (with labels) give, per target weight,

    G_ij = (1 / B) sum_b |dL_b / dW_ij|          (d_out, d_in), float32   ("abs", default)
    G_ij = (1 / B) sum_b (dL_b / dW_ij)^2                                 ("fisher")

over batches b = 1..B, L_b the batch's mean training loss at the pretrained weights. Entries
with a large G are the ones the first optimizer steps would move most usefully. The result is a
`Scores` with no |W| factor (weight_power 0), so `dense(name)` is G itself, and `build_mask`
combines it with the upstream scores (see `dowser.mask`): train the entries that matter little
upstream and much downstream. The mask is still fixed before training; nothing is kept during
training. Cost: one forward and backward per batch, plus one float32 buffer per target weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from dowser.errors import DowserError
from dowser.fingerprint import model_fingerprints
from dowser.probing.synthetic import input_device, to_model
from dowser.scores import Factors, Scores
from dowser.targets import select_targets
from dowser.version import __version__

REDUCTIONS = ("abs", "fisher")


def task_gradients(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    layers: str | list[str] | None = None,
    include_lm_head: bool = True,
    reduction: str = "abs",
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    progress: bool = False,
) -> Scores:
    """Mean per-entry task-gradient magnitude of the target weights over `batches`.

    Args:
        model: the pretrained model (left unchanged: weights, requires_grad, .grad, mode).
        batches: keyword dicts for `model(**batch)` holding `labels` (the fine-tuning data).
        layers / include_lm_head: which weights, as `dowser.probe` (None: the decoder).
        reduction: "abs" (mean |g|) or "fisher" (mean g^2, the empirical Fisher diagonal).
        loss_fn: `loss_fn(model, batch)` -> scalar loss, instead of `model(**batch).loss`.
        progress: show a progress bar.

    Returns:
        Scores bound to `model` with weight_power 0: `dense(name)` is G, shape of the weight.
    """
    if reduction not in REDUCTIONS:
        raise DowserError(f"reduction={reduction!r}: choose one of {', '.join(REDUCTIONS)}")
    targets = select_targets(model, layers, include_lm_head=include_lm_head)
    params = dict(model.named_parameters())
    wanted = {t.param: params[t.param] for t in targets}
    sums = {n: torch.zeros(p.shape, dtype=torch.float32) for n, p in wanted.items()}
    # save what we change: which parameters train, their .grad, the mode
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    was_training = model.training
    device = input_device(model)
    count, examples = 0, 0
    try:
        model.eval()  # no dropout: the gradient of the model the mask is built for
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
        for p in wanted.values():
            p.requires_grad_(True)
        for batch in tqdm(batches, desc="task gradients", disable=not progress):
            if not isinstance(batch, dict) or "labels" not in batch:
                raise DowserError(
                    "task_gradients needs batches of keyword inputs with labels (the "
                    "fine-tuning data, as the model's training loss takes them)"
                )
            batch = to_model(batch, model, device)
            loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
            if loss is None or not torch.isfinite(loss):
                raise DowserError(
                    f"the task loss is {None if loss is None else float(loss)}: check the "
                    "labels (a batch with no supervised token gives NaN)"
                )
            loss.backward()
            for n, p in wanted.items():
                g = p.grad.detach().float().cpu()
                sums[n] += g.abs() if reduction == "abs" else g.square()
                p.grad = None
            count += 1
            examples += int(batch["labels"].shape[0])
    finally:
        model.train(was_training)
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
    if count == 0:
        raise DowserError("task_gradients got no batches: give at least one batch of task data")
    factors = {}
    for t in targets:
        g = sums[t.param] / count
        full = g.T.contiguous() if t.transposed else g  # factors are kept (d_out, d_in)
        ones = (torch.ones(1, t.out_features), torch.ones(1, t.in_features), torch.ones(1))
        factors[t.param] = Factors(*ones, full=full)
    meta = {
        "dowser_version": __version__,
        "estimator": f"task-gradient-{reduction}",
        "weight_power": 0.0,
        "num_batches": count,
        "num_samples": examples,
        "model_class": type(model).__name__,
    }
    fingerprints = model_fingerprints(model, list(wanted))
    return Scores(factors, {t.param: t for t in targets}, meta, fingerprints, model=model)
