"""Helpers the merges share: which tensors to process (pairs, tied weights), exact counts,
working dtypes, seeds and argument checks (conventions: `dowser.baselines.merging`)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor

from dowser.errors import DowserError


def pairs(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    names: Iterable[str] | None,
    *,
    any_shape: bool = False,
) -> Iterator[tuple[tuple[str, ...], Tensor, Tensor, bool]]:
    """(names, W_pre on W_ft's device/dtype, W_ft, process?) per distinct fine-tuned tensor.

    `names` holds every selected name whose fine-tuned tensor is this one (several for tied
    weights), sorted: the first stands for them all. Every name is checked first; then the
    base tensors are converted one at a time as the caller asks for the next, so no second
    copy of the whole model is held. process is False for non-floating tensors and, unless
    named explicitly (or any_shape), for tensors with fewer than 2 dimensions: those are
    returned fine-tuned.
    """
    explicit = names is not None
    if isinstance(names, str):
        names = [names]  # a lone name, not its characters
    candidates = list(dict.fromkeys(names)) if explicit else [n for n in tuned if n in base]
    groups: dict[tuple, list[str]] = {}
    for name in candidates:
        if name not in tuned or name not in base:
            where = "the fine-tuned" if name not in tuned else "the base"
            raise DowserError(f"{name!r} is not in {where} tensors; check `names`")
        w_ft, w_pre = tuned[name], base[name]
        if tuple(w_pre.shape) != tuple(w_ft.shape):
            raise DowserError(
                f"shape mismatch for {name!r}: base {tuple(w_pre.shape)} vs fine-tuned "
                f"{tuple(w_ft.shape)}; base and tuned must come from the same architecture"
            )
        groups.setdefault(identity(w_ft), []).append(name)
    return converted(base, tuned, [sorted(g) for g in groups.values()], explicit, any_shape)


def converted(
    base: Mapping[str, Tensor],
    tuned: Mapping[str, Tensor],
    groups: list[list[str]],
    explicit: bool,
    any_shape: bool,
) -> Iterator[tuple[tuple[str, ...], Tensor, Tensor, bool]]:
    """The generator behind `pairs`, after its checks."""
    for group in groups:
        w_ft = tuned[group[0]]
        w_pre = base[group[0]].to(device=w_ft.device, dtype=w_ft.dtype)
        for other in group[1:]:
            b = base[other]
            if identity(b) != identity(base[group[0]]) and not torch.equal(
                b.to(device=w_ft.device, dtype=w_ft.dtype), w_pre
            ):
                raise DowserError(
                    f"{group[0]!r} and {other!r} are one fine-tuned tensor (tied weights) but "
                    "their base tensors differ; merge them separately (clone one of them)"
                )
        if not explicit and torch.equal(w_pre, w_ft):
            continue  # default: only tensors the fine-tune changed
        process = w_ft.is_floating_point() and (explicit or any_shape or w_ft.dim() >= 2)
        yield tuple(group), w_pre, w_ft, process
        del w_pre  # the caller holds it until it asks for the next one, no longer


def identity(t: Tensor) -> tuple:
    """Equal for two tensors exactly when they view the same memory the same way (tied
    weights); tensors without ordinary memory (empty, sparse, meta) are only themselves."""
    if t.layout != torch.strided or t.numel() == 0 or t.device.type == "meta":
        return ("object", id(t))
    return (
        t.device,
        t.dtype,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        tuple(t.shape),
        t.stride(),
    )


def top_k(score: Tensor, k: int) -> Tensor:
    """Bool mask of the k largest scores; ties at the threshold go to lower flat indices."""
    flat = score.reshape(-1)
    n = flat.numel()
    if k <= 0 or k >= n:
        return torch.full_like(score, k > 0, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    above = flat > threshold
    tied = flat == threshold
    room = k - above.sum()  # how many of the tied entries still fit, in index order
    keep = above | (tied & (torch.cumsum(tied, 0) <= room))
    return keep.reshape(score.shape)


def count(fraction: float, numel: int) -> int:
    """round(fraction * numel), halves up (Python's round() sends 2.5 to 2), as dowser.mask."""
    return int(math.floor(fraction * numel + 0.5))


def work_dtype(t: Tensor) -> torch.dtype:
    """float32 for half-precision weights (deltas lose bits in bf16), else their own."""
    return torch.promote_types(t.dtype, torch.float32)


def seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"dare:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def fraction(x: float, what: str, *, low_open: bool, high_open: bool, hint: str) -> float:
    """Check 0 (<)<= x (<)<= 1 and return it as a float; DowserError naming `what` otherwise."""
    ok = is_number(x) and math.isfinite(x)
    ok = ok and (x > 0 if low_open else x >= 0) and (x < 1 if high_open else x <= 1)
    if not ok:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise DowserError(f"{what}={x!r} is outside {interval}; {hint}")
    return float(x)
