"""Safe, atomic file handling: safetensors and JSON only, never pickle.

Writes go to a temporary file in the destination folder and are renamed into place, so an
interrupted run never leaves a half-written artifact, and an existing file is only replaced
when the caller asked for it. A write that fails for want of space or permission (ENOSPC,
EDQUOT, EACCES, EPERM, EROFS; safetensors reports them as a SafetensorError "... (os error
N)") leaves nothing behind and raises a one-line DowserError naming the path (`write_error`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dowser.errors import DowserError

PathLike = str | os.PathLike
# the write failures a user can fix (space, quota, permission), shown as one line
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_errno(error: BaseException) -> int | None:
    """The errno behind `error`: an OSError's own, or the "(os error N)" that safetensors puts
    in the message of the SafetensorError it raises for a failed write; else None."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    if isinstance(error, SafetensorError):
        found = _OS_ERROR.search(str(error))
        return int(found.group(1)) if found else None
    return None


def write_error(path: PathLike, error: BaseException) -> DowserError | None:
    """The one-line DowserError for a write to `path` that failed for want of space or
    permission (see module doc); None for any other error (a bug: keep its traceback)."""
    code = os_errno(error)
    if code in DISK_FULL:
        return DowserError(
            f"cannot write {path}: {os.strerror(code).lower()}; free space and retry"
        )
    if code in NOT_WRITABLE:
        return DowserError(
            f"cannot write {path}: {os.strerror(code).lower()}; write to a folder you can "
            "write to and retry"
        )
    return None


def check_writable(
    path: PathLike, *, overwrite: bool = False, flag: str = "overwrite=True"
) -> Path:
    """Fail early (before any long computation) if `path` cannot be written as asked.

    `flag` is how the caller's user allows replacing a file, named in the error: the
    library's "overwrite=True", the command line's "--overwrite".
    """
    path = Path(path)
    if path.is_dir():
        raise DowserError(f"{path} is a directory; give a file name such as {path}/out.safetensors")
    if path.exists() and not overwrite:
        raise DowserError(f"{path} already exists; pass {flag} to replace it")
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        os.close(fd)
    except OSError as e:
        error = write_error(path, e)
        if error is None:
            raise
        raise error from None
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        error = write_error(path, e)
        if error is not None:
            raise error from None
        raise
    return path


def write_atomic(path: PathLike, write: Callable[[str], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place.

    Check `path` with `check_writable` first. A failure leaves no file behind; one for want of
    space or permission is a one-line DowserError (`write_error`).
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        error = write_error(path, e)
        if error is not None:
            raise error from None
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


def check_outside_inputs(out: PathLike, inputs: Mapping[str, PathLike | None]) -> None:
    """Refuse an output path that would write over an input (label -> path).

    Refused: the output is an input, contains one (a folder holding the mask or the data), or
    already exists inside an input folder (a scores file written over the model's weights).
    With --overwrite any of these would destroy what the run reads.
    """
    target = Path(out).resolve()
    for label, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == target:
            problem = "is"
        elif target in source.parents:
            problem = "contains"
        elif source.is_dir() and source in target.parents and target.exists():
            problem = "would replace a file of"
        else:
            continue
        raise DowserError(
            f"the output {out} {problem} the {label} {path}; write somewhere outside every input"
        )
