"""What fine-tuning leaves behind: a sparse delta file and a merged checkpoint directory.

A delta holds, for every masked weight, the flat indices of its trainable entries and their
fine-tuned values (in the weight's dtype, so applying it reproduces the fine-tuned weights
bit for bit), plus every densely trained tensor (the tuned layers' norms) whole. At update
ratio rho a delta is about rho * (dtype + 4 bytes) per masked entry: a few percent of the
model.

What `apply_delta` checks before it writes anything (`checked_delta`, which
`dowser.train.compose.merge_deltas` runs on every delta too), for every tensor the delta
writes (and only those: the merged model is the given base, plus the delta):

1. the file: every written tensor has a shape, indices within it, as many values as indices
   (a dense tensor: that shape), and the file holds no tensor its metadata does not list;
2. the name and shape of the base's tensor;
3. the sampled fingerprint (`dowser.fingerprint.tensor_fingerprint`: 4,096 evenly spaced
   entries, rounded to bfloat16) of the whole tensor;
4. format 2 (deltas written with `base_digests`, as `dowser train` does): an exact sha256
   digest (`tensor_digest`) of every entry of the tensor, in the dtype it was trained from.
   So every entry the delta overwrites, and every entry of those tensors it keeps, must be
   bit for bit the one training started from.

A delta without a fingerprint for a tensor it writes is refused. Format 1 deltas (older,
or written without `base_digests`) have no digests: for them 4 is skipped, with a warning,
and a change to an entry outside the sample goes unnoticed.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from dowser.errors import DowserError
from dowser.fingerprint import digest_matches, mismatches, parameter_values
from dowser.io import PathLike, corrupt, load_safetensors, save_safetensors, write_error
from dowser.mask import Mask
from dowser.scores import _describe
from dowser.version import __version__

FORMAT = 2  # written; 1 (no digests) is still read
FORMATS = (1, 2)
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
    base_digests: Mapping[str, str] | None = None,
) -> Path:
    """Write the trainable entries of `mask`'s weights and the `dense` tensors of `model`.

    `base_fingerprints` (name -> `tensor_fingerprint` of the weight before fine-tuning) must
    cover every weight written; so must `base_digests` (name -> `tensor_digest`, taken before
    training with `dowser.fingerprint.model_digests(model, [*mask, *dense])`) when given:
    the delta is then format 2, checked entry by entry when applied. Without them it is
    format 1, checked on sampled fingerprints only (see module doc). `state_dict`: take the
    values from these whole tensors instead of the model's parameters (a sharded model's
    gathered state).
    """
    if state_dict is not None:
        params = dict(state_dict)
    else:
        params = dict(model.named_parameters(remove_duplicate=False))
    dense = list(dense)
    names = [*mask, *dense]
    for label, record in (("fingerprint", base_fingerprints), ("digest", base_digests)):
        missing = [n for n in names if record is not None and n not in record]
        if missing:
            raise DowserError(f"no base {label} for {missing[0]}: take them before training")
    tensors: dict[str, torch.Tensor] = {}
    for name, m in mask.items():
        idx = m.reshape(-1).nonzero().squeeze(1)
        idx = idx.to(torch.int32 if m.numel() < 2**31 else torch.int64)
        tensors[f"{name}::indices"] = idx
        tensors[f"{name}::values"] = (
            params[name].detach().reshape(-1)[idx.long().to(params[name].device)]
        )
    for name in dense:
        tensors[f"{name}::dense"] = params[name].detach()
    meta = {
        "kind": "delta",
        "format": 1 if base_digests is None else FORMAT,
        "dowser_version": __version__,
        "sparse": list(mask),
        "dense": dense,
        "shapes": {n: list(params[n].shape) for n in names},
        "base_fingerprints": {n: base_fingerprints[n] for n in names},
    }
    if base_digests is not None:
        meta["base_digests"] = {n: base_digests[n] for n in names}
    return save_safetensors(tensors, path, meta, overwrite=overwrite)


def apply_delta(model: nn.Module, path: PathLike) -> nn.Module:
    """Write a delta's values into `model` (in place) after the checks of the module doc;
    nothing is written unless they all pass."""
    tensors, sparse, dense = checked_delta(model, path)
    params = dict(model.named_parameters(remove_duplicate=False))
    # no_grad as a block, not a decorator: mutation testing skips decorated functions
    with torch.no_grad():
        for name in sparse:
            p = params[name]
            idx = tensors[f"{name}::indices"].long().to(p.device)
            values = tensors[f"{name}::values"].to(device=p.device, dtype=p.dtype)
            p.view(-1).index_copy_(0, idx, values)
        for name in dense:
            params[name].copy_(tensors[f"{name}::dense"])
    return model


def checked_delta(model: nn.Module, path: PathLike) -> tuple[dict, list[str], list[str]]:
    """(tensors, sparse names, dense names) of the delta at `path`, after every check of the
    module doc against `model`; writes nothing. DowserError if a check fails."""
    tensors, meta = load_safetensors(path, kind="delta")
    sparse, dense, shapes, fingerprints, digests = read_delta(path, tensors, meta)
    problem = _describe(*mismatches(fingerprints, model, shapes))
    if not problem and digests is not None:
        params = parameter_values(model)
        other = [n for n, d in digests.items() if not digest_matches(params[n], d)]
        problem = _describe([], [], other)
    if problem:
        raise DowserError(
            f"{path} was made from another base model: {problem}; apply it to the checkpoint "
            "that was fine-tuned"
        )
    if digests is None:
        warnings.warn(
            f"{path} is a format-1 delta (no digests): its base was checked on sampled "
            "fingerprints only (4,096 entries per tensor), not entry by entry",
            stacklevel=3,
        )
    return tensors, sparse, dense


def read_delta(path: PathLike, tensors: dict[str, torch.Tensor], meta: dict) -> tuple:
    """(sparse, dense, shapes, fingerprints, digests or None) of a delta, after checking that
    its metadata and tensors fit together (module doc, check 1); DowserError if not."""
    if meta.get("format") not in FORMATS:
        raise DowserError(f"{path}: delta format {meta.get('format')} is not supported")
    try:
        sparse, dense = _names(meta["sparse"]), _names(meta["dense"])
        shapes = {str(n): tuple(int(d) for d in s) for n, s in dict(meta["shapes"]).items()}
        fingerprints = {str(n): str(f) for n, f in dict(meta["base_fingerprints"]).items()}
        digests = None
        if meta["format"] >= 2:
            digests = {str(n): str(d) for n, d in dict(meta["base_digests"]).items()}
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise corrupt(path, e) from None
    names = [*sparse, *dense]
    if len(set(names)) < len(names):
        raise DowserError(f"{path} is corrupt: a tensor is listed twice in its metadata")
    for label, record in (("shape", shapes), ("base fingerprint", fingerprints)):
        lacking = [n for n in names if n not in record]
        if lacking:
            raise DowserError(
                f"{path} has no {label} for {lacking[0]}, which it would write; it cannot be "
                "checked against its base (re-save the delta from its training run)"
            )
    if digests is not None and any(n not in digests for n in names):
        lacking = next(n for n in names if n not in digests)
        raise DowserError(f"{path} is corrupt: no base digest for {lacking}, which it would write")
    expected = {f"{n}::{part}" for n in sparse for part in ("indices", "values")}
    expected |= {f"{n}::dense" for n in dense}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise DowserError(
            f"{path} is corrupt: its tensors do not match its metadata ({len(odd)} differ, "
            f"e.g. {odd[0]})"
        )
    for n in sparse:
        _check_sparse(path, n, tensors[f"{n}::indices"], tensors[f"{n}::values"], shapes[n])
    for n in dense:
        if tuple(tensors[f"{n}::dense"].shape) != shapes[n]:
            raise DowserError(f"{path} is corrupt: the tensor of {n} does not have its shape")
    return (
        sparse,
        dense,
        {n: shapes[n] for n in names},
        {n: fingerprints[n] for n in names},
        (None if digests is None else {n: digests[n] for n in names}),
    )


def _names(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise TypeError("expected a list of tensor names")
    return value


def _check_sparse(
    path: PathLike, name: str, idx: torch.Tensor, values: torch.Tensor, shape: tuple
) -> None:
    """Indices: 1-D integers within the weight's `shape`; as many values, floating point."""
    numel = math.prod(shape)
    ok = idx.dim() == 1 and not idx.is_floating_point() and idx.dtype != torch.bool
    ok = ok and values.dim() == 1 and values.is_floating_point() and len(values) == len(idx)
    if ok and idx.numel():
        ok = int(idx.min()) >= 0 and int(idx.max()) < numel
    if not ok:
        raise DowserError(
            f"{path} is corrupt: the indices or values of {name} do not fit its shape {shape}"
        )


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
    (each move atomic). If writing fails (a full disk: a one-line DowserError), folders this
    call created are removed again and an existing `out_dir` keeps its files. Preprocessors are saved with `save_pretrained`; files of
    `source_dir` that are not weights or configs (tokenizer, processor, chat template files)
    are copied over when not already written, so nothing the base checkpoint had is lost.
    `state_dict`: save these whole tensors instead of the model's own (a sharded model's
    gathered state).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a directory")
    created = [d for d in (out, *out.parents) if not d.exists()]  # removed again on failure
    try:
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
    except BaseException as e:
        # a folder this call made holds nothing but its own partial output: remove it (a
        # folder that existed keeps the user's files; only the temporary folder goes)
        if created:
            shutil.rmtree(created[-1], ignore_errors=True)
        error = write_error(out, e) if isinstance(e, (OSError, SafetensorError)) else None
        if error is not None:
            raise error from None
        raise
    return out
