"""The continual benchmark's numbers: the field's metrics, results.json, results.md, plots.

An accuracy matrix `acc` has one row per stage s = 0..T (0: the pretrained model, s: after
the s-th downstream task) and one column per task: the U upstream tasks first, then the T
downstream tasks in training order, so downstream task t (1-based) is column U + t - 1 and
was trained at stage t. With that layout (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018):

    average accuracy   ACC = (1/T) sum_t acc[T][U+t-1]                      (end, downstream)
    backward transfer  BWT = 1/(T-1) sum_{t<T} (acc[T][U+t-1] - acc[t][U+t-1])
    forgetting         f_j = max_{s in S_j} acc[s][j] - acc[T][j], S_j the stages from when
                       task j was learnt (0 for upstream, t for downstream) to T - 1; none for
                       the last task (it cannot have been forgotten yet)
    A_up               (1/U) sum_u acc[T][u]                                  (end, upstream)

Each method's reported matrix is the mean over seeds at its best learning rate: the one with
the highest mean H = 2 A_up ACC / (A_up + ACC) at the end (as the single-task benchmark picks
best H). The per-lr points (ACC and A_up at the end, mean +- standard error over seeds) are
the method's frontier.

Methods are compared at matched ACC (`matched_end`, as `dowser.forgetting.matched` compares
single tasks): on each seed's frontier over learning rates, A_up and BWT are interpolated
at ACC levels a fraction of the way from the pretrained model's ACC (stage 0) to full-ft's
best seed-mean ACC, then differenced against a baseline paired by seed.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from dowser.eval.metrics import h_score, mean_stderr
from dowser.forgetting.matched import best_h, diff_cell, matched
from dowser.forgetting.report import _save, _write_text
from dowser.forgetting.style import COLORS as SINGLE_TASK_COLORS
from dowser.forgetting.style import _style

# the single-task benchmark's colours where a method has one there; the Dowser variants blues
COLORS = {
    **{m: SINGLE_TASK_COLORS[m] for m in ("full-ft", "lora", "random-mask", "spider")},
    "dowser-static": "tab:blue",
    "dowser-reprobe": "tab:cyan",
    "dowser-reprobe-exclude": "navy",
    "merge": "tab:purple",
    "merge-exclude": "tab:pink",
}


def _shape(acc, n_upstream: int) -> np.ndarray:
    a = np.asarray(acc, dtype=float)
    if a.ndim != 2 or a.shape[0] < 2 or a.shape[1] != n_upstream + a.shape[0] - 1:
        raise ValueError(
            f"accuracy matrix of shape {a.shape}: want (T + 1) x (U + T) with U = {n_upstream}"
        )
    return a


def average_accuracy(acc, n_upstream: int) -> float:
    """Mean accuracy over the downstream tasks after the last stage."""
    a = _shape(acc, n_upstream)
    return float(a[-1, n_upstream:].mean())


def backward_transfer(acc, n_upstream: int) -> float | None:
    """Mean over downstream t < T of acc[T][t] - acc[t][t] (None with a single task)."""
    a = _shape(acc, n_upstream)
    T = a.shape[0] - 1
    if T < 2:
        return None
    return float(
        np.mean([a[T, n_upstream + t - 1] - a[t, n_upstream + t - 1] for t in range(1, T)])
    )


def forgetting(acc, n_upstream: int) -> list[float | None]:
    """Per task (column): best accuracy over the stages since it was learnt, before the last,
    minus the last; None for the last downstream task."""
    a = _shape(acc, n_upstream)
    T = a.shape[0] - 1
    out: list[float | None] = []
    for j in range(a.shape[1]):
        learnt = 0 if j < n_upstream else j - n_upstream + 1
        out.append(None if learnt == T else float(a[learnt:T, j].max() - a[T, j]))
    return out


def a_up(acc, n_upstream: int) -> float:
    """Mean upstream accuracy after the last stage."""
    a = _shape(acc, n_upstream)
    return float(a[-1, :n_upstream].mean())


def metrics(acc, n_upstream: int) -> dict:
    """Every metric of one matrix (module doc); mean_forgetting over downstream t < T."""
    f = forgetting(acc, n_upstream)
    down = [x for x in f[n_upstream:] if x is not None]
    return {
        "average_accuracy": average_accuracy(acc, n_upstream),
        "backward_transfer": backward_transfer(acc, n_upstream),
        "a_up": a_up(acc, n_upstream),
        "forgetting": f,
        "mean_forgetting": float(np.mean(down)) if down else None,
    }


MATCH_BASELINES = ("random-mask", "spider", "full-ft")


def matched_end(records: list[dict], n_upstream: int) -> dict:
    """{"best_h": method -> {"h", "h_minus_<baseline>"}, "matched": level -> {"a_down": the
    ACC level, "methods": method -> {"a_up", "bwt", "<y>_minus_<baseline>"}}} (module doc)."""
    flat = [{"task": "seq", "phase": "zero-shot", "method": "zero-shot", "seed": 0, "lr": 0}]
    flat[0]["a_down"] = float(np.mean(records[0]["accuracy"][0][n_upstream:]))
    for r in records:
        m = metrics(r["accuracy"], n_upstream)
        flat.append(
            {
                **{k: r[k] for k in ("method", "seed", "lr")},
                **{"task": "seq", "phase": "frontier", "a_down": m["average_accuracy"]},
                **{"a_up": m["a_up"], "bwt": m["backward_transfer"]},
            }
        )
    if not any(r["method"] == "full-ft" for r in records):
        return {}
    return {
        "best_h": best_h(flat, MATCH_BASELINES)["seq"],
        "matched": matched(flat, MATCH_BASELINES, ys=("a_up", "bwt"))["seq"],
    }


def _stats(values: list) -> dict | None:
    if not values or any(v is None for v in values):
        return None
    mean, se = mean_stderr(values)
    return {"mean": round(mean, 4), "se": round(se, 4), "n": len(values)}


def summarize(records: list[dict], config, *, tasks: list[str], upstream: list[str]) -> dict:
    """results.json's content: `tasks`, `upstream`, `sequence` and `methods`, one entry per
    method at its best learning rate (module doc) with its per-seed runs and frontier."""
    u = len(upstream)
    by: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r["method"]][r["lr"]].append(r)
    methods = []
    for name in [m for m in config.methods if m in by]:
        frontier = []
        for lr, runs in sorted(by[name].items()):
            per = [metrics(r["accuracy"], u) for r in runs]
            point = {"lr": lr, "seeds": [r["seed"] for r in runs]}
            for k in ("average_accuracy", "a_up", "backward_transfer", "mean_forgetting"):
                point[k] = _stats([p[k] for p in per])
            point["h_score"] = _stats([h_score(p["a_up"], p["average_accuracy"]) for p in per])
            frontier.append(point)
        best = max(frontier, key=lambda p: p["h_score"]["mean"])
        runs = sorted(by[name][best["lr"]], key=lambda r: r["seed"])
        mean = np.mean([r["accuracy"] for r in runs], axis=0)
        m = metrics(mean, u)
        per_seed = [
            {"seed": r["seed"], "accuracy": r["accuracy"], **metrics(r["accuracy"], u)}
            for r in runs
        ]
        mean_f = [
            None
            if any(p["forgetting"][j] is None for p in per_seed)
            else round(float(np.mean([p["forgetting"][j] for p in per_seed])), 4)
            for j in range(len(tasks))
        ]
        methods.append(
            {
                "name": name,
                "lr": best["lr"],
                "accuracy": np.round(mean, 4).tolist(),
                "average_accuracy": round(m["average_accuracy"], 4),
                "backward_transfer": _round(m["backward_transfer"]),
                "a_up": round(m["a_up"], 4),
                "forgetting": dict(zip(tasks, mean_f, strict=True)),
                "mean_forgetting": best["mean_forgetting"],
                "h_score": best["h_score"],
                "se": {k: best[k] for k in ("average_accuracy", "a_up", "backward_transfer")},
                "mask_reused": runs[0].get("mask_reused"),
                "seeds": per_seed,
                "frontier": frontier,
            }
        )
    return {
        "tasks": tasks,
        "upstream": upstream,
        "sequence": tasks[u:],
        "methods": methods,
        **(matched_end(records, u) if records else {}),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _pm(s: dict | None, value: float | None = None) -> str:
    if s is None:
        return "–" if value is None else f"{value:.3f}"
    return f"{s['mean']:.3f} ± {s['se']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def markdown(result: dict) -> str:
    """The summary table (each method at its best lr), then every method's matrix."""
    tasks, u = result["tasks"], len(result["upstream"])
    lines = [
        f"Sequence: {' -> '.join(result['sequence'])} after pretraining on "
        f"{', '.join(result['upstream'])}. End of sequence, each method at its best learning "
        "rate (highest H of ACC and A_up; mean ± standard error over seeds):",
        "",
        "| method | lr | ACC (downstream) | BWT | mean forgetting | A_up | "
        + " | ".join(f"{t} (end)" for t in tasks)
        + " |",
        "|" + "---|" * (6 + len(tasks)),
    ]
    for m in result["methods"]:
        se = m["se"]
        lines.append(
            f"| {m['name']} | {m['lr']:g} | {_pm(se['average_accuracy'])} | "
            f"{_pm(se['backward_transfer'], m['backward_transfer'])} | "
            f"{_pm(m['mean_forgetting'])} | {_pm(se['a_up'])} | "
            + " | ".join(f"{a:.3f}" for a in m["accuracy"][-1])
            + " |"
        )
    if result.get("matched"):
        lines += ["", *_matched_table(result)]
    lines += ["", "Accuracy matrices (row: after stage s; 0 = pretrained):", ""]
    for m in result["methods"]:
        reused = m.get("mask_reused")
        note = f" (share of each stage's mask trained before: {reused})" if reused else ""
        lines += [f"**{m['name']}**, lr {m['lr']:g}{note}", ""]
        lines.append("| stage | " + " | ".join(tasks) + " |")
        lines.append("|" + "---|" * (1 + len(tasks)))
        names = ["pretrained", *tasks[u:]]
        for s, row in enumerate(m["accuracy"]):
            lines.append(f"| {s} {names[s]} | " + " | ".join(f"{a:.3f}" for a in row) + " |")
        lines.append("")
    return "\n".join(lines)


def _matched_table(result: dict) -> list[str]:
    """Best H and A_up / BWT at matched ACC against random-mask and SPIDER (module doc)."""
    levels = result["matched"]
    lines = [
        "At matched ACC (levels: fraction of the way from the pretrained model's ACC to "
        "full-ft's best: "
        + ", ".join(f"{k} = {v['a_down']:.3f}" for k, v in levels.items())
        + "); differences paired by seed, mean ± standard error, **bold** beyond two standard "
        "errors, – where a frontier does not reach the level:",
        "",
        "| method | best H | H − random |"
        + "".join(f" A_up − random @{k} |" for k in levels)
        + "".join(f" A_up − spider @{k} |" for k in levels)
        + "".join(f" BWT − random @{k} |" for k in levels),
        "|" + "---|" * (3 + 3 * len(levels)),
    ]
    for m, e in sorted(result["best_h"].items(), key=lambda kv: -kv[1]["h"]["mean"]):
        row = f"| {m} | {_pm(e['h'])} | {diff_cell(e, 'h_minus_random-mask')} |"
        for key in ("a_up_minus_random-mask", "a_up_minus_spider", "bwt_minus_random-mask"):
            row += "".join(f" {diff_cell(v['methods'].get(m), key)} |" for v in levels.values())
        lines.append(row)
    return lines


def plots(result: dict, out: Path) -> list[Path]:
    """heatmap-METHOD.png per method, heatmaps.png (all panels) and frontier.png (A_up
    against ACC at the end, one point per learning rate). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, u = result["tasks"], len(result["upstream"])
    stages = ["0 pretrained", *(f"{s} {t}" for s, t in enumerate(tasks[u:], 1))]
    written = []

    def panel(ax, m):
        im = ax.imshow(m["accuracy"], vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for s, row in enumerate(m["accuracy"]):
            for j, a in enumerate(row):
                color = "black" if a > 0.6 else "white"  # readable on viridis
                ax.text(j, s, f"{a:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(stages)), stages, fontsize=8)
        ax.axvline(u - 0.5, color="white", lw=2)  # upstream | downstream
        ax.set_title(f"{m['name']} (lr {m['lr']:g})", fontsize=10)
        return im

    for m in result["methods"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        fig.colorbar(panel(ax, m), ax=ax, label="accuracy")
        written.append(_save(fig, out / f"heatmap-{m['name']}.png"))
        plt.close(fig)
    n = len(result["methods"])
    if n:
        cols = min(4, n)
        rows = -(-n // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        for ax, m in zip(axes.flat, result["methods"], strict=False):
            panel(ax, m)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle("Accuracy after each stage (rows) on each task (columns)")
        written.append(_save(fig, out / "heatmaps.png"))
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 6))
    for m in result["methods"]:
        pts = m["frontier"]  # in learning-rate order: ACC need not grow with it here
        ax.errorbar(
            [p["average_accuracy"]["mean"] for p in pts],
            [p["a_up"]["mean"] for p in pts],
            xerr=[p["average_accuracy"]["se"] for p in pts],
            yerr=[p["a_up"]["se"] for p in pts],
            label=m["name"],
            **{**_style(m["name"]), "color": COLORS.get(m["name"])},
        )
    ax.set(
        xlabel="ACC: mean downstream accuracy at the end",
        ylabel="A_up at the end",
        title="Continual frontier (points: learning rates, joined from low to high)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    written.append(_save(fig, out / "frontier.png"))
    plt.close(fig)
    return written


def write_report(result: dict, records: list[dict], out: Path) -> None:
    """results.json (with every run), results.md and the plots, each written atomically."""
    result["plots"] = [p.name for p in plots(result, out)]
    for old in out.glob("heatmap-*.png"):  # methods an earlier config had and this one lacks
        if old.name not in result["plots"]:
            old.unlink()
    _write_text(out / "results.json", json.dumps({**result, "runs": records}, indent=1) + "\n")
    _write_text(out / "results.md", markdown(result) + "\n")
