"""Comparisons at matched downstream accuracy, with paired seed differences.

At one learning rate a method that learns the new task more slowly always looks as if it
forgets less, so methods are compared along their learning-rate frontiers instead: for each
seed, the points (A_down, y) over the learning rates that no other point beats on both axes,
linearly interpolated at a downstream level (`dowser.eval.metrics.upstream_at`). Levels are
fractions of the way from zero-shot's A_down to full-ft's best seed-mean A_down; a method whose
frontier does not reach a level has no value there. Differences against a baseline are paired by seed (same data order), then
averaged: mean +- standard error over seeds.
"""

from __future__ import annotations

from collections import defaultdict

from dowser.eval.metrics import h_score, mean_stderr, upstream_at

LEVELS = (0.5, 0.7, 0.9)  # of the way from zero-shot's A_down to full-ft's best (seed means)
BASELINES = ("random-mask", "full-ft")


def curves(records: list[dict], task: str, y: str) -> dict:
    """method -> seed -> [(A_down, y)] over the frontier's learning rates."""
    out: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        if r["task"] == task and r["phase"] == "frontier" and r.get(y) is not None:
            out[r["method"]][r["seed"]].append((r["a_down"], r[y]))
    return out


def stats(values: list[float]) -> dict:
    """{"mean", "se", "n"} of `values`, rounded to 4 places."""
    mean, se = mean_stderr(values)
    return {"mean": round(mean, 4), "se": round(se, 4), "n": len(values)}


def level_of(records: list[dict], task: str, fraction: float) -> float:
    """The A_down `fraction` of the way from zero-shot to full-ft's best seed mean."""
    full = defaultdict(list)
    zero = [r["a_down"] for r in records if r["task"] == task and r["method"] == "zero-shot"]
    for r in records:
        if r["task"] == task and r["phase"] == "frontier" and r["method"] == "full-ft":
            full[r["lr"]].append(r["a_down"])
    if not full:
        raise ValueError(f"{task}: no full-ft runs to set the matched levels")
    best = max(sum(v) / len(v) for v in full.values())
    start = sum(zero) / len(zero) if zero else 0.0
    return start + fraction * (best - start)


def matched(
    records: list[dict],
    baselines: tuple[str, ...] = BASELINES,
    levels: tuple[float, ...] = LEVELS,
    ys: tuple[str, ...] = ("a_up", "wer"),
) -> dict:
    """task -> level -> {"a_down", "methods": {method: {y, y_minus_<baseline>}}}."""
    result = {}
    for task in dict.fromkeys(r["task"] for r in records):
        per_level = {}
        for fraction in levels:
            level = level_of(records, task, fraction)
            row: dict = {}
            for y in ys:
                up = y != "wer"  # WER: lower is better
                at = {
                    m: {s: upstream_at(c, level, higher_is_better=up) for s, c in seeds.items()}
                    for m, seeds in curves(records, task, y).items()
                }
                for m, seeds in at.items():
                    if None in seeds.values() or m == "zero-shot":
                        continue
                    entry = row.setdefault(m, {})
                    entry[y] = stats(list(seeds.values()))
                    for b in baselines:
                        if b == m or b not in at or None in at[b].values():
                            continue
                        common = sorted(set(seeds) & set(at[b]))
                        entry[f"{y}_minus_{b}"] = stats([seeds[s] - at[b][s] for s in common])
            per_level[f"{fraction:g}"] = {"a_down": round(level, 4), "methods": row}
        result[task] = per_level
    return result


def best_h(records: list[dict], baselines: tuple[str, ...] = BASELINES) -> dict:
    """task -> method -> {"h": best over learning rates of each seed's H (mean +- se),
    "h_minus_<baseline>": paired by seed}."""
    result = {}
    for task in dict.fromkeys(r["task"] for r in records):
        per_seed = {
            m: {s: max(h_score(up, down) for down, up in pts) for s, pts in seeds.items()}
            for m, seeds in curves(records, task, "a_up").items()
        }
        rows = {}
        for m, seeds in per_seed.items():
            entry = {"h": stats(list(seeds.values()))}
            for b in baselines:
                if b != m and b in per_seed:
                    common = sorted(set(seeds) & set(per_seed[b]))
                    entry[f"h_minus_{b}"] = stats([seeds[s] - per_seed[b][s] for s in common])
            rows[m] = entry
        result[task] = rows
    return result


def diff_cell(entry: dict | None, key: str) -> str:
    """A table cell for the paired difference `entry[key]` ({"mean", "se", "n"}): "+0.012 ±
    0.003", in bold when beyond two standard errors with more than one seed; "-" if absent."""
    if not entry or key not in entry:
        return "-"
    d = entry[key]
    star = "**" if d["n"] > 1 and abs(d["mean"]) > 2 * d["se"] > 0 else ""
    return f"{star}{d['mean']:+.3f} ± {d['se']:.3f}{star}"
