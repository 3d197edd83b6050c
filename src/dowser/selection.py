"""Which scored weights a mask covers, and the groups its ratio applies to.

`targets` names module types of the decoder ("attn", "mlp", "other"), groups ("decoder",
"lm_head", "encoder"/"vision", "projector"), "all", or is a regex over parameter names;
`last_layers` keeps the last N decoder layers; the scope groups what is left. Entries that
earlier masks trained (`exclude`) are taken out of the candidates, and a group left with too
few candidates for its count is refused (`excluded_entries`, `check_room`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.fingerprint import parameter_values
from dowser.ranking import round_half_up
from dowser.scores import Scores, _describe
from dowser.targets import find_decoder_layers

KINDS = ("attn", "mlp", "other")
GROUP_WORDS = {
    "decoder": "decoder",
    "lm_head": "lm_head",
    "encoder": "encoder",
    "vision": "encoder",
    "projector": "projector",
}


def select_weights(scores: Scores, targets: str) -> list[str]:
    """The scored weights `targets` names (module types, groups, "all", or a regex)."""
    words = [w.strip() for w in targets.split(",") if w.strip()]
    if words and all(w in KINDS or w in GROUP_WORDS or w == "all" for w in words):

        def wanted(t) -> bool:
            return (
                "all" in words
                or (t.group == "decoder" and (t.kind in words or "decoder" in words))
                or any(GROUP_WORDS.get(w) == t.group and w != "decoder" for w in words)
            )

        names = [n for n, t in scores.targets.items() if wanted(t)]
    else:
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise DowserError(
                f"targets={targets!r} is neither module types nor a regex: {e}"
            ) from None
        names = [n for n in scores.names if pattern.search(n)]
    if not names:
        raise DowserError(
            f"targets={targets!r} selects none of the {len(scores)} scored weights; use "
            f"attn, mlp, decoder, lm_head, encoder, projector, all, or a regex over names "
            f"such as {scores.names[0]!r}"
        )
    return names


def last_layers_only(model: nn.Module, scores: Scores, names: list[str], n: int) -> list[str]:
    """`names` without the decoder weights outside the last `n` decoder layers."""
    dec = find_decoder_layers(model)
    if dec is None:
        raise DowserError("last_layers needs a model with a decoder layer stack")
    depth = len(dec[1])
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= depth:
        raise DowserError(f"last_layers={n!r}: the decoder has {depth} layers; use 1..{depth}")
    keep = []
    for name in names:
        t = scores.targets[name]
        if t.group != "decoder" or t.layer >= depth - n:
            keep.append(name)
    return keep


def rank_groups(scores: Scores, names: list[str], scope: str) -> list[list[str]]:
    """The groups the update ratio applies to, for `scope` (see `dowser.mask`)."""
    if scope in ("tensor", "row"):
        return [[n] for n in names]
    if scope == "global":
        return [names]
    by_layer: dict[object, list[str]] = {}
    for n in names:
        t = scores.targets[n]
        key = ("layer", t.layer) if t.group == "decoder" else ("tensor", n)
        by_layer.setdefault(key, []).append(n)
    return list(by_layer.values())


def check_ratio(update_ratio: float) -> float:
    """`update_ratio` as a float, refused unless a finite number in (0, 1]."""
    ok = isinstance(update_ratio, (int, float)) and not isinstance(update_ratio, bool)
    if not ok or not math.isfinite(update_ratio) or not 0 < update_ratio <= 1:
        raise DowserError(
            f"update ratio {update_ratio!r} is outside (0, 1]: it is the fraction of each "
            "matrix left trainable, e.g. 0.1"
        )
    return float(update_ratio)


def excluded_entries(
    model: nn.Module, masks: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str]
) -> dict[str, torch.Tensor]:
    """name -> bool tensor of the entries trainable in any of `masks` (their union, on the CPU),
    for those of `names` some mask covers, in the order of `names`.

    Every mask must fit `model` by names and shapes; values are not compared, since the model
    is usually a fine-tune of the one an earlier mask was built for. A mask may cover weights
    outside `names`: those entries are simply no candidates of the new mask anyway.
    """
    params = parameter_values(model)
    union: dict[str, torch.Tensor] = {}
    for i, mask in enumerate(masks, 1):
        missing = [n for n in mask if n not in params]
        shapes = [n for n in mask if n in params and mask[n].shape != params[n].shape]
        problem = _describe(missing, shapes, [])
        if problem:
            raise DowserError(
                f"excluded mask {i} of {len(masks)} was built for another model: {problem}; "
                "exclude masks built for this model or a fine-tune of it"
            )
        for n, m in mask.items():
            m = m.cpu()
            union[n] = union[n] | m if n in union else m  # never changed in place
    return {n: union[n] for n in names if n in union}


def check_room(
    scores: Scores,
    groups: list[list[str]],
    excluded: Mapping[str, torch.Tensor],
    ratio: float,
    scope: str,
    structure: str,
) -> None:
    """Refuse a group with fewer non-excluded candidates than the count its ratio asks for.

    The count is the one without exclusion: round(ratio * size), where size is the group's
    entries ("tensor", "layer", "global"), each output row's entries ("row" scope), or the
    matrix's rows or columns ("row"/"column" structure, where a line holding any excluded
    entry is no candidate: it cannot train whole).
    """
    short: list[tuple[str, int, str, int, float]] = []  # (label, need, unit, free, max ratio)
    for group in groups:
        if not any(n in excluded for n in group):
            continue
        label = group[0] if len(group) == 1 else f"the group of {group[0]} ({len(group)} matrices)"
        if scope == "row" or structure != "entry":
            (name,) = group
            frozen = excluded[name].T if scores.targets[name].transposed else excluded[name]
            if scope == "row":  # (d_out, d_in): every row needs its own count
                size, unit = frozen.shape[1], "entries of a row"
                free = size - int(frozen.sum(1).max())
            else:
                lines = frozen.any(1 if structure == "row" else 0)
                size, unit, free = lines.numel(), f"{structure}s", int((~lines).sum())
        else:
            size = sum(math.prod(scores.shapes[n]) for n in group)
            free = size - sum(int(excluded[n].sum()) for n in group if n in excluded)
            unit = "entries"
        need = round_half_up(ratio * size)
        if need > free:
            short.append((label, need, unit, free, math.floor(1e4 * free / size) / 1e4))
    if short:  # name the first; the fix must fit them all
        label, need, unit, free, _ = short[0]
        most = min(s[-1] for s in short)  # rounded down to 4 decimals: still fits
        fix = f"use update_ratio <= {most:g}"
        if most == 0:
            fix = "exclude fewer masks, or leave these matrices out of the targets"
        others = f" (and {len(short) - 1} more matrices)" if len(short) > 1 else ""
        raise DowserError(
            f"{label}{others}: update_ratio={ratio:g} trains {need} {unit} but the excluded "
            f"masks leave only {free} free; {fix}"
        )


def exclusion_record(
    masks: Sequence[Mapping[str, torch.Tensor]], excluded: Mapping[str, torch.Tensor]
) -> dict:
    """What a mask's metadata says about its exclusion: a 16-hex id of each excluded mask
    (sha256 of its names, shapes and bits) and the excluded entries per covered matrix."""
    ids = []
    for mask in masks:
        h = hashlib.sha256()
        for n, m in mask.items():
            h.update(repr((n, tuple(m.shape))).encode())
            h.update(m.reshape(-1).to(torch.uint8).cpu().numpy().tobytes())
        ids.append(h.hexdigest()[:16])
    return {"masks": ids, "entries": {n: int(m.sum()) for n, m in excluded.items()}}
