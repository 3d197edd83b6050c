"""The `dowser report` outputs: a Markdown table and a frontier plot of an lmms-eval report.

`report` is what `dowser.eval.lmms.build_report` returns (see that module for the figures).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dowser.errors import DowserError


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def markdown(report: Mapping) -> str:
    """The report as a Markdown table: scores in percent, retention as tuned/base."""
    base, runs = report["base"], report["runs"]
    head = ["task", "metric", f"base: {base['name']}"]
    for run in runs:
        head += [run["name"], "retention"]
    rows = [head, ["---"] * 2 + ["---:"] * (len(head) - 2)]
    for task, metric in report["metrics"].items():
        row = [task, metric, _pct(base["scores"][task])]
        for run in runs:
            row += [_pct(run["scores"][task]), _ratio(run["retention"][task])]
        rows.append(row)
    rows.append(
        ["A_up", "mean", _pct(base["a_up"])]
        + [c for r in runs for c in (_pct(r["a_up"]), _ratio(r["a_up_retention"]))]
    )
    down = report.get("downstream") or {}
    rows.append(
        ["A_down", down.get("name", "-"), ""] + [c for r in runs for c in (_pct(r["a_down"]), "")]
    )
    rows.append(["H", "harmonic mean", ""] + [c for r in runs for c in (_pct(r["h"]), "")])
    rows.append(
        ["learning rate", "", ""]
        + [c for r in runs for c in ("-" if r["lr"] is None else f"{r['lr']:g}", "")]
    )
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines += [f"\nNote: {n}" for n in report.get("notes", [])]
    return "\n".join(lines) + "\n"


def frontier_points(report: Mapping) -> list[tuple[float, float, float]]:
    """(lr, A_down, A_up) of the runs that have both a learning rate and A_down, by lr."""
    pts = [
        (r["lr"], r["a_down"], r["a_up"])
        for r in report["runs"]
        if r["lr"] is not None and r["a_down"] is not None
    ]
    return sorted(pts)


def check_plot(report: Mapping) -> None:
    """Refuse --plot unless two or more learning rates have a downstream accuracy."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise DowserError("--plot needs matplotlib: pip install matplotlib")
    if report.get("downstream") is None:
        raise DowserError("--plot needs --downstream: the frontier plots A_up against A_down")
    if len({lr for lr, _, _ in frontier_points(report)}) < 2:
        raise DowserError(
            "--plot needs tuned runs at two or more learning rates (give --lr RUN=LR, or name "
            "the runs with lr<NUMBER>)"
        )


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write `text` to `path` (check it with dowser.io.check_writable first)."""
    from dowser.io import write_atomic  # dowser.io imports torch: only when writing

    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def plot_frontier(report: Mapping, path: str | os.PathLike) -> None:
    """PNG of A_up against A_down, one point per learning rate, base A_up dashed."""
    check_plot(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = frontier_points(report)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p[1] * 100 for p in pts], [p[2] * 100 for p in pts], "o-", color="C0")
    for lr, down, up in pts:
        ax.annotate(
            f"lr {lr:g}",
            (down * 100, up * 100),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    ax.axhline(report["base"]["a_up"] * 100, color="grey", ls="--", lw=1, label="base A_up")
    down = report["downstream"]["name"]
    ax.set(
        xlabel=f"A_down ({down}, %)", ylabel="A_up (upstream mean, %)", title="Forgetting frontier"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        from dowser.io import write_atomic

        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
