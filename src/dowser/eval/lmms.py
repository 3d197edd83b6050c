"""Forgetting figures from lmms-eval results files (`dowser report`).

Read from lmms-eval's source (EvolvingLMMs-Lab/lmms-eval, main branch as of v0.4/0.5:
`lmms_eval/__main__.py` `cli_evaluate_single`, `lmms_eval/evaluator.py` `simple_evaluate` and
`evaluate`, `lmms_eval/evaluator_utils.py` `TaskOutput.calculate_aggregate_metric`,
`lmms_eval/loggers/evaluation_tracker.py` `save_results_aggregated`): one run writes
`<--output_path>/<model_name_sanitized>/<YYYYmmdd_HHMMSS>_results.json`, a JSON object with

    results          task -> {"alias": ..., "METRIC,FILTER": value, "METRIC_stderr,FILTER": ...}
    group_subtasks   name -> its subtasks ([] for a task run on its own)
    configs, versions, n-shot, higher_is_better, n-samples
    config           {"model": the --model type (llava_hf, qwen2_vl, ...), "model_args": ...}
    date, git_hash, model_name, model_name_sanitized, ... (the tracker's fields)

A metric whose aggregation only writes a submission file ("submission") holds null; a stderr
that could not be computed holds "N/A".

Primary metric of each of the paper's upstream tasks (task yaml `metric_list` + utils.py):
textvqa_val, ok_vqa_val2014: exact_match (VQA accuracy, 0-1); gqa: exact_match (0-1);
mmbench_en_dev, mmbench_cn_dev: gpt_eval_score (overall accuracy * 100, 0-100; a prediction
that is an option letter is scored offline, only other answers go to the GPT judge), their
other metric, submission, is null; ocrvqa (the task file dowser ships): exact_match (0-1).

Every score is normalised to a fraction: metrics known to report percent are divided by 100,
and so is any other value in (1, 100]. For each upstream task t with base score b_t and
tuned score s_t, retention_t = s_t / b_t (undefined when b_t = 0),
A_up = mean_t s_t over the upstream tasks, A_down = the downstream accuracy and
H = 2 A_up A_down / (A_up + A_down) (dowser.eval.metrics.h_score).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dowser.errors import DowserError
from dowser.eval.metrics import h_score

PRIMARY_METRICS = {
    "textvqa_val": "exact_match",
    "mmbench_en_dev": "gpt_eval_score",
    "mmbench_cn_dev": "gpt_eval_score",
    "gqa": "exact_match",
    "ok_vqa_val2014": "exact_match",
    "ocrvqa": "exact_match",
}
PERCENT_METRICS = {"gpt_eval_score"}  # aggregations that return accuracy * 100
RESULTS_GLOB = "*_results.json"  # save_results_aggregated's file name
_LR_IN_NAME = re.compile(r"lr[=_-]?(\d+(?:\.\d+)?(?:e-?\d+)?)", re.IGNORECASE)


@dataclass
class Results:
    """One run's lmms-eval results, merged over the files of its folder."""

    name: str
    path: str
    model: str | None  # config.model: the lmms-eval model type
    tasks: dict[str, dict] = field(default_factory=dict)  # task -> its `results` entry
    files: dict[str, str] = field(default_factory=dict)  # task -> the file it came from


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DowserError(f"{path} is not a JSON file (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise DowserError(f"{path} is not a JSON file ({e.msg} at line {e.lineno})") from None
    except OSError as e:
        raise DowserError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise DowserError(
            f"{path} is not an lmms-eval results file (no 'results' object); give the "
            "*_results.json file or the --output_path folder lmms-eval wrote"
        )
    return data


def _leaf_tasks(data: dict) -> dict[str, dict]:
    """The task entries of `results`, without groups (their score aggregates subtasks that
    are listed too)."""
    groups = {k for k, v in (data.get("group_subtasks") or {}).items() if v}
    return {t: e for t, e in data["results"].items() if t not in groups and isinstance(e, dict)}


def load_results(spec: str) -> Results:
    """Read a run: `PATH` or `NAME=PATH`, PATH a results file or a folder searched recursively
    for *_results.json (several tasks run separately are merged). The run is named NAME, else
    the folder's name or the file's stem."""
    name, sep, raw = spec.partition("=")
    if not sep or not name or os.path.exists(spec):
        name, raw = "", spec
    path = Path(raw)
    if not path.exists():
        raise DowserError(f"{path} does not exist")
    files = sorted(path.rglob(RESULTS_GLOB)) if path.is_dir() else [path]
    if not files:
        raise DowserError(
            f"{path} holds no lmms-eval results (*_results.json); pass lmms-eval's --output_path"
        )
    run = Results(name or (path.name if path.is_dir() else path.stem), str(path), None)
    models: dict[str, str] = {}
    for file in files:
        data = _read_json(file)
        model = (data.get("config") or {}).get("model")
        if isinstance(model, str):
            models.setdefault(model, str(file))
        for task, entry in _leaf_tasks(data).items():
            if task in run.tasks and run.tasks[task] != entry:
                raise DowserError(
                    f"task {task} appears twice in {path} with different scores ({run.files[task]}"
                    f" and {file}); keep one of the two files"
                )
            run.tasks[task], run.files[task] = entry, str(file)
    if len(models) > 1:
        raise DowserError(f"{path} mixes results of model types {', '.join(sorted(models))}")
    run.model = next(iter(models), None)
    if not run.tasks:
        raise DowserError(f"{path} holds lmms-eval results of no task")
    return run


def _number(value: object) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) else None


def choose_metric(task: str, entry: Mapping, metric: str | None) -> str:
    """The "METRIC,FILTER" key scored for `task`: `metric` (from --metric or the table), with
    filter "none" unless written METRIC,FILTER; without one, the task's only numeric metric."""
    keys = [k for k in entry if "," in k and "_stderr" not in k.split(",")[0]]
    if metric is None:
        numeric = [k for k in keys if _number(entry[k]) is not None]
        if len(numeric) == 1:
            return numeric[0]
        raise DowserError(
            f"task {task} has {len(numeric)} numeric metrics ({', '.join(numeric) or 'none'}); "
            f"name one with --metric {task}=METRIC"
        )
    if "," in metric:
        found = [metric] if metric in entry else []
    else:
        found = [k for k in keys if k.split(",")[0] == metric]
        found = [f"{metric},none"] if f"{metric},none" in found else found
    if len(found) != 1:
        have = ", ".join(keys) or "none"
        what = "several filters" if found else "no metric"
        raise DowserError(
            f"task {task} has {what} {metric!r} (it has: {have}); pass --metric {task}=METRIC,FILTER"
        )
    return found[0]


def fraction(value: float, metric: str, where: str) -> float:
    """A score as a fraction in [0, 1]: percent metrics and values in (1, 100] are / 100."""
    if metric.split(",")[0] in PERCENT_METRICS or 1 < value <= 100:
        value /= 100
    if not 0 <= value <= 1:
        raise DowserError(f"{where} is {value:g}, not an accuracy in [0, 1] or [0, 100]")
    return value


def score(run: Results, task: str, metric: str) -> float:
    """The normalised score of `task` in `run` under the "METRIC,FILTER" key `metric`."""
    entry = run.tasks[task]
    if metric not in entry:
        have = ", ".join(k for k in entry if "," in k and "_stderr" not in k) or "none"
        raise DowserError(
            f"task {task} in {run.files[task]} has no metric {metric} (it has: {have}); "
            f"choose one both runs have with --metric {task}=METRIC"
        )
    value = _number(entry[metric])
    if value is None:
        raise DowserError(
            f"metric {metric} of task {task} in {run.files[task]} has no numeric value "
            f"({run.tasks[task].get(metric)!r}); choose another with --metric {task}=METRIC"
        )
    return fraction(value, metric, f"{metric} of {task} in {run.files[task]}")


def learning_rate(run: Results, given: Mapping[str, float]) -> tuple[float | None, str | None]:
    """The run's learning rate and where it came from: --lr, else "lr<NUMBER>" in its name."""
    if run.name in given:
        return given[run.name], "--lr"
    found = _LR_IN_NAME.search(run.name)
    return (float(found.group(1)), "name") if found else (None, None)


def read_downstream(path: str, runs: Sequence[str], metrics: Mapping[str, str]) -> dict:
    """Downstream accuracy per run from `path`: {"name": TASK, "accuracy": A} (one tuned run),
    {"name": TASK, "runs": {RUN: A, ...}}, or an lmms-eval results file of one task (one
    tuned run). A is a fraction or a percent. Returns {"name", "source", "accuracy": {run: A}}."""
    file = Path(path)
    if not file.is_file():
        raise DowserError(f"downstream file {file} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DowserError(f"downstream file {file} is not a JSON file") from None
    if not isinstance(data, dict):
        raise DowserError(f"downstream file {file} is not a JSON object")
    if isinstance(data.get("results"), dict):
        ran = load_results(str(file))
        if len(ran.tasks) != 1:
            raise DowserError(
                f"downstream file {file} holds {len(ran.tasks)} tasks; give one task's results"
            )
        task = next(iter(ran.tasks))
        metric = choose_metric(task, ran.tasks[task], metrics.get(task))
        data = {"name": task, "accuracy": score(ran, task, metric)}
    name = data.get("name", "downstream")
    if "runs" in data and isinstance(data["runs"], dict):
        values = data["runs"]
    elif "accuracy" in data and len(runs) == 1:
        values = {runs[0]: data["accuracy"]}
    else:
        raise DowserError(
            f"downstream file {file} needs {{'name': TASK, 'runs': {{RUN: ACCURACY}}}} "
            "(or 'accuracy' with a single tuned run)"
        )
    unknown = sorted(set(values) - set(runs))
    missing = [r for r in runs if r not in values]
    if unknown or missing:
        raise DowserError(
            f"downstream file {file} names runs {', '.join(unknown) or '-'} and lacks "
            f"{', '.join(missing) or '-'}; its runs must be the tuned runs: {', '.join(runs)}"
        )
    accuracy = {}
    for run, value in values.items():
        number = _number(value)
        if number is None:
            raise DowserError(f"downstream accuracy of {run} in {file} is not a number")
        accuracy[run] = fraction(number, "", f"downstream accuracy of {run} in {file}")
    return {"name": str(name), "source": str(file), "accuracy": accuracy}


def build_report(
    base: Results,
    tuned: Sequence[Results],
    *,
    metrics: Mapping[str, str] | None = None,
    lrs: Mapping[str, float] | None = None,
    downstream: Mapping | None = None,
    allow_mixed_models: bool = False,
) -> dict:
    """The forgetting figures of `tuned` runs against `base` (equations in the module doc),
    as a JSON-ready dict; raises a DowserError for mismatched runs."""
    metrics, lrs = dict(metrics or {}), dict(lrs or {})
    names = [base.name] + [r.name for r in tuned]
    if len(set(names)) != len(names):
        raise DowserError(f"two runs are named alike ({', '.join(names)}); name them as NAME=PATH")
    unknown = sorted(set(lrs) - set(names[1:]))
    if unknown:
        raise DowserError(
            f"--lr names no tuned run: {', '.join(unknown)} (runs: {', '.join(names[1:])})"
        )
    tasks = list(base.tasks)
    for run in tuned:
        missing = [t for t in tasks if t not in run.tasks]
        if missing:
            raise DowserError(
                f"tuned run {run.name} ({run.path}) lacks task {', '.join(missing)} that the base "
                "has; evaluate it on the same --tasks"
            )
        extra = [t for t in run.tasks if t not in base.tasks]
        if extra:
            raise DowserError(
                f"tuned run {run.name} has task {', '.join(extra)} that the base {base.path} lacks;"
                " evaluate the base on it too"
            )
        if (
            not allow_mixed_models
            and None not in (base.model, run.model)
            and run.model != base.model
        ):
            raise DowserError(
                f"tuned run {run.name} was evaluated as lmms-eval model {run.model!r}, the base as "
                f"{base.model!r}; evaluate both with the same --model or pass --allow-mixed-models"
            )
    key = {
        t: choose_metric(t, base.tasks[t], metrics.get(t, PRIMARY_METRICS.get(t))) for t in tasks
    }
    notes = []
    base_scores = {t: score(base, t, key[t]) for t in tasks}
    for t, value in base_scores.items():
        if value == 0:
            notes.append(f"the base scores 0 on {t}: its retention is undefined (n/a)")
    a_up_base = sum(base_scores.values()) / len(tasks)
    base_info = dict(name=base.name, path=base.path, model=base.model, scores=base_scores)
    report = dict(kind="dowser-lmms-report", metrics=key, base={**base_info, "a_up": a_up_base})
    report.update(runs=[], downstream=None, notes=notes)
    if downstream is not None:
        report["downstream"] = {"name": downstream["name"], "source": downstream["source"]}
    for run in tuned:
        scores = {t: score(run, t, key[t]) for t in tasks}
        a_up = sum(scores.values()) / len(tasks)
        lr, lr_source = learning_rate(run, lrs)
        a_down = None if downstream is None else downstream["accuracy"][run.name]
        retention = {t: (v / base_scores[t] if base_scores[t] else None) for t, v in scores.items()}
        up_kept = a_up / a_up_base if a_up_base else None
        h = None if a_down is None else h_score(a_up, a_down)
        info = dict(name=run.name, path=run.path, model=run.model, lr=lr, lr_source=lr_source)
        info.update(scores=scores, retention=retention, a_up=a_up, a_up_retention=up_kept)
        report["runs"].append({**info, "a_down": a_down, "h": h})
    return report
