"""`dowser merge-deltas D1 D2 ... --base DIR --out DIR`: several deltas of one base, merged."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
    a = sub.add_parser(
        "merge-deltas",
        help="merge sparse deltas trained from one base into one checkpoint",
        description="Write BASE + every DELTA as a Hugging Face checkpoint; refuses deltas of "
        "another base. An entry one delta trained gets its value bit for bit; one several "
        "trained gets base + the sum (or mean) of their changes.",
    )
    a.add_argument(
        "deltas", nargs="+", metavar="DELTA", help="delta files from `dowser train --save-delta`"
    )
    a.add_argument("--base", required=True, help="the base checkpoint every delta was trained from")
    a.add_argument("--out", required=True, help="directory for the merged checkpoint")
    a.add_argument(
        "--overlap",
        choices=["sum", "mean", "refuse"],
        default="sum",
        help="entries several deltas trained: base + the sum of their changes (default), + "
        "their mean, or refuse the merge",
    )
    a.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code"
    )
    a.add_argument("--overwrite", action="store_true", help="replace files in a non-empty --out")
    a.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Merge the deltas onto their base and save the merged checkpoint."""
    from dowser.train.compose import run_merge_deltas

    run_merge_deltas(args)
