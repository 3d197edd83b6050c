"""What the continual benchmark runs: the sequence, the methods, `ContinualConfig`, its presets,
and the plan of (method, learning rate, seed) sequences (`continual.py` runs them)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

from dowser.forgetting.config import BenchConfig
from dowser.forgetting.methods import LR_SCALE
from dowser.forgetting.model import BaseConfig

SEQUENCE: tuple[str, ...] = ("digits-low", "wordnet-topic", "digits-high")
# tasks made from a built-in task's label subset: name -> (built-in task, its classes)
SPLITS = {"digits-low": ("digits", (0, 1, 2, 3, 4)), "digits-high": ("digits", (5, 6, 7, 8, 9))}
CONTINUAL_METHODS: tuple[str, ...] = (
    "full-ft",
    "lora",
    "random-mask",
    "dowser-static",
    "dowser-reprobe",
    "dowser-reprobe-exclude",
    "spider",
    "merge",
    "merge-exclude",
)
MERGES = ("merge", "merge-exclude")  # deltas trained from the base, merged onto it
MASK_METHODS = ("random-mask", "dowser-static", "dowser-reprobe", "dowser-reprobe-exclude", *MERGES)
SHARED_FIRST = ("dowser-static", "dowser-reprobe", "dowser-reprobe-exclude", *MERGES)
# the single-task grid factors: 10 for a mask (rho = 0.1 of the entries move), 3 for LoRA
CONTINUAL_LR_SCALE = {m: LR_SCALE["random-mask"] for m in MASK_METHODS} | {"lora": LR_SCALE["lora"]}


@dataclass(frozen=True)
class ContinualConfig:
    """What the continual benchmark runs. Presets: CONTINUAL_PRESETS["quick" | "full"] (the
    built-in LLaVA), ["whisper-quick" | "whisper"] (Whisper tiny.en)."""

    base: BaseConfig = field(default_factory=BaseConfig)  # the built-in model (as forgetting)
    upstream_train: int = 20000  # pretraining sizes: the same cached model as forgetting's
    upstream_test: int = 1000
    downstream_train: int = 4000  # wordnet-topic's training examples
    downstream_test: int = 500  # per built-in task (digits' 500 split into 250 + 250)
    sequence: tuple[str, ...] = SEQUENCE  # downstream tasks in training order
    methods: tuple[str, ...] = CONTINUAL_METHODS
    # full-ft's grid, others times lr_scale; 3e-5 because every method but SPIDER had its best
    # H at 1e-4 (its lowest point before)
    lrs: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3)
    lr_scale: dict = field(default_factory=lambda: dict(CONTINUAL_LR_SCALE))
    seeds: tuple[int, ...] = (0, 1)
    update_ratio: float = 0.1  # rho
    last_layers: int = 4
    steps: int = 300  # optimizer steps per task
    batch_size: int = 16
    eval_examples: int | None = None  # score only the first N test examples of each task
    probe: dict = field(default_factory=dict)  # extra dowser.probe arguments
    model: str = "llava"  # "llava" (built-in) or "whisper-tiny-en" (speech/continual.py)
    model_dir: str | None = None  # a local Whisper checkpoint instead of tiny.en (tests)

    def bench_config(self) -> BenchConfig:
        """The forgetting benchmark's config of the same model and data (for `prepare_llava`)."""
        parents = tuple(dict.fromkeys(SPLITS.get(t, (t,))[0] for t in self.sequence))
        return BenchConfig(
            base=self.base,
            upstream_train=self.upstream_train,
            upstream_test=self.upstream_test,
            downstream=parents,
            downstream_train=self.downstream_train,
            downstream_test=self.downstream_test,
            methods=("full-ft",),  # no dowser-data: the pretraining mix is not encoded
            probe=self.probe,
        )


_WHISPER = ContinualConfig(
    model="whisper-tiny-en",
    sequence=("topic-a", "phonemes", "topic-b"),
    upstream_test=150,  # the speech track's sizes: 800 / 150 clips per task (400 / 75 per half)
    downstream_train=800,
    downstream_test=150,
    lrs=(3e-6, 1e-5, 3e-5),  # the speech track's full-ft grid
    lr_scale=dict(CONTINUAL_LR_SCALE, lora=10.0),  # LoRA at 3x barely moves Whisper
    steps=100,
    batch_size=8,
)
CONTINUAL_PRESETS: dict[str, ContinualConfig] = {
    # one learning rate (the grid's middle), one seed, half the steps, the first 250 test
    # examples per task: 9.6 minutes on 2 cores from a fresh cache (4.3 of them pretraining)
    "quick": ContinualConfig(lrs=(3e-4,), seeds=(0,), steps=150, eval_examples=250),
    "full": ContinualConfig(),
    # Whisper tiny.en (speech/continual.py): one seed at the grid's middle, half the steps
    "whisper-quick": replace(_WHISPER, lrs=(1e-5,), seeds=(0,), steps=50),
    "whisper": _WHISPER,
}


def lr_grid(config: ContinualConfig, method: str) -> list[float]:
    """`config.lrs` times the method's factor, rounded to 3 significant digits."""
    scale = config.lr_scale.get(method, 1.0)
    return [float(f"{lr * scale:.3g}") for lr in config.lrs]


RUN_KEYS = ("method", "lr", "seed")


def run_key(run: dict, config: ContinualConfig) -> str:
    """What identifies a sequence in runs.jsonl: the run, and the settings that change it."""
    setting = {
        "sequence": list(config.sequence),
        "steps": config.steps,
        "eval_examples": config.eval_examples,
    }
    return json.dumps({**{k: run[k] for k in RUN_KEYS}, **setting}, sort_keys=True)


def plan(config: ContinualConfig) -> list[dict]:
    """Every (method, lr, seed) sequence, ordered by (lr index, seed) so that the methods
    sharing stage 1 run one after another."""
    runs = [
        {"method": m, "lr": lr, "seed": s, "_order": (i, s, k)}
        for k, m in enumerate(config.methods)
        for i, lr in enumerate(lr_grid(config, m))
        for s in config.seeds
    ]
    runs.sort(key=lambda r: r.pop("_order"))
    return runs
