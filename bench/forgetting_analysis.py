"""Why do the masks rank as they do? Two checks on the forgetting benchmark's model.

1. Mask overlap: for each pair of methods, the fraction of one mask's trainable entries that
   the other mask also leaves trainable (0.1 = chance at rho = 0.1, 1 = the same mask).
2. Probing budget: dowser with 4x the synthetic samples (256 instead of 64), on the
   benchmark's first downstream task, at the masks' learning rates and seeds.

    python bench/forgetting_analysis.py [--cache DIR]   # -> bench/results/forgetting-analysis.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dowser.forgetting.bench import PRESETS, Runner, machine, plan, prepare
from dowser.forgetting.methods import ScoreBank, Setting, tuned_mask

MASKS = ("dowser", "dowser-rms", "dowser-data", "magnitude-mask", "wanda-mask", "random-mask")
BUDGET = 256  # synthetic probing samples for the budget check (the default is 64)


def overlaps(prep, config) -> dict:
    """{a: {b: |trainable(a) & trainable(b)| / |trainable(a)|}} at the default setting."""
    task = config.downstream[0]
    setting = Setting(0.0, config.last_layers, config.update_ratio, 0, 0, 0)
    masks = {}
    for m in MASKS:
        scores = prep.bank.get(m, seed=0, task=task, data=prep.train[task])
        masks[m] = tuned_mask(prep.base, setting, scores)
    out = {}
    for a in MASKS:
        total = sum(int(t.sum()) for t in masks[a].values())
        out[a] = {
            b: sum(int((masks[a][k] & masks[b][k]).sum()) for k in masks[a]) / total for b in MASKS
        }
    return out


def budget(prep, config) -> list[dict]:
    """Dowser frontier runs with BUDGET probing samples instead of the default."""
    task = config.downstream[0]
    bank = ScoreBank(prep.base, prep.processor, probe_kwargs={"num_samples": BUDGET})
    runner = Runner(config, prep, progress=False)
    runner.prep = type(prep)(**{**prep.__dict__, "bank": bank})
    records = []
    for run in plan(config, task, "frontier"):
        if run["method"] == "dowser":
            rec = runner.execute(run)
            rec["num_samples"] = BUDGET
            records.append(rec)
            print(
                f"dowser x{BUDGET} samples lr={rec['lr']:g} seed={rec['seed']}: "
                f"A_up={rec['a_up']:.3f} A_down={rec['a_down']:.3f} H={rec['h_score']:.3f}"
            )
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None, help="pretrained-model cache (default ~/.cache)")
    ap.add_argument("--out", default="bench/results/forgetting-analysis.json")
    args = ap.parse_args()
    config = PRESETS["full"]
    prep = prepare(config, cache=Path(args.cache) if args.cache else None, progress=False)
    result = {"machine": machine(), "overlap": overlaps(prep, config)}
    for a, row in result["overlap"].items():
        print(f"{a:>15} " + " ".join(f"{b}={v:.3f}" for b, v in row.items()))
    result["budget"] = budget(prep, config)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
