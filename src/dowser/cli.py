"""The `dowser` command: one console script, one subcommand per stage.

    dowser probe MODEL_DIR --out scores.safetensors      # once per base model, no data
    dowser mask SCORES --model MODEL_DIR --ratio 0.1 --out mask.safetensors
    dowser train MODEL_DIR --mask mask.safetensors --data train.jsonl --out OUT_DIR
    dowser apply-delta BASE_DIR OUT_DIR/delta.safetensors --out MERGED_DIR
    dowser inspect FILE                                  # what a scores or mask file holds
    dowser demo --out DIR                                # forgetting demo on a built-in VLM
    dowser bench forgetting --out DIR [--quick]          # the full forgetting benchmark
    dowser bench estimators --out DIR [--quick]          # which importance estimator is best

User errors print one line and exit with status 2; existing files are never replaced unless
--overwrite is given, and outputs are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dowser.errors import DowserError
from dowser.version import __version__


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{value} is outside (0, 1]: it is the fraction of each matrix left trainable"
        )
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _number(
    low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False
):
    """An argparse type for a float in a range, with a message that names the range."""
    lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
    span = f"{lo}{low}, {high if high is not None else 'inf'}{hi if high is not None else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = value > low if low_open else value >= low
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok or value != value:
            raise argparse.ArgumentTypeError(f"{value} is outside {span}")
        return value

    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def _max_memory(text: str) -> dict:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dowser",
        description="Data-free importance probing and sparse masks that keep what a model knew.",
    )
    parser.add_argument("--version", action="version", version=f"dowser {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "probe",
        help="score every weight of a model, without data",
        description="Probe a local Hugging Face checkpoint with self-generated inputs and write "
        "its importance scores (factors + metadata) to a safetensors file.",
    )
    p.add_argument(
        "model_dir",
        metavar="MODEL_DIR",
        help="local checkpoint directory (config.json + *.safetensors)",
    )
    p.add_argument("--out", required=True, help="scores file to write, e.g. scores.safetensors")
    p.add_argument(
        "--num-samples", type=_positive, default=64, help="synthetic sequences (reference: 64)"
    )
    p.add_argument(
        "--batch-size", type=_positive, default=4, help="sequences per forward pass (reference: 4)"
    )
    p.add_argument(
        "--num-probes", type=_positive, default=8, help="Hutchinson probes per batch (reference: 8)"
    )
    p.add_argument(
        "--seq-len",
        type=_positive,
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
        "--seed", type=int, default=0, help="seed for token draws, noise, sampling and probes"
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
        type=_max_memory,
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
    p.set_defaults(func=_cmd_probe)

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
        type=_ratio,
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
        "--last-layers", type=_positive, default=None, help="only the last N decoder layers"
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
    m.set_defaults(func=_cmd_mask)

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
        "image paths relative to the file",
    )
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument(
        "--epochs",
        type=_number(0, low_open=True),
        default=1.0,
        help="passes over the data (default 1)",
    )
    t.add_argument("--batch-size", type=_positive, default=4, help="examples per device per step")
    t.add_argument("--grad-accum", type=_positive, default=1, help="gradient accumulation steps")
    t.add_argument(
        "--lr",
        type=_number(0, low_open=True),
        default=2e-5,
        help="peak learning rate (reference 2e-5)",
    )
    t.add_argument(
        "--weight-decay",
        type=_number(0),
        default=0.0,
        help="decoupled weight decay; frozen entries never decay",
    )
    t.add_argument(
        "--warmup-ratio",
        type=_number(0, 1, high_open=True),
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
        "--max-grad-norm", type=_number(0), default=1.0, help="gradient clipping (0 = off)"
    )
    t.add_argument(
        "--max-length", type=_positive, default=1024, help="tokens per example, longer ones are cut"
    )
    t.add_argument("--seed", type=int, default=0, help="training seed")
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
        type=_count,
        default=0,
        help="checkpoint every N steps (default: each epoch)",
    )
    t.add_argument("--logging-steps", type=_positive, default=10, help="log the loss every N steps")
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
    t.set_defaults(func=_cmd_train)

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
    a.set_defaults(func=_cmd_apply_delta)

    i = sub.add_parser(
        "inspect",
        help="describe a scores or mask file",
        description="Print what a dowser file holds.",
    )
    i.add_argument("file", metavar="FILE", help="a scores or mask safetensors file")
    i.set_defaults(func=_cmd_inspect)

    d = sub.add_parser(
        "demo",
        help="pretrain a small LLaVA, fine-tune it four ways, measure forgetting",
        description=(
            "The forgetting benchmark's demo preset: pretrain (or load from the cache) a small "
            "LLaVA on Fashion-MNIST and WordNet, fine-tune it on sklearn digits with full-ft, "
            "lora, random-mask, dowser and grafting, and report A_up, A_down and H."
        ),
    )
    d.add_argument("--out", default="demo-out", help="output directory (default: demo-out)")
    _bench_options(d)
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="benchmarks", description="Run a benchmark.")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    f = bsub.add_parser(
        "forgetting",
        help="every method over learning-rate, depth and ratio sweeps",
        description=(
            "Pretrain the built-in LLaVA (cached), fine-tune it with every method through one "
            "training loop, and write results.json, results.md and PNG plots to --out. "
            "Finished runs are kept in OUT/runs.jsonl; --resume continues an interrupted run."
        ),
    )
    f.add_argument("--out", default="forgetting-out", help="output directory")
    size = f.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="one downstream task, short sweeps (minutes)"
    )
    size.add_argument(
        "--preset", choices=("demo", "quick", "full"), default=None, help="default: full"
    )
    f.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    _bench_options(f)
    f.set_defaults(func=_cmd_bench_forgetting)
    e = bsub.add_parser(
        "estimators",
        help="which importance estimator keeps the most (frontiers, a training-free measure)",
        description=(
            "Train masks from every dowser.probe estimator (plus magnitude and random) on the "
            "forgetting benchmark at several depths and ratios, measure each mask's KL under "
            "noise on its trainable entries, and write estimators.json, estimators.md and "
            "plots (besides the benchmark's results) to --out; --resume continues."
        ),
    )
    e.add_argument("--out", default="estimators-out", help="output directory")
    e_size = e.add_mutually_exclusive_group()
    e_size.add_argument("--quick", action="store_true", help="one seed, one learning rate")
    e_size.add_argument("--preset", choices=("quick", "full"), default=None, help="default: full")
    e.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    _bench_options(e)
    e.set_defaults(func=_cmd_bench_estimators)
    return parser


def _device_and_dtype(device: str | None, dtype: str | None):
    import torch

    from dowser.hf import parse_dtype

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, parse_dtype(dtype)


def _cmd_probe(args: argparse.Namespace) -> None:
    from dowser.hf import load_model
    from dowser.io import check_writable
    from dowser.probing import peak_memory, probe

    out = check_writable(args.out, overwrite=args.overwrite)  # fail before the long part
    if args.device_map is not None and args.device is not None:
        raise DowserError("--device and --device-map: give one (--device-map places the model)")
    if (args.max_memory or args.offload_folder) and args.device_map is None:
        raise DowserError("--max-memory and --offload-folder apply only with --device-map")
    device, dtype = _device_and_dtype(args.device, args.dtype)
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
    )
    scores.save(out, overwrite=args.overwrite)
    print(f"wrote {out}: scores for {len(scores)} weights ({args.estimator})")
    peaks = ", ".join(f"{d} {b / 2**30:.2f} GiB" for d, b in peak_memory().items())
    print(f"peak memory: {peaks}")


def _cmd_mask(args: argparse.Namespace) -> None:
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


def _cmd_train(args: argparse.Namespace) -> None:
    from dowser.train.recipe import run_train

    run_train(args)


def _cmd_apply_delta(args: argparse.Namespace) -> None:
    from dowser.train.recipe import run_apply_delta

    run_apply_delta(args)


def _cmd_inspect(args: argparse.Namespace) -> None:
    print(describe_file(args.file))


def describe_file(path: str | Path) -> str:
    """A human-readable description of a dowser scores or mask file."""
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
        return f"{path}: mask ({settings})\n{mask.summary()}"
    if kind == "delta":
        sparse, dense = meta.get("sparse"), meta.get("dense")
        if not isinstance(sparse, list) or not isinstance(dense, list):
            raise DowserError(f"{path} has corrupt dowser metadata (no list of weights)")
        lines = [f"{path}: sparse delta of {len(sparse)} masked weights"]
        lines.append(f"  densely trained tensors: {len(dense)}")
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
            "seed",
            "model_class",
            "dowser_version",
        )
        lines = [f"{path}: scores for {len(targets)} weights"]
        lines += [f"  {k}: {meta.get(k)}" for k in keys]
        lines.append("  weights per group: " + ", ".join(f"{g} {n}" for g, n in groups.items()))
        return "\n".join(lines)
    raise DowserError(f"{path} holds {kind!r} data, which dowser cannot describe")


def _bench_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace the results in --out")
    p.add_argument(
        "--cache",
        default=None,
        help="where the pretrained model is kept (default: $DOWSER_CACHE or ~/.cache/dowser)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_demo(args: argparse.Namespace) -> None:
    from dowser.demo import run_demo

    run_demo(Path(args.out), overwrite=args.overwrite, cache=args.cache, progress=not args.quiet)


def _cmd_bench_forgetting(args: argparse.Namespace) -> None:
    from dowser.demo import run_preset

    preset = "quick" if args.quick else (args.preset or "full")
    run_preset(
        preset,
        Path(args.out),
        overwrite=args.overwrite,
        resume=args.resume,
        cache=args.cache,
        progress=not args.quiet,
    )


def _cmd_bench_estimators(args: argparse.Namespace) -> None:
    from dowser.demo import run_estimators

    run_estimators(
        "quick" if args.quick else (args.preset or "full"),
        Path(args.out),
        overwrite=args.overwrite,
        resume=args.resume,
        cache=args.cache,
        progress=not args.quiet,
    )


def _silence_progress_bars() -> None:
    """--quiet: also silence transformers' and huggingface_hub's own bars."""
    import huggingface_hub.utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


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
    if "torch.distributed" in sys.modules:  # a torchrun process: leave without teardown
        from dowser.train.distributed import exit_process

        exit_process(code)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
