"""An oracle for `dowser.probe`'s default ("mean-abs") estimator that shares no code with it.

Plain autograd on the model as it is: forward hooks only record each target's input h and
output z, and `torch.autograd.grad` differentiates the probe scalar with respect to the z's.
Nothing from `dowser.probing` is imported (no `last_logits`, `rademacher`, `TokenMask`,
`reference_probe`): the positions, probes, token masks and normalisations are written out here
from the documented contract, so a slip in the package's helpers cannot hide in the oracle.

Contract, per batch of B samples and K probes (xi_k in {-1, +1}^(B, V), drawn in order from
`torch.Generator().manual_seed(seed)` as randint(0, 2) * 2 - 1, one (B, V) tensor per probe):

    f     = logits at each sample's last position whose attention mask is 1    (B, V)
    g_k   = d((xi_k * f).sum() / B) / dz                                        (B, T, d_out)
    psi   = sum_k sum_valid |g_k| / (K * valid tokens)                          (d_out,)
    a     = sum_valid |h| / valid tokens                                        (d_in,)

"valid" = attention-mask 1 (the decoder's in an encoder-decoder) for language-decoder and head
layers; every row for the others (vision, encoder). The head's psi is 1. The score is
S = |W| * mean over batches of psi a^T (every batch has K probes, so equal weights).

The "rms" estimator (`rms=True`): g_k = d((xi_k * f).sum()) / dz (no 1/B), and one pair
pooled over every batch: psi = sqrt(sum_batches sum_k sum_valid g_k^2 / (K * valid tokens of
all batches)), a = sum_batches sum_valid |h| / valid tokens of all batches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """For each row, the largest t with mask[b, t] == 1 (a Python loop: obviously right)."""
    return torch.tensor([max(t for t in range(len(row)) if row[t]) for row in mask.tolist()])


def default_f(outputs, batch: dict) -> torch.Tensor:
    """Logits at each sample's last valid position, (B, V) float32."""
    logits = outputs.logits
    mask = batch.get("decoder_attention_mask", batch.get("attention_mask"))
    if mask is None or tuple(mask.shape) != tuple(logits.shape[:2]):
        last = torch.full((logits.shape[0],), logits.shape[1] - 1)
    else:
        last = _last_positions(mask)
    return logits[torch.arange(logits.shape[0]), last].float()


def _masked_mean(x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(sum over valid rows of x, count): x is (B, T, d) with valid (B, T), or any rows."""
    if valid is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(valid.shape):
        keep = valid.bool()
        return x[keep].double().sum(0), int(keep.sum())
    rows = x.reshape(-1, x.shape[-1]).double()
    return rows.sum(0), rows.shape[0]


def oracle_mean_abs(
    model: nn.Module,
    batches: list[dict],
    groups: dict[str, str],
    *,
    num_probes: int,
    seed: int,
    f_of: Callable = default_f,
    rms: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module name -> (psi, a) stacked over batches, (n_batches, d_out) and (n_batches, d_in);
    with `rms`, one pooled pair, (1, d_out) and (1, d_in) (module doc).

    `groups` maps each target module to its group ("decoder", "lm_head", "encoder", ...);
    sums are taken in float64 so that the oracle's own rounding is far below the tolerance.
    """
    modules = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    psis: dict[str, list] = {n: [] for n in groups}
    acts: dict[str, list] = {n: [] for n in groups}
    pooled = {n: [0.0, 0, 0.0, 0] for n in groups}  # rms: g^2 sum, count, |h| sum, count
    for batch in batches:
        seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = [
            modules[n].register_forward_hook(
                lambda mod, args, out, n=n, seen=seen: seen.__setitem__(n, (args[0], out))
            )
            for n in groups
        ]
        try:
            with torch.enable_grad():
                f = f_of(model(**batch), batch)
        finally:
            for h in handles:
                h.remove()
        text = batch.get("decoder_attention_mask", batch.get("attention_mask"))
        probed = [n for n in groups if groups[n] != "lm_head"]
        sums = {n: 0.0 for n in probed}
        counts = {n: 0 for n in probed}
        for _ in range(num_probes):
            xi = (torch.randint(0, 2, tuple(f.shape), generator=gen) * 2 - 1).float()
            scalar = (f * xi).sum() if rms else (f * xi).sum() / f.shape[0]
            outs = [seen[n][1] for n in probed]
            grads = torch.autograd.grad(scalar, outs, retain_graph=True, allow_unused=True)
            for n, z, g in zip(probed, outs, grads, strict=True):
                g = torch.zeros_like(z) if g is None else g
                valid = text if groups[n] == "decoder" else None
                s, c = _masked_mean(g.square() if rms else g.abs(), valid)
                sums[n] = sums[n] + s
                counts[n] += c
        for n in groups:
            h = seen[n][0].detach()
            valid = text if groups[n] in ("decoder", "lm_head") else None
            s, c = _masked_mean(h.abs(), valid)
            if rms:
                pooled[n][2], pooled[n][3] = pooled[n][2] + s, pooled[n][3] + c
                if n in sums:
                    pooled[n][0], pooled[n][1] = pooled[n][0] + sums[n], pooled[n][1] + counts[n]
                continue
            acts[n].append((s / c).float())
            if groups[n] == "lm_head":
                psis[n].append(torch.ones(seen[n][1].shape[-1]))
            else:
                psis[n].append((sums[n] / counts[n]).float())
    if rms:
        ones = {n: torch.ones(model.get_submodule(n).weight.shape[0]) for n in groups}
        return {
            n: (
                ones[n][None] if groups[n] == "lm_head" else (g / gn).sqrt().float()[None],
                (a / an).float()[None],
            )
            for n, (g, gn, a, an) in pooled.items()
        }
    return {n: (torch.stack(psis[n]), torch.stack(acts[n])) for n in groups}


def oracle_scores(model: nn.Module, factors: dict[str, tuple], params: dict[str, str]) -> dict:
    """param name -> S = |W| * mean_b psi_b a_b^T in the parameter's layout (Conv1D: d_in x d_out).

    `params` maps each parameter name to its module name.
    """
    weights = dict(model.named_parameters())
    modules = dict(model.named_modules())
    out = {}
    for pname, mname in params.items():
        psi, act = factors[mname]
        outer = (psi.double().T @ act.double() / psi.shape[0]).float()  # (d_out, d_in)
        w = weights[pname].detach().abs().float()
        # nn.Linear stores W as (d_out, d_in); GPT-2's Conv1D as (d_in, d_out)
        out[pname] = w * (outer if isinstance(modules[mname], nn.Linear) else outer.T)
    return out


def check_against_oracle(
    model, scores, batches, *, num_probes, seed, f_of=None, rms: bool = False
) -> None:
    """Every factor row and every dense score of `scores` equals the oracle's."""
    groups = {t.module: t.group for t in scores.targets.values()}
    kwargs = {} if f_of is None else {"f_of": f_of}
    ref = oracle_mean_abs(
        model, batches, groups, num_probes=num_probes, seed=seed, rms=rms, **kwargs
    )
    for name, t in scores.targets.items():
        f = scores.factors[name]
        psi, act = ref[t.module]
        torch.testing.assert_close(
            f.psi, psi, rtol=2e-5, atol=1e-7, msg=lambda m, n=name: f"psi of {n}: {m}"
        )
        torch.testing.assert_close(
            f.act, act, rtol=2e-5, atol=1e-7, msg=lambda m, n=name: f"act of {n}: {m}"
        )
        weight = torch.ones(1) if rms else torch.full((len(batches),), float(num_probes))
        assert torch.equal(f.weight, weight)
    dense = oracle_scores(model, ref, {n: t.module for n, t in scores.targets.items()})
    for name, s in dense.items():
        ours = scores.dense(name)
        torch.testing.assert_close(ours, s, rtol=5e-5, atol=1e-6 * float(s.abs().max()))
