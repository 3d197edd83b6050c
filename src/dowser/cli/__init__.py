"""The `dowser` command: one console script, one module per subcommand.

    dowser probe MODEL_DIR --out scores.safetensors      # once per base model, no data
    dowser mask SCORES --model MODEL_DIR --ratio 0.1 --out mask.safetensors
    dowser train MODEL_DIR --mask mask.safetensors --data train.jsonl --out OUT_DIR
    dowser apply-delta BASE_DIR OUT_DIR/delta.safetensors --out MERGED_DIR
    dowser merge-deltas D1 D2 ... --base BASE_DIR --out MERGED_DIR  # deltas of one base, merged
    dowser export-peft DELTA --base BASE_DIR --out ADAPTER_DIR  # delta -> PEFT SHiRA adapter
    dowser import-peft ADAPTER_DIR --base BASE_DIR --out DELTA  # SHiRA adapter -> delta
    dowser report BASE_RESULTS TUNED_RESULTS...          # forgetting figures from lmms-eval
    dowser inspect FILE                                  # what a scores or mask file holds
    dowser import-ct2 [SRC] --out DIR                    # a CTranslate2 Whisper -> HF folder
    dowser demo --out DIR                                # forgetting demo on a built-in VLM
    dowser bench forgetting --out DIR [--quick]          # the full forgetting benchmark
    dowser bench estimators --out DIR [--quick]          # which importance estimator is best

Each module here adds its parser (`add_parser`) and runs its command (`run`); the work itself
is done by the library. User errors print one line and exit with status 2, and so does a write
that fails for want of space or permission (full disk, quota, read-only folder); existing files
are never replaced unless --overwrite is given, and outputs are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dowser.cli import (
    apply_delta,
    bench,
    describe,
    import_ct2,
    mask,
    merge_deltas,
    peft,
    probe,
    report,
    train,
)
from dowser.errors import DowserError
from dowser.version import __version__

# in --help order
COMMANDS = (
    probe,
    mask,
    train,
    apply_delta,
    merge_deltas,
    peft,
    report,
    describe,
    import_ct2,
    bench,
)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="dowser",
        description="Data-free importance probing and sparse masks that keep what a model knew.",
    )
    parser.add_argument("--version", action="version", version=f"dowser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _silence_progress_bars() -> None:
    """--quiet: also silence transformers' and huggingface_hub's own bars."""
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def _write_failure(error: Exception) -> str | None:
    """One line for a full disk, an exceeded quota or a folder without write permission that
    a library write did not already turn into a DowserError; None for anything else."""
    import re

    from dowser.io import write_error

    path = getattr(error, "filename", None)
    if path is None:  # safetensors names the path in its message
        found = re.search(r'at path "([^"]+)"', str(error))
        path = found.group(1) if found else "an output file"
    found = write_error(path, error)
    return None if found is None else str(found)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dowser` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if getattr(args, "quiet", False):
        _silence_progress_bars()
    code = 0
    try:
        args.func(args)
    except DowserError as e:
        print(f"dowser {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"dowser {args.command}: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        message = _write_failure(e)
        if message is None:
            raise  # anything else is a bug: keep its traceback
        print(f"dowser {args.command}: error: {message}", file=sys.stderr)
        code = 2
    if "torch.distributed" in sys.modules:  # a torchrun process: leave without teardown
        from dowser.train.distributed import exit_process

        exit_process(code)
    return code
