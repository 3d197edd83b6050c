"""`dowser demo` and `dowser bench forgetting`: the forgetting benchmark from the command line.

The demo is the benchmark's "demo" preset: pretrain (first run only; then from the cache) the
built-in LLaVA on Fashion-MNIST and WordNet, probe it without data, fine-tune it on sklearn
digits with full-ft, lora, random-mask, dowser and grafting (one learning rate each), and print
A_up, A_down and H for each. It also leaves the Dowser scores and mask of the pretrained model
in the output directory, the files a user's own run would produce.
"""

from __future__ import annotations

from pathlib import Path

from dowser.errors import DowserError

DEMO_MASK_RATIO = 0.1  # the reference update ratio


def _check_missing_packages() -> None:
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise DowserError(
            f"the forgetting benchmark needs {', '.join(missing)}: "
            "pip install 'model-dowser[bench]'"
        )


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
    overwrite: bool = False,
    resume: bool = False,
    cache: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Run the forgetting benchmark's `preset` into `out`; print and return the results."""
    from dowser.forgetting.bench import PRESETS, run_benchmark
    from dowser.forgetting.report import markdown

    _check_missing_packages()
    out = Path(out)
    _prepare_out(out, overwrite=overwrite, resume=resume, can_resume=preset != "demo")
    result = run_benchmark(
        PRESETS[preset],
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

    _check_missing_packages()
    out = Path(out)
    _prepare_out(out, overwrite=overwrite, resume=resume, can_resume=True)
    summary = run_study(
        PRESETS[preset],
        out,
        resume=resume,
        overwrite=overwrite,
        cache=Path(cache) if cache else None,
        progress=progress,
    )
    print()
    print(markdown(summary))
    print(f"wrote {out}/estimators.json, {out}/estimators.md and {', '.join(summary['plots'])}")
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
