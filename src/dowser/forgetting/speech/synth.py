"""Speech made here: espeak-ng reads English text aloud in several accents, voices and rates.

    clip = speak("The fog blurs my vision", Voice("en-gb-scotland", "m3", 170))  # 16 kHz float32
    phonemes("The fog blurs my vision", "en-us")   # "D@ f'0g bl'3:z maI v'IZ@n" (its own notation)

espeak-ng (Debian package `espeak-ng`) writes 22,050 Hz 16-bit mono WAV to stdout; it is
resampled to Whisper's 16 kHz. A clip takes about 15 ms to make, so clips are made again when
needed rather than stored; what is cached is the expensive part, the encoder's states
(`dowser.forgetting.speech.model`). The same text, voice and espeak-ng version always give
the same samples.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np

from dowser.errors import DowserError
from dowser.train.audio import decode_wav, resample

SAMPLING_RATE = 16000  # Whisper's
# English accents of espeak-ng's own voices (no MBROLA): American, British, Received
# Pronunciation, New York. (Its Scottish and Caribbean voices are left out: Whisper tiny.en
# gets most of their words wrong even before fine-tuning.)
ACCENTS = ("en-us", "en-gb", "en-gb-x-rp", "en-us-nyc")
VARIANTS = ("m1", "m3", "f2", "f4")  # voice variants: pitch and timbre (male, female)
RATES = (130, 150, 170)  # words per minute (espeak-ng's default is 175)


@dataclass(frozen=True)
class Voice:
    """Who speaks: accent (espeak-ng voice), variant and speed."""

    accent: str = "en-us"
    variant: str = "m1"
    rate: int = 160  # words per minute

    def args(self) -> list[str]:
        return ["-v", f"{self.accent}+{self.variant}", "-s", str(self.rate)]


def voice_for(key: int) -> Voice:
    """A voice chosen by `key` (e.g. an example's index), cycling through accents, variants
    and rates so that neighbouring examples differ in all three."""
    return Voice(
        ACCENTS[key % len(ACCENTS)],
        VARIANTS[(key // len(ACCENTS)) % len(VARIANTS)],
        RATES[(key // 7) % len(RATES)],
    )


@cache
def espeak() -> str:
    """The espeak-ng program, or a one-line error naming the package."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise DowserError(
            "speech synthesis needs espeak-ng: apt-get install -y --no-install-recommends espeak-ng"
        )
    return path


@cache
def espeak_version() -> str:
    """espeak-ng's version line (part of every cache key: another version speaks differently)."""
    out = subprocess.run([espeak(), "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


def _run(args: list[str], text: str) -> bytes:
    # "--" ends the options: a text starting with "-" is read, not parsed
    done = subprocess.run([espeak(), *args, "--", text], capture_output=True, check=False)
    if done.returncode != 0:
        msg = done.stderr.decode(errors="replace").strip() or f"exit status {done.returncode}"
        raise DowserError(f"espeak-ng failed on {text[:40]!r}: {msg}")
    return done.stdout


def speak(text: str, voice: Voice = Voice()) -> np.ndarray:
    """`text` read aloud by `voice`: (n,) float32 samples at 16 kHz."""
    samples, rate = decode_wav(_run([*voice.args(), "--stdout"], text), f"espeak-ng({text!r})")
    if samples.size == 0:
        raise DowserError(f"espeak-ng produced no audio for {text!r}")
    return resample(samples, rate, SAMPLING_RATE, "espeak-ng's audio")


def speak_all(texts: list[str], voices: list[Voice], *, workers: int = 4) -> list[np.ndarray]:
    """Every text read by its voice, several espeak-ng processes at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(speak, texts, voices))


def phonemes(text: str, accent: str = "en-us") -> str:
    """espeak-ng's phoneme transcription of `text` in `accent` (ASCII phoneme mnemonics with
    ' and , for primary and secondary stress), words separated by single spaces."""
    out = _run(["-q", "-x", "-v", accent], text).decode("utf-8", errors="replace")
    return " ".join(out.split())


def phonemes_all(texts: list[str], accents: list[str], *, workers: int = 4) -> list[str]:
    """`phonemes` of every text in its accent, several espeak-ng processes at a time."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(phonemes, texts, accents))
