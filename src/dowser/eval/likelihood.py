"""Accuracy by candidate likelihood: the answer the model finds most probable, among a fixed set.

For example i and candidate answer c, the score is log p(c | prompt_i) summed over c's answer
tokens (end-of-answer token included, so "shirt" and "t-shirt" are told apart), with the text
built exactly as for training (`dowser.train.data.SupervisedDataset`). The prediction is the
arg-max over candidates; accuracy is the fraction predicted right.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.train.data import IGNORE, Collator, Example, SupervisedDataset


@torch.no_grad()
def candidate_logprobs(
    model: nn.Module,
    processor: Any,
    examples: Sequence[Example],
    candidates: Sequence[str],
    *,
    batch_size: int = 32,
    normalize: str = "sum",
) -> torch.Tensor:
    """(N, C) log-probabilities of each candidate answer after each example's prompt.

    Only the first turn's prompt of each example is used. `normalize="mean"` divides by the
    number of answer tokens instead of summing.
    """
    if normalize not in ("sum", "mean"):
        raise DowserError(f'normalize={normalize!r}: use "sum" or "mean"')
    pairs = [
        Example([(ex.turns[0][0], cand)], ex.image, ex.where)
        for ex in examples
        for cand in candidates
    ]
    data = SupervisedDataset(pairs, processor, max_length=1 << 20)
    tok = getattr(processor, "tokenizer", processor)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    collate = Collator(pad_token_id=pad)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores = []
    try:
        for start in range(0, len(data), batch_size):
            batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            dtype = next(model.parameters()).dtype
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            total = answer_logprobs(model, batch)
            per_row = (batch["labels"][:, 1:] != IGNORE).sum(1)
            if normalize == "mean":
                total = total / per_row.clamp_min(1)
            scores.append(total.cpu())
    finally:
        model.train(was_training)
    return torch.cat(scores).view(len(examples), len(candidates))


@torch.no_grad()
def answer_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) sum of log p(token) over each row's answer tokens (those whose label is not -100).

    `batch` holds the model inputs and `labels` (B, T), aligned with `input_ids`.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    # position t predicts token t + 1; only answer positions are normalised (the prompt and
    # image positions would cost a (B, T, V) float32 tensor)
    target = batch["labels"][:, 1:]
    keep = target != IGNORE
    rows = logits[:, :-1][keep].float()  # (answer tokens in batch, V)
    picked = rows.gather(1, target[keep][:, None]).squeeze(1) - rows.logsumexp(1)
    total = torch.zeros(len(target), device=picked.device)
    return total.index_add_(0, keep.nonzero()[:, 0], picked)


def candidate_accuracy(
    model: nn.Module,
    processor: Any,
    examples: Sequence[Example],
    candidates: Sequence[str],
    answers: Sequence[int],
    **kwargs: Any,
) -> float:
    """Fraction of examples whose most likely candidate is `candidates[answers[i]]`."""
    logp = candidate_logprobs(model, processor, examples, candidates, **kwargs)
    predicted = logp.argmax(1)
    return float((predicted == torch.as_tensor(answers)).float().mean())
