"""Small stand-ins for the benchmark's data files, in their real formats, for fast tests.

Fashion-MNIST: gzip IDX files (16-byte image header, 8-byte label header), each class a bright
bar at its own height so that a model can learn it. WordNet: data.{noun,verb,adj,adv} lines
"offset lex_filenum ss_type w_cnt word lex_id p_cnt | definition; "example"" with words that
hint at the class, and plain example sentences of 5 to 9 words (the speech track reads them).
"""

from __future__ import annotations

import gzip
import struct
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dowser.forgetting.tasks import TOPICS


def write_fashion(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, size=(n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 255
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes())
    return root


_HINTS = {
    "noun": "a thing or object that is",
    "verb": "to move or cause to act by",
    "adj": "being or having the quality of",
    "adv": "in a manner that is",
}
_WORDS = ["red", "small", "quick", "old", "bright", "soft", "loud", "cold", "deep", "kind"]


def write_wordnet(root: Path, per_file: int = 240, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    codes = {"noun": list(TOPICS), "verb": ["30"], "adj": ["00"], "adv": ["02"]}
    letters = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}
    for part, hint in _HINTS.items():
        lines = ["  1 This software and database is being provided to you, the LICENSEE, ..."]
        for k in range(per_file):
            code = codes[part][k % len(codes[part])]
            pos = "s" if part == "adj" and k % 3 == 0 else letters[part]
            words = " ".join(rng.choice(_WORDS, size=3))
            topic = TOPICS.get(code, "")
            definition = f"{hint} {topic} {words}".replace("  ", " ")
            example = " ".join(rng.choice(_WORDS, size=2 + k % 5))
            lines.append(
                f"{10000000 + 97 * k:08d} {code} {pos} 01 word{k} 0 000 | {definition}; "
                f'"the {example} thing was here"  '
            )
        (root / f"data.{part}").write_text("\n".join(lines) + "\n", encoding="latin-1")
    return root


@contextmanager
def speech_env(root: Path, seed: int):
    """The speech track's setting in `root`: WordNet stand-ins, a private cache, and a tiny
    Whisper checkpoint built in code (yielded: its folder), for the duration."""
    import pytest

    from dowser.tiny_whisper import build_whisper_checkpoint

    values = {
        "DOWSER_WORDNET": str(write_wordnet(root / "wordnet")),
        "DOWSER_CACHE": str(root / "cache"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in values.items():
            mp.setenv(k, v)
        yield build_whisper_checkpoint(root / "tiny", seed=seed)
