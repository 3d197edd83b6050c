"""`dowser probe MODEL_DIR --out SCORES`: score every weight of a checkpoint, without data."""

from __future__ import annotations

import argparse

from dowser.cli.options import device_and_dtype, max_memory, number, positive, seed
from dowser.errors import DowserError


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
    p = sub.add_parser(
        "probe",
        help="score every weight of a model, without data",
        description="Probe a local Hugging Face checkpoint with self-generated inputs and write "
        "its importance scores (factors + metadata) to a safetensors file. Speech models "
        "(Whisper) hear white noise and continue their own text (no option needed).",
    )
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="local checkpoint directory (config.json + *.safetensors)",
    )
    p.add_argument("--out", required=True, help="scores file to write, e.g. scores.safetensors")
    p.add_argument(
        "--num-samples",
        type=_sample_count,
        default=64,
        help="synthetic sequences, 1 to 1,000,000 (reference: 64)",
    )
    p.add_argument(
        "--batch-size", type=positive, default=4, help="sequences per forward pass (reference: 4)"
    )
    p.add_argument(
        "--num-probes", type=positive, default=8, help="Hutchinson probes per batch (reference: 8)"
    )
    p.add_argument(
        "--seq-len",
        type=positive,
        default=64,
        help="text tokens per sequence, BOS included (reference: 64)",
    )
    p.add_argument(
        "--estimator",
        choices=[
            "mean-abs",
            "reference",
            "rms",
            "tokenwise",
            "gradient",
            "activation",
            "wanda",
            "magnitude",
        ],
        default="mean-abs",
        help="mean-abs (= reference): the released scripts' mean |d(xi^T f)/dz| (default); "
        "rms: the paper's "
        "root mean square; tokenwise: |g_t||h_t| per token; gradient: exact per-weight "
        "sqrt(E[(d(xi^T f)/dW)^2]) (tokenwise and gradient keep a dense fp32 matrix per "
        "weight); activation, wanda, magnitude: no Jacobian term (see README)",
    )
    p.add_argument(
        "--output",
        choices=["logits", "log-probs"],
        default="logits",
        help="f: the logits (reference) or their log-softmax",
    )
    p.add_argument(
        "--positions",
        choices=["last", "all"],
        default="last",
        help="f at each sample's last valid token (reference) or at every valid token",
    )
    p.add_argument(
        "--images",
        choices=["off", "noise"],
        default="off",
        help="noise: start each sample with the image placeholder and Gaussian-noise pixels",
    )
    p.add_argument(
        "--layers",
        default=None,
        help="groups (decoder, lm_head, encoder/vision, projector, all; comma-separated) or a regex "
        "over module paths; default: the language decoder",
    )
    p.add_argument("--no-lm-head", action="store_true", help="do not score the output head")
    p.add_argument(
        "--weight-power",
        type=number(0, 4),
        default=1.0,
        help="gamma in S = |W|^gamma ||J|| |h|: 1 the paper's score (default), 0 the drift "
        "score without |W| (see README: mask recipes)",
    )
    p.add_argument(
        "--seed", type=seed, default=0, help="seed for token draws, noise, sampling and probes"
    )
    p.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)"
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="float32, bfloat16, float16 or auto (default: bfloat16 on GPU, float32 on CPU)",
    )
    p.add_argument(
        "--device-map",
        default=None,
        help="spread a model larger than one device over GPUs, CPU and disk (accelerate): "
        "auto, balanced, balanced_low_0 or sequential; instead of --device",
    )
    p.add_argument(
        "--max-memory",
        type=max_memory,
        default=None,
        help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB",
    )
    p.add_argument(
        "--offload-folder",
        default=None,
        help="with --device-map: where weights that fit nowhere else are kept on disk",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _sample_count(text: str) -> int:
    """--num-samples: an integer in [1, MAX_SAMPLES] (speech models: MAX_SPEECH_SAMPLES)."""
    from dowser.probing.synthetic import MAX_SAMPLES

    value = positive(text)
    if value > MAX_SAMPLES:
        raise argparse.ArgumentTypeError(
            f"{value:,} is more than {MAX_SAMPLES:,} synthetic sequences (the reference uses 64)"
        )
    return value


def run(args: argparse.Namespace) -> None:
    """Probe MODEL_DIR and write its scores."""
    from dowser.hf import load_model
    from dowser.io import check_outside_inputs, check_writable
    from dowser.probing import peak_memory, probe

    # fail before the long part
    out = check_writable(args.out, overwrite=args.overwrite, flag="--overwrite")
    check_outside_inputs(out, {"model directory": args.model_dir})
    if args.device_map is not None and args.device is not None:
        raise DowserError("--device and --device-map: give one (--device-map places the model)")
    if (args.max_memory or args.offload_folder) and args.device_map is None:
        raise DowserError("--max-memory and --offload-folder apply only with --device-map")
    device, dtype = device_and_dtype(args.device, args.dtype)
    model, tokenizer, processor = load_model(
        args.model_dir,
        device=None if args.device_map else device,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        device_map=args.device_map,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
    )
    scores = probe(
        model,
        tokenizer=tokenizer,
        processor=processor,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        num_probes=args.num_probes,
        seq_len=args.seq_len,
        estimator=args.estimator,
        output=args.output,
        positions=args.positions,
        images=args.images,
        layers=args.layers,
        include_lm_head=not args.no_lm_head,
        seed=args.seed,
        progress=not args.quiet,
        weight_power=args.weight_power,
    )
    scores.save(out, overwrite=args.overwrite)
    print(f"wrote {out}: scores for {len(scores)} weights ({args.estimator})")
    peaks = ", ".join(f"{d} {b / 2**30:.2f} GiB" for d, b in peak_memory().items())
    print(f"peak memory: {peaks}")
