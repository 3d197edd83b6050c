"""LoRA on exactly the matrices a Dowser mask would tune, for like-for-like comparisons."""

from __future__ import annotations

from typing import Any

from torch import nn

from dowser.errors import DowserError
from dowser.targets import find_decoder_layers, select_targets


def tuned_modules(
    model: nn.Module, *, targets: str = "attn,mlp", last_layers: int | None = None
) -> list[str]:
    """Module paths of the decoder linears `build_mask` would select with these settings."""
    kinds = {w.strip() for w in targets.split(",") if w.strip()}
    unknown = kinds - {"attn", "mlp", "other"}
    if unknown:
        raise DowserError(f"targets={targets!r}: use attn, mlp, other (comma-separated)")
    chosen = [t for t in select_targets(model, "decoder", include_lm_head=False) if t.kind in kinds]
    if last_layers is not None:
        depth = len(find_decoder_layers(model)[1])
        if not 1 <= last_layers <= depth:
            raise DowserError(f"last_layers={last_layers}: the decoder has {depth} layers")
        chosen = [t for t in chosen if t.layer >= depth - last_layers]
    return [t.module for t in chosen]


def lora_config(
    model: nn.Module,
    *,
    targets: str = "attn,mlp",
    last_layers: int | None = None,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
) -> Any:
    """A peft.LoraConfig adapting the same matrices as a Dowser mask (needs `peft`)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise DowserError("the LoRA baseline needs peft: pip install peft") from None
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=tuned_modules(model, targets=targets, last_layers=last_layers),
        bias="none",
    )
