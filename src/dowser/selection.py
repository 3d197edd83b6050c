"""Which scored weights a mask covers, and the groups its ratio applies to.

`targets` names module types of the decoder ("attn", "mlp", "other"), groups ("decoder",
"lm_head", "encoder"/"vision", "projector"), "all", or is a regex over parameter names;
`last_layers` keeps the last N decoder layers; the scope groups what is left.
"""

from __future__ import annotations

import re

from torch import nn

from dowser.errors import DowserError
from dowser.scores import Scores
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
