"""What fine-tuning leaves behind: a sparse delta file and a merged checkpoint directory.

A delta holds, for every masked weight, the flat indices of its trainable entries and their
fine-tuned values (in the weight's dtype, so applying it reproduces the fine-tuned weights
bit for bit), plus every densely trained tensor (the tuned layers' norms) whole. Its metadata
carries fingerprints of the base weights it applies to: `apply_delta` refuses another base.
At update ratio rho a delta is about rho * (dtype + 4 bytes) per masked entry: a few percent
of the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dowser.errors import DowserError
from dowser.fingerprint import mismatches
from dowser.io import PathLike, corrupt, load_safetensors, save_safetensors
from dowser.mask import Mask
from dowser.scores import _describe
from dowser.version import __version__

FORMAT = 1
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json")


def save_delta(
    model: nn.Module,
    mask: Mask,
    path: PathLike,
    *,
    base_fingerprints: Mapping[str, str],
    dense: Iterable[str] = (),
    overwrite: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the trainable entries of `mask`'s weights and the `dense` tensors of `model`.

    `base_fingerprints` (name -> fingerprint of the weight before fine-tuning) must cover
    every weight written. `state_dict`: take the values from these whole tensors instead of
    the model's parameters (a sharded model's gathered state).
    """
    if state_dict is not None:
        params = dict(state_dict)
    else:
        params = dict(model.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    for name, m in mask.items():
        idx = m.reshape(-1).nonzero().squeeze(1)
        idx = idx.to(torch.int32 if m.numel() < 2**31 else torch.int64)
        tensors[f"{name}::indices"] = idx
        tensors[f"{name}::values"] = (
            params[name].detach().reshape(-1)[idx.long().to(params[name].device)]
        )
    dense = list(dense)
    for name in dense:
        tensors[f"{name}::dense"] = params[name].detach()
    names = [*mask, *dense]
    missing = [n for n in names if n not in base_fingerprints]
    if missing:
        raise DowserError(f"no base fingerprint for {missing[0]}: take them before training")
    meta = {
        "kind": "delta",
        "format": FORMAT,
        "dowser_version": __version__,
        "sparse": list(mask),
        "dense": dense,
        "shapes": {n: list(params[n].shape) for n in names},
        "base_fingerprints": {n: base_fingerprints[n] for n in names},
    }
    return save_safetensors(tensors, path, meta, overwrite=overwrite)


@torch.no_grad()
def apply_delta(model: nn.Module, path: PathLike) -> nn.Module:
    """Write a delta's values into `model` (in place) after checking it is the right base."""
    tensors, meta = load_safetensors(path, kind="delta")
    if meta.get("format") != FORMAT:
        raise DowserError(f"{path}: delta format {meta.get('format')} is not supported")
    try:
        expected = dict(meta["base_fingerprints"])
        shapes = {n: tuple(s) for n, s in meta["shapes"].items()}
        sparse, dense = list(meta["sparse"]), list(meta["dense"])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise corrupt(path, e) from None
    problem = _describe(*mismatches(expected, model, shapes))
    if problem:
        raise DowserError(
            f"{path} was made from another base model: {problem}; apply it to the checkpoint "
            "that was fine-tuned"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    try:
        for name in sparse:
            p = params[name]
            idx = tensors[f"{name}::indices"].long().to(p.device)
            values = tensors[f"{name}::values"].to(device=p.device, dtype=p.dtype)
            p.view(-1).index_copy_(0, idx, values)
        for name in dense:
            params[name].copy_(tensors[f"{name}::dense"])
    except (KeyError, RuntimeError, IndexError) as e:
        raise corrupt(path, e) from None
    return model


def save_merged(
    model: nn.Module,
    out_dir: PathLike,
    *,
    preprocessors: Iterable[Any] = (),
    source_dir: PathLike | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save `model` as a Hugging Face checkpoint in `out_dir`, with its tokenizer/processor.

    Files are written to a temporary folder inside `out_dir` and moved into place one by one
    (each move atomic). Preprocessors are saved with `save_pretrained`; files of
    `source_dir` that are not weights or configs (tokenizer, processor, chat template files)
    are copied over when not already written, so nothing the base checkpoint had is lost.
    `state_dict`: save these whole tensors instead of the model's own (a sharded model's
    gathered state).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".dowser-merged-", dir=out))
    try:
        model.save_pretrained(tmp, state_dict=state_dict)
        for pre in preprocessors:
            if pre is not None:
                pre.save_pretrained(tmp)
        if source_dir is not None:
            for f in Path(source_dir).iterdir():
                weight = any(f.match(pattern) for pattern in WEIGHT_FILES)
                if f.is_file() and not weight and not (tmp / f.name).exists():
                    shutil.copy2(f, tmp / f.name)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
