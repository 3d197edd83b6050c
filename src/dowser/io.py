"""Safe, atomic file handling: safetensors and JSON only, never pickle.

Writes go to a temporary file in the destination folder and are renamed into place, so an
interrupted run never leaves a half-written artifact, and an existing file is only replaced
when the caller asked for it.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dowser.errors import DowserError

PathLike = str | os.PathLike


def check_writable(path: PathLike, *, overwrite: bool = False) -> Path:
    """Fail early (before any long computation) if `path` cannot be written as asked."""
    path = Path(path)
    if path.is_dir():
        raise DowserError(f"{path} is a directory; give a file name such as {path}/out.safetensors")
    if path.exists() and not overwrite:
        raise DowserError(
            f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise DowserError(f"folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise DowserError(f"folder {parent} is not writable")
    return path


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, object],
    *,
    overwrite: bool = False,
) -> Path:
    """Atomically write `tensors` with `metadata` (JSON-encoded under the key "dowser")."""
    path = check_writable(path, overwrite=overwrite)
    meta = {"dowser": json.dumps(metadata)}  # insertion order = model order
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_metadata(path: PathLike, *, kind: str | None = None) -> dict:
    """The dowser metadata of a safetensors file, without loading its tensors.

    With `kind` ("scores" or "mask"), the file must hold that kind of artifact.
    """
    path = Path(path)
    if not path.exists():
        raise DowserError(f"{path} does not exist")
    if path.is_dir():
        raise DowserError(f"{path} is a directory, not a dowser file")
    try:
        with safe_open(path, framework="pt") as f:
            raw = (f.metadata() or {}).get("dowser")
    except (SafetensorError, OSError, ValueError) as e:
        raise DowserError(f"{path} is not a readable safetensors file ({e})") from None
    if raw is None:
        raise DowserError(f"{path} is a safetensors file but not one written by dowser")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise DowserError(f"{path} has corrupt dowser metadata") from None
    if not isinstance(meta, dict):
        raise DowserError(f"{path} has corrupt dowser metadata (not a JSON object)")
    if kind is not None and meta.get("kind") != kind:
        raise DowserError(
            f"{path} holds {meta.get('kind', 'unknown')!r} data, not {kind}; "
            "check the order of the arguments"
        )
    return meta


def corrupt(path: PathLike, error: BaseException) -> DowserError:
    """The error for a dowser file whose metadata or tensors do not fit together."""
    return DowserError(f"{path} is corrupt or incomplete ({type(error).__name__}: {error})")


def load_safetensors(path: PathLike, *, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a dowser safetensors file; `kind` ("scores" or "mask") must match its metadata."""
    meta = read_metadata(path, kind=kind)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DowserError(f"{path} is not a readable safetensors file ({e})") from None
    return tensors, meta
