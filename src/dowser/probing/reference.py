"""A plain implementation of the reference probing algorithm, for validation and benchmarks.

This is what the authors' scripts do, written out simply: for every probe a fresh forward
and a full backward with parameter gradients; the dense matrix psi[:, None] * |W| * a[None, :]
of every probed weight is folded into a running mean and variance (Welford) held in float32
on the host, two dense copies per matrix. `dowser.probe` computes the same mean from the same
probe vectors with one forward per batch, no parameter gradients and no dense matrices.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dowser.probing.capture import TokenMask, is_text_layer, text_mask
from dowser.probing.outputs import last_logits, rademacher
from dowser.probing.synthetic import to_model
from dowser.targets import Target


@torch.no_grad()
def _update(mean: torch.Tensor, m2: torch.Tensor, x: torch.Tensor, n: int) -> None:
    """Welford: fold the n-th observation x into the running mean and sum of squares."""
    delta = x - mean
    mean.add_(delta / n)
    m2.add_(delta * (x - mean))


def reference_probe(
    model: nn.Module,
    batches: Iterable[dict],
    targets: list[Target],
    *,
    num_probes: int = 8,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Mean over (batch, probe) of psi |W| a for each target, as dense float32 host tensors.

    Draws the probe vectors in the same order as `dowser.probe(..., batches=..., seed=seed)`
    with the "mean-abs" estimator, so the two results must agree.
    """
    generator = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters(remove_duplicate=False))
    device = next(model.parameters()).device
    mean = {t.param: torch.zeros(params[t.param].shape) for t in targets}
    m2 = {t.param: torch.zeros(params[t.param].shape) for t in targets}
    seen: dict[str, tuple] = {}

    def fwd_hook(name):
        def hook(module, args, output):
            seen[name] = (args[0].detach(),)

        return hook

    def bwd_hook(name):
        def hook(module, grad_input, grad_output):
            seen[name] = (*seen[name], grad_output[0].detach())

        return hook

    handles = []
    try:
        for t in targets:
            m = modules[t.module]
            handles.append(m.register_forward_hook(fwd_hook(t.module)))
            if t.group != "lm_head":
                handles.append(m.register_full_backward_hook(bwd_hook(t.module)))
        n = 0
        for batch in batches:
            batch = to_model(batch, model, device)
            tokens = TokenMask(text_mask(batch))
            for _ in range(num_probes):
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    f = last_logits(model(**batch), batch).float()
                    xi = rademacher(tuple(f.shape), generator).to(f.device)
                    ((f * xi).sum() / f.shape[0]).backward()  # parameter gradients too
                n += 1
                for t in targets:
                    h, *g = seen[t.module]
                    text = is_text_layer(t)
                    a_sum, a_n = tokens.sum(h.abs(), masked=text)
                    if t.group == "lm_head":
                        psi = torch.ones(t.out_features, device=a_sum.device)
                    else:
                        g_sum, g_n = tokens.sum(g[0].abs(), masked=text)
                        psi = g_sum / g_n
                    outer = psi[:, None] * (a_sum / a_n)[None, :]
                    w = params[t.param].detach().abs().float()
                    dense = w * (outer.T if t.transposed else outer)
                    _update(mean[t.param], m2[t.param], dense.cpu(), n)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return mean
