"""The built-in LLaVA track of the forgetting benchmark: its presets, tasks and scoring.

    prep = prepare_llava(PRESETS["quick"])   # pretrain (or load from the cache), encode tasks

Upstream: Fashion-MNIST VQA and WordNet part of speech; downstream: sklearn digits and WordNet
topics (`tasks.py`); every score is accuracy by candidate likelihood (`accuracy`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dowser.errors import DowserError
from dowser.forgetting import tasks as T
from dowser.forgetting.config import BenchConfig, Prepared
from dowser.forgetting.encode import Encoded, encode, sequence_logprobs
from dowser.forgetting.methods import ANALYSIS, METHODS, ScoreBank
from dowser.forgetting.model import encode_train, pretrained

PRESETS: dict[str, BenchConfig] = {
    # `make demo`: the four required methods and grafting, one learning rate each, two seeds
    # (a single run's A_up moved by up to 0.09 between two machines: the spread is shown)
    "demo": BenchConfig(
        downstream=("digits",),
        methods=("zero-shot", "full-ft", "lora", "random-mask", "dowser", "grafting"),
        lrs=(3e-4,),
        seeds=(0, 1),
        depths=(),
    ),
    # every method, one downstream task, one seed, short sweeps
    "quick": BenchConfig(
        downstream=("digits",),
        seeds=(0,),
        depths=(2,),
        depth_methods=("full-ft", "dowser", "random-mask", "dare"),
        ratios=(0.03,),
        ratio_methods=("dowser", "random-mask", "grafting"),
    ),
    # the published figures (bench/results/forgetting)
    "full": BenchConfig(
        methods=(*METHODS, *ANALYSIS),
        sweep_tasks=("digits",),
        depth_methods=(
            "full-ft",
            "lora",
            "dowser",
            "random-mask",
            "spider",
            "model-tailor",
            "dare",
            "grafting",
        ),
        ratios=(0.01, 0.03, 0.3),
        ratio_methods=("dowser", "dowser-rms", "random-mask", "dare", "grafting"),
    ),
}


def load_tasks(
    config: BenchConfig,
) -> tuple[list[T.Task], list[T.Task], dict[str, T.Task], list[str]]:
    """Upstream (scored) tasks, every pretraining task (upstream + wordnet-define), downstream
    tasks and the tokenizer corpus (wordnet-pos's definitions)."""
    synsets = T.read_wordnet()
    n, m = config.upstream_train, config.upstream_test
    upstream = [
        T.fashion_mnist(n, m, seed=config.base.seed),
        T.wordnet_pos(n, m, seed=config.base.seed, synsets=synsets),
    ]
    makers = {
        "digits": lambda: T.digits(config.downstream_test, seed=config.base.seed),
        "wordnet-topic": lambda: T.wordnet_topic(
            config.downstream_train,
            config.downstream_test,
            seed=config.base.seed,
            synsets=synsets,
        ),
    }
    unknown = [d for d in config.downstream if d not in makers]
    if unknown:
        raise DowserError(f"unknown downstream task {unknown[0]!r}; choose from {list(makers)}")
    downstream = {d: makers[d]() for d in config.downstream}
    corpus = [d for o, p, _, _, d in synsets if T._for_pos(o, p)]
    define = T.wordnet_define(n, seed=config.base.seed, synsets=synsets)
    return upstream, [*upstream, define], downstream, corpus


def prepare_llava(
    config: BenchConfig, *, cache: Path | None = None, progress: bool = True
) -> Prepared:
    """Load the data, pretrain (or load) the built-in LLaVA, encode every task."""
    from safetensors import SafetensorError

    from dowser.tiny import load_checkpoint

    upstream, pretraining, downstream, corpus = load_tasks(config)
    path = pretrained(config.base, pretraining, corpus, cache=cache, progress=progress)
    try:
        base, processor = load_checkpoint(path)
    except (OSError, ValueError, SafetensorError) as e:
        raise DowserError(
            f"the cached model in {path} cannot be loaded ({e}); delete that directory and it "
            "will be pretrained again"
        ) from None
    base.eval().requires_grad_(False)
    tests = {}
    for task in [*upstream, *downstream.values()]:
        cands = encode(
            processor, task.test.prompts, [task.candidates] * len(task.test), task.test.images
        )
        tests[task.name] = (cands, task.test.labels, len(task.candidates))
    train = {name: encode_train(processor, task) for name, task in downstream.items()}
    info = json.loads((path / "pretraining.json").read_text())
    info["path"] = str(path)
    wanted = {*config.methods, *config.depth_methods, *config.ratio_methods}
    mix = None
    if wanted & set(ANALYSIS):  # dowser-data probes on the pretraining mix
        mix = Encoded.cat([encode_train(processor, t) for t in pretraining])
    bank = ScoreBank(base, processor, probe_kwargs=config.probe, pretraining=mix)
    prep = Prepared(base, processor, upstream, downstream, train, tests, bank, info)

    def evaluate(model: torch.nn.Module, task: str, tail: int) -> dict:
        upstream = {t.name: accuracy(model, prep.tests[t.name]) for t in prep.upstream}
        a_up = float(np.mean(list(upstream.values())))
        return {"upstream": upstream, "a_up": a_up, "a_down": accuracy(model, prep.tests[task])}

    prep.evaluate = evaluate
    prep.train_data = lambda task, tail: prep.train[task]
    return prep


def accuracy(model: torch.nn.Module, test: tuple[Encoded, np.ndarray, int]) -> float:
    """Fraction of test examples whose true candidate is the most likely."""
    cands, labels, k = test
    logp = sequence_logprobs(model, cands, batch_size=256).view(len(labels), k)
    return float((logp.argmax(1).numpy() == labels).mean())
