"""Reading CTranslate2 model files (`model.bin`) without the CTranslate2 runtime.

    model = read_ct2("ct2-whisper/")          # CT2Model: spec name, variables, aliases
    model.variables["decoder/embeddings/weight"]   # numpy array (bfloat16: a torch tensor)

The file (CTranslate2 format version 6, little-endian):

    uint32 version | string spec name | uint32 spec revision | uint32 n
    n x (string name | uint8 rank | rank x uint32 dims | uint8 dtype | uint32 nbytes | bytes)
    uint32 m | m x (string alias | string target)

A string is a uint16 length (counting its trailing NUL), then the bytes. dtype: 0 float32,
1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16. Arrays are views of the memory-mapped
file; nothing is copied until a caller converts them.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dowser.errors import DowserError

FORMAT_VERSIONS = (6,)  # the layout above; other versions are refused, not guessed at
NUMPY_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
BFLOAT16 = 5  # no numpy type: read as int16 bits, reinterpreted by torch


@dataclass
class CT2Model:
    """The contents of a CTranslate2 model.bin."""

    version: int  # file format version
    spec: str  # model specification, e.g. "WhisperSpec"
    revision: int  # revision of that specification
    variables: dict[str, np.ndarray | torch.Tensor]  # name -> array (bf16 ones as tensors)
    aliases: dict[str, str]  # alias -> the variable it stands for


def read_ct2(path: str | os.PathLike) -> CT2Model:
    """Parse a CTranslate2 `model.bin` (or the folder holding it) without running anything."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    if not path.is_file():
        raise DowserError(f"{path} not found: give a CTranslate2 model folder holding model.bin")
    with path.open("rb") as f:
        try:
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            raise DowserError(f"{path} is empty: not a CTranslate2 model") from None
    reader = _Reader(buf, path)
    version = reader.u32()
    if version not in FORMAT_VERSIONS:
        raise DowserError(
            f"{path}: CTranslate2 format version {version} is not supported (this importer "
            f"reads version {', '.join(map(str, FORMAT_VERSIONS))}); re-convert the model "
            "with a ctranslate2 release that writes it, or it is not a CTranslate2 file"
        )
    spec, revision = reader.string(), reader.u32()
    variables = {}
    for _ in range(reader.u32()):
        name = reader.string()
        dims = [reader.u32() for _ in range(reader.u8())]
        dtype, nbytes = reader.u8(), reader.u32()
        variables[name] = reader.array(name, dims, dtype, nbytes)
    aliases = {}
    for _ in range(reader.u32()):
        alias = reader.string()
        aliases[alias] = reader.string()
    return CT2Model(version, spec, revision, variables, aliases)


class _Reader:
    """Sequential little-endian reads with one clear error for a file that ends too soon."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def _take(self, n: int, what: str) -> int:
        if self.pos + n > len(self.buf):
            raise DowserError(
                f"{self.path} is truncated ({len(self.buf):,} bytes; {what} needs byte "
                f"{self.pos + n:,}): copy or download it again"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def u8(self) -> int:
        return self.buf[self._take(1, "a header")]

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buf, self._take(4, "a header"))[0]

    def string(self) -> str:
        n = struct.unpack_from("<H", self.buf, self._take(2, "a name"))[0]
        raw = self.buf[self._take(n, "a name") : self.pos]
        try:
            return raw.rstrip(b"\0").decode("utf-8")
        except UnicodeDecodeError:
            raise DowserError(f"{self.path} is corrupt (a name that is not text)") from None

    def array(self, name: str, dims: list[int], dtype: int, nbytes: int):
        start = self._take(nbytes, f"variable {name}")
        if dtype == BFLOAT16:
            np_dtype = np.int16
        elif dtype in NUMPY_DTYPES:
            np_dtype = NUMPY_DTYPES[dtype]
        else:
            raise DowserError(f"{self.path}: variable {name} has unknown data type code {dtype}")
        count = int(np.prod(dims)) if dims else 1
        if count * np.dtype(np_dtype).itemsize != nbytes:
            raise DowserError(
                f"{self.path} is corrupt: variable {name} {dims} holds {nbytes} bytes"
            )
        values = np.frombuffer(self.buf, np_dtype, count=count, offset=start).reshape(dims)
        if dtype == BFLOAT16:
            return torch.from_numpy(values.copy()).view(torch.bfloat16)
        return values


def tensor(model: CT2Model, name: str, dtype: torch.dtype) -> torch.Tensor:
    name = model.aliases.get(name, name)
    if name not in model.variables:
        raise DowserError(f"the model has no variable {name}: not a complete Whisper model")
    value = model.variables[name]
    t = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
    if not t.is_floating_point():
        raise DowserError(
            f"variable {name} is stored as {t.dtype} (a quantized model); re-convert it with "
            "ct2-transformers-converter --quantization float16 (or float32) first"
        )
    return t.to(dtype)


def shape(model: CT2Model, name: str) -> tuple[int, ...]:
    """The dims of a variable (or of what an alias stands for)."""
    name = model.aliases.get(name, name)
    if name not in model.variables:
        raise DowserError(f"the model has no variable {name}: not a complete Whisper model")
    return tuple(model.variables[name].shape)


def scalar(model: CT2Model, name: str, default: int) -> int:
    value = model.variables.get(name)
    return default if value is None else int(np.asarray(value).reshape(-1)[0])


def count_layers(model: CT2Model, side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in model.variables:
        n += 1
    if n == 0:
        raise DowserError(f"the model has no {side} layers: not a complete Whisper model")
    return n
