"""`dowser mask SCORES --model MODEL_DIR --out MASK`: freeze the important weights."""

from __future__ import annotations

import argparse
import re

from dowser.cli.options import number, positive, ratio


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
    m.add_argument(
        "--weight-power",
        type=number(0, 4),
        default=None,
        help="gamma in S = |W|^gamma ||J|| |h| instead of the one the scores were probed with "
        "(0: the drift score)",
    )
    m.add_argument(
        "--structure",
        choices=["entry", "row", "column"],
        default="entry",
        help="entry: any entries (default); row / column: whole output rows / input columns",
    )
    m.add_argument(
        "--task-data",
        default=None,
        help="a task-aware mask: the fine-tuning data (JSON/JSONL as for `dowser train`); the "
        "first --task-examples examples give each entry's task gradient",
    )
    m.add_argument(
        "--task-examples",
        type=positive,
        default=256,
        help="examples of --task-data read (default 256)",
    )
    m.add_argument(
        "--combine",
        choices=["split", "ratio", "task"],
        default="split",
        help="with --task-data: split (of the 2 rho least important entries, the half with "
        "the largest task gradient; default), ratio (lowest S / |g|) or task (largest |g|)",
    )
    m.add_argument(
        "--max-length", type=positive, default=1024, help="with --task-data: tokens per example"
    )
    m.add_argument(
        "--exclude",
        nargs="+",
        default=[],
        metavar="MASK",
        help="masks of earlier tasks: no entry they trained is trainable here (same count per "
        "matrix, ranked among the other entries; refused if too few remain)",
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
    from dowser.io import check_outside_inputs, check_writable
    from dowser.mask import Mask, build_mask
    from dowser.scores import Scores

    out = check_writable(args.out, overwrite=args.overwrite, flag="--overwrite")
    inputs = {"scores": args.scores, "model directory": args.model, "task data": args.task_data}
    inputs |= {f"excluded mask {i}": path for i, path in enumerate(args.exclude, 1)}
    check_outside_inputs(out, inputs)
    exclude = [Mask.load(path) for path in args.exclude]  # before the model: fail fast
    scores = Scores.load(args.scores)
    if args.weight_power is not None:
        scores = scores.with_weight_power(args.weight_power)
    model, tokenizer, processor = load_model(
        args.model, device=args.device, dtype="auto", trust_remote_code=args.trust_remote_code
    )
    task_scores = None
    if args.task_data is not None:
        task_scores = _task_gradients(args, model, processor or tokenizer, scores)
    mask = build_mask(
        model,
        scores,
        update_ratio=args.ratio,
        targets=args.targets,
        last_layers=args.last_layers,
        scope=args.scope,
        structure=args.structure,
        task_scores=task_scores,
        combine=args.combine,
        exclude=exclude,
    )
    mask.save(out, overwrite=args.overwrite)
    print(mask.summary())
    print(f"wrote {out}")


def _task_gradients(args: argparse.Namespace, model, pre, scores):
    """Task gradients of the scored weights over the first --task-examples examples."""
    from types import SimpleNamespace

    import torch

    from dowser.errors import DowserError
    from dowser.probing.task import task_gradients
    from dowser.train.data import load_examples
    from dowser.train.recipe import dataset_for
    from dowser.train.speech import is_speech_data, load_speech_examples

    if pre is None:
        raise DowserError(f"{args.model} has no tokenizer or processor to encode --task-data")
    speech = is_speech_data(args.task_data)
    examples = load_speech_examples(args.task_data) if speech else load_examples(args.task_data)
    examples = examples[: args.task_examples]
    where = SimpleNamespace(data=args.task_data, model_dir=args.model, max_length=args.max_length)
    dataset, collator = dataset_for(model, pre, examples, speech, where)
    dataset.check(progress=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collator)
    names = "|".join(rf"^{re.escape(n.removesuffix('.weight'))}$" for n in scores.names)
    return task_gradients(model, loader, layers=names, include_lm_head=False)
