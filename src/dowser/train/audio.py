"""Audio files for speech models: WAV in, mono float32 at the model's sampling rate out.

    wave = load_audio("clip.wav", sampling_rate=16000)   # (n,) float32 in [-1, 1]

WAV files of any sampling rate: 8-, 16-, 24- and 32-bit integer PCM (read with the standard
library) and 32/64-bit float (read with scipy). Channels are averaged to mono; other rates
are resampled with a polyphase filter (scipy.signal.resample_poly, which low-pass filters
against aliasing). Every problem is one DowserError naming the file.
"""

from __future__ import annotations

import io
import math
import os
import wave
from pathlib import Path

import numpy as np

from dowser.errors import DowserError


def _scipy(what: str):
    try:
        import scipy.io.wavfile
        import scipy.signal
    except ImportError:
        raise DowserError(f"{what} needs scipy: pip install 'model-dowser[audio]'") from None
    return scipy


def decode_wav(data: bytes, where: str) -> tuple[np.ndarray, int]:
    """(samples (n,) float32 mono in [-1, 1], sampling rate) of WAV file contents."""
    try:
        with wave.open(io.BytesIO(data)) as w:
            rate, width, channels = w.getframerate(), w.getsampwidth(), w.getnchannels()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        if b"WAVE" not in data[:12]:
            raise DowserError(f"{where} is not a WAV file (convert it to WAV first)") from None
        if "unknown format: 3" not in str(e):  # 3 = IEEE float, which scipy reads
            raise DowserError(f"{where} is not a readable WAV file ({e})") from None
        rate, samples = _scipy(f"the float WAV {where}").io.wavfile.read(io.BytesIO(data))
        samples = np.asarray(samples, dtype=np.float32)
        return (samples.mean(1) if samples.ndim == 2 else samples), int(rate)
    if width == 3:  # 24-bit: widen to 32-bit, sign from the top byte
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        samples = (b[:, 0].astype(np.int32) << 8 | b[:, 1].astype(np.int32) << 16) | (
            b[:, 2].astype(np.int8).astype(np.int32) << 24
        )
        scale = 2.0**31
    elif width in (1, 2, 4):
        kind = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
        samples = np.frombuffer(raw, kind).astype(np.int64)
        if width == 1:  # 8-bit WAV is unsigned
            samples = samples - 128
        scale = 2.0 ** (8 * width - 1)
    else:
        raise DowserError(f"{where}: {8 * width}-bit samples are not supported")
    if channels < 1 or len(samples) % channels:
        raise DowserError(f"{where} is corrupt (samples do not fill its {channels} channels)")
    samples = (samples.reshape(-1, channels).mean(1) / scale).astype(np.float32)
    return samples, rate


def resample(samples: np.ndarray, rate: int, target: int, where: str = "audio") -> np.ndarray:
    """`samples` at `rate` Hz resampled to `target` Hz (unchanged when equal)."""
    if rate == target:
        return samples.astype(np.float32, copy=False)
    if rate <= 0:
        raise DowserError(f"{where} has sampling rate {rate}")
    g = math.gcd(rate, target)
    signal = _scipy(f"resampling {where} from {rate} Hz to {target} Hz").signal
    return signal.resample_poly(samples, target // g, rate // g).astype(np.float32)


def load_audio(path: str | os.PathLike, *, sampling_rate: int) -> np.ndarray:
    """A WAV file as mono float32 samples at `sampling_rate` Hz (see module doc)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DowserError(f"audio file {path} not found") from None
    except OSError as e:
        raise DowserError(f"cannot read audio file {path}: {e.strerror}") from None
    samples, rate = decode_wav(data, str(path))
    if samples.size == 0:
        raise DowserError(f"{path} holds no audio samples")
    if not np.isfinite(samples).all():
        raise DowserError(f"{path} holds NaN or infinite samples")
    return resample(samples, rate, sampling_rate, str(path))
