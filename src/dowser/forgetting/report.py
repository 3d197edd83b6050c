"""Turn benchmark runs into numbers people can read: results.json, results.md, PNG plots.

Per downstream task and method:
  frontier   the (A_down, A_up) point of each learning rate, mean over seeds
  best       the learning rate with the best mean H, and its A_up, A_down, H (+- standard
             error over seeds)
  matched    A_up interpolated along the frontier at a common downstream level: 90 % of the
             best A_down full-ft reaches (None where a method's frontier does not span it)
  depth      the best H over the learning rates at each depth (last N decoder layers)
  ratio      the best H over the learning rates at each update ratio
The top-level "methods" list averages each method's best point over the downstream tasks.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from dowser.eval.metrics import mean_stderr, upstream_at
from dowser.forgetting.style import _style

MATCH_LEVEL = 0.9  # matched comparison at this fraction of full-ft's best A_down


def _stats(values: list[float]) -> dict:
    mean, se = mean_stderr(values)
    return {"mean": mean, "se": se, "n": len(values)}


def summarize(records: list[dict], config) -> dict:
    """Aggregate run records into per-task and overall tables (module doc)."""
    tasks: dict[str, dict] = {}
    for task in dict.fromkeys(r["task"] for r in records):
        rows = [r for r in records if r["task"] == task]
        order = list(dict.fromkeys([*config.methods, *config.depth_methods, *config.ratio_methods]))
        methods = sorted(
            dict.fromkeys(r["method"] for r in rows),
            key=lambda m: order.index(m) if m in order else len(order),
        )
        frontier = {m: _by(rows, m, "frontier", "lr") for m in methods}
        full = frontier.get("full-ft")
        level = MATCH_LEVEL * max(p["a_down"]["mean"] for p in full.values()) if full else None
        table = {}
        for m in methods:
            pts = frontier[m]
            if not pts:
                continue
            lr = max(pts, key=lambda k: pts[k]["h_score"]["mean"])
            curve = [(p["a_down"]["mean"], p["a_up"]["mean"]) for p in pts.values()]
            table[m] = {
                "best_lr": lr,
                **pts[lr],
                "a_up_matched": None if level is None else upstream_at(curve, level),
                "frontier": [{"lr": k, **v} for k, v in sorted(pts.items())],
                "depth": _sweep(rows, m, "depth", "last_layers", config.last_layers, pts),
                "ratio": _sweep(rows, m, "ratio", "update_ratio", config.update_ratio, pts),
                "encoder": _sweep(rows, m, "encoder", "encoder_layers", 0, pts),
                "encoder_frontier": [
                    {"lr": k, **v} for k, v in sorted(_by(rows, m, "encoder", "lr").items())
                ],
            }
            table[m]["a_up_matched_seeds"] = _matched_by_seed(rows, m, level, "a_up")
            if all("wer" in p for p in pts.values()):  # free-running transcription, matched
                wers = [(p["a_down"]["mean"], p["wer"]["mean"]) for p in pts.values()]
                table[m]["wer_matched"] = (
                    None if level is None else upstream_at(wers, level, higher_is_better=False)
                )
                table[m]["wer_matched_seeds"] = _matched_by_seed(rows, m, level, "wer")
        tasks[task] = {"matched_level": level, "methods": table}
    overall = []
    for m in dict.fromkeys(m for t in tasks.values() for m in t["methods"]):
        per = [t["methods"][m] for t in tasks.values() if m in t["methods"]]
        matched = [p["a_up_matched"] for p in per]
        overall.append(
            {
                "name": m,
                "a_up": float(np.mean([p["a_up"]["mean"] for p in per])),
                "a_down": float(np.mean([p["a_down"]["mean"] for p in per])),
                "h_score": float(np.mean([p["h_score"]["mean"] for p in per])),
                "h_score_se": float(
                    np.sqrt(np.sum([p["h_score"]["se"] ** 2 for p in per])) / len(per)
                ),
                "a_up_matched": None if None in matched else float(np.mean(matched)),
                "tasks": [t for t in tasks if m in tasks[t]["methods"]],
                "best_lr": {
                    t: tasks[t]["methods"][m]["best_lr"] for t in tasks if m in tasks[t]["methods"]
                },
            }
        )
        if all("wer" in p for p in per):
            wer_matched = [p.get("wer_matched") for p in per]
            overall[-1]["wer"] = float(np.mean([p["wer"]["mean"] for p in per]))
            overall[-1]["wer_matched"] = (
                None if None in wer_matched else float(np.mean(wer_matched))
            )
    return {"methods": overall, "tasks": tasks}


METRICS = ("a_up", "a_down", "h_score")
EXTRA = ("wer", "cer")  # speech track: greedy word / character error rates, when recorded


def _by(rows, method, phase, key) -> dict:
    """{value of `key`: stats of a_up, a_down, h_score (and wer, cer) over seeds} for one
    method and phase."""
    groups = defaultdict(list)
    for r in rows:
        if r["method"] == method and r["phase"] == phase:
            groups[r[key]].append(r)
    return {
        k: {
            m: _stats([r[m] for r in g])
            for m in (*METRICS, *EXTRA)
            if all(r.get(m) is not None for r in g)
        }
        for k, g in groups.items()
    }


def _matched_by_seed(rows, method, level, y: str) -> dict | None:
    """`y` interpolated at A_down = `level` along each seed's own frontier, then mean and
    standard error over seeds: the noise of a matched comparison. None unless every seed's
    frontier reaches the level."""
    if level is None:
        return None
    curves = defaultdict(list)
    for r in rows:
        if r["method"] == method and r["phase"] == "frontier" and r.get(y) is not None:
            curves[r["seed"]].append((r["a_down"], r[y]))
    values = [upstream_at(c, level, higher_is_better=y != "wer") for c in curves.values()]
    return None if not values or None in values else _stats(values)


def _sweep(rows, method, phase, key, default, frontier) -> list[dict]:
    """Per swept value, the best seed-mean H over the learning rates, with its point and lr;
    the default value's point is the frontier's best."""
    groups = defaultdict(list)
    for r in rows:
        if r["method"] == method and r["phase"] == phase:
            groups[r[key]].append(r)
    if not groups:
        return []
    points = {}
    for value, group in groups.items():
        by_lr = _by(group, method, phase, "lr")
        lr = max(by_lr, key=lambda k: by_lr[k]["h_score"]["mean"])
        points[value] = {"lr": lr, **by_lr[lr]}
    lr = max(frontier, key=lambda k: frontier[k]["h_score"]["mean"])
    points.setdefault(default, {"lr": lr, **frontier[lr]})
    return [{key: k, **v} for k, v in sorted(points.items())]


def markdown(result: dict) -> str:
    """The Markdown report: an overall table, then per task the frontier summary and sweeps."""
    speech = any("wer" in m for m in result["methods"])
    head = "| method | A_up | A_down | H | A_up at matched A_down |"
    lines = [head + (" WER | WER at matched A_down |" if speech else ""), _rule(5 + 2 * speech)]
    for m in result["methods"]:
        se = f" ± {m['h_score_se']:.3f}" if m["h_score_se"] > 0 else ""
        # a method run on fewer tasks than the others is averaged over those only
        some = m["tasks"]
        name = (
            m["name"] if len(some) == len(result["tasks"]) else f"{m['name']} ({', '.join(some)})"
        )
        row = (
            f"| {name} | {m['a_up']:.3f} | {m['a_down']:.3f} | "
            f"{m['h_score']:.3f}{se} | {_num(m['a_up_matched'])} |"
        )
        if speech:
            row += f" {_num(m.get('wer'))} | {_num(m.get('wer_matched'))} |"
        lines.append(row)
    for task, t in result["tasks"].items():
        level = "–" if t["matched_level"] is None else f"{t['matched_level']:.3f}"
        lines += [
            "",
            f"### downstream: {task}",
            "",
            f"Best learning rate of each method's sweep (mean ± standard error over seeds); "
            f"matched: A_up interpolated at A_down = {level} (90 % of full-ft's best) along "
            "each seed's frontier.",
            "",
        ]
        extra = [k for k in EXTRA if any(k in m for m in t["methods"].values())]
        lines += [
            "| method | best lr | A_up | A_down | H | A_up at matched |"
            + "".join(f" {k.upper()} |" for k in extra),
            _rule(6 + len(extra)),
        ]
        for name, m in t["methods"].items():
            matched = m.get("a_up_matched_seeds")
            lines.append(
                f"| {name} | {m['best_lr']:g} | {_pm(m['a_up'])} | {_pm(m['a_down'])} | "
                f"{_pm(m['h_score'])} | {_pm(matched) if matched else _num(m['a_up_matched'])} |"
                + "".join(f" {_pm(m[k]) if k in m else '–'} |" for k in extra)
            )
        for sweep, key, label in SWEEPS:
            swept = {n: m[sweep] for n, m in t["methods"].items() if m[sweep]}
            if not swept:
                continue
            values = sorted({p[key] for pts in swept.values() for p in pts})
            lines += [
                "",
                f"Best H over the learning rates (and that rate), by {sweep} ({label})",
                "",
                "| method | " + " | ".join(f"{label}={v:g}" for v in values) + " |",
                "|---|" + "---|" * len(values),
            ]
            for name, pts in swept.items():
                at = {p[key]: p for p in pts}
                cells = [
                    f"{_pm(at[v]['h_score'])} ({at[v]['lr']:g})" if v in at else "–" for v in values
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SWEEPS = (  # per-task sweep tables: (key in a method's table, run key, label)
    ("depth", "last_layers", "N"),
    ("ratio", "update_ratio", "rho"),
    ("encoder", "encoder_layers", "E"),
)


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['se']:.3f}" if s["n"] > 1 else f"{s['mean']:.3f}"


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _rule(columns: int) -> str:
    return "|" + "---|" * columns


def plots(result: dict, out: Path) -> list[Path]:
    """frontier-TASK.png (A_up against A_down over the learning rates), depth-TASK.png and
    ratio-TASK.png (H against the swept value); for the speech track also wer-TASK.png (WER
    against A_down) and frontier-encoder-TASK.png (the encoder phase's frontiers). Returns
    the files written."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, t in result["tasks"].items():
        level = t["matched_level"]
        curves = {n: m["frontier"] for n, m in t["methods"].items()}
        title = f"Forgetting frontier, fine-tuned on {task}\n(points: learning rates)"
        ylabel = "A_up (mean upstream accuracy)"
        written.append(
            _frontier(plt, curves, "a_up", ylabel, title, level, out / f"frontier-{task}.png")
        )
        if all("wer" in p for c in curves.values() for p in c):
            title = f"Free-running transcription, fine-tuned on {task}\n(points: learning rates)"
            path = out / f"wer-{task}.png"
            written.append(
                _frontier(plt, curves, "wer", "upstream WER (greedy)", title, level, path)
            )
        encoder = {
            n: m["encoder_frontier"] for n, m in t["methods"].items() if m["encoder_frontier"]
        }
        if encoder:
            layers = next(
                p for pts in t["methods"].values() for p in pts["encoder"] if p["encoder_layers"]
            )
            title = (
                f"Frontier when the last {layers['encoder_layers']} encoder layer(s) tune too, "
                f"{task}\n(points: learning rates)"
            )
            path = out / f"frontier-encoder-{task}.png"
            written.append(_frontier(plt, encoder, "a_up", ylabel, title, level, path))
        for sweep, key, xlabel in (
            ("depth", "last_layers", "tuned decoder layers (last N)"),
            ("ratio", "update_ratio", "update ratio rho"),
        ):
            swept = {n: m[sweep] for n, m in t["methods"].items() if m[sweep]}
            if not swept:
                continue
            fig, ax = plt.subplots(figsize=(8, 6))
            for name, pts in swept.items():
                ax.errorbar(
                    [p[key] for p in pts],
                    [p["h_score"]["mean"] for p in pts],
                    yerr=[p["h_score"]["se"] for p in pts],
                    label=name,
                    **_style(name),
                )
            if sweep == "ratio":
                ax.set_xscale("log")
            ax.set_xticks(sorted({p[key] for pts in swept.values() for p in pts}))
            ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.set(xlabel=xlabel, ylabel="H-score", title=f"H-score by {sweep}, {task}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, ncol=2)
            written.append(_save(fig, out / f"{sweep}-{task}.png"))
        plt.close("all")
    return written


def _frontier(plt, curves: dict, y: str, ylabel: str, title: str, level, path: Path) -> Path:
    """One plot of each method's (A_down, `y`) points over its learning rates."""
    fig, ax = plt.subplots(figsize=(8, 6))
    for name, pts in curves.items():
        pts = sorted(pts, key=lambda p: p["a_down"]["mean"])
        ax.errorbar(
            [p["a_down"]["mean"] for p in pts],
            [p[y]["mean"] for p in pts],
            xerr=[p["a_down"]["se"] for p in pts],
            yerr=[p[y]["se"] for p in pts],
            label=name,
            **_style(name),
        )
    if level is not None:
        ax.axvline(level, color="grey", ls=":", lw=1)
    ax.set(xlabel="A_down (downstream accuracy)", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    return path


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_report(result: dict, records: list[dict], out: Path) -> None:
    """results.json (with every run), results.md and the plots, each written atomically."""
    result["plots"] = [p.name for p in plots(result, out)]
    for old in out.glob("*.png"):  # plots of an earlier config that this run did not redraw
        if (
            old.name.startswith(("frontier-", "depth-", "ratio-", "wer-"))
            and old.name not in result["plots"]
        ):
            old.unlink()
    _write_text(out / "results.json", json.dumps({**result, "runs": records}, indent=1) + "\n")
    _write_text(out / "results.md", markdown(result))
