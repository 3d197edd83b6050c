"""`dowser inspect FILE`: describe a scores, mask or delta file."""

from __future__ import annotations

import argparse
from pathlib import Path

from dowser.errors import DowserError


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
    i = sub.add_parser(
        "inspect",
        help="describe a scores, mask or delta file",
        description="Print what a dowser file holds.",
    )
    i.add_argument("file", metavar="FILE", help="a scores, mask or delta safetensors file")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Print what FILE holds."""
    print(describe_file(args.file))


def describe_file(path: str | Path) -> str:
    """A human-readable description of a dowser scores, mask or delta file (checked as it
    would be when used: a corrupt one is a DowserError)."""
    from dowser.io import read_metadata
    from dowser.mask import Mask

    meta = read_metadata(path)
    kind = meta.get("kind")
    if kind == "mask":
        mask = Mask.load(path)
        settings = ", ".join(
            f"{k}={mask.meta.get(k)}"
            for k in ("update_ratio", "scope", "targets", "last_layers", "estimator")
        )
        text = f"{path}: mask ({settings})\n{mask.summary()}"
        excluded = mask.meta.get("exclude")
        if excluded:  # masks of earlier tasks whose entries this one keeps frozen
            n = sum(excluded.get("entries", {}).values())
            ids = ", ".join(excluded.get("masks", []))
            k = len(excluded.get("masks", []))
            text += f"\n  excludes {n:,} entries trained by {k} mask{'s' * (k != 1)} ({ids})"
        return text
    if kind == "delta":
        from dowser.io import load_safetensors
        from dowser.train.artifacts import read_delta

        tensors, meta = load_safetensors(path, kind="delta")
        sparse, dense, _, _, digests = read_delta(path, tensors, meta)  # validates the file
        entries = sum(tensors[f"{n}::indices"].numel() for n in sparse)
        check = (
            "sampled fingerprints only (format 1: 4,096 entries per tensor)"
            if digests is None
            else "every entry of each written tensor (sha256) and sampled fingerprints"
        )
        lines = [f"{path}: sparse delta of {len(sparse)} masked weights ({entries:,} entries)"]
        lines.append(f"  densely trained tensors: {len(dense)}")
        lines.append(f"  format: {meta.get('format')}; base check: {check}")
        lines.append(f"  dowser_version: {meta.get('dowser_version')}")
        return "\n".join(lines)
    if kind == "scores":
        from dowser.scores import Scores

        targets = Scores.load(path).targets  # loading validates the file
        groups: dict[str, int] = {}
        for t in targets.values():
            groups[t.group] = groups.get(t.group, 0) + 1
        keys = (
            "estimator",
            "output",
            "positions",
            "synthetic",
            "num_samples",
            "num_batches",
            "num_probes",
            "seq_len",
            "images",
            "audio",
            "seed",
            "model_class",
            "dowser_version",
        )
        lines = [f"{path}: scores for {len(targets)} weights"]
        lines += [f"  {k}: {meta.get(k)}" for k in keys]
        lines.append("  weights per group: " + ", ".join(f"{g} {n}" for g, n in groups.items()))
        return "\n".join(lines)
    raise DowserError(f"{path} holds {kind!r} data, which dowser cannot describe")
