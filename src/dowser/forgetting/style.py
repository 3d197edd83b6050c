"""How each method looks in every plot: one fixed colour, and a heavier line for dowser's."""

from __future__ import annotations

COLORS = {  # one fixed colour per method, the same in every plot
    "zero-shot": "black",
    "full-ft": "tab:gray",
    "lora": "tab:olive",
    "random-mask": "tab:red",
    "magnitude-mask": "tab:brown",
    "wanda-mask": "tab:pink",
    "dowser": "tab:blue",
    "dowser-rms": "tab:cyan",
    "dowser-data": "navy",
    "dowser-tokenwise": "tab:green",
    "dowser-gradient": "darkviolet",
    "dowser-all-positions": "teal",
    "dowser-log-probs": "royalblue",
    "dowser-activation": "darkorange",
    "dowser-wanda": "hotpink",
    "dowser-drift": "limegreen",
    "dowser-sqrt-w": "slateblue",
    "dowser-gradient-drift": "plum",
    "dowser-task-split": "crimson",
    "dowser-task-ratio": "salmon",
    "task-gradient-mask": "maroon",
    "dowser-rows": "darkkhaki",
    "dowser-columns": "khaki",
    "dowser-soft": "deepskyblue",
    "dowser-random-half": "darkgreen",
    "dowser-task-split-n16": "lightcoral",
    "dowser-task-split-n64": "indianred",
    "dowser-spider": "sandybrown",
    "random-mask-spider": "peru",
    "dowser-refresh": "midnightblue",
    "spider": "tab:orange",
    "model-tailor": "tab:green",
    "dare": "tab:purple",
    "grafting": "gold",
}


def _style(name: str) -> dict:
    ours = name.startswith("dowser")
    style = {
        "color": COLORS.get(name),
        "capsize": 2,
        "lw": 2.5 if ours else 1.2,
        "marker": "o" if ours else ".",
        "ms": 7 if ours else 6,
    }
    if name == "zero-shot":
        style.update(marker="*", ms=14, ls="none")
    return style
