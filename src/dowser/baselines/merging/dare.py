"""DARE: drop each fine-tuning delta at random and rescale the survivors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from dowser.baselines.merging.common import fraction, pairs, seed_for, work_dtype


def dare(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    *,
    drop: float = 0.9,
    names: Iterable[str] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """DARE (Drop And REscale): randomly drop fine-tuning deltas and rescale the survivors.

    Per tensor, element-wise:

        delta  = W_ft - W_pre
        m_ij   ~ Bernoulli(1 - drop)                    (independent per entry)
        W_ij   = W_pre_ij + m_ij * delta_ij / (1 - drop)

    so E[W - W_pre] = delta (the rescale keeps the expected delta unbiased). Dropped entries are
    exactly W_pre; drop=0 returns the fine-tuned tensors unchanged.

    Args:
        base: name -> pretrained tensor W_pre.
        tuned: name -> fine-tuned tensor W_ft (same shapes); sets dtype and device of outputs.
        drop: probability p in [0, 1) of dropping each delta entry (DARE's default 0.9).
        names: tensors to process (see the module doc for the default).
        seed: the mask of a tensor depends only on (seed, name, shape): drawn on the CPU, so
            the same seed gives the same merged model on any device and in any name order
            (tied weights: one mask, see the module doc).

    Returns:
        name -> merged tensor, for every selected name.
    """
    p = fraction(drop, "drop", low_open=False, high_open=True, hint="e.g. 0.9")
    out = {}
    for group, w_pre, w_ft, process in pairs(base, tuned, names):
        if not process or p == 0.0:
            out.update((n, tuned[n]) for n in group)
            continue
        work = work_dtype(w_ft)
        delta = w_ft.to(work) - w_pre.to(work)
        g = torch.Generator().manual_seed(seed_for(seed, group[0]))
        survive = (torch.rand(w_ft.shape, generator=g) >= p).to(w_ft.device)
        rescaled = (w_pre.to(work) + delta / (1.0 - p)).to(w_ft.dtype)
        out.update(dict.fromkeys(group, torch.where(survive, rescaled, w_pre)))
    return out
