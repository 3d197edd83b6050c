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
4. encoder   (speech models) `encoder_methods` tuning the last `encoder_layers` encoder layers
             too, over the whole grid, on `sweep_tasks` with `sweep_seeds`.

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

Tracks. `config.model` picks the model and its tasks: "llava", the built-in LLaVA pretrained
here (`llava.py`), or "whisper-tiny-en", OpenAI's Whisper tiny.en on speech made with
espeak-ng (`speech/track.py`). A track's `prepare` gives the runs everything they share
(`config.Prepared`); everything else here is the same for both.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from dowser.errors import DowserError
from dowser.eval.metrics import h_score
from dowser.forgetting.config import BenchConfig, Prepared
from dowser.forgetting.llava import PRESETS, accuracy, load_tasks, prepare_llava
from dowser.forgetting.merges import merge
from dowser.forgetting.methods import MASKED, MERGED, Setting, fine_tune

__all__ = [  # the tracks' pieces are re-exported: one place to import the benchmark from
    "PRESETS",
    "BenchConfig",
    "Prepared",
    "Runner",
    "accuracy",
    "load_tasks",
    "lr_grid",
    "plan",
    "prepare",
    "run_benchmark",
]


def prepare(config: BenchConfig, *, cache: Path | None = None, progress: bool = True) -> Prepared:
    """The track of `config.model`, ready to run: model, encoded tasks, scoring."""
    if config.model == "llava":
        return prepare_llava(config, cache=cache, progress=progress)
    from dowser.forgetting.speech.track import prepare_speech

    return prepare_speech(config, cache=cache, progress=progress)


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
        for method in config.task_methods.get(task, config.methods):
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


def read_runs(out: Path, *, resume: bool, overwrite: bool) -> tuple[Path, list[dict]]:
    """(OUT/runs.jsonl, the runs already in it): kept with `resume` (a last line cut short by
    a crash is dropped: that run is simply done again), none when the file is absent or
    `overwrite` (the caller removes the file once ready), else a DowserError. Creates OUT."""
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    if runs_path.exists() and not (resume or overwrite):
        raise DowserError(
            f"{runs_path} exists; resume it (--resume) or allow overwriting (--overwrite)"
        )
    if not (resume and runs_path.is_file()):
        return runs_path, []
    lines = runs_path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError:
            if i < len(lines):
                raise DowserError(
                    f"{runs_path}:{i} is not a run record; remove that line to run it again, "
                    "or start over with --overwrite"
                ) from None
            # the last line, written when the process died: rewrite the file without it
            runs_path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return runs_path, records


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

    _check_task_methods(config)
    out = Path(out)
    runs_path, records = read_runs(out, resume=resume, overwrite=overwrite)
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


def _check_task_methods(config: BenchConfig) -> None:
    """task_methods may only leave methods out, and only for tasks that run: a typo would
    otherwise silently run every method (or a method whose scores were never made)."""
    for task, rows in config.task_methods.items():
        if task not in config.downstream:
            raise DowserError(
                f"task_methods names {task!r}, which is not a downstream task "
                f"({', '.join(config.downstream)})"
            )
        extra = [m for m in rows if m not in config.methods]
        if extra:
            raise DowserError(
                f"task_methods[{task!r}] has {extra[0]!r}, which is not in methods; "
                "task_methods may only leave methods out"
            )


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
