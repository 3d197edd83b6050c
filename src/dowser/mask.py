"""Masks: which entries of which weights may train (True) and which stay frozen (False).

`build_mask` makes the lowest-scoring `update_ratio` of each group trainable, the rest frozen
(important weights keep their pretrained values). Groups ("scope"):

- "tensor": each weight matrix (the reference);
- "row":    each output unit's row; this cancels ||J_i||, which is constant along a row, so the
            Jacobian term has no effect and the score ranks like Wanda's |W| |h|;
- "layer":  all selected matrices of one decoder layer together;
- "global": all selected matrices together.

`structure` "row" or "column" (tensor scope) trains whole output rows or input columns, the
ones with the lowest summed score: cheaper kernels and smaller deltas. `task_scores` (from
`dowser.task_gradients`) makes the mask task-aware: per matrix, the entries that matter little
upstream and much downstream train, ranked by `combine` (see `dowser.ranking.combine_task`).

Exactly round(update_ratio * numel) entries of a group are trainable (half rounds up; "row"
rounds per row). Ties are broken by position: an earlier matrix (model order), then a lower
flat index, is trainable first. With this strict order a smaller ratio's trainable set always
lies inside a larger one's.

`exclude` (masks of earlier tasks) keeps every entry they trained frozen: the count stays
round(update_ratio * numel) of the whole group, chosen by the same order among the entries no
excluded mask trained; a group with fewer such entries is refused (use a smaller ratio).
With structure "row" or "column" a line holding any excluded entry is no candidate.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.fingerprint import mismatches
from dowser.io import PathLike, corrupt, load_safetensors, save_safetensors
from dowser.ranking import (
    COMBINES,
    combine_task,
    lowest_k,
    lowest_lines,
    lowest_per_row,
    round_half_up,
)
from dowser.scores import Scores, _describe
from dowser.selection import (
    check_ratio,
    check_room,
    excluded_entries,
    exclusion_record,
    last_layers_only,
    rank_groups,
    select_weights,
)
from dowser.version import __version__

SCOPES = ("tensor", "row", "layer", "global")
STRUCTURES = ("entry", "row", "column")
FORMAT = 1
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class Mask(Mapping[str, torch.Tensor]):
    """Parameter name -> bool tensor of the parameter's shape (True = trainable).

    Build one with `build_mask`, or from any dict of bool tensors: `Mask({"w": t})`.
    Parameters absent from the mask are not covered by it (the trainer freezes them).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        meta: dict | None = None,
        info: Mapping[str, dict] | None = None,
        fingerprints: Mapping[str, str] | None = None,
    ):
        self._tensors: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.bool:
                raise DowserError(f"mask entry {name!r} must be a bool tensor (True = trainable)")
            self._tensors[name] = t
        self.meta = dict(meta or {})  # how it was built: ratio, scope, estimator, ...
        self.info = {n: dict((info or {}).get(n) or _guess_info(n)) for n in self._tensors}
        self.fingerprints = dict(fingerprints or {})  # of the weights it was built for

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        return f"Mask({len(self)} weights, {self.num_trainable():,}/{self.numel():,} trainable)"

    def numel(self) -> int:
        """Entries covered by the mask."""
        return sum(t.numel() for t in self._tensors.values())

    def num_trainable(self) -> int:
        """Entries the mask lets train."""
        return sum(int(t.sum()) for t in self._tensors.values())

    def stats(self) -> list[dict]:
        """Trainable and total counts per (layer, kind), in model order."""
        rows: dict[tuple, list[int]] = {}
        for name, t in self._tensors.items():
            key = (self.info[name].get("layer"), self.info[name].get("kind", "other"))
            row = rows.setdefault(key, [0, 0])
            row[0] += int(t.sum())
            row[1] += t.numel()
        return [
            {"layer": k[0], "kind": k[1], "trainable": v[0], "total": v[1]} for k, v in rows.items()
        ]

    def summary(self) -> str:
        """A table of trainable entries per layer and module type."""
        by_layer: dict[object, dict[str, tuple[int, int]]] = defaultdict(dict)
        kinds: list[str] = []
        for row in self.stats():
            by_layer[row["layer"]][row["kind"]] = (row["trainable"], row["total"])
            if row["kind"] not in kinds:
                kinds.append(row["kind"])
        head = f"{'layer':>7} " + "".join(f"{k:>22}" for k in kinds)
        lines = [head]
        for layer, cells in by_layer.items():
            label = "-" if layer is None else str(layer)
            line = f"{label:>7} "
            for k in kinds:
                tr, tot = cells.get(k, (0, 0))
                line += f"{_pct(tr, tot):>8} of {tot:>10,}" if tot else f"{'':>22}"
            lines.append(line)
        total = self.numel()
        lines.append(
            f"total: {self.num_trainable():,} of {total:,} trainable ({_pct(self.num_trainable(), total)}) in {len(self)} weights"
        )
        return "\n".join(lines)

    def check(self, model: nn.Module) -> None:
        """Raise DowserError unless `model` has these weights (names, shapes, fingerprints)."""
        shapes = {n: tuple(t.shape) for n, t in self._tensors.items()}
        expected = {n: self.fingerprints.get(n, "") for n in self._tensors}
        missing, wrong_shape, other = mismatches(expected, model, shapes)
        other = [n for n in other if self.fingerprints.get(n)]  # no fingerprint: names/shapes only
        problem = _describe(missing, wrong_shape, other)
        if problem:
            raise DowserError(
                f"this mask does not fit this model: {problem}; build the mask from scores of "
                "this model (`dowser probe` then `dowser mask`)"
            )

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the mask, bit-packed, with its metadata to a safetensors file (atomically)."""
        tensors = {name: _pack(t) for name, t in self._tensors.items()}
        meta = {
            **self.meta,
            "kind": "mask",
            "format": FORMAT,
            "shapes": {n: list(t.shape) for n, t in self._tensors.items()},
            "info": self.info,
            "fingerprints": self.fingerprints,
        }
        return save_safetensors(tensors, path, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: PathLike, model: nn.Module | None = None) -> Mask:
        """Read a mask written by `save`; with `model`, check that it fits."""
        tensors, meta = load_safetensors(path, kind="mask")
        if meta.get("format") != FORMAT:
            raise DowserError(f"{path}: mask format {meta.get('format')} is not supported")
        try:
            shapes = meta.pop("shapes")
            unpacked = {n: _unpack(tensors[n], list(shapes[n])) for n in shapes}
            info, fingerprints = dict(meta.pop("info")), dict(meta.pop("fingerprints"))
            mask = cls(unpacked, meta=meta, info=info, fingerprints=fingerprints)
        except (KeyError, RuntimeError, TypeError, AttributeError, ValueError) as e:
            raise corrupt(path, e) from None
        if model is not None:
            mask.check(model)
        return mask


def build_mask(
    model: nn.Module,
    scores: Scores,
    *,
    update_ratio: float = 0.1,
    targets: str = "attn,mlp",
    last_layers: int | None = None,
    scope: str = "tensor",
    structure: str = "entry",
    task_scores: Scores | None = None,
    combine: str = "split",
    pool: float = 2.0,
    exclude: Sequence[Mask] = (),
) -> Mask:
    """Freeze the important weights: the lowest-scoring `update_ratio` of each group trains.

    Args:
        model: the probed model (its weights give |W|; checked against the scores).
        scores: from `dowser.probe` or `Scores.load`.
        update_ratio: fraction in (0, 1] left trainable (rho; reference 0.1).
        targets: which scored weights to mask: "attn", "mlp", "other" (decoder matrices of
            that type), "decoder", "lm_head", "encoder"/"vision", "projector", "all", comma-
            separated; or a regex searched in parameter names.
        last_layers: only the last N decoder layers (reference: 20 of 32 for LLaVA-1.5-7B).
        scope: "tensor", "row", "layer" or "global" (see module doc).
        structure: "entry" (any entries), "row" or "column" (whole lines; tensor scope).
        task_scores: `dowser.task_gradients` of the fine-tuning data: a task-aware mask.
        combine: how task_scores and scores rank together: "split", "ratio" or "task".
        pool: for "split", the candidates are the pool * rho least important (>= 1; all
            entries when pool * rho >= 1).
        exclude: masks whose trainable entries must stay frozen (earlier tasks' masks; they
            must fit the model's names and shapes). The count per group is unchanged and
            ranked among the other entries; DowserError if too few remain (module doc).
    """
    ratio = check_ratio(update_ratio)
    _check_options(scope, structure, task_scores, combine)
    if isinstance(pool, bool) or not isinstance(pool, (int, float)) or not 1 <= pool < math.inf:
        raise DowserError(f"pool={pool!r}: use a number >= 1 (times the trainable count)")
    scores.bind(model)
    if task_scores is not None:
        task_scores.bind(model)
    names = select_weights(scores, targets)
    if last_layers is not None:
        names = last_layers_only(model, scores, names, last_layers)
    groups = rank_groups(scores, names, scope)
    exclude = [_as_mask(m) for m in exclude]
    excluded = excluded_entries(model, exclude, names)
    check_room(scores, groups, excluded, ratio, scope, structure)
    masks: dict[str, torch.Tensor] = {}
    for group in groups:
        if task_scores is not None or structure != "entry":
            (name,) = group
            masks[name] = _structured(
                scores, task_scores, name, ratio, structure, combine, pool, excluded.get(name)
            )
            continue
        if scope == "row":
            (name,) = group
            dense = _checked_dense(scores, name, excluded.get(name))
            masks[name] = lowest_per_row(dense, ratio, scores.targets[name].transposed)
            continue
        k = round_half_up(ratio * _numel(scores, group))
        if len(group) == 1:  # one matrix: form it once
            group_scores = [_checked_dense(scores, group[0], excluded.get(group[0]))]
        else:  # several: form each when needed, one at a time (see lowest_k)
            group_scores = [partial(_checked_dense, scores, n, excluded.get(n)) for n in group]
        masks.update(zip(group, lowest_k(group_scores, k), strict=True))

    # A group too small for the ratio (k = 0) stays wholly frozen; in "layer" or "global"
    # scope a matrix may legitimately get no trainable entry, which is the ranking's choice.
    def group_size(g: list[str]) -> int:  # what the ratio is applied to
        return scores.targets[g[0]].in_features if scope == "row" else _numel(scores, g)

    empty = [n for g in groups for n in g if round_half_up(ratio * group_size(g)) == 0]
    if empty:
        warnings.warn(
            f"update_ratio={ratio} is too small to leave any entry of {len(empty)} of "
            f"{len(masks)} matrices trainable (e.g. {empty[0]}); they stay frozen",
            stacklevel=2,
        )
    masks = {n: masks[n] for n in scores.names if n in masks}  # model order
    meta = {
        "dowser_version": __version__,
        "update_ratio": ratio,
        "targets": targets,
        "last_layers": last_layers,
        "scope": scope,
        "estimator": scores.meta.get("estimator"),
        "weight_power": scores.weight_power,
        "structure": structure,
    }
    if task_scores is not None:
        meta |= {
            "combine": combine,
            "pool": pool,
            "task_estimator": task_scores.meta.get("estimator"),
            "task_examples": task_scores.meta.get("num_samples"),
        }
    if exclude:
        meta["exclude"] = exclusion_record(exclude, excluded)
    info = {
        n: {"layer": t.layer, "kind": t.kind, "group": t.group}
        for n, t in scores.targets.items()
        if n in masks
    }
    fps = {n: scores.fingerprints[n] for n in masks}
    return Mask(masks, meta=meta, info=info, fingerprints=fps)


def _check_options(scope: str, structure: str, task_scores: Scores | None, combine: str) -> None:
    if scope not in SCOPES:
        raise DowserError(f"scope={scope!r}: choose one of {', '.join(SCOPES)}")
    if structure not in STRUCTURES:
        raise DowserError(f"structure={structure!r}: choose one of {', '.join(STRUCTURES)}")
    if combine not in COMBINES:
        raise DowserError(f"combine={combine!r}: choose one of {', '.join(COMBINES)}")
    if task_scores is not None and structure != "entry":
        raise DowserError("a task-aware mask picks entries: use structure='entry' with it")
    if (task_scores is not None or structure != "entry") and scope != "tensor":
        raise DowserError(
            f"scope={scope!r}: structured and task-aware masks rank within each matrix; "
            "use scope='tensor'"
        )


def _structured(
    scores: Scores,
    task_scores: Scores | None,
    name: str,
    ratio: float,
    structure: str,
    combine: str,
    pool: float,
    frozen: torch.Tensor | None = None,
) -> torch.Tensor:
    """One matrix's mask from whole lines, or from the upstream and task scores together;
    `frozen` entries (excluded) rank last in both."""
    up = _checked_dense(scores, name, frozen)
    transposed = scores.targets[name].transposed
    if task_scores is None:
        return lowest_lines(up, ratio, transposed, structure)
    if name not in task_scores:
        raise DowserError(
            f"the task gradients do not cover {name}: compute them for the same layers as "
            "the scores (task_gradients(model, batches, layers=...))"
        )
    k = round_half_up(ratio * up.numel())
    key = combine_task(up, _checked_dense(task_scores, name), k, combine, pool)
    if frozen is not None:  # "task" ignores S, so the key itself must rank them last
        key = key.masked_fill(frozen.to(key.device), math.inf)
    return lowest_k([key], k)[0]


def _numel(scores: Scores, group: list[str]) -> int:
    return sum(math.prod(scores.shapes[n]) for n in group)


def _checked_dense(scores: Scores, name: str, frozen: torch.Tensor | None = None) -> torch.Tensor:
    """S for `name`, refused unless finite and >= 0 (what the ranking assumes); +inf at the
    `frozen` entries, so they rank after every finite score (check_room keeps k below them)."""
    d = scores.dense(name)
    if not torch.isfinite(d).all():
        raise DowserError(
            f"scores for {name} hold NaN or inf (the weights or the probe overflowed); "
            "probe again in float32 (--dtype float32)"
        )
    if bool((d < 0).any()):
        raise DowserError(
            f"scores for {name} hold negative values (min {float(d.min()):.3g}); importance "
            "scores are >= 0 (e.g. |W| ||J|| |h|): give non-negative factors"
        )
    return d if frozen is None else d.masked_fill_(frozen.to(d.device), math.inf)


def _as_mask(mask: object) -> Mask:
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, Mapping):
        return Mask(mask)  # checks bool tensors
    raise DowserError(
        f"exclude takes masks (Mask.load(path)), not {type(mask).__name__}: load each file first"
    )


def _pack(t: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8, 8 entries a byte (most significant bit first)."""
    flat = t.reshape(-1).to(torch.uint8).cpu()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8) * _BITS).sum(1).to(torch.uint8)


def _unpack(packed: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (n + 7) // 8:
        raise RuntimeError("packed size does not match the recorded shape")
    bits = (packed[:, None] & _BITS) != 0
    return bits.reshape(-1)[:n].reshape(shape)


def _guess_info(name: str) -> dict:
    """Layer and kind from a parameter name, for masks built from a plain dict."""
    layers = re.findall(r"\.(\d+)\.", name)
    low = name.lower()
    kind = "attn" if ("attn" in low or "attention" in low) else "mlp" if "mlp" in low else "other"
    return {"layer": int(layers[-1]) if layers else None, "kind": kind}


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"
