"""Model Tailor: keep the entries with the best salience/sensitivity fusion, revert the rest,
compensate (OBS) with the input covariance of each layer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from dowser.baselines.merging.common import count, fraction, is_number, pairs, top_k, work_dtype
from dowser.errors import DowserError


def model_tailor(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    hessians: Mapping[str, Tensor],
    *,
    keep: float = 0.1,
    block: int = 128,
    damp: float = 0.01,
    alpha: float = 0.8,
    names: Iterable[str] | None = None,
    compensate: bool = True,
) -> dict[str, Tensor]:
    """Model Tailor: keep the most useful fine-tuned entries, revert the rest, compensate.

    Per 2-D weight W (d_out x d_in) with a Hessian H (d_in x d_in), delta = W_ft - W_pre:

    1. Damping and inverse factor. Input features whose H_jj = 0 (never active) get H_jj = 1,
       then H <- H + damp * mean(diag H) * I, and U = chol(H^-1) is the upper Cholesky factor
       (H^-1 = U^T U).
    2. Score, within blocks of `block` columns [b, b + block), each z-scored per row over the
       block's columns (z(x)_rj = (x_rj - mean_j x_rj) / std_j x_rj, population std, 0 where
       a row is constant):

           S = alpha * z(|delta|) + (1 - alpha) * z(W_ft^2 / U_jj^2)

       the first term is the salience of the fine-tuning change, the second the OBS
       sensitivity of the fine-tuned weight (W^2 / [H^-1]_jj after earlier columns are fixed).
    3. Mask: the k = round(keep * numel) highest scores of the whole tensor stay fine-tuned
       (ties: lower flat index first); every other entry is reverted to W_pre.
    4. Compensation (OBS / SparseGPT, columns left to right): minimise ||(W - W_ft) X||^2 given
       the reverted entries. At column c, every reverted entry (r, c) has its current delta
       (including compensation it received from earlier columns) set to 0, and the error

           err_r = delta_rc / U_cc,    delta_rj -= err_r * U_cj   for every j > c

       flows into the not-yet-processed columns of its row. Columns are processed in blocks
       of `block` (inside a block column by column; the block's errors reach later columns
       in one matrix product), which gives the same result as one column at a time.
       Finally kept entries are W_ft + (the compensation they absorbed) and reverted entries
       are exactly W_pre. With compensate=False step 4 is skipped (plain reverting).

    Selected tensors that are not 2-D or have no entry in `hessians` are returned fine-tuned.
    Math runs in float32 (float64 for float64 weights) on the fine-tuned tensor's device.
    Tied weights are merged once, with the sum of their names' Hessians (module doc).

    Args:
        base: name -> pretrained tensor W_pre.
        tuned: name -> fine-tuned tensor W_ft (same shapes); sets dtype and device of outputs.
        hessians: weight name -> H = 2 X X^T / n of that layer's inputs on task data, e.g.
            `InputCovariance(...).hessians()`. Weights must be laid out (d_out x d_in) as in
            nn.Linear (transposed layouts such as GPT-2's Conv1D are not supported).
        keep: fraction in (0, 1] of each weight's entries left fine-tuned (paper: 0.1).
        block: columns per score block and per compensation block (paper: 128).
        damp: diagonal damping as a fraction of mean(diag H), >= 0 (paper: 0.01).
        alpha: weight of the salience term in [0, 1] (paper: 0.8).
        names: tensors to process (default: every name whose tensors differ).
        compensate: run the OBS compensation (step 4).

    Returns:
        name -> merged tensor, for every selected name.
    """
    keep = fraction(keep, "keep", low_open=True, high_open=False, hint="e.g. 0.1")
    alpha = fraction(alpha, "alpha", low_open=False, high_open=False, hint="e.g. 0.8")
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise DowserError(f"block={block!r} must be a positive integer (columns per block)")
    if not is_number(damp) or not math.isfinite(damp) or damp < 0:
        raise DowserError(f"damp={damp!r} must be a finite number >= 0, e.g. 0.01")
    out = {}
    for group, w_pre, w_ft, process in pairs(base, tuned, names, any_shape=True):
        given = [n for n in group if hessians.get(n) is not None]
        if not process or w_ft.dim() != 2 or not given:
            out.update((n, tuned[n]) for n in group)
            continue
        d_in = w_ft.shape[1]
        for n in given:
            if tuple(hessians[n].shape) != (d_in, d_in):
                raise DowserError(
                    f"Hessian of {n!r} is {tuple(hessians[n].shape)} but the weight "
                    f"{tuple(w_ft.shape)} needs ({d_in}, {d_in}) = (d_in, d_in)"
                )
        h, where = hessians[given[0]], dict(device=w_ft.device, dtype=work_dtype(w_ft))
        for n in given[1:]:  # a tied weight read by several layers: both outputs count
            h = h.to(**where) + hessians[n].to(**where)
        merged = _tailor(given[0], w_pre, w_ft, h, keep, block, damp, alpha, compensate)
        out.update(dict.fromkeys(group, merged))
    return out


def _tailor(
    name: str,
    w_pre: Tensor,
    w_ft: Tensor,
    h: Tensor,
    keep: float,
    block: int,
    damp: float,
    alpha: float,
    compensate: bool,
) -> Tensor:
    work = work_dtype(w_ft)
    ft = w_ft.to(work)
    delta = ft - w_pre.to(work)
    u = _inverse_cholesky(name, h.to(device=w_ft.device, dtype=work), damp)
    score = _tailor_score(delta, ft, u.diagonal(), alpha, block)
    kept = top_k(score, count(keep, w_ft.numel()))
    if compensate:
        ft = ft + _compensation(delta, kept, u, block)
    return torch.where(kept, ft.to(w_ft.dtype), w_pre)


def _inverse_cholesky(name: str, h: Tensor, damp: float) -> Tensor:
    """Upper U with H^-1 = U^T U, after the dead-input fix and damping (step 1)."""
    if not torch.isfinite(h).all():
        raise DowserError(f"Hessian of {name!r} holds NaN or inf; collect it in float32")
    h = h.clone()
    diag = h.diagonal()  # a view: edits below change h
    diag[diag == 0] = 1.0  # an input that is always 0: its weights never matter, any pivot does
    diag.add_(damp * diag.mean())
    lower, info = torch.linalg.cholesky_ex(h)
    if info == 0:
        u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
    if info != 0:
        raise DowserError(
            f"Hessian of {name!r} is not positive definite after damping {damp}; raise damp "
            "(e.g. 0.01) or collect it on more tokens"
        )
    return u


def _zscore_rows(x: Tensor) -> Tensor:
    """Per-row z-score over the columns of x; a constant row scores 0."""
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True, correction=0)
    return torch.where(std > 0, (x - mean) / std, torch.zeros_like(x))


def _tailor_score(delta: Tensor, ft: Tensor, u_diag: Tensor, alpha: float, block: int) -> Tensor:
    """S = alpha z(|delta|) + (1 - alpha) z(W_ft^2 / U_jj^2), z per row within each block."""
    sensitivity = ft.square() / u_diag.square()[None, :]
    score = torch.empty_like(delta)
    for b in range(0, delta.shape[1], block):
        cols = slice(b, b + block)
        salience_z = _zscore_rows(delta[:, cols].abs())
        score[:, cols] = alpha * salience_z + (1 - alpha) * _zscore_rows(sensitivity[:, cols])
    return score


def _compensation(delta: Tensor, kept: Tensor, u: Tensor, block: int) -> Tensor:
    """What each entry absorbs from the OBS updates of the reverted entries (step 4).

    Tracks comp (d_out x d_in) with current delta = delta + comp; meaningful on kept entries
    (reverted ones end at W_pre whatever comp holds there). Exactly 0 where no entry to its
    left in the row is reverted, so keep=1 returns W_ft bit-exactly.
    """
    d_in = delta.shape[1]
    revert = ~kept
    comp = torch.zeros_like(delta)
    for b in range(0, d_in, block):
        e = min(b + block, d_in)
        cur = delta[:, b:e] + comp[:, b:e]  # current deltas of this block's columns
        errs = torch.zeros_like(cur)  # err_r for each column of the block
        for i in range(e - b):
            c = b + i
            err = torch.where(revert[:, c], cur[:, i] / u[c, c], torch.zeros_like(cur[:, i]))
            cur[:, i + 1 :] -= err[:, None] * u[c, c + 1 : e][None, :]  # j > c inside the block
            errs[:, i] = err
        comp[:, b:e] = cur - delta[:, b:e]
        comp[:, e:] -= errs @ u[b:e, e:]  # j >= e: the whole block's errors in one product
    return comp
