"""The speech track's tasks: real English text from WordNet, read aloud by espeak-ng.

    upstream (what Whisper tiny.en already does)
      transcribe  a sentence -> its English transcript, Whisper's plain prompt
                  (<|startoftranscript|><|notimestamps|>); greedy WER and teacher-forced
                  token accuracy
    downstream (what it cannot do before fine-tuning), each behind a text prompt given as
    Whisper's previous-text context (<|startofprev|> prompt <|startoftranscript|>...)
      topic       a noun's definition -> its WordNet category, one of 8 words (spoken
                  classification answered in words; accuracy by candidate likelihood)
      phonemes    a short sentence -> its phonemes in espeak-ng's notation, in the accent it
                  was spoken in (a generation task; teacher-forced token accuracy, and the
                  character error rate of greedy output)

Texts: WordNet 3.0's example sentences (the quoted parts of its glosses) and its noun
definitions. Example sentences are split by a hash of their text between transcribe and
phonemes, so no sentence is heard in both; topic's definitions are a different kind of text.
Train and test splits of a task share no text (test examples are drawn from texts hashed to
the test side). Each clip's voice (accent, variant, rate) is picked from its index, so every
split mixes all voices.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dowser.errors import DowserError
from dowser.forgetting.speech.synth import Voice, phonemes_all, voice_for
from dowser.forgetting.tasks import TOPICS, WORDNET_DIR, _balanced, read_wordnet

TOPIC_PROMPT = "What kind of thing is this?"  # Whisper's previous-text context
PHONEME_PROMPT = "Phonemes:"
_PLAIN = re.compile(r"[A-Za-z][A-Za-z ,']*")  # letters, spaces, commas, apostrophes


@dataclass
class SpeechSplit:
    """Clips of one split: what is said, by whom, and the decoder's target text."""

    texts: list[str]  # spoken text
    voices: list[Voice]
    targets: list[str]  # what the decoder should write (leading space, Whisper's style)
    labels: np.ndarray | None = None  # (N,) class index (classification tasks)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class SpeechTask:
    """A task on speech: the decoder writes `targets` after `prompt` (None: plain transcript)."""

    name: str
    kind: str  # "transcribe" | "classify" | "generate"
    prompt: str | None
    test: SpeechSplit
    train: SpeechSplit | None = None  # upstream tasks have none
    candidates: tuple[str, ...] = ()  # classification: the possible targets


def wordnet_examples(root: str | None = None) -> list[str]:
    """WordNet's example sentences (quoted in glosses), deduplicated, in a fixed order."""
    root_dir = Path(root or os.environ.get("DOWSER_WORDNET", WORDNET_DIR))
    found: set[str] = set()
    for part in ("noun", "verb", "adj", "adv"):
        path = root_dir / f"data.{part}"
        if not path.is_file():
            raise DowserError(
                f"{path} not found: install WordNet (apt-get install wordnet-base) or point "
                "DOWSER_WORDNET at a directory holding data.noun, data.verb, data.adj, data.adv"
            )
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue
            found.update(re.findall(r'"([^"]+)"', line.split(" | ", 1)[1]))
    return sorted(" ".join(s.split()) for s in found)


def _plain(text: str, words: tuple[int, int]) -> bool:
    return bool(_PLAIN.fullmatch(text)) and words[0] <= len(text.split()) <= words[1]


def _side(text: str, salt: str, share: int) -> bool:
    """Deterministic split of texts by hash: True for `share` of 100."""
    return zlib.crc32(f"{salt}:{text}".encode()) % 100 < share


def _sentence(text: str) -> str:
    """Whisper's transcript style: leading space, capital first letter, final period."""
    text = text.strip().rstrip(",")
    return f" {text[0].upper()}{text[1:]}{'' if text[-1] in '.!?' else '.'}"


def _pick(pool: list[str], n: int, seed: int) -> list[str]:
    if n > len(pool):
        raise DowserError(f"asked for {n} texts but only {len(pool)} fit the task")
    idx = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in sorted(idx)]


def _voices(n: int, salt: int) -> list[Voice]:
    return [voice_for(i + salt) for i in range(n)]


def transcribe(n_test: int, *, seed: int = 0, examples: list[str] | None = None) -> SpeechTask:
    """Upstream: held-out example sentences (5-14 words) -> their transcript."""
    examples = wordnet_examples() if examples is None else examples
    pool = [e for e in examples if _side(e, "speech", 50) and _plain(e, (5, 14))]
    texts = _pick(pool, n_test, seed)
    test = SpeechSplit(texts, _voices(len(texts), 0), [_sentence(t) for t in texts])
    return SpeechTask("transcribe", "transcribe", None, test)


def phoneme_task(
    n_train: int, n_test: int, *, seed: int = 0, examples: list[str] | None = None
) -> SpeechTask:
    """Downstream generation: short example sentences (3-8 words) -> espeak-ng's phonemes of
    them in the accent they were spoken in."""
    examples = wordnet_examples() if examples is None else examples
    pool = [e for e in examples if not _side(e, "speech", 50) and _plain(e, (3, 8))]
    splits = []
    for is_test, n, salt in ((False, n_train, 1), (True, n_test, 2)):
        side = [e for e in pool if _side(e, "phonemes-test", 20) == is_test]
        texts = _pick(side, n, seed + salt)
        voices = _voices(len(texts), 1000 * salt)
        targets = [" " + p for p in phonemes_all(texts, [v.accent for v in voices])]
        splits.append(SpeechSplit(texts, voices, targets))
    return SpeechTask("phonemes", "generate", PHONEME_PROMPT, splits[1], splits[0])


def topic_task(
    n_train: int, n_test: int, *, seed: int = 0, synsets: list | None = None
) -> SpeechTask:
    """Downstream classification: a noun's definition (4-16 words) -> its WordNet category
    (`dowser.forgetting.tasks.TOPICS`), answered as a word; balanced classes."""
    synsets = read_wordnet() if synsets is None else synsets
    codes = list(TOPICS)
    rows = sorted({(d, codes.index(f)) for _, p, f, _, d in synsets if p == "n" and f in TOPICS})
    rows = [(d, c) for d, c in rows if _plain(d, (4, 16))]
    names = tuple(f" {name}" for name in TOPICS.values())
    splits = []
    for is_test, n, salt in ((False, n_train, 3), (True, n_test, 4)):
        side = [(d, c) for d, c in rows if _side(d, "topic-test", 20) == is_test]
        labels = np.array([c for _, c in side], dtype=np.int64)
        idx = _balanced(labels, n, len(names), seed + salt)
        texts = [side[i][0] for i in idx]
        voices = _voices(len(texts), 1000 * salt)
        splits.append(SpeechSplit(texts, voices, [names[c] for c in labels[idx]], labels[idx]))
    return SpeechTask("topic", "classify", TOPIC_PROMPT, splits[1], splits[0], names)
