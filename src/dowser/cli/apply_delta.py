"""`dowser apply-delta BASE DELTA --out DIR`: rebuild a fine-tuned checkpoint from its base."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
    a = sub.add_parser(
        "apply-delta",
        help="apply a sparse delta to its base checkpoint",
        description="Write BASE + DELTA as a Hugging Face checkpoint; refuses another base.",
    )
    a.add_argument("base", metavar="BASE", help="the base checkpoint directory that was fine-tuned")
    a.add_argument("delta", metavar="DELTA", help="delta file from `dowser train --save-delta`")
    a.add_argument("--out", required=True, help="directory for the merged checkpoint")
    a.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code"
    )
    a.add_argument("--overwrite", action="store_true", help="replace files in a non-empty --out")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Apply a delta to its base and save the merged checkpoint."""
    from dowser.train.recipe import run_apply_delta

    run_apply_delta(args)
