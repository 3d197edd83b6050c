"""Mask baselines at the same ratio and on the same layers as Dowser's: random, magnitude, Wanda.

Each is a `Scores` object with a different importance, so `build_mask` selects the tensors,
counts and ties exactly as it does for Dowser:

    random:     S_ij ~ U(0, 1), seeded per weight
    magnitude:  S_ij = |W_ij|                         (psi = 1, a = 1)
    wanda:      S_ij = |W_ij| * ||h_j||_2             (psi = 1, a = root mean square of the input)

The lowest scores train, the highest stay frozen, as for Dowser. Wanda's activation norm is
taken over the tokens of `batches` (the user's data, or `dowser.probing.synthetic_batches`
for the data-free setting); the root mean square ranks like the norm within a weight.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.fingerprint import model_fingerprints
from dowser.mask import Mask, build_mask
from dowser.probing.capture import TokenMask, is_text_layer, text_mask
from dowser.probing.synthetic import to_model
from dowser.scores import Factors, Scores
from dowser.targets import Target, select_targets
from dowser.version import __version__


def _scores(model: nn.Module, targets: list[Target], factors: dict, estimator: str) -> Scores:
    meta = {
        "dowser_version": __version__,
        "estimator": estimator,
        "model_class": type(model).__name__,
    }
    fingerprints = model_fingerprints(model, [t.param for t in targets])
    return Scores(factors, {t.param: t for t in targets}, meta, fingerprints, model=model)


def _ones(t: Target) -> Factors:
    return Factors(torch.ones(1, t.out_features), torch.ones(1, t.in_features), torch.ones(1))


def magnitude_scores(model: nn.Module, layers: str | None = None) -> Scores:
    """S = |W| for the targets `layers` selects (see `dowser.targets.select_targets`)."""
    targets = select_targets(model, layers)
    return _scores(model, targets, {t.param: _ones(t) for t in targets}, "magnitude")


class RandomScores(Scores):
    """Uniform random scores, the same for a given seed and weight name."""

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed

    def save(self, path, *, overwrite: bool = False):
        """Refused: a file would hold only the factors, and would load as magnitude scores."""
        raise DowserError(
            "random scores are not saved: rebuild them (and their masks) from the seed with "
            f"random_scores(model, seed={self.seed}) or random_mask(model, seed={self.seed})"
        )

    def dense(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        shape = self.shapes[name]
        digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
        device = weight.device if weight is not None else self._params[name].device
        return torch.rand(shape, generator=g).to(device)


def random_scores(model: nn.Module, layers: str | None = None, *, seed: int = 0) -> Scores:
    """Random importance: masks built from it train a uniformly random subset."""
    targets = select_targets(model, layers)
    factors = {t.param: _ones(t) for t in targets}
    meta = {"dowser_version": __version__, "estimator": "random", "seed": seed}
    fingerprints = model_fingerprints(model, [t.param for t in targets])
    return RandomScores(
        factors, {t.param: t for t in targets}, meta, fingerprints, model=model, seed=seed
    )


@contextmanager
def _input_square_sums(model: nn.Module, targets: list[Target]) -> Iterator[dict]:
    """Forward hooks summing h^2 over tokens of each target's input; always removed."""
    modules = dict(model.named_modules())
    sums: dict[str, list] = {t.module: [0.0, 0] for t in targets}
    state = {"tokens": TokenMask()}
    handles = []

    def hook_for(t: Target):
        def hook(module, args, output):
            s, n = state["tokens"].sum(args[0].detach().float().pow(2), masked=is_text_layer(t))
            sums[t.module][0] = s + sums[t.module][0]
            sums[t.module][1] += n

        return hook

    try:
        for t in targets:
            handles.append(modules[t.module].register_forward_hook(hook_for(t)))
        yield {"sums": sums, "state": state}
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def wanda_scores(model: nn.Module, batches: Iterable[dict], layers: str | None = None) -> Scores:
    """S = |W| * ||h||_2 per input feature, over the tokens of `batches` (padding excluded)."""
    targets = select_targets(model, layers)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _input_square_sums(model, targets) as rec:
            for batch in batches:
                batch = to_model(batch, model, device)
                rec["state"]["tokens"] = TokenMask(text_mask(batch))
                model(**batch)
    finally:
        model.train(was_training)
    factors = {}
    for t in targets:
        total, n = rec["sums"][t.module]
        act = torch.as_tensor(total, dtype=torch.float32).cpu() / max(n, 1)
        factors[t.param] = Factors(torch.ones(1, t.out_features), act.sqrt()[None], torch.ones(1))
    return _scores(model, targets, factors, "wanda")


def random_mask(model: nn.Module, *, seed: int = 0, **mask_kwargs) -> Mask:
    """A uniformly random mask; `mask_kwargs` as `dowser.build_mask` (update_ratio, ...)."""
    return build_mask(model, random_scores(model, seed=seed), **mask_kwargs)


def magnitude_mask(model: nn.Module, **mask_kwargs) -> Mask:
    """Freeze the largest-magnitude weights; `mask_kwargs` as `dowser.build_mask`."""
    return build_mask(model, magnitude_scores(model), **mask_kwargs)


def wanda_mask(model: nn.Module, batches: Iterable[dict], **mask_kwargs) -> Mask:
    """Freeze the weights with the largest |W| * ||h||; `mask_kwargs` as `dowser.build_mask`."""
    return build_mask(model, wanda_scores(model, batches), **mask_kwargs)
