"""The forgetting benchmark: pretrain once, fine-tune every method over sweeps, measure both ends.

    result = run_benchmark(PRESETS["quick"], out_dir)       # dowser bench forgetting --quick

Phases, each a list of runs (downstream task x method x learning rate x depth x ratio x seed):

1. frontier  every method at each learning rate of its sweep (`lrs` times the method's
             `lr_scale`), default depth and ratio, every seed.
             Each method's points (A_down, A_up), averaged over seeds, are its trade-off frontier.
2. depth     `depth_methods` at each depth of `depths`, each over its whole learning-rate
             grid (on the downstream tasks of `sweep_tasks`, with `sweep_seeds`).
3. ratio     `ratio_methods` at each update ratio of `ratios`, likewise; a mask's grid is
             scaled by update_ratio / ratio, as it has that many times fewer entries to move.

A point of a depth or ratio sweep is the best H over the learning rates at that depth or
ratio: at one fixed learning rate the sweeps would mostly show how far each method moved.

Learning rates. A step of a method that changes a tenth of the entries moves the model much
less than a dense step at the same rate, so each method's sweep is placed where it goes from
too little change to too much: the base grid `lrs` (right for full-ft) times `lr_scale`,
10 for the masks (rho = 0.1) and 3 for LoRA. The frontier plots show each sweep does span the
trade-off.

A_up is the mean accuracy over the upstream tasks after fine-tuning, A_down the downstream
task's accuracy, H = 2 A_up A_down / (A_up + A_down). Every finished run is appended to
OUT/runs.jsonl at once, so an interrupted benchmark resumes where it stopped (`resume=True`).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from dowser.errors import DowserError
from dowser.eval.metrics import h_score
from dowser.forgetting import tasks as T
from dowser.forgetting.encode import Encoded, encode, sequence_logprobs
from dowser.forgetting.methods import (
    ANALYSIS,
    LR_SCALE,
    MASKED,
    MERGED,
    METHODS,
    ScoreBank,
    Setting,
    fine_tune,
    merge,
)
from dowser.forgetting.model import BaseConfig, encode_train, pretrained


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


PRESETS: dict[str, BenchConfig] = {
    # `make demo`: the four required methods and grafting, one seed, one learning rate each
    "demo": BenchConfig(
        downstream=("digits",),
        methods=("zero-shot", "full-ft", "lora", "random-mask", "dowser", "grafting"),
        lrs=(3e-4,),
        seeds=(0,),
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


@dataclass
class Prepared:
    """Everything the runs share: the model, encoded tasks, scores, and how to score a model.

    `evaluate(model, task, tail)` gives a run's metrics ("upstream" per task, "a_up",
    "a_down", and for speech "wer" / "cer"); `train_data(task, tail)` its training data, with
    batches for tuning the last `tail` encoder layers too; `loss_fn(model, batch)` the
    training loss (None: `model(**batch).loss`).
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


def prepare(config: BenchConfig, *, cache: Path | None = None, progress: bool = True) -> Prepared:
    """Load the data, pretrain (or load) the model, encode every task."""
    if config.model != "llava":
        from dowser.forgetting.speech.track import prepare_speech

        return prepare_speech(config, cache=cache, progress=progress)
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


def lr_grid(config: BenchConfig, method: str, ratio: float | None = None) -> list[float]:
    """The learning rates `method` sweeps: `lrs` times its `lr_scale`; for a mask at another
    update ratio also times update_ratio / ratio (fewer trainable entries, larger steps)."""
    if method == "zero-shot":
        return [0.0]
    scale = config.lr_scale.get(method, 1.0)
    if ratio is not None and method in MASKED:
        scale *= config.update_ratio / ratio
    return [_round(lr * scale) for lr in config.lrs]


def plan(config: BenchConfig, task: str, phase: str) -> list[dict]:
    """The runs of one phase for one downstream task, as JSON-ready dicts: every method at
    every learning rate of its grid, so that each point of a sweep is a frontier's best."""
    d, r = config.last_layers, config.update_ratio
    runs = []
    if phase == "frontier":
        for method in config.methods:
            seeds = config.seeds[:1] if method == "zero-shot" else config.seeds
            runs += [
                _run(task, phase, method, lr, d, r, s)
                for lr in lr_grid(config, method)
                for s in seeds
            ]
    elif config.sweep_tasks is not None and task not in config.sweep_tasks:
        pass
    elif phase == "depth":
        for method in config.depth_methods:
            runs += [
                _run(task, phase, method, lr, depth, r, s)
                for depth in config.depths
                for lr in lr_grid(config, method)
                for s in config.sweep_seeds
            ]
    elif phase == "ratio":
        for method in config.ratio_methods:
            runs += [
                _run(task, phase, method, lr, d, ratio, s)
                for ratio in config.ratios
                for lr in lr_grid(config, method, ratio)
                for s in config.sweep_seeds
            ]
    elif phase == "encoder" and config.encoder_layers:
        # these read activations through the model's own forward, which runs no encoder layer
        # on cached states
        unsupported = set(config.encoder_methods) & {"wanda-mask", "model-tailor", "dowser-data"}
        if unsupported:
            raise DowserError(
                f"{', '.join(sorted(unsupported))} cannot tune encoder layers in this benchmark; "
                "leave them out of encoder_methods"
            )
        for method in config.encoder_methods:
            runs += [
                _run(task, phase, method, lr, d, r, s, config.encoder_layers)
                for lr in lr_grid(config, method)
                for s in config.sweep_seeds
            ]
    return runs


def _round(lr: float) -> float:
    return float(f"{lr:.3g}")  # 3e-4 * 10 is 3e-3, not 0.0030000000000000005


RUN_KEYS = (
    "task",
    "phase",
    "method",
    "lr",
    "last_layers",
    "update_ratio",
    "seed",
    "encoder_layers",  # runs recorded before this key existed tuned no encoder layer
)
PHASES = ("frontier", "depth", "ratio", "encoder")


def _run(*values) -> dict:
    """A run's identity: the values of RUN_KEYS, in that order (encoder_layers: 0 if absent)."""
    return dict(zip(RUN_KEYS, (*values, 0)[: len(RUN_KEYS)], strict=True))


def _key(run: dict) -> str:
    """What identifies a run in runs.jsonl (resume skips runs whose key is there)."""
    return json.dumps({k: run.get(k, 0) for k in sorted(RUN_KEYS)})


class Runner:
    """Executes runs, sharing each setting's full-ft model with the merges that need it."""

    def __init__(self, config: BenchConfig, prep: Prepared, progress: bool):
        self.config, self.prep, self.progress = config, prep, progress
        self._full_ft: dict[tuple, torch.nn.Module] = {}

    def execute(self, run: dict) -> dict:
        prep, task = self.prep, run["task"]
        setting = self._setting(run)
        t0 = time.perf_counter()
        data = prep.train_data(task, setting.encoder_layers)
        losses: list[float] = []
        if run["method"] == "zero-shot":
            model = prep.base
        elif run["method"] in MERGED:
            tuned = self._tuned(task, setting)
            model = merge(run["method"], prep.base, tuned, data, setting)
        else:
            model, losses = fine_tune(
                run["method"],
                prep.base,
                data,
                setting,
                bank=prep.bank,
                task=task,
                progress=self.progress,
                loss_fn=self.prep.loss_fn,
            )
            if run["method"] == "full-ft":
                self._full_ft = {(task, _without_ratio(setting)): model}
        metrics = prep.evaluate(model, task, setting.encoder_layers)
        return {
            **run,
            **metrics,
            "h_score": h_score(metrics["a_up"], metrics["a_down"]),
            "final_loss": float(np.mean(losses[-20:])) if losses else None,
            "seconds": round(time.perf_counter() - t0, 2),
        }

    def _setting(self, run: dict) -> Setting:
        return Setting(
            run["lr"],
            run["last_layers"],
            run["update_ratio"],
            run["seed"],
            self.config.steps,
            self.config.batch_size,
            run.get("encoder_layers", 0),
        )

    def _tuned(self, task: str, setting: Setting) -> torch.nn.Module:
        """The full-ft model of this setting (the update ratio does not change full-ft)."""
        key = (task, _without_ratio(setting))
        if key not in self._full_ft:
            model, _ = fine_tune(
                "full-ft",
                self.prep.base,
                self.prep.train_data(task, setting.encoder_layers),
                setting,
                bank=self.prep.bank,
                task=task,
                progress=self.progress,
                loss_fn=self.prep.loss_fn,
            )
            self._full_ft = {key: model}  # one at a time: runs are ordered so that this hits
        return self._full_ft[key]


def _without_ratio(setting: Setting) -> Setting:
    return replace(setting, update_ratio=0.0)


def run_benchmark(
    config: BenchConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cache: Path | None = None,
    progress: bool = True,
    log=print,
    prepared: Prepared | None = None,
) -> dict:
    """Run every phase, write OUT/runs.jsonl, results.json, results.md and the plots.

    An existing OUT/runs.jsonl is continued with `resume`, replaced with `overwrite` (once the
    data and the model are ready, so a failed start loses nothing), else refused.
    `prepared`: the data and model of `prepare(config)`, when the caller already has them.
    """
    from dowser.forgetting.report import summarize, write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    records = []
    if resume and runs_path.is_file():
        records = [json.loads(line) for line in runs_path.read_text().splitlines() if line]
    elif runs_path.exists() and not overwrite:
        raise DowserError(f"{runs_path} exists; resume it or allow overwriting")
    done = {_key(r) for r in records}
    t0 = time.perf_counter()
    prep = prepared or prepare(config, cache=cache, progress=progress)
    if not resume:
        runs_path.unlink(missing_ok=True)
    log(
        prep.pretraining.get("summary")
        or f"built-in model: {prep.pretraining['parameters'] / 1e6:.2f}M parameters, "
        f"pretrained in {prep.pretraining['seconds']} s (cached at {prep.pretraining['path']})"
    )
    runner = Runner(config, prep, progress)
    for task in config.downstream:
        for phase in PHASES:
            todo = plan(config, task, phase)
            # merges reuse the full-ft model of their setting: order by setting
            todo.sort(
                key=lambda r: (
                    r["lr"],
                    r["last_layers"],
                    r["encoder_layers"],
                    r["seed"],
                    r["method"] in MERGED,
                )
            )
            for run in todo:
                if _key(run) in done:
                    continue
                record = runner.execute(run)
                records.append(record)
                done.add(_key(run))
                with runs_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                tail = f" E={run['encoder_layers']}" if run["encoder_layers"] else ""
                wer = f" WER={record['wer']:.3f}" if "wer" in record else ""
                log(
                    f"{task:>13} {phase:>8} {run['method']:>14} lr={run['lr']:<7g} "
                    f"N={run['last_layers']}{tail} rho={run['update_ratio']:<5g} "
                    f"seed={run['seed']}  A_up={record['a_up']:.3f} "
                    f"A_down={record['a_down']:.3f} H={record['h_score']:.3f}{wer}  "
                    f"({record['seconds']:.0f} s)"
                )
    # only this config's runs count (runs.jsonl may hold others from an earlier config)
    planned = {
        _key(run)
        for task in config.downstream
        for phase in PHASES
        for run in plan(config, task, phase)
    }
    records = [r for r in records if _key(r) in planned]
    result = summarize(records, config)
    result["pretraining"] = prep.pretraining
    result["upstream_tasks"] = [t.name for t in prep.upstream]
    result["test_sizes"] = prep.pretraining.get("test_sizes") or {
        name: len(t[1]) for name, t in prep.tests.items()
    }
    result["machine"] = machine()
    result["config"] = _jsonable(asdict(config))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(result, records, out)
    result["runs"] = records
    return result


def machine() -> dict:
    """Where the figures came from."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
