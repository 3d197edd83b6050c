"""The estimator study's report: its Markdown tables and its two plots.

markdown(summary)       the ranking, then one table per setting
plots(summary, out)     estimators-kl.png (forgetting against KL), estimators-h.png
"""

from __future__ import annotations

from pathlib import Path

from dowser.forgetting.report import _num, _pm, _save
from dowser.forgetting.style import COLORS

NOISES = {"kl": "relative", "kl_absolute": "absolute"}  # result key -> perturbation noise


def markdown(summary: dict) -> str:
    """The study's tables: the ranking, then one table per setting."""
    rho = summary["spearman"]
    where = ", ".join(
        f"{s['task']} N={s['last_layers']} rho={s['update_ratio']:g}" for s in summary["settings"]
    )
    lines = [
        f"Mean over the settings ({where}).",
        "",
        "| estimator | mean best H | A_up at matched A_down | KL relative (x1e3) | "
        "KL absolute (x1e3) |",
        "|---|---|---|---|---|",
    ]
    for r in summary["ranking"]:
        kls = " | ".join("–" if r[k] is None else f"{1e3 * r[k]:.2f}" for k in NOISES)
        lines.append(
            f"| {r['name']} | {r['h_score']:.3f} ± {r['h_score_se']:.3f} | "
            f"{_num(r['a_up_matched'])} | {kls} |"
        )
    lines += [
        "",
        "Spearman rank correlation of KL with forgetting, over every setting and estimator: "
        f"relative noise {_fmt(rho['kl'])}, absolute noise {_fmt(rho['kl_absolute'])}",
    ]
    for s in summary["settings"]:
        lines += [
            "",
            f"### {s['task']}, N = {s['last_layers']}, rho = {s['update_ratio']:g}",
            "",
            f"zero-shot A_up = {_num(s['zero_shot_a_up'])}; matched A_down = "
            f"{s['matched_level']:.3f}; Spearman(KL, forgetting): relative "
            f"{_fmt(s['spearman']['kl'])}, absolute {_fmt(s['spearman']['kl_absolute'])}",
            "",
            "| estimator | best lr | A_up | A_down | H | A_up matched | forgetting | "
            "KL rel. (x1e3) | KL abs. (x1e3) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, m in s["methods"].items():
            b = m["best"]
            kl_text = " | ".join(
                "–" if not m.get(k) else f"{1e3 * m[k]['mean']:.2f} ± {1e3 * m[k]['se']:.2f}"
                for k in NOISES
            )
            forgetting = m["forgetting"]
            f_text = "–" if not forgetting else _pm(forgetting)
            lines.append(
                f"| {name} | {m['best_lr']:g} | {_pm(b['a_up'])} | {_pm(b['a_down'])} | "
                f"{_pm(b['h_score'])} | {_num(m['a_up_matched'])} | {f_text} | {kl_text} |"
            )
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "–" if x is None or x != x else f"{x:+.2f}"


def plots(summary: dict, out: Path) -> list[Path]:
    """estimators-kl.png (forgetting against KL, one colour per estimator, one marker per
    setting) and estimators-h.png (best H per setting and estimator, with standard errors)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = ["o", "s", "^", "D", "v"]
    legend = ", ".join(
        f"{markers[i % len(markers)]} {s['task']} N={s['last_layers']} rho={s['update_ratio']:g}"
        for i, s in enumerate(summary["settings"])
    )
    fig, axes = plt.subplots(1, 2, figsize=(14, 6), sharey=True)
    for ax, (key, noise) in zip(axes, NOISES.items(), strict=True):
        for i, s in enumerate(summary["settings"]):
            for name, m in s["methods"].items():
                if not (m.get(key) and m["forgetting"]):
                    continue
                ax.errorbar(
                    max(m[key]["mean"], 1e-12),  # log axis: a KL of 0 sits at the floor
                    m["forgetting"]["mean"],
                    xerr=m[key]["se"],
                    yerr=m["forgetting"]["se"],
                    color=COLORS.get(name),
                    marker=markers[i % len(markers)],
                    capsize=2,
                    label=name if i == 0 else None,
                )
        ax.set_xscale("log")
        rho = summary["spearman"][key]
        ax.set(
            xlabel=f"KL after {noise} noise on the trainable entries (held-out upstream text)",
            title=f"{noise} noise: Spearman with forgetting {_fmt(rho)}",
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("forgetting: zero-shot A_up - A_up (mean over learning rates)")
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"Does the training-free measure predict forgetting? ({legend})", fontsize=9)
    written = [_save(fig, out / "estimators-kl.png")]

    fig, ax = plt.subplots(figsize=(10, 5))
    names = [r["name"] for r in summary["ranking"]]
    width = 0.8 / max(1, len(summary["settings"]))
    for i, s in enumerate(summary["settings"]):
        x = [j + i * width for j in range(len(names))]
        h = [s["methods"][n]["best"]["h_score"]["mean"] if n in s["methods"] else 0 for n in names]
        se = [s["methods"][n]["best"]["h_score"]["se"] if n in s["methods"] else 0 for n in names]
        label = f"{s['task']} N={s['last_layers']} rho={s['update_ratio']:g}"
        ax.bar(x, h, width, yerr=se, capsize=2, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right")
    lows = [
        s["methods"][n]["best"]["h_score"]["mean"]
        for s in summary["settings"]
        for n in s["methods"]
    ]
    ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(lows) + 0.03))
    ax.set(ylabel="best H over the learning rates", title="Best H by estimator and setting")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    written.append(_save(fig, out / "estimators-h.png"))
    plt.close("all")
    return written
