"""GPU benchmark: the whole Dowser probe of a 7B-shaped model, the reference, one optimizer step.

On one GPU, in one process, with random bfloat16 weights (the cost does not depend on them):

1. `dowser.probe` at the reference settings (64 self-generated samples of 64 tokens, batches
   of 4, 8 Hutchinson probes), self-generation included: wall time and peak GPU memory.
2. The reference algorithm (bench/probe.py's, `dowser.probing.reference`) on the first
   `--ref-batches` of the same batches, extrapolated to all of them, plus the same
   generation time; and the largest relative difference between its scores and Dowser's
   on those batches.
3. A 10 % Dowser mask over every attention and MLP weight, built on the GPU.
4. One training step (forward, backward, optimizer step) on a probing batch with SparseAdamW
   and with dense torch AdamW over the same weights: step time and peak GPU memory.

Targets for the 7B shape on one H200: probe <= 30 s, >= 20x faster than the reference,
peak probe memory <= 1.2x the weights. The run fits one 8-minute call.

    python bench/gpu.py                                  # 7B-shaped Llama on cuda
    python bench/gpu.py --size tiny --device cpu --num-samples 8 --out /tmp/gpu.json
                                                         # smoke run anywhere (seconds)

Writes bench/results/gpu-<machine>.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
from common import SIZES, PeakRSS, build_model, machine_name

import dowser
from dowser.probing.reference import reference_probe
from dowser.probing.synthetic import synthetic_batches
from dowser.targets import select_targets

GiB = 2**30


class Phase:
    """Wall time (device synchronised) and peak device memory of a block of work."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        self._sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.t0
        self.peak = torch.cuda.max_memory_allocated() if self.cuda else None

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def train_step(model, batch: dict, opt) -> float:
    """Forward, backward and one optimizer step; seconds of the optimizer step alone."""
    model(**batch, labels=batch["input_ids"]).loss.backward()
    with Phase("cuda" if batch["input_ids"].is_cuda else "cpu") as step:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return step.seconds


def steps(model, mask, batch: dict, mode: str, device: str) -> dict:
    """One warm-up and one timed training step under `mode` (sparse-adamw or adamw)."""
    dowser.prepare_model(model, mask)
    if mode == "sparse-adamw":
        opt = dowser.SparseAdamW(model, mask, lr=1e-5)
    else:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    train_step(model, batch, opt)  # the first step allocates the optimizer state
    with Phase(device) as whole:
        step_s = train_step(model, batch, opt)
    state = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    out = {"step_s": step_s, "iteration_s": whole.seconds, "state_bytes": state}
    if whole.peak is not None:
        out["peak_gpu_bytes"] = whole.peak
    if mode == "sparse-adamw":
        opt.remove_hooks()
    del opt
    gc.collect()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-probes", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--ref-batches", type=int, default=1, help="0: skip the reference")
    parser.add_argument("--compare", type=int, default=8, help="weights compared to the reference")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--out", default=None, help="default: bench/results/gpu-<machine>.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (and a small --size)")
    device, dtype = args.device, getattr(torch, args.dtype)
    report: dict = {"machine": machine_name(device), "device": device, "dtype": args.dtype}

    with Phase(device) as build:
        model = build_model(args.size, dtype, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    report["model"] = f"Llama {args.size}, random weights, {count / 1e6:,.1f}M parameters"
    report["weights_bytes"] = weights
    report["build_s"] = build.seconds
    settings = dict(num_samples=args.num_samples, batch_size=args.batch_size, seq_len=args.seq_len)
    report["settings"] = {**settings, "num_probes": args.num_probes}
    print(f"{report['model']} on {report['machine']}: built in {build.seconds:.1f} s")

    # 1. the whole probe, self-generation included
    with Phase(device) as whole:
        scores = dowser.probe(model, num_probes=args.num_probes, seed=0, progress=False, **settings)
    with Phase(device) as gen:  # the generation alone, for the breakdown and the reference
        batches = synthetic_batches(model, seed=0, progress=False, **settings)
    report["dowser"] = {"seconds": whole.seconds, "generation_s": gen.seconds}
    if whole.peak is not None:
        report["dowser"]["peak_gpu_bytes"] = whole.peak
        report["dowser"]["peak_over_weights"] = whole.peak / weights
    print(f"dowser.probe: {whole.seconds:.1f} s (generation {gen.seconds:.1f} s)")

    # 2. the reference on the first batches, extrapolated
    if args.ref_batches:
        part = batches[: args.ref_batches]
        targets = select_targets(model)
        with PeakRSS() as rss, Phase(device) as ref:
            dense = reference_probe(model, part, targets, num_probes=args.num_probes, seed=0)
        per_batch = ref.seconds / len(part)
        extrapolated = per_batch * len(batches) + gen.seconds
        ours = dowser.probe(model, batches=part, num_probes=args.num_probes, seed=0, progress=False)
        rel = 0.0
        for name in ours.names[: args.compare]:
            d, r = ours.dense(name).float().cpu(), dense[name]
            rel = max(rel, float((d - r).abs().max() / r.abs().max()))
        del dense
        gc.collect()
        report["reference"] = {
            "batches_run": len(part),
            "seconds_per_batch": per_batch,
            "seconds_extrapolated": extrapolated,
            "peak_extra_host_bytes": rss.extra,
            "max_relative_difference": rel,
            "weights_compared": min(args.compare, len(ours.names)),
        }
        if ref.peak is not None:
            report["reference"]["peak_gpu_bytes"] = ref.peak
        report["speedup"] = extrapolated / whole.seconds
        print(
            f"reference: {per_batch:.1f} s per batch, {extrapolated:.1f} s extrapolated; "
            f"speed-up {report['speedup']:.1f}x; max relative difference {rel:.1e}"
        )

    # 3. the mask, on the model's device
    with Phase(device) as masking:
        mask = dowser.build_mask(model, scores, update_ratio=args.ratio)
    report["mask_s"] = masking.seconds
    print(f"mask at {args.ratio}: {masking.seconds:.1f} s")

    # 4. one training step, sparse then dense (the dense state is the larger)
    batch = {k: v.to(device) for k, v in batches[0].items()}
    report["steps"] = {
        mode: steps(model, mask, batch, mode, device) for mode in ("sparse-adamw", "adamw")
    }
    for mode, r in report["steps"].items():
        mem = f", peak GPU {r['peak_gpu_bytes'] / GiB:.1f} GiB" if "peak_gpu_bytes" in r else ""
        print(
            f"{mode}: optimizer step {r['step_s']:.3f} s, iteration {r['iteration_s']:.2f} s, "
            f"state {r['state_bytes'] / GiB:.2f} GiB{mem}"
        )

    if device.startswith("cuda") and args.size == "7b":  # the targets are for this setting
        report["targets"] = {
            "probe_s_at_most_30": report["dowser"]["seconds"] <= 30,
            "speedup_at_least_20": report.get("speedup", 0) >= 20,
            "peak_at_most_1.2x_weights": report["dowser"]["peak_over_weights"] <= 1.2,
        }
        print(f"targets: {report['targets']}")
    report.update(
        date=time.strftime("%Y-%m-%d"), torch=torch.__version__, platform=platform.platform()
    )
    out = Path(args.out or Path(__file__).parent / "results" / f"gpu-{report['machine']}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
