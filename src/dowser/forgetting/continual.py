"""Continual fine-tuning: several downstream tasks in turn, one model, every method.

    result = run_continual(CONTINUAL_PRESETS["quick"], out)   # dowser bench continual --quick
    result = run_continual(CONTINUAL_PRESETS["whisper"], out)  # ... --model whisper-tiny-en

The sequence (`SEQUENCE`) follows the pretraining of the built-in LLaVA (`llava.py`):

    stage 1  digits-low     sklearn digits 0-4 -> "zero" ... "four"   (image)
    stage 2  wordnet-topic  WordNet noun gloss -> one of 8 categories (text)
    stage 3  digits-high    sklearn digits 5-9 -> "five" ... "nine"   (image)

The built-in data has two downstream tasks; the third comes from splitting digits into two
label sets (the field's "Split MNIST", task-incremental: each half has its own candidates),
with the single-task benchmark's train / test split of digits. Upstream tasks (fashion,
wordnet-pos) are the pretraining tasks the forgetting benchmark measures (A_up). Whisper
tiny.en has a sequence of its own (`speech/continual.py`: topic-a -> phonemes -> topic-b).

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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dowser.baselines.masks import random_scores
from dowser.errors import DowserError
from dowser.fingerprint import model_digests, model_fingerprints
from dowser.forgetting.config import Prepared
from dowser.forgetting.continual_config import (  # noqa: F401  (the benchmark's names, here too)
    CONTINUAL_LR_SCALE,
    CONTINUAL_METHODS,
    CONTINUAL_PRESETS,
    MASK_METHODS,
    MERGES,
    SEQUENCE,
    SHARED_FIRST,
    SPLITS,
    ContinualConfig,
    lr_grid,
    plan,
    run_key,
)
from dowser.forgetting.encode import Encoded, encode
from dowser.forgetting.llava import accuracy, prepare_llava
from dowser.forgetting.methods import ScoreBank, Setting, fine_tune, tuned_mask
from dowser.forgetting.model import encode_train
from dowser.forgetting.tasks import class_subset
from dowser.forgetting.train import Examples, train_loop
from dowser.mask import Mask
from dowser.train.masking import mask_gradients, tuned_norms


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
    unknown = [m for m in config.methods if m not in CONTINUAL_METHODS]
    if unknown:
        raise DowserError(
            f"unknown continual method {unknown[0]!r}; choose from {', '.join(CONTINUAL_METHODS)}"
        )
    if config.model != "llava":
        from dowser.forgetting.speech.continual import prepare_speech_continual

        if config.model != "whisper-tiny-en":
            raise DowserError(f"model {config.model!r}: use llava or whisper-tiny-en")
        return prepare_speech_continual(config, cache=cache, progress=progress)
    known, seq = ("digits", "wordnet-topic", *SPLITS), config.sequence
    if len(set(seq)) != len(seq) or len(seq) < 2 or not set(seq) <= set(known):
        raise DowserError(f"sequence {list(seq)}: use two or more of {', '.join(known)}, once each")
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
    if prep.score_task is not None:  # speech: each task has its own score
        return [prep.score_task(model, task) for task in prep.tests]
    return [accuracy(model, test) for test in prep.tests.values()]


def train_masked(
    start: nn.Module,
    mask: Mask,
    data: Examples,
    setting: Setting,
    *,
    progress: bool = False,
    loss_fn=None,
) -> tuple[nn.Module, list[float]]:
    """A copy of `start` with `mask`'s trainable entries (and the norms of the layers it
    reaches) trained on `data` (`loss_fn(model, batch)`, None: the model's own loss); every
    other entry stays bit-identical."""
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
        loss_fn=loss_fn,
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

    def data(self, task: str) -> Examples:
        """`task`'s training examples."""
        prep = self.prep
        return prep.train_data(task, 0) if prep.train_data else prep.train[task]

    def train(self, start: nn.Module, mask: Mask, task: str, setting: Setting) -> tuple:
        """`train_masked` on `task` with the track's loss."""
        data, loss_fn = self.data(task), self.prep.loss_fn
        return train_masked(start, mask, data, setting, progress=self.progress, loss_fn=loss_fn)

    def base_mask(self, setting: Setting, exclude: list[Mask] | None = None) -> Mask:
        """The pretrained model's Dowser mask (its probe is cached in the score bank),
        without the entries of the `exclude` masks."""
        data = self.data(self.config.sequence[0])
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
                if stage == 1 and method in SHARED_FIRST:
                    mask, tuned, loss, row = self._shared_first(setting)
                elif method in MASK_METHODS:
                    mask = self._mask(method, model, setting, stage, masks)
                    start = prep.base if method in MERGES else model
                    tuned, loss = self.train(start, mask, task, setting)
                    row = None
                else:
                    mask, row = None, None
                    tuned, loss = fine_tune(
                        method,
                        model,
                        self.data(task),
                        setting,
                        bank=prep.bank,
                        task=task,
                        loss_fn=prep.loss_fn,
                    )
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
            tuned, loss = self.train(self.prep.base, mask, self.config.sequence[0], setting)
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
        # probed as the base was (speech: no images), on the model trained so far
        kwargs = dict(self.prep.bank.probe_kwargs)
        bank = ScoreBank(model, self.prep.processor, probe_kwargs=kwargs)
        scores = bank.get("dowser", seed=0, task="", data=self.data(self.config.sequence[0]))
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
    if "seconds" in info:
        log(f"built-in model pretrained in {info['seconds']} s (cached at {info['path']})")
    else:
        log(info["summary"])
    wanted = {run_key(r, config) for r in plan(config)}
    done = {r.get("key") for r in records}
    if resume and records:
        other = sum(r.get("key") not in wanted for r in records)
        log(
            f"resuming: {len(done & wanted)} of {len(wanted)} sequences already in {runs_path}"
            + (f"; {other} runs of other settings there are kept but not used" if other else "")
        )
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
    records = [r for r in records if r.get("key") in wanted]
    result = summarize(
        records, config, tasks=list(prep.tests), upstream=[t.name for t in prep.upstream]
    )
    result["pretraining"] = info
    # (candidates, labels, k) for the built-in tasks, encoded clips for speech
    result["test_sizes"] = {
        t: len(v[1]) if isinstance(v, tuple) else len(v) for t, v in prep.tests.items()
    }
    result["machine"] = machine()
    result["config"] = json.loads(json.dumps(asdict(config)))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_report(result, records, out)
    return result
