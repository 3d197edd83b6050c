"""What the probe differentiates: the model output f taken from the logits, the Rademacher
probes xi that turn f into one scalar xi^T f, and the process's peak memory.

Logits are (B, T, V); f is (B, V) at each sample's last valid position or (N, V) at all N
valid positions, where "valid" is the attention mask (the decoder's for encoder-decoders).
"""

from __future__ import annotations

from typing import Any

import torch

from dowser.errors import DowserError


def peak_memory() -> dict[str, int]:
    """Peak memory of this process so far, in bytes: {"cuda:0": ..., "host": ...}.

    GPUs: the most ever allocated by torch on each; host: the peak resident set (Linux).
    """
    import resource

    peaks = {}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            peaks[f"cuda:{i}"] = torch.cuda.max_memory_allocated(i)
    peaks["host"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return peaks


def _logits(outputs: Any) -> torch.Tensor:
    logits = outputs.logits if hasattr(outputs, "logits") else outputs
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise DowserError(
            "cannot find (B, T, V) logits in the model outputs; pass output_fn=... that maps "
            "the outputs to the (B, V) tensor to probe"
        )
    return logits


def _valid(logits: torch.Tensor, batch: dict) -> torch.Tensor | None:
    """The (B, T) attention mask that goes with the logits, if there is one."""
    mask = batch.get("decoder_attention_mask", batch.get("attention_mask"))
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(logits.shape[:2]):
        return mask
    return None


def last_logits(outputs: Any, batch: dict) -> torch.Tensor:
    """Logits at each sample's last valid position, (B, V).

    The last valid position is the last 1 of the attention mask (left or right padding);
    when no mask matches the logits (encoder-decoder, no mask), it is the last position.
    """
    logits = _logits(outputs)
    mask = _valid(logits, batch)
    b, t, _ = logits.shape
    if mask is not None:
        # index of the last 1 in each row: T - 1 - (first 1 in the flipped row)
        last = t - 1 - mask.flip(1).to(torch.long).argmax(1)
    else:
        last = torch.full((b,), t - 1, dtype=torch.long)
    return logits[torch.arange(b, device=logits.device), last.to(logits.device)]


def all_logits(outputs: Any, batch: dict) -> torch.Tensor:
    """Logits at every valid position (attention mask 1; all positions without one), (N, V)."""
    logits = _logits(outputs)
    mask = _valid(logits, batch)
    if mask is None:
        return logits.reshape(-1, logits.shape[-1])
    return logits[mask.to(logits.device).bool()]


def probed_output(outputs: Any, batch: dict, output: str, positions: str) -> torch.Tensor:
    """f, (N, V) float32: logits or log-probs at the last or all valid positions."""
    f = (last_logits if positions == "last" else all_logits)(outputs, batch).float()
    return torch.log_softmax(f, dim=-1) if output == "log-probs" else f


def rademacher(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Entries +1 or -1 with equal probability (drawn on the CPU: same on every device)."""
    return torch.randint(0, 2, shape, generator=generator).mul_(2).sub_(1).float()


def samples_in(outputs: Any, batch: dict) -> int:
    """Samples in a batch: rows of the logits (of input_ids when there are none)."""
    try:
        return _logits(outputs).shape[0]
    except DowserError:
        ids = batch.get("input_ids")
        return ids.shape[0] if isinstance(ids, torch.Tensor) else 1
