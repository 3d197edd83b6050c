"""The recipe study's summary: matched comparisons against the baselines, and each recipe's cost.

    run_recipes(config, out)   # the benchmark's runs (resumable), then recipes.json / .md

Per downstream task and method: best H (each seed's best over the learning rates, mean +-
standard error, and the paired difference against random-mask, SPIDER and full-ft), and
A_up at matched downstream accuracy (50, 70 and 90 % of the way from zero-shot to full-ft's
best A_down) minus each baseline, paired by seed (`dowser.forgetting.matched`). A recipe
beats a baseline at a level when the mean difference exceeds two standard errors.

Cost per recipe, measured on the benchmark's pretrained model: seconds to make the mask (probe,
task gradients, ranking; a row reuses what an earlier row computed, so the dowser row carries
the probe), the downstream examples it reads, and the scoring state it holds (factor and
gradient tensors, MiB), and what it adds during training (TRAIN_EXTRA: static masks nothing
beyond the mask; SPIDER keeps W0 and a gradient sum, besides full-ft's optimizer state when it
trains every entry).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dowser.forgetting.bench import Prepared, prepare, run_benchmark
from dowser.forgetting.config import BenchConfig
from dowser.forgetting.matched import best_h, diff_cell, matched
from dowser.forgetting.methods import (
    MASKED,
    REFRESHED,
    SOFT,
    TASK_AWARE,
    WANDA_EXAMPLES,
    WITH_SPIDER,
    ScoreBank,
    Setting,
    tuned_mask,
)
from dowser.forgetting.methods import tuned_layers as _layers

BASELINES = ("random-mask", "spider", "full-ft")
# memory a method adds during training, per entry of the tuned matrices, beyond a hard mask's
# (1 bit) and the optimizer state of the trainable entries: from the code, not measured
TRAIN_EXTRA = {
    "soft": "1 B (uint8 scale) + a transient fp32 copy per step",
    "spider": "8 B (fp32 W0 and gradient sum)",
    "refresh": "- (2 more probes during training: the dowser row's seconds again, twice)",
}


def costs(prep: Prepared, config: BenchConfig, methods: tuple[str, ...]) -> dict:
    """method -> {"seconds", "examples", "state_mib"} for each mask, in `methods` order, with
    one score bank: a row pays only what no earlier row computed (the dowser row pays the
    probe that the drift, task-aware, structured and soft rows reuse)."""
    task = config.downstream[0]
    data = prep.train_data(task, 0)
    setting = Setting(0.0, config.last_layers, config.update_ratio, 0, 0, 0)
    layers = _layers(prep.base, setting)
    bank = ScoreBank(prep.base, prep.processor, probe_kwargs=dict(prep.bank.probe_kwargs))
    out = {}
    for method in methods:
        if method not in MASKED:
            continue
        t0 = time.perf_counter()
        scores = bank.get(method, seed=0, task=task, data=data, layers=layers)
        options = bank.mask_options(
            method, task=task, data=data, layers=layers, loss_fn=prep.loss_fn
        )
        tuned_mask(prep.base, setting, scores, **options)
        seconds = time.perf_counter() - t0
        held = [scores] + ([options["task_scores"]] if "task_scores" in options else [])
        state = sum(
            t.numel() * t.element_size()
            for s in held
            for f in s.factors.values()
            for t in (f.psi, f.act, f.weight, f.full)
            if t is not None
        )
        examples = TASK_AWARE[method][1] if method in TASK_AWARE else 0
        if method == "wanda-mask":
            examples = WANDA_EXAMPLES
        extra = "-"
        if method in SOFT:
            extra = TRAIN_EXTRA["soft"]
        elif method in WITH_SPIDER:
            extra = TRAIN_EXTRA["spider"]
        elif method in REFRESHED:
            extra = TRAIN_EXTRA["refresh"]
        out[method] = {
            "seconds": round(seconds, 2),
            "examples": min(examples, len(data)),
            "state_mib": round(state / 2**20, 3),
            "training_extra": extra,
        }
    return out


def summarize_recipes(records: list[dict]) -> dict:
    """{"matched": ..., "best_h": ...} against BASELINES (see module doc)."""
    return {
        "matched": matched(records, BASELINES, ys=("a_up",)),
        "best_h": best_h(records, BASELINES),
    }


def markdown(summary: dict) -> str:
    """Per task: best H and matched A_up differences, then the cost table."""
    lines = ["# Mask recipes: what keeps the most at matched downstream accuracy", ""]
    lines.append(
        "Differences are paired by seed (mean ± standard error over seeds); **bold**: beyond "
        "two standard errors. Levels: fraction of the way from zero-shot's A_down to "
        "full-ft's best."
    )
    for task, rows in summary["best_h"].items():
        levels = summary["matched"][task]
        lines += ["", f"## {task}", ""]
        head = "| method | best H | H − random | H − spider |"
        head += "".join(f" A_up − random @{k} | A_up − spider @{k} |" for k in levels)
        lines += [head, "|" + "---|" * (4 + 2 * len(levels))]
        for m, e in sorted(rows.items(), key=lambda kv: -kv[1]["h"]["mean"]):
            if m == "zero-shot":
                continue
            row = f"| {m} | {e['h']['mean']:.3f} ± {e['h']['se']:.3f} | "
            row += f"{diff_cell(e, 'h_minus_random-mask')} | {diff_cell(e, 'h_minus_spider')} |"
            for lv in levels.values():
                entry = lv["methods"].get(m)
                row += f" {diff_cell(entry, 'a_up_minus_random-mask')} |"
                row += f" {diff_cell(entry, 'a_up_minus_spider')} |"
            lines.append(row)
    if summary.get("costs"):
        lines += ["", "## Cost of making the mask", ""]
        lines += [
            "Seconds beyond what an earlier row computed (the dowser row carries the probe).",
            "",
        ]
        lines += [
            "| method | seconds | downstream examples | scoring state (MiB) | "
            "extra training memory per tuned entry |"
        ]
        lines += ["|---|---|---|---|---|"]
        for m, c in summary["costs"].items():
            lines.append(
                f"| {m} | {c['seconds']:.1f} | {c['examples']} | {c['state_mib']:.2f} | "
                f"{c.get('training_extra', '-')} |"
            )
    return "\n".join(lines) + "\n"


def run_recipes(
    config: BenchConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cache: Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Every run of `config` (resumable), then OUT/recipes.json and recipes.md."""
    from dowser.forgetting.report import _write_text

    out = Path(out)
    prep = prepare(config, cache=cache, progress=progress)
    result = run_benchmark(
        config,
        out,
        resume=resume,
        overwrite=overwrite,
        cache=cache,
        progress=progress,
        log=log,
        prepared=prep,
    )
    summary = summarize_recipes(result["runs"])
    summary["costs"] = costs(prep, config, config.methods)
    summary["machine"] = result["machine"]
    summary["model"] = config.model
    _write_text(out / "recipes.json", json.dumps(summary, indent=1) + "\n")
    _write_text(out / "recipes.md", markdown(summary))
    return summary
