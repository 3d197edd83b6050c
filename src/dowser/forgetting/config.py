"""What a forgetting benchmark runs (`BenchConfig`) and what its runs share (`Prepared`).

The benchmark (`bench.py`) takes both from a track: the built-in LLaVA (`llava.py`) or a
speech model (`speech/track.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dowser.forgetting.encode import Encoded
from dowser.forgetting.methods import LR_SCALE, METHODS, ScoreBank
from dowser.forgetting.model import BaseConfig


@dataclass(frozen=True)
class BenchConfig:
    """What the benchmark runs. Presets: PRESETS["demo" | "quick" | "full"]."""

    base: BaseConfig = field(default_factory=BaseConfig)  # the built-in model, pretraining
    upstream_train: int = 20000  # pretraining examples per upstream task and of wordnet-define
    upstream_test: int = 1000  # test examples per upstream task (SE ~1.4 points at 70 %)
    downstream: tuple[str, ...] = ("digits", "wordnet-topic")  # fine-tuning tasks
    downstream_train: int = 4000  # training examples of a downstream task (digits has 1297)
    downstream_test: int = 500  # held-out test examples of a downstream task
    methods: tuple[str, ...] = METHODS  # rows of the frontier phase
    task_methods: dict = field(default_factory=dict)  # task -> its frontier rows, if fewer
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)  # learning-rate sweep of full-ft
    lr_scale: dict = field(default_factory=lambda: dict(LR_SCALE))  # per-method grid factor
    seeds: tuple[int, ...] = (0, 1)  # fine-tuning seeds; means and standard errors over them
    sweep_seeds: tuple[int, ...] = (0,)  # seeds of the depth and ratio sweeps
    update_ratio: float = 0.1  # rho: fraction of each tuned matrix that may change
    last_layers: int = 4  # default depth: tune the last N decoder layers
    steps: int = 300  # fine-tuning optimizer steps (3.7 epochs of digits)
    batch_size: int = 16  # fine-tuning examples per step
    depths: tuple[int, ...] = (1, 2, 3)  # extra depths for the depth sweep
    depth_methods: tuple[str, ...] = ()  # methods in the depth sweep
    ratios: tuple[float, ...] = ()  # extra update ratios for the ratio sweep
    ratio_methods: tuple[str, ...] = ()  # methods in the ratio sweep
    sweep_tasks: tuple[str, ...] | None = None  # downstream tasks with sweeps (None: all)
    encoder_layers: int = 0  # encoder phase: also tune the last E encoder layers (speech)
    encoder_methods: tuple[str, ...] = ()  # methods in the encoder phase
    probe: dict = field(default_factory=dict)  # extra dowser.probe arguments
    model: str = "llava"  # "llava" (built-in, pretrained here) or "whisper-tiny-en"
    model_dir: str | None = None  # a local Whisper checkpoint instead of tiny.en (tests)


@dataclass
class Prepared:
    """Everything the runs share: the model, encoded tasks, scores, and how to score a model.

    `evaluate(model, task, tail)` gives a run's metrics ("upstream" per task, "a_up",
    "a_down", and for speech "wer" / "cer"); `train_data(task, tail)` its training data, with
    batches for tuning the last `tail` encoder layers too; `loss_fn(model, batch)` the
    training loss (None: `model(**batch).loss`); `score_task(model, task)` one task's accuracy
    (the continual benchmark; None: candidate accuracy on `tests[task]`).
    """

    base: torch.nn.Module
    processor: object
    upstream: list  # upstream tasks (each with a .name)
    downstream: dict  # downstream task name -> task
    train: dict  # downstream task -> training sequences (Encoded or SpeechEncoded)
    tests: dict[str, tuple[Encoded, np.ndarray, int]]  # task -> candidates, labels, #candidates
    bank: ScoreBank
    pretraining: dict
    evaluate: Callable[[torch.nn.Module, str, int], dict] | None = None
    loss_fn: Callable | None = None
    train_data: Callable[[str, int], object] | None = None
    score_task: Callable[[torch.nn.Module, str], float] | None = None
