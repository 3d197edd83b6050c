"""Sparse deltas trained independently from one base, merged onto it (`dowser merge-deltas`).

Delta k (see `dowser.train.artifacts`) holds the fine-tuned values v_k of the entries it
trained, plus whole dense tensors (tuned norms: every entry counts as written). `merge_deltas`
writes them all onto the base b they were trained from, entry by entry:

- an entry exactly one delta writes gets that delta's value bit for bit, as `apply_delta`
  writes it; so deltas on disjoint entries merge exactly, in any order (`apply_delta` itself
  refuses a second delta on the first one's output when both touch one tensor: that
  tensor's digest no longer matches);
- an entry K >= 2 deltas write gets, by `overlap`:

      "sum":    b + sum_k (v_k - b)           (task arithmetic: the changes add up)
      "mean":   b + (1/K) sum_k (v_k - b)     (the changes' average)
      "refuse": a DowserError naming the first such tensor and how many entries overlap

  computed in float64 from the base's and the deltas' own values and rounded once to the
  weight's dtype (`round_once`).

Every delta is checked against the base exactly as `apply_delta` checks it (`checked_delta`),
all of them before anything is written, so a refused merge leaves the model as it was.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.io import PathLike, check_outside_inputs, read_metadata
from dowser.train.artifacts import checked_delta

OVERLAPS = ("sum", "mean", "refuse")

Part = tuple[int, torch.Tensor, torch.Tensor]  # (delta number, flat indices, values)


def merge_deltas(base: nn.Module, deltas: Sequence[PathLike], *, overlap: str = "sum") -> dict:
    """Apply several deltas trained from `base` onto it, in place (rule: module doc).

    Returns a report: "rule" (`overlap`), "deltas" (per delta, in order: "path", "entries"
    written, "tensors" touched), "tensors" (name -> {"entries": distinct entries written,
    "overlap": entries written by two or more deltas}, model order) and the totals "entries"
    and "overlap". DowserError, with the model unchanged, if a delta does not fit `base`, a
    path is given twice, or `overlap` is "refuse" and two deltas write one entry.
    """
    if overlap not in OVERLAPS:
        raise DowserError(f"overlap={overlap!r}: choose one of {', '.join(OVERLAPS)}")
    paths = [Path(d) for d in deltas]
    if not paths:
        raise DowserError("no delta to merge: give at least one delta file")
    seen: set[Path] = set()
    for path in paths:
        if path.resolve() in seen:
            raise DowserError(f"{path} is given twice; give each delta once")
        seen.add(path.resolve())
    params = dict(base.named_parameters(remove_duplicate=False))
    parts: dict[str, list[Part]] = {name: [] for name in params}  # model order
    report_deltas = []
    for k, path in enumerate(paths):  # every check before any write
        tensors, sparse, dense = checked_delta(base, path)
        for name in sparse:
            idx = tensors[f"{name}::indices"].long()
            parts[name].append((k, idx, tensors[f"{name}::values"]))
        for name in dense:
            values = tensors[f"{name}::dense"].reshape(-1)
            parts[name].append((k, torch.arange(values.numel()), values))
        written = sum(len(tensors[f"{n}::values"]) for n in sparse)
        written += sum(tensors[f"{n}::dense"].numel() for n in dense)
        report_deltas.append(
            {"path": str(path), "entries": written, "tensors": len(sparse) + len(dense)}
        )
    parts = {name: p for name, p in parts.items() if p}
    plans = {name: _plan(params[name].numel(), p) for name, p in parts.items()}
    if overlap == "refuse":
        _refuse_overlap(paths, parts, plans)
    with torch.no_grad():
        for name, p in parts.items():
            _write(params[name], p, *plans[name][:2], overlap)
    tensors_report = {
        name: {"entries": entries, "overlap": int(pos.numel())}
        for name, (pos, _, entries) in plans.items()
    }
    return {
        "rule": overlap,
        "deltas": report_deltas,
        "tensors": tensors_report,
        "entries": sum(t["entries"] for t in tensors_report.values()),
        "overlap": sum(t["overlap"] for t in tensors_report.values()),
    }


def round_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 `x` rounded to nearest-even in `dtype` by a single rounding.

    torch casts float64 to bfloat16/float16 through float32, two roundings that can land on
    the wrong neighbour near a tie. Rounding to float32 "to odd" first (an inexact result
    with an even last bit moves one step towards x) makes the second rounding exact: float32
    has more than two bits beyond either 16-bit format.
    """
    if dtype in (torch.float64, torch.float32) or not dtype.is_floating_point:
        return x.to(dtype)
    y = x.float()
    inexact = y.double() != x
    even = (y.view(torch.int32) & 1) == 0
    toward = torch.where(x > y.double(), math.inf, -math.inf).float()
    return torch.where(inexact & even, torch.nextafter(y, toward), y).to(dtype)


def _plan(numel: int, parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sorted flat indices written by several parts, how many write each, entries written)."""
    count = torch.zeros(numel, dtype=torch.int32)
    for _, idx, _ in parts:
        count.index_add_(0, idx, torch.ones(len(idx), dtype=torch.int32))
    pos = (count > 1).nonzero().squeeze(1)
    return pos, count[pos], int((count > 0).sum())


def _refuse_overlap(paths: list[Path], parts: dict[str, list[Part]], plans: dict) -> None:
    """overlap="refuse": DowserError at the first tensor (model order) two deltas share."""
    for name, (pos, _, _) in plans.items():
        if pos.numel():
            who = [str(paths[k]) for k, idx, _ in parts[name] if _hits(pos, idx).any()]
            raise DowserError(
                f"{pos.numel()} entries of {name} are written by {' and '.join(who[:2])}"
                f"{' and others' if len(who) > 2 else ''}; with --overlap refuse the deltas must "
                "train disjoint entries (build later masks with --exclude, or use --overlap sum)"
            )


def _hits(pos: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Bool per entry of `idx`: is it in `pos` (sorted)?"""
    if not pos.numel():
        return torch.zeros(len(idx), dtype=torch.bool)
    j = torch.searchsorted(pos, idx).clamp_(max=len(pos) - 1)
    return pos[j] == idx


def _write(
    p: torch.Tensor, parts: list[Part], pos: torch.Tensor, count: torch.Tensor, rule: str
) -> None:
    """One tensor: single-writer entries copied, shared ones combined by `rule`."""
    flat, dev = p.view(-1), p.device
    if pos.numel():  # read the base before writing anything to this tensor
        b = flat[pos.to(dev)].double().cpu()
        change = torch.zeros(len(pos), dtype=torch.float64)
        for _, idx, values in parts:
            hit = _hits(pos, idx)
            j = torch.searchsorted(pos, idx[hit])
            change.index_add_(0, j, values[hit].double().cpu() - b[j])
        if rule == "mean":
            change /= count.double()
        merged = round_once(b + change, p.dtype)
    for _, idx, values in parts:
        single = ~_hits(pos, idx)
        flat.index_copy_(0, idx[single].to(dev), values[single].to(device=dev, dtype=p.dtype))
    if pos.numel():
        flat.index_copy_(0, pos.to(dev), merged.to(dev))


def run_merge_deltas(args: argparse.Namespace) -> Path:
    """`dowser merge-deltas`: merge deltas onto their base checkpoint and save the result."""
    from dowser.hf import load_model
    from dowser.train.artifacts import save_merged

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a directory")
    inputs = {"base checkpoint": args.base}
    inputs |= {f"delta {i}": d for i, d in enumerate(args.deltas, 1)}
    check_outside_inputs(out, inputs)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DowserError(f"{out} exists and is not empty; pass --overwrite to replace its files")
    for d in args.deltas:  # a missing or wrong file fails before the model loads
        read_metadata(d, kind="delta")
    model, tokenizer, processor = load_model(
        args.base, dtype="auto", trust_remote_code=args.trust_remote_code
    )
    report = merge_deltas(model, args.deltas, overlap=args.overlap)
    save_merged(model, out, preprocessors=[processor or tokenizer], source_dir=args.base)
    for d in report["deltas"]:
        print(f"{d['path']}: {d['entries']:,} entries of {d['tensors']} tensors")
    shared = [n for n, t in report["tensors"].items() if t["overlap"]]
    if shared:
        how = {
            "sum": "base + the sum of their changes",
            "mean": "base + the mean of their changes",
        }[args.overlap]
        print(
            f"overlap: {report['overlap']:,} entries of {len(shared)} tensors written by several "
            f"deltas, combined as {how} (float64, rounded once)"
        )
    else:
        print("overlap: none (no entry written by two deltas; each keeps its delta's value)")
    print(f"merged {len(report['deltas'])} deltas onto {args.base}; wrote {out}")
    return out
