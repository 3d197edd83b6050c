"""What sparse fine-tuning needs to know about data-parallel and sharded training.

DDP keeps every parameter whole on every rank and averages gradients: a mask applies
unchanged, and every rank makes the same update. FSDP2 (`fully_shard`) replaces each
parameter by a DTensor whose local part is a block of its rows (placement Shard(0), the
last rank's block possibly shorter); gradients arrive already reduced and sharded the same
way. A mask is cut like its weight (`shard_like`), so each rank updates, and keeps frozen,
exactly the entries it holds. Only `gather_blocks`, `full_state_dict`, `mean_over_ranks`,
`any_over_ranks` and `barrier` communicate; every rank must call them together.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from dowser.errors import DowserError


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of `t` this rank holds: the local shard of a DTensor, else `t` itself.

    The result shares storage with `t`, so in-place writes to it update the parameter.
    """
    return t.to_local() if isinstance(t, DTensor) else t


def _rows(p: DTensor) -> tuple[int, int]:
    """(first row, number of rows) of p's global rows that this rank holds.

    FSDP2 shards dim 0 with torch.chunk: blocks of ceil(rows / ranks) rows, the last ones
    shorter or empty. Only that layout (one mesh dimension, Shard(0)) is supported.
    """
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise DowserError(
            f"a weight sharded as {tuple(p.placements)} over a {p.device_mesh.ndim}-D mesh: "
            "Dowser masks follow FSDP2's row sharding (Shard(0) over one mesh dimension) only"
        )
    rows = p.shape[0]
    block = -(-rows // p.device_mesh.size())
    start = min(p.device_mesh.get_local_rank() * block, rows)
    return start, p.to_local().shape[0]


def flat_offset(p: torch.Tensor) -> int:
    """Flat index, in the whole weight, of the first entry this rank holds (0 if unsharded)."""
    if not isinstance(p, DTensor):
        return 0
    start, _ = _rows(p)
    return start * (p.numel() // max(1, p.shape[0]))


def shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The block of `full` (shaped like p's whole weight) that this rank holds of p.

    For a plain tensor p that is `full` itself (on p's device); for a row-sharded DTensor,
    the same rows as p's local part (a view, no copy, no communication).
    """
    if not isinstance(p, DTensor):
        return full.to(p.device)
    if tuple(full.shape) != tuple(p.shape):
        raise DowserError(f"shape {tuple(full.shape)} does not match the weight's {tuple(p.shape)}")
    start, n = _rows(p)
    return full[start : start + n].to(p.to_local().device)


def gather_blocks(t: torch.Tensor, p: DTensor) -> torch.Tensor:
    """Concatenate each rank's `t` (1-D, any length) in the order of p's row blocks.

    Every rank of p's mesh must call this. The result is on t's device.
    """
    group = p.device_mesh.get_group()
    n = dist.get_world_size(group)
    size = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    dist.all_gather(sizes, size, group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(n)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[: int(s.item())] for part, s in zip(parts, sizes, strict=True)])


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (FSDP2 or tensor parallel)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def world_size() -> int:
    """Processes in the default group (1 outside torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files and prints."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def exit_process(code: int) -> None:
    """End a process of a distributed run at once, once its work is done and written.

    Python's normal exit tears down the communication threads of an open process group in
    an order that can abort the process ("terminate called without an active exception"),
    and `destroy_process_group` can deadlock: gloo joins a thread that waits for the GIL
    to release a tensor. Command-line runs under torchrun therefore leave with os._exit,
    after flushing their output. Outside a process group this does nothing.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number over all ranks (itself in a single process)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item()) / world_size()


def any_over_ranks(flag: bool) -> bool:
    """True when `flag` is true on any rank (itself in a single process)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def full_state_dict(model: nn.Module) -> Mapping[str, torch.Tensor]:
    """Every parameter and buffer of `model` whole, on the CPU, on rank 0 (others: empty).

    Sharded models are gathered one tensor at a time (every rank must call this); a model
    that is not sharded returns its own state dict on every rank, without copies.
    """
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
