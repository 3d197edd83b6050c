"""The speech track of the forgetting benchmark: Whisper tiny.en, speech made with espeak-ng.

    dowser bench forgetting --model whisper-tiny-en --quick --out DIR

`prepare_speech` gives the benchmark (`dowser.forgetting.bench`) what it needs to run every
method through the same loop as on the built-in LLaVA: the model, the encoded tasks
(`tasks.py`, with their encoder states cached), the training loss and how a fine-tuned model
is scored:

    a_up    teacher-forced token accuracy on transcribing held-out sentences (upstream)
    wer     greedy word error rate on the same clips (free-running transcription)
    a_down  topic: accuracy by candidate likelihood over the 8 category words;
            phonemes: teacher-forced token accuracy of the phoneme strings
    cer     phonemes only: character error rate of the greedy phoneme strings

Methods tune the decoder's matrices (self-attention q/k/v/o, cross-attention q/k/v/o, fc1,
fc2) of the last N decoder layers; the encoder phase also tunes the last E encoder layers.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from dowser.errors import DowserError
from dowser.eval.metrics import error_rate, word_error_rate
from dowser.forgetting.speech import tasks as T
from dowser.forgetting.speech.data import SpeechEncoded, speech_loss
from dowser.forgetting.speech.evaluate import candidate_accuracy, greedy_texts, token_accuracy
from dowser.forgetting.speech.model import EncoderStates, load_whisper, whisper_tiny_en

DOWNSTREAM = ("topic", "phonemes")
MODELS = ("llava", "whisper-tiny-en")


def _task_tails(config) -> dict[str, int]:
    """Downstream task -> encoder layers its runs tune at most (the encoder phase's tasks)."""
    swept = config.sweep_tasks if config.sweep_tasks is not None else config.downstream
    active = config.encoder_layers if config.encoder_methods else 0
    return {t: (active if t in swept else 0) for t in config.downstream}


def prepare_speech(config, *, cache: Path | None = None, progress: bool = True):
    """Import (or load) the model, make and encode the speech, set up scoring (module doc)."""
    from dowser.forgetting.config import Prepared
    from dowser.forgetting.methods import ScoreBank
    from dowser.forgetting.tasks import read_wordnet

    unknown = [d for d in config.downstream if d not in DOWNSTREAM]
    if unknown:
        raise DowserError(f"unknown speech task {unknown[0]!r}; choose from {list(DOWNSTREAM)}")
    path = Path(config.model_dir) if config.model_dir else whisper_tiny_en(cache)
    base, processor = load_whisper(path)
    tok = processor.tokenizer
    seed = config.base.seed
    examples = T.wordnet_examples()
    upstream = T.transcribe(config.upstream_test, seed=seed, examples=examples)
    makers = {
        "topic": lambda: T.topic_task(
            config.downstream_train, config.downstream_test, seed=seed, synsets=read_wordnet()
        ),
        "phonemes": lambda: T.phoneme_task(
            config.downstream_train, config.downstream_test, seed=seed, examples=examples
        ),
    }
    downstream = {d: makers[d]() for d in config.downstream}
    tails = _task_tails(config)

    def encoded(task, split, tail: int) -> SpeechEncoded:
        states = EncoderStates.compute(
            base, processor, split, tail=tail, cache=cache, progress=progress
        )
        return SpeechEncoded.build(tok, split, task.prompt, states)

    up_test = encoded(upstream, upstream.test, max(tails.values(), default=0))
    train = {n: encoded(t, t.train, tails[n]) for n, t in downstream.items()}
    tests = {n: encoded(t, t.test, tails[n]) for n, t in downstream.items()}

    def room(data: SpeechEncoded) -> int:  # greedy tokens: the longest target and some
        return max(len(ids) - int(s) for ids, s in zip(data.ids, data.start, strict=True)) + 10

    def evaluate(model: torch.nn.Module, task: str, tail: int) -> dict:
        up = up_test.with_tail(tail)
        a_up = token_accuracy(model, up)
        said = greedy_texts(model, up, processor, None, max_new_tokens=room(up))
        wer = word_error_rate(upstream.test.targets, said)
        down, spec = tests[task].with_tail(tail), downstream[task]
        out = {"upstream": {upstream.name: a_up}, "a_up": a_up, "wer": wer}
        if spec.kind == "classify":
            labels = spec.test.labels
            out["a_down"] = candidate_accuracy(
                model, down, tok, spec.candidates, spec.prompt, labels
            )
        else:
            out["a_down"] = token_accuracy(model, down)
            said = greedy_texts(model, down, processor, spec.prompt, max_new_tokens=room(down))
            out["cer"] = error_rate(
                [t.strip() for t in spec.test.targets], [s.strip() for s in said]
            )
        return out

    parameters = sum(p.numel() for p in base.parameters())
    info = {
        "model": config.model,
        "path": str(path),
        "parameters": parameters,
        "summary": f"{config.model}: {parameters / 1e6:.1f}M parameters ({path})",
        "test_sizes": {
            upstream.name: len(upstream.test),
            **{n: len(t.test) for n, t in downstream.items()},
        },
        "train_sizes": {n: len(t.train) for n, t in downstream.items()},
    }
    bank = ScoreBank(base, processor, probe_kwargs={"images": "off", **config.probe})
    prep = Prepared(base, processor, [upstream], downstream, train, {}, bank, info)
    prep.evaluate = evaluate
    prep.loss_fn = speech_loss
    prep.train_data = lambda task, tail: train[task].with_tail(tail)
    return prep


def speech_presets():
    """The speech track's presets: "quick" (minutes) and "full" (the published figures)."""
    from dowser.forgetting.config import BenchConfig
    from dowser.forgetting.methods import LR_SCALE, METHODS

    common = BenchConfig(
        model="whisper-tiny-en",
        downstream=DOWNSTREAM,
        upstream_test=150,
        downstream_train=800,
        downstream_test=150,
        lrs=(3e-6, 1e-5, 3e-5),  # full-ft: from keeping almost all to losing most of it
        lr_scale=dict(LR_SCALE, lora=10.0),  # LoRA at 3x barely moves Whisper
        steps=100,
        batch_size=8,
        last_layers=4,
    )
    return {
        "quick": replace(
            common,
            downstream=("topic",),
            upstream_test=80,
            downstream_train=320,
            downstream_test=80,
            methods=("zero-shot", "full-ft", "lora", "random-mask", "dowser", "grafting"),
            lrs=(1e-5,),
            seeds=(0,),
            probe={"num_samples": 32},
        ),
        "full": replace(
            common,
            methods=METHODS,
            sweep_tasks=("topic",),
            depths=(1, 2),
            depth_methods=("dowser", "random-mask"),
            ratios=(0.03, 0.3),
            ratio_methods=("dowser", "random-mask"),
            encoder_layers=1,
            encoder_methods=("full-ft", "random-mask", "dowser"),
            # every method on topic; on phonemes (runs of ~100 s on 2 cores) the common
            # baselines, Dowser, and the best gradient-based and merging methods on topic
            task_methods={
                "phonemes": (
                    "zero-shot",
                    "full-ft",
                    "lora",
                    "random-mask",
                    "dowser",
                    "spider",
                    "model-tailor",
                )
            },
        ),
    }
