"""dowser deltas as PEFT adapters and back: `export_peft`, `import_peft`.

The format is SHiRA (`peft.tuners.shira`, PEFT 0.21.2), the one sparse PEFT type that stores
the indices it adapts, so that `PeftModel.from_pretrained(base, folder).merge_and_unload()`
rebuilds any set of entries without code. What we rely on, read from PEFT 0.21.2's source:

- A SHiRA layer wraps an nn.Linear only; its trainable vector `shira_weight` has exactly
  K = r * (in_features + out_features) entries, with one `r` for the whole adapter (ShiraConfig
  has no per-module rank), and K may not exceed in_features * out_features.
- The adapter file stores, per layer, `<module>.shira_indices` (int32, shape [2, K]: row and
  column, in `torch.where(mask)` order) and `<module>.shira_weight` (K values). On load,
  a `mask_type` other than "random" builds no mask and the stored indices are used as they
  are; we write mask_type "dowser".
- Merging adds `torch.sparse_coo_tensor(indices, shira_weight * 1.0, W.shape)` to W: one
  addition per entry, so an entry whose adapter value is -0.0 leaves W bit for bit as it was.
- `from_pretrained` casts the adapter to the base layer's dtype, then upcasts bfloat16 and
  float16 to float32 (autocast_adapter_dtype=True, the default): the adapter values we store
  are float32 for such weights, float32 for float32 weights.
- `modules_to_save` keeps whole copies of modules; `merge_and_unload` puts the copy in place
  of the module, in the module's dtype (no upcast), so its values come back exactly.

How a delta maps onto it:

- a sparse weight: a SHiRA layer holding value - base for its trainable entries (chosen so
  one addition lands on the value bit for bit, see `dowser.adapters._reach`), padded to K
  entries with -0.0 at the first untrained positions;
- a dense tensor (tuned norms): its module in `modules_to_save`, with the tuned values;
- an entry that no addition can reach (a float32 value far smaller than its base; see
  `_reach`): refused by default; with `dense_fallback` its whole module goes to
  `modules_to_save` (exact, but the full matrix is stored).

Refused: counts SHiRA cannot hold (one r for all: every matrix must hold r * (rows + cols)
<= rows * cols entries), masked weights that are not nn.Linear weights, a base the delta was
not made from. A file `dowser_base.json` beside the adapter records the base's fingerprints,
so that `import_peft` can refuse another base too. The merge was checked bit for bit on the
CPU; merging on a GPU was not measured here.

`import_peft` reads a SHiRA adapter (ours, or one trained with PEFT) into a delta: each
SHiRA entry whose value is not -0.0 becomes a trainable entry (padding drops out), each
`modules_to_save` parameter that differs from the base becomes a dense tensor (1-D) or a
sparse one over the entries that differ; the values are those of PEFT's own merge.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from dowser.adapters._peft_read import read_adapter, read_config, read_json
from dowser.adapters._reach import adapter_dtype, addends, bits, check_base
from dowser.errors import DowserError
from dowser.fingerprint import model_digests, tensor_digest, tensor_fingerprint
from dowser.io import PathLike, check_outside_inputs, check_writable, load_safetensors, write_error
from dowser.mask import Mask
from dowser.train.artifacts import read_delta, save_delta
from dowser.version import __version__

ADAPTER = "default"  # the adapter name PeftModel.from_pretrained gives
SIDECAR = "dowser_base.json"  # base fingerprints, beside PEFT's own files


@dataclass
class PeftExport:
    """What `export_peft` wrote: the folder, SHiRA's r, the matrices it adapts, the delta
    entries they carry, the -0.0 entries padding them to r * (rows + cols), and the modules
    stored whole (dense tensors' modules and, with dense_fallback, unreachable matrices)."""

    out: Path
    r: int
    matrices: list[str] = field(default_factory=list)
    entries: int = 0
    padding: int = 0
    whole: list[str] = field(default_factory=list)


def export_peft(
    delta_path: PathLike,
    base: PathLike | nn.Module,
    out_dir: PathLike,
    *,
    overwrite: bool = False,
    dense_fallback: bool = False,
    flag: str = "overwrite=True",
) -> PeftExport:
    """Write the delta at `delta_path` as a SHiRA adapter folder `out_dir` for `base` (a
    checkpoint folder, loaded with `dowser.hf.load_model`, or the loaded base model, which is
    left as it was).

    Merged, `W_merged[i] = fl(W_base[i] + d[i]) == value[i]` bit for bit for every entry the
    delta writes (module doc); a weight of shape (rows, cols) holds K = r * (rows + cols)
    entries. Written to a temporary folder and moved into place; nothing is written if a
    check fails. `flag`: how the caller's user allows replacing files (named in errors).
    """
    from_dir = not isinstance(base, nn.Module)
    out = _check_out(
        out_dir, overwrite, flag, {"delta": delta_path, "base": base if from_dir else None}
    )
    tensors, meta = load_safetensors(delta_path, kind="delta")
    sparse, dense, shapes, fps, digests = read_delta(delta_path, tensors, meta)
    model = _load(base)
    check_base(delta_path, model, shapes, fps, digests)
    if digests is None:
        warnings.warn(
            f"{delta_path} is a format-1 delta (no digests): its base was checked on sampled "
            "fingerprints only (4,096 entries per tensor), not entry by entry",
            stacklevel=2,
        )
    shira, whole = _plan(delta_path, model, tensors, sparse, dense, dense_fallback)
    r, padded = _pad(delta_path, model, shira)
    sidecar = {
        "kind": "peft-export",
        "dowser_version": __version__,
        "shapes": {n: list(s) for n, s in shapes.items()},
        "base_fingerprints": fps,
        "base_digests": digests if digests is not None else model_digests(model, shapes),
    }
    report = PeftExport(out, r, sorted(shira), sum(len(i) for i, _ in shira.values()))
    report.padding = sum(len(i) for i, _ in padded.values()) - report.entries
    report.whole = sorted(whole)
    _write(model, r, padded, whole, out, sidecar, restore=not from_dir)
    return report


def _plan(path, model, tensors, sparse, dense, dense_fallback):
    """(shira: module -> (flat indices, adapter values), whole: module -> leaf -> value)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules(remove_duplicate=False))
    whole: dict[str, dict[str, torch.Tensor]] = {}
    for name in dense:
        owner, _, leaf = name.rpartition(".")
        if not owner:
            raise DowserError(f"{path}: {name} belongs to no submodule; PEFT cannot save it")
        whole.setdefault(owner, {})[leaf] = tensors[f"{name}::dense"]
    shira: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in sparse:
        owner, _, leaf = name.rpartition(".")
        if leaf != "weight" or not isinstance(modules.get(owner), nn.Linear):
            kind = type(modules.get(owner)).__name__
            raise DowserError(
                f"{path}: {name} is not the weight of an nn.Linear (its module is a {kind}); "
                "SHiRA adapts nn.Linear weights only"
            )
        p = params[name].detach()
        idx = tensors[f"{name}::indices"].long()
        values = tensors[f"{name}::values"].to(p.dtype)
        b = p.reshape(-1)[idx.to(p.device)].cpu()
        d, reached = addends(b, values, adapter_dtype(p.dtype))
        if owner not in whole and bool(reached.all()):
            shira[owner] = (idx, d)
            continue
        if owner not in whole and not dense_fallback:
            i = int((~reached).nonzero()[0])
            raise DowserError(
                f"{path}: {int((~reached).sum())} of {len(idx)} entries of {name} cannot be "
                f"reached by adding one {str(d.dtype).removeprefix('torch.')} value to the base "
                f"(e.g. {b[i].item()!r} -> {values[i].item()!r}), which is how SHiRA merges; "
                "pass --dense-fallback (dense_fallback=True) to store such matrices whole "
                "(modules_to_save), or export a delta trained in bfloat16"
            )
        full = p.cpu().clone().reshape(-1)
        full[idx] = values
        whole.setdefault(owner, {})[leaf] = full.reshape(p.shape)
    for owner in whole:
        inner = [s for s in shira if s.startswith(f"{owner}.")]
        if inner:
            raise DowserError(f"{path}: {owner} is stored whole but contains {inner[0]}")
    return shira, whole


def _pad(path, model, shira):
    """SHiRA's r and, per module, every stored flat index with its adapter value: the
    delta's entries, then -0.0 (which changes nothing) at the first untrained positions."""
    modules = dict(model.named_modules())
    sizes = {o: (modules[o].out_features, modules[o].in_features) for o in shira}
    need = {o: max(1, math.ceil(len(shira[o][0]) / sum(sizes[o]))) for o in shira}
    if not need:
        raise DowserError(
            f"{path} leaves no matrix for SHiRA's sparse layers (every masked matrix is stored "
            "whole); merge it with `dowser apply-delta` instead"
        )
    worst = max(need, key=need.get)
    r = need[worst]
    padded = {}
    for o, (idx, d) in shira.items():
        rows, cols = sizes[o]
        k = r * (rows + cols)
        if k > rows * cols:
            raise DowserError(
                f"{path}: {o}.weight cannot be a SHiRA matrix: SHiRA stores exactly r * (rows + "
                f"cols) entries in every matrix, with one r for the adapter, and at most "
                f"rows * cols; {worst}.weight needs r = {r} for its {len(shira[worst][0])} "
                f"entries, which makes {k} for {o}.weight ({rows} x {cols} = {rows * cols}); "
                "train with a lower update ratio or leave the dense matrices out of the mask"
            )
        free = torch.ones(rows * cols, dtype=torch.bool)
        free[idx] = False
        pad = free.nonzero().squeeze(1)[: k - len(idx)]
        padded[o] = (
            torch.cat([idx, pad]),
            torch.cat([d, torch.full((len(pad),), -0.0, dtype=d.dtype)]),
        )
    return r, padded


def _write(model, r, padded, whole, out, sidecar, *, restore):
    """Build the adapter with PEFT itself (so the file is exactly what PEFT writes), check it
    merges to the delta's values, save it to a temporary folder and move it into place."""
    from peft import ShiraConfig, get_peft_model
    from peft.tuners.shira import ShiraLayer
    from peft.utils.other import ModulesToSaveWrapper

    modules = dict(model.named_modules())
    masks = {}
    for o, (idx, _) in padded.items():
        w = modules[o].weight
        m = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        m[idx.to(w.device)] = 1
        masks[id(modules[o])] = m.reshape(w.shape)
    config = ShiraConfig(
        r=r,
        mask_type="dowser",
        target_modules=sorted(padded),
        modules_to_save=sorted(whole) or None,
        inference_mode=True,
    )
    config.mask_fn = lambda layer, r, **kwargs: masks[id(layer)]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, config)
    try:
        inner = peft_model.base_model.model
        found = {n for n, m in inner.named_modules() if isinstance(m, ShiraLayer)}
        saved = {n for n, m in inner.named_modules() if isinstance(m, ModulesToSaveWrapper)}
        if found != set(padded) or saved != set(whole):
            odd = sorted((found ^ set(padded)) | (saved ^ set(whole)))
            raise DowserError(
                f"PEFT's name matching picked other modules than asked, e.g. {odd[0]}"
            )
        with torch.no_grad():
            for o, (idx, d) in padded.items():
                layer = inner.get_submodule(o)
                rows, cols = layer.out_features, layer.in_features
                ind = layer.shira_indices[ADAPTER].long().cpu()
                lookup = torch.full((rows * cols,), -0.0, dtype=d.dtype)
                lookup[idx] = d
                stored = lookup[ind[0] * cols + ind[1]]
                weight = layer.shira_weight[ADAPTER]
                weight.copy_(stored.to(weight.device))
                # the values must survive in their own dtype: the reach search assumed it
                kept = weight.dtype == d.dtype and torch.equal(bits(weight.cpu()), bits(stored))
                if not kept:
                    raise DowserError(
                        f"{o}: PEFT holds SHiRA values as {weight.dtype}, not {d.dtype}"
                    )
            for o, leaves in whole.items():
                copy = inner.get_submodule(o).modules_to_save[ADAPTER]
                for leaf, value in leaves.items():
                    copy.get_parameter(leaf).copy_(value)
        _save_folder(peft_model, out, sidecar)
    finally:
        if restore:  # a model the caller gave: take the adapter out again
            # unload() would leave the modules_to_save copies (the tuned values) in place
            for name, wrapper in list(peft_model.base_model.model.named_modules()):
                if isinstance(wrapper, ModulesToSaveWrapper):
                    parent, _, leaf = name.rpartition(".")
                    owner = peft_model.base_model.model.get_submodule(parent)
                    setattr(owner, leaf, wrapper.original_module)
            peft_model.unload()
            for n, p in model.named_parameters():
                p.requires_grad_(grads.get(n, p.requires_grad))


def _save_folder(peft_model, out: Path, sidecar: dict) -> None:
    """save_pretrained into a temporary folder beside `out`, then rename it to `out` (or, when
    `out` exists, move its files in one by one, each move atomic)."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        peft_model.save_pretrained(tmp)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1))
        if not out.exists():
            os.replace(tmp, out)
        else:
            for f in tmp.iterdir():
                os.replace(f, out / f.name)
    except (OSError, SafetensorError) as e:
        error = write_error(out, e)
        if error is None:
            raise
        raise error from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_out(out_dir: PathLike, overwrite: bool, flag: str, inputs: dict) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DowserError(f"{out} exists and is not a directory")
    check_outside_inputs(out, inputs)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DowserError(f"{out} exists and is not empty; pass {flag} to replace its files")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DowserError(f"folder {parent} does not exist; create it first")
    return out


def _load(base: PathLike | nn.Module) -> nn.Module:
    if isinstance(base, nn.Module):
        return base
    from dowser.hf import load_model

    return load_model(base, dtype="auto")[0]


def import_peft(
    adapter_dir: PathLike,
    base: PathLike | nn.Module,
    out_delta: PathLike,
    *,
    overwrite: bool = False,
    flag: str = "overwrite=True",
) -> Path:
    """Write the SHiRA adapter in `adapter_dir` as a dowser delta `out_delta` for `base` (a
    checkpoint folder, or the loaded base model, which is then merged in place).

    The delta's values are PEFT's merge, `W_base + sparse(indices, shira_weight)` and the
    modules_to_save copies (module doc); its base fingerprints and digests are `base`'s, so
    `dowser apply-delta` checks it as any other delta. An adapter written by `export_peft`
    is first checked against `base` with the fingerprints it recorded.
    """
    from_dir = not isinstance(base, nn.Module)
    adapter = Path(adapter_dir)
    out = check_writable(out_delta, overwrite=overwrite, flag=flag)
    check_outside_inputs(out, {"adapter": adapter, "base": base if from_dir else None})
    read_config(adapter)
    model = _load(base)
    if (adapter / SIDECAR).is_file():
        record = read_json(adapter / SIDECAR)
        try:
            shapes = {str(n): tuple(s) for n, s in record["shapes"].items()}
            fps, digests = dict(record["base_fingerprints"]), record.get("base_digests")
        except (KeyError, TypeError, AttributeError) as e:
            raise DowserError(f"{adapter / SIDECAR} is corrupt ({e})") from None
        check_base(adapter, model, shapes, fps, digests)
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            peft_model = PeftModel.from_pretrained(model, adapter)
        except (ValueError, RuntimeError, KeyError, OSError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DowserError(f"{adapter} does not fit this base model: {first}") from None
    missing = [w for w in caught if "missing adapter keys" in str(w.message)]
    if missing:
        raise DowserError(f"{adapter} lacks weights its config names; it is incomplete")
    masks, dense, before = read_adapter(adapter, peft_model.base_model.model)
    fps = {n: tensor_fingerprint(t) for n, t in before.items()}
    digests = {n: tensor_digest(t) for n, t in before.items()}  # before the merge changes them
    merged = peft_model.merge_and_unload()
    return save_delta(
        merged,
        Mask(masks),
        out,
        base_fingerprints=fps,
        dense=dense,
        overwrite=overwrite,
        base_digests=digests,
    )
