"""The continual benchmark's Whisper sequence: three speech tasks in turn on Whisper tiny.en.

    dowser bench continual --model whisper-tiny-en --out DIR

    upstream   transcribe  held-out sentences -> transcript (teacher-forced token accuracy)
    stage 1    topic-a     a definition -> act / animal / artifact / communication
    stage 2    phonemes    a short sentence -> its phonemes (teacher-forced token accuracy)
    stage 3    topic-b     a definition -> location / person / plant / state

The speech track has two downstream tasks (`tasks.py`); the third comes from splitting topic's
8 categories into two halves, each with its own 4 candidate words (as the built-in sequence
splits digits). Both halves keep topic's train / test split of definitions. Accuracy of a
topic half is candidate accuracy over its 4 words; the greedy scores of the single-task track
(WER, CER) are left out: every method is scored after every stage, and they would add a
free-running decoding of every test clip each time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dowser.errors import DowserError
from dowser.forgetting.speech import tasks as T
from dowser.forgetting.speech.data import SpeechEncoded, speech_loss
from dowser.forgetting.speech.evaluate import candidate_accuracy, token_accuracy
from dowser.forgetting.speech.model import EncoderStates, load_whisper, whisper_tiny_en

SPEECH_SEQUENCE: tuple[str, ...] = ("topic-a", "phonemes", "topic-b")
# tasks made from a speech task's label subset: name -> (speech task, its classes)
SPEECH_SPLITS = {"topic-a": ("topic", (0, 1, 2, 3)), "topic-b": ("topic", (4, 5, 6, 7))}
SPEECH_TASKS = ("topic", "phonemes", *SPEECH_SPLITS)


def speech_subset(task: T.SpeechTask, classes: tuple[int, ...], name: str) -> T.SpeechTask:
    """A classification task restricted to `classes` (labels renumbered 0..len-1, candidates
    kept in order), with the same clips, voices and train / test split as `task`."""
    remap = np.full(len(task.candidates), -1)
    remap[list(classes)] = np.arange(len(classes))

    def part(split: T.SpeechSplit) -> T.SpeechSplit:
        keep = np.flatnonzero(remap[split.labels] >= 0)
        return T.SpeechSplit(
            [split.texts[i] for i in keep],
            [split.voices[i] for i in keep],
            [split.targets[i] for i in keep],
            remap[split.labels[keep]],
        )

    cands = tuple(task.candidates[c] for c in classes)
    return T.SpeechTask(name, task.kind, task.prompt, part(task.test), part(task.train), cands)


def prepare_speech_continual(config, *, cache: Path | None = None, progress: bool = True):
    """Whisper (tiny.en, or `config.model_dir`), the upstream transcription task and every task
    of `config.sequence` made and encoded; `prep.score_task(model, name)` scores one task.

    `prep.tests` maps every evaluated task (upstream first) to its encoded test clips.
    """
    from dowser.forgetting.config import Prepared
    from dowser.forgetting.methods import ScoreBank
    from dowser.forgetting.tasks import read_wordnet

    seq = config.sequence
    if len(set(seq)) != len(seq) or len(seq) < 2 or not set(seq) <= set(SPEECH_TASKS):
        raise DowserError(
            f"sequence {list(seq)}: use two or more of {', '.join(SPEECH_TASKS)}, once each"
        )
    path = Path(config.model_dir) if config.model_dir else whisper_tiny_en(cache)
    base, processor = load_whisper(path)
    tok, seed = processor.tokenizer, config.base.seed
    examples = T.wordnet_examples()
    upstream = T.transcribe(config.upstream_test, seed=seed, examples=examples)
    parents = {SPEECH_SPLITS.get(t, (t,))[0] for t in seq}
    made = {}
    if "topic" in parents:
        made["topic"] = T.topic_task(
            config.downstream_train, config.downstream_test, seed=seed, synsets=read_wordnet()
        )
    if "phonemes" in parents:
        made["phonemes"] = T.phoneme_task(
            config.downstream_train, config.downstream_test, seed=seed, examples=examples
        )
    tasks = {
        t: speech_subset(made[SPEECH_SPLITS[t][0]], SPEECH_SPLITS[t][1], t)
        if t in SPEECH_SPLITS
        else made[t]
        for t in seq
    }

    def encoded(task: T.SpeechTask, split: T.SpeechSplit) -> SpeechEncoded:
        states = EncoderStates.compute(base, processor, split, cache=cache, progress=progress)
        return SpeechEncoded.build(tok, split, task.prompt, states)

    train = {t: encoded(task, task.train) for t, task in tasks.items()}
    tests = {upstream.name: encoded(upstream, upstream.test)}
    tests |= {t: encoded(task, task.test) for t, task in tasks.items()}

    def score_task(model: torch.nn.Module, name: str) -> float:
        spec = tasks.get(name)
        if spec is None or spec.kind != "classify":  # transcribe, phonemes
            return token_accuracy(model, tests[name])
        return candidate_accuracy(
            model, tests[name], tok, spec.candidates, spec.prompt, spec.test.labels
        )

    parameters = sum(p.numel() for p in base.parameters())
    info = {
        "model": "whisper-tiny-en",
        "path": str(path),
        "parameters": parameters,
        "summary": f"whisper-tiny-en: {parameters / 1e6:.1f}M parameters ({path})",
        "train_sizes": {t: len(task.train) for t, task in tasks.items()},
    }
    bank = ScoreBank(base, processor, probe_kwargs={"images": "off", **config.probe})
    prep = Prepared(base, processor, [upstream], tasks, train, tests, bank, info)
    prep.loss_fn = speech_loss
    prep.train_data = lambda task, tail=0: train[task]
    prep.score_task = score_task
    return prep
