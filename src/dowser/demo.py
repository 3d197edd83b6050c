"""`dowser demo`: the pipeline end to end on a small LLaVA-architecture model built here.

Until the forgetting benchmark exists, the demo shows the probing and masking stages: it
builds a randomly initialised LLaVA (CLIP-style vision tower + Llama decoder) with its
processor, saves it as a Hugging Face checkpoint, loads it back with from_pretrained, probes it
at the reference settings with noise images, and builds the reference mask (10 % of each
attention and MLP matrix trainable).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dowser.errors import DowserError

DEMO_ARCH = "llava"
DEMO_LAYERS = 4  # decoder layers (so "last N layers" means something)
DEMO_WIDTH = 128  # decoder hidden size


def run_demo(out: Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Build, probe and mask the demo model; write everything under `out`; return a summary."""
    from dowser.hf import load_model
    from dowser.mask import build_mask
    from dowser.probing import probe
    from dowser.tiny import build_checkpoint

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DowserError(f"{out} is not empty; pass --overwrite to replace the demo files in it")
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    t0 = time.perf_counter()
    build_checkpoint(DEMO_ARCH, model_dir, seed=0, num_layers=DEMO_LAYERS, hidden_size=DEMO_WIDTH)
    model, _, processor = load_model(model_dir, device="cpu", dtype="float32")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"built {type(model).__name__} ({n_params / 1e6:.2f}M parameters) in {model_dir}")

    t1 = time.perf_counter()
    scores = probe(model, processor=processor, images="noise", progress=progress)
    scores.save(out / "scores.safetensors", overwrite=True)
    t2 = time.perf_counter()
    print(
        f"probed {len(scores)} weights in {t2 - t1:.1f} s "
        f"({scores.meta['num_samples']} self-generated samples with noise images, "
        f"{scores.meta['num_probes']} probes per batch, estimator {scores.meta['estimator']})"
    )
    mask = build_mask(model, scores, update_ratio=0.1, last_layers=DEMO_LAYERS)
    mask.save(out / "mask.safetensors", overwrite=True)
    print(mask.summary())
    summary = {
        "model": type(model).__name__,
        "parameters": n_params,
        "weights_scored": len(scores),
        "weights_masked": len(mask),
        "trainable": mask.num_trainable(),
        "masked_entries": mask.numel(),
        "probe_seconds": round(t2 - t1, 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}/scores.safetensors, {out}/mask.safetensors and {out}/summary.json")
    return summary
