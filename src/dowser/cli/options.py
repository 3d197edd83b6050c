"""Argument types and option groups shared by the subcommands.

Every numeric option is parsed by a type that names the allowed range in its error, so a bad
value stops the command before it loads anything.
"""

from __future__ import annotations

import argparse
import math


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{value} is outside (0, 1]: it is the fraction of each matrix left trainable"
        )
    return value


INT_MAX = 2**31 - 1  # larger counts overflow torch and numpy index types


def integer(low: int, high: int = INT_MAX):
    """An argparse type for an integer in [low, high], with a message that names the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}]")
        return value

    return parse


positive = integer(1)  # counts of at least one (steps, examples, layers)
count = integer(0)  # counts that may be zero (0 = off)
seed = integer(0, 2**32 - 1)  # numpy's seed range, which the Trainer's set_seed uses


def number(low: float, high: float, *, low_open: bool = False, high_open: bool = False):
    """An argparse type for a finite float in a range, with a message that names the range.

    Every numeric option has an upper bound: inf, nan and 1e308 stop at the parser instead of
    turning the run's weights into NaN.
    """
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = value > low if low_open else value >= low
        ok = ok and (value < high if high_open else value <= high)
        if not ok or not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{value} is outside {span}")
        return value

    return parse


def max_memory(text: str) -> dict:
    """'0=70GiB,cpu=200GiB' -> {0: '70GiB', 'cpu': '200GiB'} (accelerate's max_memory)."""
    out: dict = {}
    for item in text.split(","):
        key, sep, size = item.strip().partition("=")
        if not sep or not size.strip():
            raise argparse.ArgumentTypeError(
                f"{item!r}: write DEVICE=SIZE pairs, e.g. 0=70GiB,cpu=200GiB"
            )
        key, size = key.strip(), size.strip()
        value = int(size) if size.isdigit() else size  # bytes, or "70GiB"
        if key.isdigit():
            out[int(key)] = value
        elif key in ("cpu", "mps"):
            out[key] = value
        else:
            raise argparse.ArgumentTypeError(
                f"{key!r} is not a device: use a GPU index (0, 1, ...) or cpu"
            )
    return out


SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_min_lr",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "warmup_stable_decay",
)


def device_and_dtype(device: str | None, dtype: str | None):
    import torch

    from dowser.hf import parse_dtype

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, parse_dtype(dtype)


def bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    p.add_argument(
        "--cache",
        default=None,
        help="where the pretrained model is kept (default: $DOWSER_CACHE or ~/.cache/dowser)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
