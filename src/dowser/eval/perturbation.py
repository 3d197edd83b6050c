"""A training-free measure of how well a mask protects what the model knows.

For a mask M (True = trainable) only the trainable entries are perturbed,

    relative:  W' = W + sigma * |W| * eps * M         eps ~ N(0, 1) per entry, fresh per draw
    absolute:  W' = W + sigma * rms(W) * eps * M      one scale per matrix

and the change of the model's next-token distributions is measured on held-out data,

    KL = mean over sequences and valid positions t of KL( p_W(. | x_<t) || p_W'(. | x_<t) ).

A better importance estimate leaves the entries the outputs depend on frozen, so at the same
ratio its mask keeps this KL smaller. Relative noise moves each entry by a fraction of
itself (it favours masks of small weights by construction); absolute noise moves every
trainable entry of a matrix by the same amount, as Adam's normalised steps roughly do, so it
measures only where the outputs are sensitive. Weights are restored bit for bit after each
draw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from dowser.mask import Mask
from dowser.probing.synthetic import input_device, to_model
from dowser.train.masking import masked_parameters


@dataclass
class Perturbation:
    """KL of the perturbed model from the original: mean and one value per draw."""

    kl: float  # mean over draws
    per_draw: list[float]

    @property
    def se(self) -> float:
        """Standard error of the mean over draws (0 for one draw)."""
        n = len(self.per_draw)
        if n < 2:
            return 0.0
        return float(torch.tensor(self.per_draw).std().item()) / n**0.5


@torch.no_grad()
def perturbation_kl(
    model: nn.Module,
    mask: Mask,
    batches: Iterable[dict],
    *,
    sigma: float = 1.0,
    draws: int = 4,
    seed: int = 0,
    noise: str = "relative",
) -> Perturbation:
    """KL of next-token distributions after noise on the mask's trainable entries (module doc).

    The base model's log-probs at the valid positions are kept on the CPU (tokens x vocab
    floats): use a few hundred sequences for large vocabularies.

    Args:
        model: a causal LM (outputs with `.logits`, (B, T, V)); left unchanged.
        mask: which entries are perturbed (its trainable ones).
        batches: held-out model inputs; positions with attention_mask 0 are left out.
        sigma: noise scale, relative to |W| or to the matrix's rms (`noise`).
        noise: "relative" or "absolute" (module doc).
        draws: independent noise draws; the result averages them.
        seed: seeds the noise (draw d uses seed + d).
    """
    if noise not in ("relative", "absolute"):
        raise ValueError(f"noise={noise!r}: choose relative or absolute")
    if draws < 1:
        raise ValueError(f"draws={draws}: at least one noise draw")
    device = input_device(model)
    batches = [
        to_model({k: v for k, v in b.items() if k != "labels"}, model, device) for b in batches
    ]
    params = masked_parameters(model, mask)
    was_training = model.training
    model.eval()
    try:
        # the base model's log-probs at valid positions, kept on the CPU
        base = [_valid_logprobs(model, b).cpu() for b in batches]
        per_draw = []
        for d in range(draws):
            g = torch.Generator().manual_seed(seed + d)
            saved = []
            try:
                for name, p in params.items():
                    keep = mask[name].to(p.device)
                    old = p[keep].clone()
                    saved.append((p, keep, old))
                    eps = torch.randn(old.shape, generator=g).to(device=p.device, dtype=old.dtype)
                    scale = old.abs() if noise == "relative" else p.float().square().mean().sqrt()
                    p[keep] = old + sigma * scale.to(old.dtype) * eps
                total, count = 0.0, 0
                for b, logp in zip(batches, base, strict=True):
                    logq = _valid_logprobs(model, b).cpu()
                    # 0 * log 0 is 0: positions the base model rules out add nothing
                    terms = torch.where(logp.isfinite(), logp.exp() * (logp - logq), 0.0)
                    total += float(terms.sum())
                    count += logp.shape[0]
            finally:
                for p, keep, old in reversed(saved):  # tied weights: first saved is original
                    p[keep] = old
            per_draw.append(total / max(count, 1))
    finally:
        model.train(was_training)
    return Perturbation(float(sum(per_draw) / len(per_draw)), per_draw)


def _valid_logprobs(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-token log-probs at the batch's valid positions, (N, V) float32."""
    logp = torch.log_softmax(model(**batch).logits.float(), -1)
    valid = batch.get("attention_mask")
    if valid is None:
        return logp.reshape(-1, logp.shape[-1])
    return logp[valid.to(logp.device).bool()]
