"""The estimator study: which importance estimate keeps the most of what the model knew.

    dowser bench estimators --out DIR            # run_study(PRESETS["full"], DIR)

Every estimator of `dowser.probe` (STUDY: the mean-abs default, rms, tokenwise, gradient,
all positions, log-probs, and the no-Jacobian activation and wanda) plus magnitude and
random masks is trained through the forgetting benchmark (`dowser.forgetting.bench`) at
several settings (depth N, ratio rho), each over the masks' learning-rate grid and seeds.
Per setting and estimator the study reports:

  best H        the best seed-mean H over the learning rates (+- standard error over seeds)
  matched A_up  A_up along the frontier at the highest A_down every mask of the setting
                reaches (linear interpolation, as the forgetting report does)
  forgetting    zero-shot A_up minus A_up, averaged over the grid's learning rates and seeds
  KL            the training-free quality measure (`dowser.eval.perturbation_kl`): noise on
                the mask's trainable entries, KL of next-token distributions on held-out
                upstream sequences (mean +- standard error over noise draws), with noise
                relative to |W| ("kl") and of one scale per matrix ("kl_absolute")

and the Spearman rank correlation between each KL and forgetting over every (setting,
estimator) pair, and within each setting: does the cheap measure predict what training shows?
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dowser.eval.metrics import mean_stderr, upstream_at
from dowser.eval.perturbation import perturbation_kl
from dowser.forgetting.bench import BenchConfig, Prepared, prepare, run_benchmark
from dowser.forgetting.encode import Encoded
from dowser.forgetting.estimators_report import NOISES, markdown, plots
from dowser.forgetting.methods import Setting, tuned_mask
from dowser.forgetting.report import _by, _stats

STUDY: tuple[str, ...] = (
    "dowser",  # mean-abs, the default
    "dowser-rms",
    "dowser-tokenwise",
    "dowser-gradient",
    "dowser-all-positions",
    "dowser-log-probs",
    "dowser-activation",
    "dowser-wanda",
    "magnitude-mask",
    "random-mask",
)


@dataclass(frozen=True)
class StudyConfig:
    """The study: a forgetting-benchmark config plus the quality measure's settings."""

    bench: BenchConfig  # which runs (methods, tasks, settings, seeds, learning rates)
    kl_examples: int = 128  # held-out sequences per upstream task for the KL
    kl_sigma: float = 1.0  # noise scale: times |W| (relative) or the matrix's rms (absolute)
    kl_draws: int = 4  # noise draws per mask
    kl_seed: int = 0


def _bench(**kwargs) -> BenchConfig:
    return BenchConfig(methods=("zero-shot", "full-ft", *STUDY), **kwargs)


PRESETS: dict[str, StudyConfig] = {
    # the published figures: three settings on digits, the default one on wordnet-topic,
    # two seeds everywhere
    "full": StudyConfig(
        _bench(
            sweep_tasks=("digits",),
            depths=(2,),
            depth_methods=STUDY,
            ratios=(0.03,),
            ratio_methods=STUDY,
            sweep_seeds=(0, 1),
        )
    ),
    # the same settings, one seed, one learning rate: minutes
    "quick": StudyConfig(
        _bench(
            downstream=("digits",),
            lrs=(3e-4,),
            seeds=(0,),
            depths=(2,),
            depth_methods=STUDY,
            ratios=(0.03,),
            ratio_methods=STUDY,
        ),
        kl_examples=64,
        kl_draws=2,
    ),
}


def settings(config: BenchConfig, task: str | None = None) -> list[tuple[str, int, float]]:
    """(phase, depth, ratio) of every setting the study trains at (on `task`, if given)."""
    out = [("frontier", config.last_layers, config.update_ratio)]
    if task is not None and config.sweep_tasks is not None and task not in config.sweep_tasks:
        return out
    out += [("depth", d, config.update_ratio) for d in config.depths if config.depth_methods]
    out += [("ratio", config.last_layers, r) for r in config.ratios if config.ratio_methods]
    return out


def upstream_sequences(prep: Prepared, n: int, size: int = 32) -> list[dict]:
    """Model inputs of held-out upstream sequences: test prompts with their true answers."""
    batches = []
    for task in prep.upstream:
        cands, labels, k = prep.tests[task.name]
        rows = [i * k + int(labels[i]) for i in range(min(n, len(labels)))]
        for i in range(0, len(rows), size):
            batch = cands.batch(rows[i : i + size])
            batch.pop("labels")
            batches.append(batch)
    return batches


def mask_quality(prep: Prepared, study: StudyConfig, task: str) -> list[dict]:
    """The KL of every studied mask at every setting (random-mask: per seed, averaged).

    The studied masks do not depend on the downstream task (they are data-free), so `task`
    only names the training data `ScoreBank` is handed."""
    config = study.bench
    batches = upstream_sequences(prep, study.kl_examples)
    data: Encoded = prep.train[task]
    rows = []
    for phase, depth, ratio in settings(config):
        methods = [m for m in STUDY if m in _methods(config, phase)]
        for method in methods:
            trained = config.seeds if phase == "frontier" else config.sweep_seeds
            seeds = trained if method == "random-mask" else trained[:1]  # the trained masks
            kls: dict[str, list] = {noise: [] for noise in NOISES.values()}
            for seed in seeds:
                scores = prep.bank.get(method, seed=seed, task=task, data=data)
                setting = Setting(0.0, depth, ratio, seed, 0, 0)
                mask = tuned_mask(prep.base, setting, scores)
                for noise in NOISES.values():
                    kls[noise].append(
                        perturbation_kl(
                            prep.base,
                            mask,
                            batches,
                            sigma=study.kl_sigma,
                            draws=study.kl_draws,
                            seed=study.kl_seed,
                            noise=noise,
                        )
                    )
            row = {"phase": phase, "last_layers": depth, "update_ratio": ratio, "method": method}
            for key, noise in NOISES.items():
                per_draw = [v for k in kls[noise] for v in k.per_draw]
                mean, se = mean_stderr(per_draw)
                row[key] = {"mean": mean, "se": se, "n": len(per_draw)}
            rows.append(row)
    return rows


def _methods(config: BenchConfig, phase: str) -> tuple[str, ...]:
    return {
        "frontier": config.methods,
        "depth": config.depth_methods,
        "ratio": config.ratio_methods,
    }[phase]


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""

    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def summarize_study(records: list[dict], quality: list[dict], study: StudyConfig) -> dict:
    """Per task, setting and estimator: best H, matched A_up, forgetting, KL; the ranking
    (best H averaged over every task and setting) and the rank correlations."""
    config = study.bench
    out = []
    for task in config.downstream:
        zero = [r["a_up"] for r in records if r["method"] == "zero-shot" and r["task"] == task]
        a_up0 = float(np.mean(zero)) if zero else None
        for phase, depth, ratio in settings(config, task):
            rows = [
                r
                for r in records
                if r["task"] == task
                and r["phase"] == phase
                and r["last_layers"] == depth
                and r["update_ratio"] == ratio
                and r["method"] in STUDY
            ]
            table = _setting_table(rows, a_up0)
            if not table:
                continue
            level = min(max(p["a_down"]["mean"] for p in t["frontier"]) for t in table.values())
            for t in table.values():
                curve = [(p["a_down"]["mean"], p["a_up"]["mean"]) for p in t["frontier"]]
                t["a_up_matched"] = upstream_at(curve, level)
            for q in quality:
                here = (q["phase"], q["last_layers"], q["update_ratio"]) == (phase, depth, ratio)
                if here and q["method"] in table:
                    table[q["method"]].update({key: q[key] for key in NOISES})
            out.append(
                {
                    "task": task,
                    "phase": phase,
                    "last_layers": depth,
                    "update_ratio": ratio,
                    "zero_shot_a_up": a_up0,
                    "matched_level": level,
                    "methods": table,
                    "spearman": {key: _correlation([table], key) for key in NOISES},
                }
            )
    tables = [s["methods"] for s in out]
    return {
        "settings": out,
        "spearman": {key: _correlation(tables, key) for key in NOISES},
        "ranking": _ranking(out),
    }


def _setting_table(rows: list[dict], a_up0: float | None) -> dict:
    """Per estimator: frontier points (seed means), the best one, forgetting."""
    table = {}
    for method in STUDY:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        # rows hold one setting: grouping by learning rate is the forgetting report's
        points = dict(sorted(_by(mine, method, mine[0]["phase"], "lr").items()))
        best = max(points, key=lambda lr: points[lr]["h_score"]["mean"])
        forgetting = None
        if a_up0 is not None:  # per seed: mean over the grid, then over seeds
            per_seed: dict[int, list] = {}
            for r in mine:
                per_seed.setdefault(r["seed"], []).append(a_up0 - r["a_up"])
            forgetting = _stats([float(np.mean(v)) for v in per_seed.values()])
        table[method] = {
            "best_lr": best,
            "best": points[best],
            "frontier": [{"lr": lr, **p} for lr, p in points.items()],
            "forgetting": forgetting,
        }
    return table


def _correlation(tables: list[dict], key: str = "kl") -> float | None:
    """Spearman between a KL (`key`) and forgetting over every estimator of `tables`."""
    pairs = [
        (m[key]["mean"], m["forgetting"]["mean"])
        for t in tables
        for m in t.values()
        if m.get(key) and m.get("forgetting")
    ]
    if len(pairs) < 3:
        return None
    rho = spearman(*zip(*pairs, strict=True))
    return None if rho != rho else rho  # constant values: no correlation to report


def _ranking(settings_: list[dict]) -> list[dict]:
    """Estimators by their best H averaged over the settings (with the combined SE)."""
    names = dict.fromkeys(m for s in settings_ for m in s["methods"])
    rows = []
    for name in names:
        per = [s["methods"][name] for s in settings_ if name in s["methods"]]
        rows.append(
            {
                "name": name,
                "h_score": float(np.mean([p["best"]["h_score"]["mean"] for p in per])),
                "h_score_se": float(
                    np.sqrt(np.sum([p["best"]["h_score"]["se"] ** 2 for p in per])) / len(per)
                ),
                "a_up_matched": _mean_or_none([p["a_up_matched"] for p in per]),
                **{
                    key: _mean_or_none([p[key]["mean"] for p in per if p.get(key)])
                    for key in NOISES
                },
            }
        )
    return sorted(rows, key=lambda r: -r["h_score"])


def _mean_or_none(values: list) -> float | None:
    """The mean of the values that exist (a frontier that does not span the matched level
    has no matched A_up), or None."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def run_study(
    study: StudyConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cache: Path | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Train every run (resumable, as the forgetting benchmark), measure every mask's KL,
    write OUT/estimators.json, estimators.md and the two plots (besides the benchmark's own
    results.json, results.md and frontier plots)."""
    from dowser.forgetting.report import _write_text

    out = Path(out)
    prep = prepare(study.bench, cache=cache, progress=progress)
    result = run_benchmark(
        study.bench,
        out,
        resume=resume,
        overwrite=overwrite,
        cache=cache,
        progress=progress,
        log=log,
        prepared=prep,
    )
    torch.manual_seed(0)
    quality = mask_quality(prep, study, study.bench.downstream[0])  # task-independent
    summary = summarize_study(result["runs"], quality, study)
    summary["quality_measure"] = {
        "sigma": study.kl_sigma,
        "draws": study.kl_draws,
        "examples_per_upstream_task": study.kl_examples,
    }
    summary["machine"] = result["machine"]
    summary["plots"] = [p.name for p in plots(summary, out)]
    _write_text(out / "estimators.json", json.dumps(summary, indent=1) + "\n")
    _write_text(out / "estimators.md", markdown(summary))
    return summary
