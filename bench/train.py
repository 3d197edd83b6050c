"""Benchmark: one fine-tuning step under full fine-tuning, gradient masking and SparseAdamW.

The same model, mask, batch and trainable set in every mode (the mask's weights plus the
norms of their layers; in full fine-tuning those weights train densely):

- full-ft:       torch.optim.AdamW over the trainable tensors;
- masked-adamw:  the same AdamW with `dowser.mask_gradients` (the reference), attached so
                 frozen entries stay exact (with weight decay > 0 that costs a copy per step);
- sparse-adamw:  `dowser.SparseAdamW`.

Each mode runs in its own process: a timing run (median step time after warm-up steps, the
step being forward + backward + clipping + optimizer step) and a memory run (peak extra host
memory above the loaded model, glibc mmap threshold fixed as in probe.py). Optimizer-state
bytes are counted from the optimizer's tensors. Writes bench/results/train-<machine>.json.

    python bench/train.py                # ~30M-parameter Llama, float32, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ALLOCATOR_ENV, SIZES, PeakRSS, build_model, machine_name

MODES = ("full-ft", "masked-adamw", "sparse-adamw")


def make_mask(model, ratio: float, seed: int = 0):
    """A random mask at `ratio` over every decoder attn/mlp weight (what it selects does not
    change step cost; a probed mask would take a probing run to build)."""
    import dowser

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n, p in model.named_parameters():
        if ".layers." in n and n.endswith("proj.weight"):
            flat = torch.zeros(p.numel(), dtype=torch.bool)
            flat[torch.randperm(p.numel(), generator=g)[: round(ratio * p.numel())]] = True
            tensors[n] = flat.view(p.shape)
    return dowser.Mask(tensors)


def state_bytes(opt, params) -> int:
    ids = {id(p) for p in params}
    return sum(
        t.numel() * t.element_size()
        for p, s in opt.state.items()
        if id(p) in ids
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )


def worker(args) -> None:
    import dowser

    torch.set_num_threads(args.threads)
    model = build_model(args.size, getattr(torch, args.dtype), args.device).train()
    mask = make_mask(model, args.ratio)
    masked = [p for n, p in model.named_parameters() if n in mask]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    batch = {"input_ids": ids.to(args.device), "labels": ids.to(args.device)}
    kw = dict(lr=1e-4, weight_decay=args.weight_decay)
    handle = None
    if args.mode == "sparse-adamw":
        dowser.prepare_model(model, mask)
        opt = dowser.SparseAdamW(model, mask, **kw)
    else:
        if args.mode == "masked-adamw":
            handle = dowser.mask_gradients(model, mask)
        else:
            dowser.prepare_model(model, mask)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **kw)
        if handle is not None:
            handle.attach(opt)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    times = []
    with PeakRSS() as rss:
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    figures = {
        "step_seconds": statistics.median(times),
        "step_seconds_all": times,
        "peak_extra_host_bytes": rss.extra,
        "state_bytes_masked": state_bytes(opt, masked),
        "state_bytes_total": state_bytes(opt, trainable),
        "masked_entries": mask.numel(),
        "trainable_entries": mask.num_trainable(),
    }
    Path(args.result).write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=list(SIZES), default="30m")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--ratio", type=float, default=0.1, help="update ratio of the mask")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=None, help="default: bench/results/train-<machine>.json")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.mode:
        return worker(args)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            for label, env in (("time", {}), ("memory", ALLOCATOR_ENV)):
                result = os.path.join(tmp, f"{mode}-{label}.json")
                cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode, "--result", result]
                subprocess.run(cmd, check=True, env={**os.environ, **env})
                figures = json.loads(Path(result).read_text())
                if label == "time":
                    results[mode] = figures
                else:
                    results[mode]["peak_extra_host_bytes"] = figures["peak_extra_host_bytes"]
    full, sparse, masked = results["full-ft"], results["sparse-adamw"], results["masked-adamw"]
    rho = full["trainable_entries"] / full["masked_entries"]
    report = {
        "machine": machine_name(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "model": f"Llama {args.size} (random weights)",
        "threads": args.threads,
        "batch": [args.batch_size, args.seq_len],
        "update_ratio": rho,
        "weight_decay": args.weight_decay,
        "modes": results,
        "step_time_vs_full": {m: results[m]["step_seconds"] / full["step_seconds"] for m in MODES},
        "memory_vs_full": {
            m: results[m]["peak_extra_host_bytes"] / full["peak_extra_host_bytes"] for m in MODES
        },
        "sparse_state_vs_dense": sparse["state_bytes_masked"] / full["state_bytes_masked"],
        "sparse_state_target": 1.5 * rho,
        "allocator_env": ALLOCATOR_ENV,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"train-{report['machine']}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    mib = 2**20
    print(
        f"model: {report['model']} on {report['machine']} ({args.dtype}), batch {args.batch_size}x{args.seq_len}, rho {rho:.3f}"
    )
    print(f"{'mode':14} {'step s':>8} {'x full':>7} {'peak MiB':>9} {'state MiB (masked)':>19}")
    for m in MODES:
        r = results[m]
        print(
            f"{m:14} {r['step_seconds']:8.3f} {report['step_time_vs_full'][m]:7.3f} "
            f"{r['peak_extra_host_bytes'] / mib:9.1f} {r['state_bytes_masked'] / mib:19.2f}"
        )
    print(
        f"SparseAdamW state / dense AdamW state = {report['sparse_state_vs_dense']:.4f} (target <= {1.5 * rho:.4f})"
    )
    print(f"wrote {out}")
    del masked


if __name__ == "__main__":
    main()
