"""Magnitude grafting: keep the largest fine-tuning changes, revert the rest."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from dowser.baselines.merging.common import count, fraction, pairs, top_k, work_dtype


def graft(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    *,
    keep: float = 0.1,
    names: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Magnitude grafting: keep the largest fine-tuning changes, revert every other entry.

    Per tensor with k = round(keep * numel):

        delta = W_ft - W_pre
        M     = the k entries with the largest |delta| (ties: lower flat index first)
        W     = W_ft on M, W_pre elsewhere (bit-exact copies of both)

    The grafting paper can also learn M; this is its magnitude initialisation, the usual
    post-hoc baseline.

    Args:
        base: name -> pretrained tensor W_pre.
        tuned: name -> fine-tuned tensor W_ft (same shapes); sets dtype and device of outputs.
        keep: fraction in (0, 1] of each tensor's entries left fine-tuned.
        names: tensors to process (see the module doc for the default).

    Returns:
        name -> merged tensor, for every selected name.
    """
    keep = fraction(keep, "keep", low_open=True, high_open=False, hint="e.g. 0.1")
    out = {}
    for group, w_pre, w_ft, process in pairs(base, tuned, names):
        if not process:
            out.update((n, tuned[n]) for n in group)
            continue
        work = work_dtype(w_ft)
        magnitude = (w_ft.to(work) - w_pre.to(work)).abs()
        kept = top_k(magnitude, count(keep, w_ft.numel()))
        out.update(dict.fromkeys(group, torch.where(kept, w_ft, w_pre)))
    return out
