"""`dowser export-peft DELTA --base DIR --out ADAPTER_DIR` and `dowser import-peft ADAPTER_DIR
--base DIR --out DELTA`: a sparse delta as a PEFT (SHiRA) adapter, and back."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Register both commands on the subparsers `sub`."""
    e = sub.add_parser(
        "export-peft",
        help="write a sparse delta as a PEFT SHiRA adapter",
        description=(
            "Write DELTA as a SHiRA adapter folder that PeftModel.from_pretrained loads and "
            "merge_and_unload merges to the same weights as `dowser apply-delta`, bit for bit."
        ),
    )
    e.add_argument("delta", metavar="DELTA", help="delta file from `dowser train --save-delta`")
    e.add_argument(
        "--base", required=True, help="the base checkpoint directory that was fine-tuned"
    )
    e.add_argument("--out", required=True, help="directory for the adapter")
    e.add_argument("--overwrite", action="store_true", help="replace files in a non-empty --out")
    e.add_argument(
        "--dense-fallback",
        action="store_true",
        help="store matrices whose values one addition cannot reach whole (modules_to_save) "
        "instead of refusing",
    )
    e.set_defaults(func=run_export)
    i = sub.add_parser(
        "import-peft",
        help="read a PEFT SHiRA adapter back into a sparse delta",
        description="Write a SHiRA adapter for BASE as a dowser delta that `apply-delta` applies.",
    )
    i.add_argument("adapter", metavar="ADAPTER_DIR", help="the PEFT SHiRA adapter folder")
    i.add_argument("--base", required=True, help="the base checkpoint directory it adapts")
    i.add_argument("--out", required=True, help="the delta file to write (.safetensors)")
    i.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    i.set_defaults(func=run_import)


def run_export(args: argparse.Namespace) -> None:
    """Export a delta as a SHiRA adapter folder."""
    from dowser.adapters.peft import export_peft

    done = export_peft(
        args.delta,
        args.base,
        args.out,
        overwrite=args.overwrite,
        dense_fallback=args.dense_fallback,
        flag="--overwrite",
    )
    whole = f"; {len(done.whole)} modules stored whole" if done.whole else ""
    print(
        f"wrote {done.out}: SHiRA r={done.r}, {len(done.matrices)} matrices, {done.entries} "
        f"entries + {done.padding} padding{whole}"
    )


def run_import(args: argparse.Namespace) -> None:
    """Read a SHiRA adapter back into a delta file."""
    from dowser.adapters.peft import import_peft

    out = import_peft(
        args.adapter, args.base, args.out, overwrite=args.overwrite, flag="--overwrite"
    )
    print(f"wrote {out}")
