"""The benchmark's tasks, built from real data sets that install offline.

Every task is a multiple-choice question with a fixed candidate set, scored by candidate
likelihood (`dowser.eval.likelihood`): the answer is right when the model finds the true
candidate more probable than every other one.

    upstream (pretrained into the built-in model)
      fashion       Fashion-MNIST photo -> "What clothing item is this?" (10 classes)
      wordnet-pos   WordNet gloss -> part of speech (noun, verb, adjective, adverb)
      (and, for pretraining only, wordnet-define: a word -> its definition, free text, so that
       the model learns to write English and not just the few answers of the two tasks)
    downstream (fine-tuned on)
      digits        sklearn's 8x8 handwritten digits -> "Which digit is this?" (10 classes)
      wordnet-topic WordNet noun gloss -> its lexicographer category (8 of them)
    `class_subset` restricts a task to some of its classes (the continual benchmark's
    digits-low and digits-high: digits 0-4 and 5-9, each with its own candidates)

WordNet synsets are split by a hash of their offset: 60 % feed wordnet-pos, 40 % wordnet-topic,
so that no gloss is seen both in pretraining and in fine-tuning. Test splits are disjoint from
train splits and class-balanced; every draw is seeded.

Data locations: Fashion-MNIST under `/usr/share/datasets/fashion-mnist` and WordNet under
`/usr/share/wordnet` (Debian packages `dataset-fashion-mnist` and `wordnet-base`), or the
directories in the environment variables DOWSER_FASHION_MNIST and DOWSER_WORDNET.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dowser.errors import DowserError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
WORDNET_DIR = "/usr/share/wordnet"
FASHION_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}
# WordNet's lexicographer files (lexnames(5WN)) used as wordnet-topic's classes: the eight
# largest noun categories, each with over 3,000 synsets.
TOPICS = {
    "04": "act",
    "05": "animal",
    "06": "artifact",
    "10": "communication",
    "15": "location",
    "18": "person",
    "20": "plant",
    "26": "state",
}
POS_SHARE = 6  # synsets whose offset hashes to 0..5 (of 10) go to wordnet-pos, the rest to topic


@dataclass
class Split:
    """One split of a task: a prompt, a label and (image tasks) an image per example."""

    prompts: list[str]
    labels: np.ndarray  # (N,) int64 index into the task's candidates
    images: np.ndarray | None = None  # (N, H, W) uint8 grayscale, or None for text tasks
    answers: list[str] | None = None  # free-text answers (generative tasks), else candidates

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: np.ndarray) -> Split:
        """The examples at `idx`."""
        images = None if self.images is None else self.images[idx]
        answers = None if self.answers is None else [self.answers[i] for i in idx]
        return Split([self.prompts[i] for i in idx], self.labels[idx], images, answers)


@dataclass
class Task:
    """A multiple-choice task: `candidates[label]` is the right answer to each prompt."""

    name: str
    candidates: tuple[str, ...]
    train: Split
    test: Split

    @property
    def has_images(self) -> bool:
        return self.train.images is not None


# --- Fashion-MNIST ---------------------------------------------------------------------------


def _read_idx(path: Path, offset: int) -> np.ndarray:
    if not path.is_file():
        raise DowserError(
            f"{path} not found: install Fashion-MNIST (apt-get install dataset-fashion-mnist) "
            "or point DOWSER_FASHION_MNIST at a directory holding its four .gz files"
        )
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def fashion_mnist(n_train: int, n_test: int, *, seed: int = 0, root: str | None = None) -> Task:
    """Fashion-MNIST as visual question answering: 28x28 grey photos of ten clothing items."""
    root_dir = Path(root or os.environ.get("DOWSER_FASHION_MNIST", FASHION_DIR))
    splits = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = _read_idx(root_dir / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(root_dir / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
        idx = _balanced(labels, n, len(FASHION_CLASSES), seed)
        prompts = ["What clothing item is this?"] * len(idx)
        splits.append(Split(prompts, labels[idx], images[idx]))
    return Task("fashion", FASHION_CLASSES, *splits)


# --- sklearn digits ----------------------------------------------------------------------------


def digits(n_test: int, *, seed: int = 0) -> Task:
    """sklearn's 1,797 8x8 handwritten digits (16 grey levels) as visual question answering;
    `n_test` class-balanced images are held out, the rest train."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DowserError(
            "the digits task needs scikit-learn: pip install 'model-dowser[bench]'"
        ) from None
    data = load_digits()
    # 0..16 -> 0..255 grey levels; ink stays bright on dark, as Fashion-MNIST's objects are
    images = np.round(data.images * (255 / 16)).astype(np.uint8)
    labels = data.target.astype(np.int64)
    test = _balanced(labels, n_test, 10, seed)
    train = np.setdiff1d(np.arange(len(labels)), test)
    train = np.random.default_rng(seed).permutation(train)
    prompts = ["Which digit is this?"] * len(labels)
    full = Split(prompts, labels, images)
    return Task("digits", DIGITS, full.take(train), full.take(test))


# --- WordNet -----------------------------------------------------------------------------------


def read_wordnet(root: str | None = None) -> list[tuple[str, str, str, str, str]]:
    """Every synset of WordNet 3.0 as (offset, pos letter, lexicographer file, first word,
    definition).

    From the `data.{noun,verb,adj,adv}` files: header lines start with two spaces; on the
    others the fields before " | " are offset, lex_filenum, ss_type, w_cnt, word, ...
    (underscores in words stand for spaces); the gloss after " | " is
    the definition followed by '; "example"' sentences, which are dropped (they quote the word).
    """
    root_dir = Path(root or os.environ.get("DOWSER_WORDNET", WORDNET_DIR))
    synsets = []
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
            fields, gloss = line.split(" | ", 1)
            offset, lexfile, pos, _, word = fields.split()[:5]
            definition = gloss.split('; "')[0].strip().rstrip(";").strip()
            if definition:
                synsets.append((offset, pos, lexfile, word.replace("_", " "), definition))
    return synsets


def _for_pos(offset: str, pos: str) -> bool:
    return zlib.crc32(f"{pos}{offset}".encode()) % 10 < POS_SHARE


def wordnet_pos(n_train: int, n_test: int, *, seed: int = 0, synsets: list | None = None) -> Task:
    """WordNet definitions -> the part of speech of the word they define (4 balanced classes;
    satellite adjectives count as adjectives)."""
    synsets = read_wordnet() if synsets is None else synsets
    names = ("noun", "verb", "adjective", "adverb")
    rows = [(d, names.index(POS[p])) for o, p, _, _, d in synsets if _for_pos(o, p)]
    return _text_task(
        "wordnet-pos", names, rows, "Part of speech of the word defined as", n_train, n_test, seed
    )


def wordnet_topic(n_train: int, n_test: int, *, seed: int = 0, synsets: list | None = None) -> Task:
    """WordNet noun definitions -> the lexicographer category of the noun (`TOPICS`)."""
    synsets = read_wordnet() if synsets is None else synsets
    codes = list(TOPICS)
    rows = [
        (d, codes.index(f))
        for o, p, f, _, d in synsets
        if p == "n" and f in TOPICS and not _for_pos(o, p)
    ]
    return _text_task(
        "wordnet-topic",
        tuple(TOPICS.values()),
        rows,
        "Category of the thing defined as",
        n_train,
        n_test,
        seed,
    )


def wordnet_define(n: int, *, seed: int = 0, synsets: list | None = None) -> Task:
    """Pretraining text: "Define WORD" -> its WordNet definition, from wordnet-pos's synsets
    (a generative task with free-text answers and no test split)."""
    synsets = read_wordnet() if synsets is None else synsets
    rows = [(w, d) for o, p, _, w, d in synsets if _for_pos(o, p)]
    idx = np.random.default_rng(seed).permutation(len(rows))[:n]
    train = Split(
        [f"Define {rows[i][0]}" for i in idx],
        np.zeros(len(idx), dtype=np.int64),
        answers=[rows[i][1] for i in idx],
    )
    return Task("wordnet-define", (), train, Split([], np.zeros(0, dtype=np.int64)))


def class_subset(task: Task, classes: tuple[int, ...], name: str) -> Task:
    """`task` restricted to `classes` (labels renumbered 0..len-1, candidates kept in order):
    the same examples, train and test splits as the full task."""
    remap = np.full(len(task.candidates), -1)
    remap[list(classes)] = np.arange(len(classes))
    splits = []
    for split in (task.train, task.test):
        part = split.take(np.flatnonzero(remap[split.labels] >= 0))
        part.labels = remap[part.labels]
        splits.append(part)
    return Task(name, tuple(task.candidates[c] for c in classes), *splits)


def _text_task(name, candidates, rows, question, n_train, n_test, seed) -> Task:
    labels = np.array([label for _, label in rows], dtype=np.int64)
    prompts = [f"{question}: {d}" for d, _ in rows]
    full = Split(prompts, labels)
    test = _balanced(labels, n_test, len(candidates), seed)
    rest = np.setdiff1d(np.arange(len(labels)), test)
    train = rest[_balanced(labels[rest], n_train, len(candidates), seed + 1)]
    return Task(name, tuple(candidates), full.take(train), full.take(test))


def _balanced(labels: np.ndarray, n: int, num_classes: int, seed: int) -> np.ndarray:
    """`n` indices drawn without replacement, as evenly over the classes as they allow
    (a class too small gives all it has, the others make up the difference), shuffled."""
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    if n > sum(len(p) for p in pools):
        raise DowserError(f"asked for {n} examples but the data has {len(labels)}")
    take = [0] * num_classes
    left = n
    while left:
        open_ = [c for c in range(num_classes) if take[c] < len(pools[c])]
        share = max(1, left // len(open_))
        for c in open_:
            add = min(share, len(pools[c]) - take[c], left)
            take[c] += add
            left -= add
            if not left:
                break
    idx = np.concatenate([p[:k] for p, k in zip(pools, take, strict=True)])
    return rng.permutation(idx)
