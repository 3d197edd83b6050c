"""`dowser report BASE TUNED... [--downstream FILE]`: forgetting figures from lmms-eval results."""

from __future__ import annotations

import argparse
import math
import sys


def _pair(what: str):
    """An argparse type for KEY=VALUE (`what` names the parts in the error)."""

    def parse(text: str) -> tuple[str, str]:
        key, sep, value = text.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: write {what}")
        return key.strip(), value.strip()

    return parse


def _learning_rate(text: str) -> tuple[str, float]:
    run, value = _pair("RUN=LR, e.g. tuned_a=1e-5")(text)
    try:
        lr = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not (math.isfinite(lr) and lr > 0):
        raise argparse.ArgumentTypeError(f"{lr} is not a positive learning rate")
    return run, lr


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
    p = sub.add_parser(
        "report",
        help="forgetting figures (retention, A_up, A_down, H) from lmms-eval results",
        description="Read lmms-eval results (a *_results.json file, or the --output_path "
        "folder it wrote) of a base checkpoint and of fine-tuned ones, and print per-task "
        "retention, A_up, A_down and H as a Markdown table. A run may be written NAME=PATH.",
    )
    p.add_argument("base", metavar="BASE_RESULTS", help="lmms-eval results of the base model")
    p.add_argument(
        "tuned", metavar="TUNED_RESULTS", nargs="+", help="lmms-eval results of fine-tuned runs"
    )
    p.add_argument(
        "--downstream",
        metavar="FILE",
        help='downstream accuracy: {"name": TASK, "runs": {RUN: ACC}}, {"name": TASK, '
        '"accuracy": ACC} for one run, or an lmms-eval results file of one task',
    )
    p.add_argument(
        "--metric",
        type=_pair("TASK=METRIC, e.g. gqa=exact_match"),
        action="append",
        default=[],
        metavar="TASK=METRIC",
        help="score TASK by METRIC (or METRIC,FILTER) instead of its primary metric",
    )
    p.add_argument(
        "--lr",
        type=_learning_rate,
        action="append",
        default=[],
        metavar="RUN=LR",
        help="the learning rate of a tuned run (default: lr<NUMBER> in the run's name)",
    )
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    p.add_argument("--markdown", metavar="OUT", help="also write the table as Markdown")
    p.add_argument(
        "--plot", metavar="OUT", help="A_up against A_down, one point per learning rate (PNG)"
    )
    p.add_argument(
        "--allow-mixed-models",
        action="store_true",
        help="accept tuned runs evaluated with another lmms-eval --model than the base",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Compute the report, check every output, then print and write it."""
    import json

    from dowser.eval import lmms, lmms_report
    from dowser.io import check_outside_inputs, check_writable

    base = lmms.load_results(args.base)
    tuned = [lmms.load_results(spec) for spec in args.tuned]
    metrics, lrs = dict(args.metric), dict(args.lr)
    downstream = None
    if args.downstream is not None:
        downstream = lmms.read_downstream(args.downstream, [r.name for r in tuned], metrics)
    report = lmms.build_report(
        base,
        tuned,
        metrics=metrics,
        lrs=lrs,
        downstream=downstream,
        allow_mixed_models=args.allow_mixed_models,
    )
    if args.plot is not None:
        lmms_report.check_plot(report)
    outputs = [p for p in (args.json, args.markdown, args.plot) if p is not None]
    if len(set(outputs)) != len(outputs):
        from dowser.errors import DowserError

        raise DowserError("--json, --markdown and --plot must name different files")
    inputs = {"results": base.path, **{f"results {r.name}": r.path for r in tuned}}
    inputs["downstream file"] = args.downstream
    for out in outputs:  # before anything is written: all or nothing
        check_writable(out, overwrite=args.overwrite, flag="--overwrite")
        check_outside_inputs(out, inputs)
    table = lmms_report.markdown(report)
    sys.stdout.write(table)
    if args.json is not None:
        lmms_report.write_text(args.json, json.dumps(report, indent=1) + "\n")
    if args.markdown is not None:
        lmms_report.write_text(args.markdown, table)
    if args.plot is not None:
        lmms_report.plot_frontier(report, args.plot)
