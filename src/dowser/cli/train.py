"""`dowser train MODEL_DIR --mask MASK --data DATA --out OUT`: sparse fine-tuning."""

from __future__ import annotations

import argparse

from dowser.cli.options import SCHEDULERS, count, number, positive, seed


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
    t = sub.add_parser(
        "train",
        help="sparse fine-tuning with a mask (HF Trainer)",
        description="Fine-tune only the trainable entries of a mask on a JSON Lines or LLaVA "
        "JSON data file; OUT_DIR gets the merged checkpoint (and the sparse delta if asked).",
    )
    t.add_argument("model_dir", metavar="MODEL_DIR", help="local checkpoint directory")
    t.add_argument("--mask", required=True, help="mask file from `dowser mask`")
    t.add_argument(
        "--data",
        required=True,
        help='JSON Lines of {"image", "prompt", "answer"} or LLaVA JSON with "conversations"; '
        'for speech models (Whisper) JSON Lines of {"audio": "clip.wav", "text": "..."} '
        '(optional "prompt"); paths relative to the file',
    )
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument(
        "--epochs",
        type=number(0, 1000, low_open=True),
        default=1.0,
        help="passes over the data, in (0, 1000] (default 1)",
    )
    t.add_argument("--batch-size", type=positive, default=4, help="examples per device per step")
    t.add_argument("--grad-accum", type=positive, default=1, help="gradient accumulation steps")
    t.add_argument(
        "--lr",
        type=number(0, 1, low_open=True),
        default=2e-5,
        help="peak learning rate, in (0, 1] (reference 2e-5)",
    )
    t.add_argument(
        "--weight-decay",
        type=number(0, 10),
        default=0.0,
        help="decoupled weight decay, in [0, 10]; frozen entries never decay",
    )
    t.add_argument(
        "--warmup-ratio",
        type=number(0, 1, high_open=True),
        default=0.03,
        help="fraction of steps warming up (reference 0.03)",
    )
    t.add_argument(
        "--scheduler",
        choices=SCHEDULERS,
        default="cosine",
        help="HF scheduler name: cosine, linear, constant, ...",
    )
    t.add_argument(
        "--max-grad-norm",
        type=number(0, 1e6),
        default=1.0,
        help="gradient clipping, in [0, 1e6] (0 = off)",
    )
    t.add_argument(
        "--max-length", type=positive, default=1024, help="tokens per example, longer ones are cut"
    )
    t.add_argument("--seed", type=seed, default=0, help="training seed, in [0, 2**32 - 1]")
    t.add_argument(
        "--optimizer",
        choices=["sparse-adamw", "masked-adamw"],
        default="sparse-adamw",
        help="sparse-adamw: state only for trainable entries; masked-adamw: dense AdamW with "
        "masked gradients (reference), frozen entries still kept exact",
    )
    t.add_argument("--save-delta", action="store_true", help="also write OUT/delta.safetensors")
    t.add_argument(
        "--no-data-check",
        action="store_true",
        help="skip opening every image and measuring every prompt before training",
    )
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT")
    t.add_argument(
        "--save-steps",
        type=count,
        default=0,
        help="checkpoint every N steps (default: each epoch)",
    )
    t.add_argument("--logging-steps", type=positive, default=10, help="log the loss every N steps")
    t.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda if available; pick GPUs with CUDA_VISIBLE_DEVICES or torchrun",
    )
    t.add_argument(
        "--dtype",
        default=None,
        help="weights dtype while training and in OUT: float32 (default), bfloat16, ... "
        "(frozen weights are then rounded to it in OUT; the delta keeps the base's values)",
    )
    t.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision)")
    t.add_argument(
        "--fsdp",
        action="store_true",
        help="shard weights, gradients and optimizer state with FSDP2 (under torchrun or "
        "accelerate launch); decoder layers are the shards' units",
    )
    t.add_argument(
        "--fsdp-config",
        default=None,
        help="JSON file of HF fsdp_config settings (with --fsdp), e.g. cpu_offload, "
        "transformer_layer_cls_to_wrap",
    )
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations")
    t.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code"
    )
    t.add_argument(
        "--overwrite", action="store_true", help="replace the contents of a non-empty --out"
    )
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Fine-tune the mask's trainable entries (see dowser.train.recipe)."""
    from dowser.train.recipe import run_train

    run_train(args)
