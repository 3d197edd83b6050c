"""How robust is the Whisper track's comparison? Matched comparisons at several levels, paired
differences with their noise, and what the masks pick on the real model.

1. Matched levels: for each downstream task, A_up and WER interpolated at three downstream
   levels, 50 %, 70 % and 90 % of the way from zero-shot's A_down to full-ft's best, along each
   seed's own frontier (mean +- standard error over seeds), and the paired difference of each
   method against random-mask and full-ft (per seed, then mean +- standard error): one level
   could favour a method by chance.
2. Mask overlap on Whisper tiny.en: the fraction of one mask's trainable entries that another
   mask also leaves trainable (0.1 = chance at rho = 0.1), at the default setting.

    python bench/whisper_analysis.py [--runs bench/results/forgetting-whisper/runs.jsonl]
        # -> bench/results/whisper-analysis.json (part 2 probes the model: a few minutes)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dowser.forgetting.matched import matched

MASKS = ("dowser", "dowser-rms", "magnitude-mask", "wanda-mask", "random-mask")


def overlaps(cache: Path | None) -> dict:
    """{a: {b: share of a's trainable entries b also trains}} on Whisper tiny.en."""
    from dowser.forgetting.methods import Setting, tuned_mask
    from dowser.forgetting.speech.track import prepare_speech, speech_presets

    config = speech_presets()["full"]
    prep = prepare_speech(config, cache=cache, progress=False)
    task = config.downstream[0]
    setting = Setting(0.0, config.last_layers, config.update_ratio, 0, 0, 0)
    masks = {}
    for m in MASKS:
        scores = prep.bank.get(m, seed=0, task=task, data=prep.train_data(task, 0))
        masks[m] = tuned_mask(prep.base, setting, scores)
    out = {}
    for a in MASKS:
        total = sum(int(t.sum()) for t in masks[a].values())
        out[a] = {
            b: round(sum(int((masks[a][k] & masks[b][k]).sum()) for k in masks[a]) / total, 4)
            for b in MASKS
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="bench/results/forgetting-whisper/runs.jsonl")
    ap.add_argument("--cache", default=None, help="model and speech cache (default ~/.cache)")
    ap.add_argument("--out", default="bench/results/whisper-analysis.json")
    ap.add_argument("--no-overlap", action="store_true", help="skip part 2 (no model needed)")
    args = ap.parse_args()
    records = [json.loads(line) for line in Path(args.runs).read_text().splitlines() if line]
    from dowser.forgetting.bench import machine

    result = {"runs": args.runs, "machine": machine(), "matched": matched(records)}
    for task, levels in result["matched"].items():
        for fraction, entry in levels.items():
            print(
                f"{task}, A_down = {entry['a_down']:.3f} ({fraction} of the way to full-ft's best):"
            )
            for m, row in entry["methods"].items():
                diff = row.get("a_up_minus_random-mask")
                versus = f"  vs random {diff['mean']:+.3f} ± {diff['se']:.3f}" if diff else ""
                print(f"  {m:>15} A_up {row['a_up']['mean']:.3f} ± {row['a_up']['se']:.3f}{versus}")
    if not args.no_overlap:
        result["overlap"] = overlaps(Path(args.cache) if args.cache else None)
        for a, row in result["overlap"].items():
            print(f"{a:>15} " + " ".join(f"{b}={v:.3f}" for b, v in row.items()))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
