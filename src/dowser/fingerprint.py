"""Fingerprints of weight tensors, to tell one model from another.

Two kinds:

- `tensor_fingerprint` (cheap, sampled): the shape and up to 4,096 evenly spaced entries,
  rounded to bfloat16 first, so the same checkpoint loaded in float32, bfloat16 or on another
  device gives the same fingerprint. It tells models apart, but misses a change to an entry
  it does not sample (or one below bfloat16's resolution).
- `tensor_digest` (exact, every entry): sha256 over the shape and every value in a stated
  dtype ("float32:<64 hex>"). Any change to any entry shows, at the cost of reading the whole
  tensor (about 1 s per GB on one CPU core). Deltas record it for every tensor they write.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn

SAMPLES = 4096  # entries hashed per tensor
DIGEST_CHUNK = 1 << 24  # entries converted and hashed at a time (bounded extra memory)


@torch.no_grad()
def tensor_fingerprint(t: torch.Tensor) -> str:
    """16 hex characters identifying `t` by shape and a fixed sample of its values."""
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n > SAMPLES:
        idx = torch.linspace(0, n - 1, SAMPLES, dtype=torch.float64).round().long()
        flat = flat[idx.to(flat.device)]
    data = flat.to(device="cpu", dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    h = hashlib.sha256(repr(tuple(t.shape)).encode())
    h.update(data)
    return h.hexdigest()[:16]


@torch.no_grad()
def tensor_digest(t: torch.Tensor, dtype: torch.dtype | None = None) -> str:
    """ "<dtype>:<sha256 hex>" of the shape and every entry of `t` cast to `dtype` (its own
    when None): exact, bit for bit in that dtype (see module doc)."""
    dtype = t.dtype if dtype is None else dtype
    flat = t.detach().reshape(-1)
    h = hashlib.sha256(repr((tuple(t.shape), str(dtype))).encode())
    for start in range(0, flat.numel(), DIGEST_CHUNK):
        part = flat[start : start + DIGEST_CHUNK].to(device="cpu", dtype=dtype).contiguous()
        h.update(part.view(torch.uint8).numpy().data)
    return f"{str(dtype).removeprefix('torch.')}:{h.hexdigest()}"


def digest_matches(t: torch.Tensor, expected: str) -> bool:
    """Whether `t`, cast to the dtype named in `expected` ("<dtype>:<hex>"), has that digest."""
    name, _, _ = expected.partition(":")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        return False
    return tensor_digest(t, dtype) == expected


def model_digests(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Exact digests (`tensor_digest`, in each parameter's dtype) of the named parameters."""
    params = parameter_values(model)
    return {n: tensor_digest(params[n]) for n in names}


def parameter_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """name -> value of every parameter, reading offloaded ones where they are kept.

    A model placed with a device map keeps weights offloaded to the CPU or disk on "meta";
    accelerate's hook on the owning module holds the real values (`weights_map`).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    if not any(p.device.type == "meta" for p in params.values()):
        return params
    modules = dict(model.named_modules(remove_duplicate=False))
    out = {}
    for name, p in params.items():
        if p.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            weights = getattr(getattr(modules[owner], "_hf_hook", None), "weights_map", None)
            if weights is not None:
                p = weights[leaf]
        out[name] = p
    return out


def model_fingerprints(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Fingerprints of the named parameters of `model` (offloaded ones included)."""
    params = parameter_values(model)
    return {n: tensor_fingerprint(params[n]) for n in names}


def mismatches(
    expected: Mapping[str, str], model: nn.Module, shapes: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[str]]:
    """(missing, wrong shape, other values) among the expected parameters of `model`."""
    params = parameter_values(model)
    missing = [n for n in expected if n not in params]
    wrong_shape = [
        n for n in expected if n in params and tuple(params[n].shape) != tuple(shapes[n])
    ]
    bad = set(missing) | set(wrong_shape)
    other = [
        n for n, fp in expected.items() if n not in bad and tensor_fingerprint(params[n]) != fp
    ]
    return missing, wrong_shape, other
