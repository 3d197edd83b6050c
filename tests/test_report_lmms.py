"""`dowser report`: forgetting figures from lmms-eval results files.

The fixtures in tests/lmms_results are lmms-eval results in the layout its
EvaluationTracker.save_results_aggregated writes (<output_path>/<model_name_sanitized>/
<date>_results.json); every expected figure below is recomputed by hand from their numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dowser.cli import main
from dowser.eval import lmms, lmms_report

DATA = Path(__file__).parent / "lmms_results"
BASE = {"textvqa_val": 0.4613, "gqa": 0.6193, "mmbench_en_dev": 0.6426, "ok_vqa_val2014": 0.5381}
LOW = {"textvqa_val": 0.4502, "gqa": 0.6120, "mmbench_en_dev": 0.6310, "ok_vqa_val2014": 0.5302}
HIGH = {"textvqa_val": 0.4010, "gqa": 0.5870, "mmbench_en_dev": 0.5842, "ok_vqa_val2014": 0.4950}
DOWN = {"tuned_lr1e-5": 0.712, "tuned_lr1e-4": 0.845}  # 84.5 in the file: a percent


def runs(*names: str) -> list[str]:
    return [str(DATA / n) for n in names]


def report(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "report.json"
    args = [*runs("base", "tuned_lr1e-5", "tuned_lr1e-4"), "--json", str(out), *extra]
    assert main(["report", *args]) == 0
    return json.loads(out.read_text())


def mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def test_figures_by_hand(tmp_path):
    got = report(tmp_path, "--downstream", str(DATA / "downstream.json"))
    assert got["base"]["scores"] == pytest.approx(BASE)  # mmbench's 64.26 read as a percent
    assert got["base"]["a_up"] == pytest.approx(mean(BASE))
    assert got["metrics"]["mmbench_en_dev"] == "gpt_eval_score,none"
    assert got["metrics"]["textvqa_val"] == "exact_match,none"
    for run, tuned in zip(got["runs"], (LOW, HIGH), strict=True):
        a_up, a_down = mean(tuned), DOWN[run["name"]]
        assert run["scores"] == pytest.approx(tuned)
        assert run["retention"] == pytest.approx({t: tuned[t] / BASE[t] for t in BASE})
        assert run["a_up"] == pytest.approx(a_up)
        assert run["a_up_retention"] == pytest.approx(a_up / mean(BASE))
        assert run["a_down"] == pytest.approx(a_down)
        assert run["h"] == pytest.approx(2 * a_up * a_down / (a_up + a_down))
    # the learning rates come from the runs' folder names, and say so
    assert [(r["lr"], r["lr_source"]) for r in got["runs"]] == [(1e-5, "name"), (1e-4, "name")]
    assert got["base"]["model"] == "llava_hf"


def test_markdown_and_json_round_trip(tmp_path, capsys):
    md = tmp_path / "report.md"
    got = report(tmp_path, "--markdown", str(md), "--lr", "tuned_lr1e-4=3e-4")
    table = capsys.readouterr().out
    assert md.read_text() == table == lmms_report.markdown(got)  # the JSON alone rebuilds the table
    lines = table.splitlines()
    assert lines[0].startswith("| task | metric | base: base | tuned_lr1e-5 | retention")
    textvqa = next(line for line in lines if line.startswith("| textvqa_val "))
    assert textvqa.split(" | ")[2:5] == ["46.13", "45.02", f"{0.4502 / 0.4613:.3f}"]
    assert got["runs"][1]["lr"] == 3e-4 and got["runs"][1]["lr_source"] == "--lr"
    assert "| A_down | - |" in table  # no --downstream: n/a, not a crash
    assert got["runs"][0]["h"] is None


def test_a_single_file_and_merged_folder_agree(tmp_path):
    """A folder's files (tasks run separately) merge into one run; a file is a run too."""
    (tmp_path / "a").mkdir()
    base = lmms.load_results(str(DATA / "base"))
    file = next((DATA / "base").rglob("*_results.json"))
    assert lmms.load_results(str(file)).tasks == base.tasks
    low = lmms.load_results(str(DATA / "tuned_lr1e-5"))
    assert sorted(low.tasks) == sorted(LOW) and len(set(low.files.values())) == 2
    named = lmms.load_results(f"mine={DATA / 'tuned_lr1e-5'}")
    assert named.name == "mine" and named.tasks == low.tasks


def test_same_task_twice_identical_is_fine_different_is_an_error(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(DATA / "tuned_lr1e-4", run)
    file = next(run.rglob("*_results.json"))
    shutil.copy(file, file.with_name("20250604_000000_results.json"))
    assert lmms.load_results(str(run)).tasks == lmms.load_results(str(file)).tasks
    data = json.loads(file.read_text())
    data["results"]["gqa"]["exact_match,none"] = 0.5
    file.write_text(json.dumps(data))
    assert main(["report", *runs("base"), str(run)]) == 2
    err = capsys.readouterr().err
    assert "task gqa appears twice" in err and err.count("\n") == 1


def test_plot_only_when_asked_and_with_two_learning_rates(tmp_path, capsys):
    png = tmp_path / "frontier.png"
    down = ["--downstream", str(DATA / "downstream.json")]
    report(tmp_path, *down)
    assert not png.exists()  # not asked
    report(tmp_path, *down, "--plot", str(png), "--overwrite")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one = tmp_path / "one.png"
    args = ["report", *runs("base", "tuned_lr1e-5"), "--plot", str(one)]
    assert main(args) == 2  # one learning rate and no downstream: refused, nothing written
    assert "--plot needs" in capsys.readouterr().err and not one.exists()


def write_run(tmp_path: Path, name: str, edit) -> str:
    """A copy of tuned_lr1e-4 whose results JSON `edit` changed in place."""
    run = tmp_path / name
    shutil.copytree(DATA / "tuned_lr1e-4", run)
    file = next(run.rglob("*_results.json"))
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))
    return str(run)


def set_model(data):
    data["config"]["model"] = "qwen2_vl"


def drop_gqa(data):
    del data["results"]["gqa"]


def other_tasks(data):
    data["results"] = {"mme": {"alias": "mme", "mme_perception_score,none": 1500.0}}


def no_metric(data):
    del data["results"]["textvqa_val"]["exact_match,none"]


def null_metric(data):
    data["results"]["textvqa_val"]["exact_match,none"] = None


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_model, "evaluated as lmms-eval model 'qwen2_vl', the base as 'llava_hf'"),
        (drop_gqa, "lacks task gqa that the base has"),
        (other_tasks, "lacks task gqa, mmbench_en_dev, ok_vqa_val2014, textvqa_val"),
        (no_metric, "has no metric exact_match,none"),
        (null_metric, "has no numeric value (None)"),
    ],
)
def test_bad_runs_one_line_nothing_written(tmp_path, capsys, edit, message):
    run = write_run(tmp_path, "bad", edit)
    out = tmp_path / "out.json"
    assert main(["report", *runs("base"), run, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("dowser report: error:") and err.count("\n") == 1
    assert not out.exists()


def test_mixed_models_allowed_when_asked(tmp_path):
    run = write_run(tmp_path, "qwen", set_model)
    assert main(["report", *runs("base"), run, "--allow-mixed-models"]) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [("not json {", "is not a JSON file"), ('{"acc": 0.5}', "is not an lmms-eval results file")],
)
def test_not_lmms_eval_files(tmp_path, capsys, content, message):
    bad = tmp_path / "x_results.json"
    bad.write_text(content)
    assert main(["report", *runs("base"), str(bad)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_base_score_zero_gives_na_retention(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(DATA / "base", base)
    file = next(base.rglob("*_results.json"))
    data = json.loads(file.read_text())
    data["results"]["gqa"]["exact_match,none"] = 0.0
    file.write_text(json.dumps(data))
    out = tmp_path / "r.json"
    assert main(["report", str(base), *runs("tuned_lr1e-5"), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["runs"][0]["retention"]["gqa"] is None
    assert got["runs"][0]["retention"]["textvqa_val"] == pytest.approx(0.4502 / 0.4613)
    assert "base scores 0 on gqa" in lmms_report.markdown(
        got
    ) and "| n/a |" in lmms_report.markdown(got)


def test_metric_override_and_refusals(tmp_path, capsys):
    out = tmp_path / "o.json"
    args = [*runs("base", "tuned_lr1e-5"), "--json", str(out)]
    assert main(["report", *args, "--metric", "mmbench_en_dev=submission"]) == 2
    assert "has no numeric value" in capsys.readouterr().err and not out.exists()
    assert main(["report", *args, "--metric", "gqa=exact_match,none"]) == 0
    assert main(["report", *args]) == 2  # exists: never replaced without --overwrite
    assert "--overwrite" in capsys.readouterr().err


def test_downstream_formats(tmp_path, capsys):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"name": "vizwiz", "accuracy": 0.6}))
    low = runs("base", "tuned_lr1e-5")
    out = tmp_path / "r.json"
    assert main(["report", *low, "--downstream", str(one), "--json", str(out)]) == 0
    got = json.loads(out.read_text())["runs"][0]
    assert got["h"] == pytest.approx(2 * mean(LOW) * 0.6 / (mean(LOW) + 0.6))
    # an lmms-eval results file of one task is a downstream file too (gqa, 61.20 here)
    lmms_file = tmp_path / "gqa_results.json"
    data = json.loads(
        next((DATA / "tuned_lr1e-5").rglob("20250602_090000_results.json")).read_text()
    )
    del data["results"]["textvqa_val"]
    lmms_file.write_text(json.dumps(data))
    down = lmms.read_downstream(str(lmms_file), ["tuned_lr1e-5"], {})
    assert down["name"] == "gqa" and down["accuracy"] == {"tuned_lr1e-5": pytest.approx(0.612)}
    # a run missing from {"runs": ...} is named
    assert main(["report", *low, *runs("tuned_lr1e-4"), "--downstream", str(one)]) == 2
    assert "'accuracy' with a single tuned run" in capsys.readouterr().err
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"name": "vizwiz", "runs": {"tuned_lr1e5": 0.6}}))
    assert main(["report", *low, "--downstream", str(typo)]) == 2
    assert "names runs tuned_lr1e5 and lacks tuned_lr1e-5" in capsys.readouterr().err


def test_percent_normalisation_edges():
    assert lmms.fraction(64.26, "gpt_eval_score,none", "x") == pytest.approx(0.6426)
    assert lmms.fraction(0.5, "gpt_eval_score,none", "x") == pytest.approx(0.005)
    assert lmms.fraction(0.5, "exact_match,none", "x") == 0.5
    assert lmms.fraction(55.0, "exact_match,none", "x") == pytest.approx(0.55)
    with pytest.raises(lmms.DowserError, match="not an accuracy"):
        lmms.fraction(1500.0, "mme_perception_score,none", "mme")


def test_shipped_ocrvqa_task_hooks():
    """The OCR-VQA task file dowser ships: one document per question, exact match scoring."""
    import importlib.util

    import datasets
    import yaml

    folder = Path(lmms.__file__).parents[1] / "lmms_tasks" / "ocrvqa"
    spec = importlib.util.spec_from_file_location("ocrvqa_utils", folder / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    rows = {"image_id": ["a", "b"], "questions": [["Who wrote this book?", "Genre?"], ["Title?"]]}
    rows["answers"] = [["Jane Doe", "Travel"], ["Nous les gosses"]]
    docs = utils.ocrvqa_process_docs(datasets.Dataset.from_dict(rows))
    assert docs["question"] == ["Who wrote this book?", "Genre?", "Title?"]
    assert docs["answer"] == ["Jane Doe", "Travel", "Nous les gosses"] and docs["image_id"] == list(
        "aab"
    )
    assert utils.ocrvqa_process_results(docs[0], ["jane doe."]) == {"exact_match": 1.0}
    assert utils.ocrvqa_process_results(docs[0], ["John Doe"]) == {"exact_match": 0.0}
    assert (
        utils.ocrvqa_doc_to_text(docs[1], {"pre_prompt": "", "post_prompt": " A:"}) == "Genre? A:"
    )

    class Tags(yaml.SafeLoader):  # lmms-eval resolves !function itself
        pass

    Tags.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    config = yaml.load((folder / "ocrvqa.yaml").read_text(), Loader=Tags)
    assert config["task"] == "ocrvqa" and config["metric_list"][0]["metric"] == "exact_match"
    assert all(hasattr(utils, config[k].split(".")[1]) for k in ("process_docs", "doc_to_text"))
    assert lmms.PRIMARY_METRICS[config["task"]] == "exact_match"
