"""The built-in small VLM: a real LLaVA (CLIP-style vision tower + Llama decoder), pretrained
here on the upstream tasks, saved as a Hugging Face checkpoint and cached on disk.

    path = pretrained(BaseConfig(), tasks)      # trains on the first call, then loads the cache
    model, processor = load_checkpoint(path)

The tokenizer is a byte-level BPE trained on WordNet definitions (real English). Pretraining
is one AdamW run over a shuffled mix of the upstream tasks' training examples, loss on the
answers, everything trainable (vision tower, projector, decoder, embeddings), deterministic
for a given config. The cache key hashes the config and the training data, so a changed
setting or data set trains a new model instead of reusing a stale one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dowser.errors import DowserError
from dowser.forgetting.encode import Encoded, encode
from dowser.forgetting.tasks import Task
from dowser.forgetting.train import train_loop

CACHE_VERSION = 1  # bump when pretraining code changes what it produces


@dataclass(frozen=True)
class BaseConfig:
    """The built-in model and its pretraining run."""

    layers: int = 4  # decoder layers: depth sweeps tune the last 1..layers of them
    width: int = 128  # decoder hidden size (MLP 2x, 4 heads, 2 key/value heads)
    vision_width: int = 64  # CLIP tower hidden size; 32x32 images in 8x8 patches
    vision_layers: int = 2  # CLIP tower layers
    vocab: int = 2048  # BPE entries, trained on WordNet definitions
    steps: int = 2000  # pretraining optimizer steps
    batch_size: int = 32  # pretraining examples per step, mixed across tasks
    lr: float = 1e-3  # AdamW peak learning rate, cosine to 0 after 3 % warm-up
    seed: int = 0  # weights, data order


def cache_root() -> Path:
    """$DOWSER_CACHE, else ~/.cache/dowser."""
    return Path(os.environ.get("DOWSER_CACHE") or Path.home() / ".cache" / "dowser")


def cache_key(config: BaseConfig, tasks: list[Task]) -> str:
    """Hash of the config, the pretraining data and CACHE_VERSION."""
    h = hashlib.sha256(json.dumps([CACHE_VERSION, asdict(config)]).encode())
    for task in tasks:
        h.update(task.name.encode())
        h.update("\0".join(task.train.prompts).encode())
        h.update(task.train.labels.tobytes())
        h.update("\0".join(task.train.answers or []).encode())
        if task.train.images is not None:
            h.update(task.train.images.tobytes())
    return h.hexdigest()[:16]


def build(config: BaseConfig, corpus: list[str]):
    """The untrained model and its processor (tokenizer trained on `corpus`)."""
    from dowser.tiny import build_model

    return build_model(
        "llava",
        seed=config.seed,
        num_layers=config.layers,
        hidden_size=config.width,
        tokenizer_vocab=config.vocab,
        corpus=corpus,
        vision_width=config.vision_width,
        vision_layers=config.vision_layers,
    )


def encode_train(processor, task: Task) -> Encoded:
    """Task's training split, one sequence per example with its right answer."""
    if task.train.answers is not None:
        answers = [[a] for a in task.train.answers]
    else:
        answers = [[task.candidates[y]] for y in task.train.labels]
    return encode(processor, task.train.prompts, answers, task.train.images)


def pretrained(
    config: BaseConfig,
    tasks: list[Task],
    corpus: list[str],
    *,
    cache: Path | None = None,
    progress: bool = True,
) -> Path:
    """The checkpoint directory of the model pretrained on `tasks`; trains it if not cached.

    The directory appears atomically (written under a temporary name, then renamed), so an
    interrupted run leaves no half-written model behind to be mistaken for a finished one.
    """
    from dowser.tiny import save_checkpoint

    root = Path(cache or cache_root()) / "forgetting"
    path = root / f"llava-{cache_key(config, tasks)}"
    if (path / "pretraining.json").is_file():
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DowserError(
            f"cannot keep the pretrained model in {root} ({e.strerror}); pass --cache DIR or "
            "set DOWSER_CACHE to a writable directory"
        ) from None
    t0 = time.perf_counter()
    model, processor = build(config, corpus)
    data = Encoded.cat([encode_train(processor, t) for t in tasks])
    losses = train_loop(
        model,
        [p for p in model.parameters()],
        data,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=config.seed,
        desc="pretraining the built-in LLaVA",
        progress=progress,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_checkpoint(model.eval(), processor, tmp)
        record = {
            "config": asdict(config),
            "tasks": {t.name: len(t.train) for t in tasks},
            "parameters": sum(p.numel() for p in model.parameters()),
            "first_loss": float(np.mean(losses[:10])),  # mean of the first 10 steps
            "final_loss": float(np.mean(losses[-50:])),  # mean of the last 50 steps
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
