"""Continual fine-tuning: several downstream tasks in turn, one model, every method.

    result = run_continual(CONTINUAL_PRESETS["quick"], out)   # dowser bench continual --quick

The sequence (`SEQUENCE`) follows the pretraining of the built-in LLaVA (`llava.py`):

    stage 1  digits-low     sklearn digits 0-4 -> "zero" ... "four"   (image)
    stage 2  wordnet-topic  WordNet noun gloss -> one of 8 categories (text)
    stage 3  digits-high    sklearn digits 5-9 -> "five" ... "nine"   (image)

The built-in data has two downstream tasks; the third comes from splitting digits into two
label sets (the field's "Split MNIST", task-incremental: each half has its own candidates),
with the single-task benchmark's train / test split of digits. Upstream tasks (fashion,
wordnet-pos) are the pretraining tasks the forgetting benchmark measures (A_up).

Methods (`CONTINUAL_METHODS`; README "The continual benchmark"), every one through
`train.train_loop` with the single-task benchmark's settings (rho of each q/k/v/o/gate/up/down
matrix of the last N decoder layers, norms of those layers dense, its learning-rate grids):
full-ft, lora (merged after each task), random-mask (a new draw per task), dowser-static (the
base's mask every time), dowser-reprobe (the current model probed again before each task),
dowser-reprobe-exclude (the same without entries earlier tasks trained: `build_mask(exclude=)`),
spider, and two merges of deltas trained from the BASE, deltas 1..s merged onto it after
stage s by `dowser.train.compose.merge_deltas` (overlap="sum": an entry several deltas touch
gets the sum of their changes): merge (the base's mask for every task) and merge-exclude
(disjoint masks: the base's mask without the entries of earlier tasks).

Stage 1 of dowser-static, both reprobe methods and both merges is the same training (the base's
mask on the base), so it runs once per learning rate and seed and is shared. Each finished
(method, lr, seed) sequence is appended to OUT/runs.jsonl; `resume=True` skips those already
there. `continual_report.py` turns the runs into the metrics, tables and plots.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dowser.baselines.masks import random_scores
from dowser.errors import DowserError
from dowser.fingerprint import model_digests, model_fingerprints
from dowser.forgetting.config import BenchConfig, Prepared
from dowser.forgetting.encode import Encoded, encode
from dowser.forgetting.llava import accuracy, prepare_llava
from dowser.forgetting.methods import LR_SCALE, ScoreBank, Setting, fine_tune, tuned_mask
from dowser.forgetting.model import BaseConfig, encode_train
from dowser.forgetting.tasks import class_subset
from dowser.forgetting.train import Examples, train_loop
from dowser.mask import Mask
from dowser.train.masking import mask_gradients, tuned_norms

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
    """What the continual benchmark runs. Presets: CONTINUAL_PRESETS["quick" | "full"]."""

    base: BaseConfig = field(default_factory=BaseConfig)  # the built-in model (as forgetting)
    upstream_train: int = 20000  # pretraining sizes: the same cached model as forgetting's
    upstream_test: int = 1000
    downstream_train: int = 4000  # wordnet-topic's training examples
    downstream_test: int = 500  # per built-in task (digits' 500 split into 250 + 250)
    sequence: tuple[str, ...] = SEQUENCE  # downstream tasks in training order
    methods: tuple[str, ...] = CONTINUAL_METHODS
    lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)  # full-ft's grid; others times lr_scale
    lr_scale: dict = field(default_factory=lambda: dict(CONTINUAL_LR_SCALE))
    seeds: tuple[int, ...] = (0, 1)
    update_ratio: float = 0.1  # rho
    last_layers: int = 4
    steps: int = 300  # optimizer steps per task
    batch_size: int = 16
    eval_examples: int | None = None  # score only the first N test examples of each task
    probe: dict = field(default_factory=dict)  # extra dowser.probe arguments

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


CONTINUAL_PRESETS: dict[str, ContinualConfig] = {
    # one learning rate (the grid's middle), one seed, half the steps, the first 250 test
    # examples per task: 9.6 minutes on 2 cores from a fresh cache (4.3 of them pretraining)
    "quick": ContinualConfig(lrs=(3e-4,), seeds=(0,), steps=150, eval_examples=250),
    "full": ContinualConfig(),
}


def lr_grid(config: ContinualConfig, method: str) -> list[float]:
    """`config.lrs` times the method's factor, rounded to 3 significant digits."""
    scale = config.lr_scale.get(method, 1.0)
    return [float(f"{lr * scale:.3g}") for lr in config.lrs]


def _head(test: tuple[Encoded, np.ndarray, int], n: int | None) -> tuple:
    """The first `n` examples of an encoded test set (each example is k candidate rows)."""
    cands, labels, k = test
    if n is None or n >= len(labels):
        return test
    rows = slice(0, n * k)
    ids, starts, images = cands.input_ids[rows], cands.answer_start[rows], cands.image_of[rows]
    return Encoded(ids, starts, images, cands.pixel_values, cands.pad_id), labels[:n], k


def prepare_continual(
    config: ContinualConfig, *, cache: Path | None = None, progress: bool = True
) -> Prepared:
    """The pretrained built-in LLaVA (cached, as the forgetting benchmark's) and every task of
    `config.sequence` encoded; `prep.tests` holds the evaluated tasks only, upstream first."""
    known, seq = ("digits", "wordnet-topic", *SPLITS), config.sequence
    if len(set(seq)) != len(seq) or len(seq) < 2 or not set(seq) <= set(known):
        raise DowserError(f"sequence {list(seq)}: use two or more of {', '.join(known)}, once each")
    unknown = [m for m in config.methods if m not in CONTINUAL_METHODS]
    if unknown:
        raise DowserError(
            f"unknown continual method {unknown[0]!r}; choose from {', '.join(CONTINUAL_METHODS)}"
        )
    prep = prepare_llava(config.bench_config(), cache=cache, progress=progress)
    for name in config.sequence:
        if name in SPLITS:
            parent, classes = SPLITS[name]
            task = class_subset(prep.downstream[parent], classes, name)
            prep.downstream[name] = task
            prep.train[name] = encode_train(prep.processor, task)
            test = task.test
            cands = encode(prep.processor, test.prompts, [task.candidates] * len(test), test.images)
            prep.tests[name] = (cands, test.labels, len(task.candidates))
    order = [*(t.name for t in prep.upstream), *config.sequence]
    prep.tests = {t: _head(prep.tests[t], config.eval_examples) for t in order}
    return prep


def evaluate_all(model: nn.Module, prep: Prepared) -> list[float]:
    """Accuracy on every task of `prep.tests`, in its order (upstream first)."""
    return [accuracy(model, test) for test in prep.tests.values()]


def train_masked(
    start: nn.Module, mask: Mask, data: Examples, setting: Setting, *, progress: bool = False
) -> tuple[nn.Module, list[float]]:
    """A copy of `start` with `mask`'s trainable entries (and the norms of the layers it
    reaches) trained on `data`; every other entry stays bit-identical."""
    model = copy.deepcopy(start)
    handle = mask_gradients(model, mask)
    losses = train_loop(
        model,
        [p for p in model.parameters() if p.requires_grad],
        data,
        steps=setting.steps,
        batch_size=setting.batch_size,
        lr=setting.lr,
        seed=setting.seed,
        attach=handle.attach,
        desc="masked",
        progress=progress,
    )
    handle.remove()  # no hooks left on a model the next stage copies
    model.requires_grad_(False)
    return model.eval(), losses


def overlap(mask: Mask, earlier: list[Mask]) -> float:
    """Fraction of `mask`'s trainable entries that some mask of `earlier` also had."""
    if not earlier:
        return 0.0
    seen = sum(
        int((m & torch.stack([e[n] for e in earlier]).any(0)).sum()) for n, m in mask.items()
    )
    return seen / max(1, mask.num_trainable())


class Sequencer:
    """Runs one (method, lr, seed) sequence at a time over the prepared tasks."""

    def __init__(self, config: ContinualConfig, prep: Prepared, progress: bool = False):
        self.config, self.prep, self.progress = config, prep, progress
        self.row0 = evaluate_all(prep.base, prep)  # stage 0: the same for every method
        self._first: dict[tuple, tuple] = {}  # (lr, seed) -> shared stage 1 (SHARED_FIRST)

    def setting(self, lr: float, seed: int) -> Setting:
        c = self.config
        return Setting(lr, c.last_layers, c.update_ratio, seed, c.steps, c.batch_size)

    def base_mask(self, setting: Setting, exclude: list[Mask] | None = None) -> Mask:
        """The pretrained model's Dowser mask (its probe is cached in the score bank),
        without the entries of the `exclude` masks."""
        data = self.prep.train[self.config.sequence[0]]
        scores = self.prep.bank.get("dowser", seed=0, task="", data=data)
        options = {"exclude": list(exclude)} if exclude else {}
        return tuned_mask(self.prep.base, setting, scores, **options)

    def run(self, method: str, lr: float, seed: int) -> dict:
        """The accuracy matrix (stage 0..T x every task) of one sequence, with per-stage
        losses, seconds and, for masks, how much of each mask earlier masks already had."""
        t0 = time.perf_counter()
        prep, setting = self.prep, self.setting(lr, seed)
        model, rows, masks, losses, reused, seconds = prep.base, [self.row0], [], [], [], []
        shared: list[float] = []  # merge: share of the merged entries several deltas wrote
        with tempfile.TemporaryDirectory(prefix="dowser-deltas-") as tmp:
            deltas: list[Path] = []
            for stage, task in enumerate(self.config.sequence, 1):
                t1 = time.perf_counter()
                data = prep.train[task]
                if stage == 1 and method in SHARED_FIRST:
                    mask, tuned, loss, row = self._shared_first(setting)
                elif method in MASK_METHODS:
                    mask = self._mask(method, model, setting, stage, masks)
                    start = prep.base if method in MERGES else model
                    tuned, loss = train_masked(start, mask, data, setting, progress=self.progress)
                    row = None
                else:
                    mask, row = None, None
                    tuned, loss = fine_tune(method, model, data, setting, bank=prep.bank, task=task)
                if mask is not None:
                    reused.append(round(overlap(mask, masks), 4))
                    masks.append(mask)
                if method in MERGES:
                    deltas.append(self._save_delta(tuned, mask, Path(tmp) / f"{stage}.safetensors"))
                    model, report = _merge(prep.base, deltas)
                    shared.append(round(report["overlap"] / max(1, report["entries"]), 4))
                else:
                    model = tuned
                rows.append(row or evaluate_all(model, prep))
                losses.append(round(float(np.mean(loss[-20:])), 4) if loss else None)
                seconds.append(round(time.perf_counter() - t1, 2))
        return {
            "method": method,
            "lr": lr,
            "seed": seed,
            "accuracy": [[round(a, 4) for a in row] for row in rows],
            "final_loss": losses,
            "mask_reused": reused if masks else None,
            "merge_overlap": shared if method in MERGES else None,
            "stage_seconds": seconds,
            "seconds": round(time.perf_counter() - t0, 2),
        }

    def _shared_first(self, setting: Setting) -> tuple:
        """Stage 1 of SHARED_FIRST: the base's Dowser mask trained from the base on task 1."""
        key = (setting.lr, setting.seed)
        if key not in self._first:
            self._first = {}  # one at a time: runs are ordered by (lr, seed)
            mask = self.base_mask(setting)
            data = self.prep.train[self.config.sequence[0]]
            tuned, loss = train_masked(self.prep.base, mask, data, setting, progress=self.progress)
            self._first[key] = (mask, tuned, loss, evaluate_all(tuned, self.prep))
        return self._first[key]

    def _mask(self, method: str, model: nn.Module, setting: Setting, stage: int, masks: list):
        """This stage's mask for a mask method, built on the current `model`."""
        if method == "random-mask":  # a fresh draw per task: seed and stage both vary it
            scores = random_scores(model, None, seed=1000 * setting.seed + stage)
            return tuned_mask(model, setting, scores)
        if method in ("dowser-static", "merge"):
            return masks[0] if masks else self.base_mask(setting)
        if method == "merge-exclude":  # the base's scores, every earlier task's entries out
            return self.base_mask(setting, exclude=masks)
        bank = ScoreBank(model, self.prep.processor, probe_kwargs=dict(self.config.probe))
        scores = bank.get("dowser", seed=0, task="", data=self.prep.train[self.config.sequence[0]])
        if method == "dowser-reprobe-exclude" and masks:
            return tuned_mask(model, setting, scores, exclude=list(masks))
        return tuned_mask(model, setting, scores)

    def _save_delta(self, tuned: nn.Module, mask: Mask, path: Path) -> Path:
        """`tuned`'s change from the base as a delta file (mask entries + the dense norms)."""
        from dowser.train.artifacts import save_delta

        base = self.prep.base
        dense = list(tuned_norms(tuned, mask))
        names = [*mask, *dense]
        return save_delta(
            tuned,
            mask,
            path,
            base_fingerprints=model_fingerprints(base, names),
            base_digests=model_digests(base, names),
            dense=dense,
        )


def _merge(base: nn.Module, deltas: list[Path]) -> tuple[nn.Module, dict]:
    """A copy of the base with every delta applied, changes summed where deltas overlap,
    and `merge_deltas`' report (entries written, entries several deltas wrote)."""
    from dowser.train.compose import merge_deltas

    model = copy.deepcopy(base)
    return model.eval(), merge_deltas(model, deltas, overlap="sum")


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


def run_continual(
    config: ContinualConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    cache: Path | None = None,
    progress: bool = True,
    log=print,
    prepared: Prepared | None = None,
) -> dict:
    """Run every sequence into OUT/runs.jsonl (resumable), then write results.json,
    results.md and the plots (`continual_report.write_report`); return the results."""
    from dowser.forgetting.bench import machine, read_runs
    from dowser.forgetting.continual_report import summarize, write_report

    out = Path(out)
    runs_path, records = read_runs(out, resume=resume, overwrite=overwrite)
    t0 = time.perf_counter()
    prep = prepared or prepare_continual(config, cache=cache, progress=progress)
    if not resume:
        runs_path.unlink(missing_ok=True)
    info = prep.pretraining
    log(f"built-in model pretrained in {info['seconds']} s (cached at {info['path']})")
    done = {r.get("key") for r in records}
    sequencer = Sequencer(config, prep, progress)
    for run in plan(config):
        key = run_key(run, config)
        if key in done:
            continue
        record = {**sequencer.run(**run), "key": key}
        records.append(record)
        done.add(key)
        with runs_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        end = record["accuracy"][-1]
        log(
            f"{run['method']:>22} lr={run['lr']:<7g} seed={run['seed']}  final "
            + " ".join(f"{a:.3f}" for a in end)
            + f"  ({record['seconds']:.0f} s)"
        )
    wanted = {run_key(r, config) for r in plan(config)}
    records = [r for r in records if r.get("key") in wanted]
    result = summarize(
        records, config, tasks=list(prep.tests), upstream=[t.name for t in prep.upstream]
    )
    result["pretraining"] = info
    result["test_sizes"] = {t: len(v[1]) for t, v in prep.tests.items()}
    result["machine"] = machine()
    result["config"] = json.loads(json.dumps(asdict(config)))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(result, records, out)
    return result
