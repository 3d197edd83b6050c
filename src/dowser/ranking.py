"""Ranking score entries: the k lowest over many tensors (exact, deterministic, nested in k)
and the lowest fraction of each row. Torch only."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from dowser.errors import DowserError


def round_half_up(x: float) -> int:
    """round(x) with halves going up (Python's round() sends 2.5 to 2)."""
    return int(math.floor(x + 0.5))


ScoreSource = torch.Tensor | Callable[[], torch.Tensor]


def lowest_k(scores: Sequence[ScoreSource], k: int) -> list[torch.Tensor]:
    """Bool masks of the k smallest entries over all `scores` (non-negative floats).

    Order: by value, then earlier tensor, then lower flat index, so the result is
    deterministic and nested in k. The k-th value is found by a radix select over the
    float32 bit patterns (monotone for non-negative floats), never concatenating.

    `scores` may be tensors or functions returning them: a function is called once per pass
    (up to four times), so only one dense score matrix exists at a time and the extra memory
    is one byte per entry (the masks) however many matrices the group holds.
    """
    get = [s if callable(s) else (lambda s=s: s) for s in scores]
    # pass 1: histogram of the top 15 value bits (the sign bit is always 0)
    hist = torch.zeros(1 << 15, dtype=torch.long)
    for g in get:
        bits = float_bits(g()).reshape(-1)
        if bool((bits > _INF_BITS).any()):  # NaN has no place in the order
            raise DowserError("scores to rank hold NaN: rank finite (or +inf) scores only")
        hist += torch.bincount((bits >> 16).long(), minlength=1 << 15).cpu()
    if k <= 0 or k >= int(hist.sum()):
        return [torch.full(g().shape, k > 0, dtype=torch.bool) for g in get]
    # pass 2: the k-th value lies in the first bucket whose running count reaches k
    cum = hist.cumsum(0)
    bucket = int(torch.searchsorted(cum, torch.tensor(k)))
    below = int(cum[bucket - 1]) if bucket > 0 else 0
    parts = []
    for g in get:
        b = float_bits(g()).reshape(-1)
        parts.append(b[(b >> 16) == bucket].cpu())
    threshold = int(torch.kthvalue(torch.cat(parts), k - below).values)
    # pass 3: everything below the threshold; pass 4: ties at it, in position order
    masks = [float_bits(g()) < threshold for g in get]
    remaining = k - sum(int(m.sum()) for m in masks)
    for g, m in zip(get, masks, strict=True):
        if remaining <= 0:
            break
        tied = (float_bits(g()).reshape(-1) == threshold).nonzero().squeeze(1)[:remaining]
        m.view(-1)[tied.to(m.device)] = True
        remaining -= tied.numel()
    return masks


_INF_BITS = 0x7F800000  # +inf; larger patterns are NaN


def float_bits(s: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns as int32, ordered like the values, which must be >= 0 (a
    negative one would rank by its magnitude: refused; -0.0 ranks as 0.0)."""
    s = s.float().contiguous()
    if bool((s.view(torch.int32) < 0).any()):  # a sign bit set: -0.0, a negative or -NaN
        if bool((s < 0).any()):
            raise DowserError(
                f"scores to rank hold negative values (min {float(s.min()):.3g}): the "
                "ranking orders non-negative scores only"
            )
        s = s.abs()
    return s.view(torch.int32)


def lowest_per_row(score: torch.Tensor, ratio: float, transposed: bool) -> torch.Tensor:
    """Bool mask of the round(ratio * d_in) lowest entries of each output row of `score`
    (>= 0; stable: ties go to the lower index); `transposed`: `score` is (d_in, d_out)."""
    s = score.T if transposed else score  # rows = output units
    if bool(torch.isnan(s).any()) or bool((s < 0).any()):
        raise DowserError("scores to rank hold NaN or negative values: give scores >= 0")
    k = round_half_up(ratio * s.shape[1])
    order = torch.sort(s.float(), dim=1, stable=True).indices[:, :k]
    m = torch.zeros_like(s, dtype=torch.bool).scatter_(1, order, True)
    return m.T.contiguous() if transposed else m


COMBINES = ("ratio", "split", "task")


def combine_task(
    up: torch.Tensor, task: torch.Tensor, k: int, rule: str, pool: float = 2.0
) -> torch.Tensor:
    """A non-negative key whose k lowest entries are the task-aware mask's trainable ones.

    `up` is the upstream score S (low = unimportant to what the model knew), `task` the task
    gradient G (high = useful to the new task), both of one matrix's shape:

        "ratio": S / (G + eps), eps = 1e-3 mean(G): little upstream per unit of task use
        "split": among the pool * k lowest S, the k largest G (upstream first, then the task)
        "task":  the k largest G, ignoring S (the control: is the upstream score needed?)
    """
    task = task.float()
    if rule == "ratio":
        eps = 1e-3 * float(task.mean()) + 1e-30  # an entry with G = 0 must still rank
        return up.float() / (task + eps)
    top = float(task.max()) - task  # lowest = largest G
    if rule == "task":
        return top
    if rule == "split":
        candidates = lowest_k([up], min(round_half_up(pool * k), up.numel()))[0]
        return torch.where(candidates, top, torch.full_like(top, float("inf")))
    raise ValueError(f"unknown rule {rule!r}")


def lowest_lines(score: torch.Tensor, ratio: float, transposed: bool, axis: str) -> torch.Tensor:
    """Whole rows (output units) or columns (input features) with the lowest summed score:
    round(ratio * lines) of them trainable, every entry of a chosen line."""
    s = score.T if transposed else score  # (d_out, d_in)
    line = s.float().sum(1 if axis == "row" else 0)
    pick = lowest_k([line], round_half_up(ratio * line.numel()))[0]
    m = (pick[:, None] if axis == "row" else pick[None, :]).expand(s.shape)
    return (m.T if transposed else m).contiguous()


def soft_scale(score: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    """Per-entry update scale of a soft mask: within `pool` (bool, the trainable entries) the
    entry of rank r by score (0 = least important) of n gets 1 - r / n, everything else 0.

    The mean over the pool is about 1/2, so a pool of 2 rho of a matrix moves as much in
    total as a hard mask of rho at the same learning rate. Shape and device of `score`.
    """
    scale = torch.zeros(score.shape, dtype=torch.float32, device=score.device)
    values = score.float()[pool]
    n = values.numel()
    if n:
        order = torch.sort(values, stable=True).indices
        ranks = torch.empty_like(order)
        ranks[order] = torch.arange(n, device=order.device)
        scale[pool] = 1 - ranks.float() / n
    return scale
