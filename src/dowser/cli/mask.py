"""`dowser mask SCORES --model MODEL_DIR --out MASK`: freeze the important weights."""

from __future__ import annotations

import argparse

from dowser.cli.options import positive, ratio


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
    m = sub.add_parser(
        "mask",
        help="build a trainable/frozen mask from scores",
        description="Make the lowest-scoring fraction of each group trainable and freeze the rest.",
    )
    m.add_argument("scores", metavar="SCORES", help="scores file from `dowser probe`")
    m.add_argument(
        "--model", required=True, help="the probed checkpoint directory (its weights give |W|)"
    )
    m.add_argument(
        "--ratio",
        type=ratio,
        default=0.1,
        help="fraction left trainable, in (0, 1] (reference: 0.1)",
    )
    m.add_argument(
        "--targets",
        default="attn,mlp",
        help="attn, mlp, decoder, lm_head, encoder, projector, all (comma-separated) or a regex "
        "over parameter names (default: attn,mlp)",
    )
    m.add_argument(
        "--last-layers", type=positive, default=None, help="only the last N decoder layers"
    )
    m.add_argument(
        "--device",
        default="cpu",
        help="where scores are formed and ranked: cpu (default) or cuda (faster for 7B models)",
    )
    m.add_argument(
        "--scope",
        choices=["tensor", "row", "layer", "global"],
        default="tensor",
        help="group the ratio applies to (reference: tensor)",
    )
    m.add_argument("--out", required=True, help="mask file to write, e.g. mask.safetensors")
    m.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code"
    )
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Build a mask from scores and write it."""
    from dowser.hf import load_model
    from dowser.io import check_writable
    from dowser.mask import build_mask
    from dowser.scores import Scores

    out = check_writable(args.out, overwrite=args.overwrite)
    scores = Scores.load(args.scores)
    model, _, _ = load_model(
        args.model, device=args.device, dtype="auto", trust_remote_code=args.trust_remote_code
    )
    mask = build_mask(
        model,
        scores,
        update_ratio=args.ratio,
        targets=args.targets,
        last_layers=args.last_layers,
        scope=args.scope,
    )
    mask.save(out, overwrite=args.overwrite)
    print(mask.summary())
    print(f"wrote {out}")
