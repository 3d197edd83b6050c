"""The continual benchmark: metrics by hand, the sequence loop on a tiny LLaVA, resume, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_forgetting import TINY, data_env  # noqa: F401  (the fixture)

from dowser.forgetting import continual as C
from dowser.forgetting.bench import lr_grid as single_task_grid
from dowser.forgetting.continual_report import (
    backward_transfer,
    forgetting,
    markdown,
    metrics,
    summarize,
)
from dowser.forgetting.llava import PRESETS

TINY_C = C.ContinualConfig(
    base=TINY.base,
    upstream_train=TINY.upstream_train,
    upstream_test=TINY.upstream_test,
    downstream_train=TINY.downstream_train,
    downstream_test=TINY.downstream_test,
    lrs=(1e-3,),
    seeds=(0,),
    last_layers=2,
    steps=3,
    batch_size=4,
    probe=TINY.probe,
)

# one upstream task (column 0), three downstream tasks trained at stages 1, 2, 3
ACC = [
    [0.9, 0.1, 0.95, 0.3],  # pretrained: task 2 happens to score high before it is learnt
    [0.8, 0.7, 0.2, 0.1],
    [0.7, 0.5, 0.9, 0.2],
    [0.6, 0.6, 0.4, 0.8],
]


def test_metrics_by_hand():
    m = metrics(ACC, 1)
    assert m["average_accuracy"] == pytest.approx((0.6 + 0.4 + 0.8) / 3)
    # (acc[3][1] - acc[1][1] + acc[3][2] - acc[2][2]) / 2
    assert m["backward_transfer"] == pytest.approx(((0.6 - 0.7) + (0.4 - 0.9)) / 2)
    assert m["a_up"] == pytest.approx(0.6)
    # upstream from stage 0; task 1 from stage 1 (its 0.1 before does not count); task 2 from
    # stage 2 (not its 0.95 before it was learnt); the last task has none
    f = forgetting(ACC, 1)
    assert f[:3] == pytest.approx([0.9 - 0.6, 0.7 - 0.6, 0.9 - 0.4]) and f[3] is None
    assert m["mean_forgetting"] == pytest.approx((0.1 + 0.5) / 2)
    assert backward_transfer([[0.5, 0.1], [0.4, 0.9]], 1) is None  # one task: no BWT
    with pytest.raises(ValueError, match="shape"):
        metrics(ACC, 2)


def _rec(method, lr, seed, acc):
    return {"method": method, "lr": lr, "seed": seed, "accuracy": acc}


def test_summary_schema_and_best_learning_rate():
    low = np.array(ACC) * 0.5  # a learning rate that keeps and learns half as much
    records = [
        _rec("full-ft", 1e-3, 0, ACC),
        _rec("full-ft", 1e-3, 1, (np.array(ACC) - 0.1).tolist()),
        _rec("full-ft", 1e-4, 0, low.tolist()),
        _rec("full-ft", 1e-4, 1, low.tolist()),
        _rec("merge", 1e-2, 0, ACC),
    ]
    config = replace(TINY_C, methods=("merge", "full-ft", "lora"))
    result = summarize(records, config, tasks=["up", "a", "b", "c"], upstream=["up"])
    assert result["tasks"] == ["up", "a", "b", "c"] and result["upstream"] == ["up"]
    assert [m["name"] for m in result["methods"]] == ["merge", "full-ft"]  # config order
    full = result["methods"][1]
    assert {"name", "accuracy", "average_accuracy", "backward_transfer", "a_up"} <= set(full)
    assert full["lr"] == 1e-3  # the better H
    assert full["accuracy"][3][1] == pytest.approx(0.55)  # mean over the two seeds
    assert full["average_accuracy"] == pytest.approx(0.6 - 0.05)
    assert full["se"]["average_accuracy"]["se"] == pytest.approx(0.05)
    assert full["backward_transfer"] == pytest.approx(-0.3)  # a shift leaves BWT unchanged
    assert [p["lr"] for p in full["frontier"]] == [1e-4, 1e-3]
    assert full["forgetting"]["up"] == pytest.approx(0.3)


def _end(acc_end: float, up_end: float) -> list[list[float]]:
    """U = 1, T = 2: zero-shot ACC 0.2; ACC at the end `acc_end`, A_up `up_end`, task 1 at
    1.0 right after it was learnt (so BWT = acc_end - 1)."""
    return [[0.9, 0.2, 0.2], [0.9, 1.0, 0.2], [up_end, acc_end, acc_end]]


def test_methods_are_compared_at_matched_acc_paired_by_seed():
    """A_up and BWT interpolated on each seed's frontier at ACC levels between the
    pretrained model's ACC (0.2) and full-ft's best (0.8), differenced per seed."""
    records = []
    for seed, lift in ((0, 0.0), (1, 0.02)):
        records += [
            _rec("full-ft", 1e-4, seed, _end(0.5, 0.5)),
            _rec("full-ft", 1e-3, seed, _end(0.8, 0.3)),
            _rec("random-mask", 1e-3, seed, _end(0.4, 0.8)),
            _rec("random-mask", 1e-2, seed, _end(0.6, 0.6)),
            _rec("spider", 1e-4, seed, _end(0.4, 0.9 + lift)),
            _rec("spider", 1e-3, seed, _end(0.6, 0.7 + lift)),
        ]
    config = replace(TINY_C, methods=("full-ft", "random-mask", "spider"))
    result = summarize(records, config, tasks=["up", "a", "b"], upstream=["up"])
    half = result["matched"]["0.5"]
    assert half["a_down"] == pytest.approx(0.5)  # 0.2 + 0.5 * (0.8 - 0.2)
    spider, rand = half["methods"]["spider"], half["methods"]["random-mask"]
    assert rand["a_up"]["mean"] == pytest.approx(0.7)  # halfway between 0.8 and 0.6
    assert spider["a_up_minus_random-mask"] == {"mean": 0.11, "se": 0.01, "n": 2}
    # BWT = ACC - 1 here: the lower rate is beaten on both ACC and BWT, so each BWT frontier is
    # the single point at ACC 0.6 and does not reach 0.5
    assert "bwt" not in spider and "bwt_minus_random-mask" not in spider
    assert half["methods"]["full-ft"]["a_up"]["mean"] == pytest.approx(0.5)
    assert "spider" not in result["matched"]["0.9"]["methods"]  # its frontier stops at 0.6
    assert result["best_h"]["spider"]["h_minus_random-mask"]["mean"] > 0
    assert "| spider |" in markdown(result) and "**+0.110 ± 0.010**" in markdown(result)


def test_grids_and_settings_are_the_single_task_benchmarks():
    full = C.CONTINUAL_PRESETS["full"]
    single = PRESETS["full"]
    # the single-task grid with one lower point (three tasks compound the change)
    assert C.lr_grid(full, "full-ft") == [3e-5, *single_task_grid(single, "full-ft")]
    assert C.lr_grid(full, "lora") == [9e-5, *single_task_grid(single, "lora")]
    for m in C.MASK_METHODS:
        assert C.lr_grid(full, m) == [3e-4, *single_task_grid(single, "dowser")]
    whisper = C.CONTINUAL_PRESETS["whisper"]
    assert C.lr_grid(whisper, "full-ft") == [3e-6, 1e-5, 3e-5]
    assert C.lr_grid(whisper, "lora") == C.lr_grid(whisper, "dowser-static") == [3e-5, 1e-4, 3e-4]
    assert (full.update_ratio, full.last_layers, full.steps) == (
        single.update_ratio,
        single.last_layers,
        single.steps,
    )
    assert len(full.seeds) == 2 and len(full.sequence) >= 3
    assert set(C.CONTINUAL_METHODS) == {
        "full-ft",
        "lora",
        "random-mask",
        "dowser-static",
        "dowser-reprobe",
        "dowser-reprobe-exclude",
        "spider",
        "merge",
        "merge-exclude",
    }
    # methods sharing stage 1 run back to back
    order = [r["method"] for r in C.plan(replace(full, seeds=(0,), lrs=(1e-4,)))]
    assert order == list(C.CONTINUAL_METHODS)


@pytest.fixture(scope="module")
def prep(data_env):  # noqa: F811
    return C.prepare_continual(TINY_C, progress=False)


def test_split_tasks_keep_the_digits_split(prep):
    low, high = prep.downstream["digits-low"], prep.downstream["digits-high"]
    assert low.candidates == ("zero", "one", "two", "three", "four")
    assert high.candidates == ("five", "six", "seven", "eight", "nine")
    digits = prep.downstream["digits"]
    assert len(low.test) + len(high.test) == len(digits.test)
    assert len(low.train) + len(high.train) == len(digits.train)
    assert set(low.test.labels) == set(range(5)) == set(high.test.labels)
    # labels still point at the right image: the first high test image is digits' own
    first = int(np.flatnonzero(digits.test.labels >= 5)[0])
    assert np.array_equal(high.test.images[0], digits.test.images[first])
    assert high.candidates[high.test.labels[0]] == digits.candidates[digits.test.labels[first]]
    assert list(prep.tests) == ["fashion", "wordnet-pos", *C.SEQUENCE]


def test_train_masked_moves_only_the_mask(prep):
    seq = C.Sequencer(TINY_C, prep)
    setting = seq.setting(1e-2, 0)
    mask = seq.base_mask(setting)
    before = {n: p.clone() for n, p in prep.base.named_parameters()}
    tuned, losses = C.train_masked(prep.base, mask, prep.train["digits-low"], setting)
    assert len(losses) == TINY_C.steps
    params = dict(tuned.named_parameters())
    for n, m in mask.items():
        assert torch.equal(params[n][~m], before[n][~m])
        assert not torch.equal(params[n][m], before[n][m])
    assert all(torch.equal(p, before[n]) for n, p in prep.base.named_parameters())
    assert not any(p.requires_grad for p in tuned.parameters())


def test_every_method_runs_the_sequence_and_resumes(prep, tmp_path, monkeypatch):
    out = tmp_path / "c"
    result = C.run_continual(TINY_C, out, prepared=prep, log=lambda *_: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["tasks"] == ["fashion", "wordnet-pos", *C.SEQUENCE]
    assert saved["upstream"] == ["fashion", "wordnet-pos"]
    by = {m["name"]: m for m in saved["methods"]}
    assert list(by) == list(C.CONTINUAL_METHODS)
    for m in by.values():
        assert np.array(m["accuracy"]).shape == (4, 5)
        assert m["accuracy"][0] == by["full-ft"]["accuracy"][0]  # stage 0: the same model
        assert 0 <= m["average_accuracy"] <= 1 and m["backward_transfer"] is not None
    # the shared first stage, and the merge of one delta is that delta's model
    for name in C.SHARED_FIRST:
        assert by[name]["accuracy"][1] == by["dowser-static"]["accuracy"][1]
    assert by["dowser-static"]["mask_reused"] == [0.0, 1.0, 1.0]
    assert by["dowser-reprobe-exclude"]["mask_reused"] == [0.0, 0.0, 0.0]
    assert by["merge-exclude"]["mask_reused"] == [0.0, 0.0, 0.0]  # disjoint: exact merges
    assert by["full-ft"]["mask_reused"] is None
    runs = {r["method"]: r for r in saved["runs"]}
    assert runs["merge"]["merge_overlap"][0] == 0 and runs["merge"]["merge_overlap"][1] > 0.5
    # disjoint masks: only the densely trained norms are written by several deltas
    assert 0 < runs["merge-exclude"]["merge_overlap"][1] < 0.1
    assert {"heatmaps.png", "frontier.png", "heatmap-merge.png"} <= set(saved["plots"])
    assert "| dowser-reprobe-exclude |" in (out / "results.md").read_text()
    assert len(result["methods"]) == 9

    # resume: the finished sequences are skipped, a missing one runs again
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    ran = []
    original = C.Sequencer.run
    monkeypatch.setattr(
        C.Sequencer, "run", lambda self, **run: ran.append(run) or original(self, **run)
    )
    # a run of other settings (another step count) is kept in the file, left out, and said
    first = json.loads(lines[0])
    other = {**first, "key": first["key"].replace('"steps": ', '"steps": 1')}
    with (out / "runs.jsonl").open("a") as f:
        f.write(json.dumps(other) + "\n")
    said = []
    C.run_continual(TINY_C, out, prepared=prep, resume=True, log=said.append)
    assert [r["method"] for r in ran] == [json.loads(lines[-1])["method"]]
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(lines) + 1
    n = len(lines)
    assert f"resuming: {n - 1} of {n} sequences" in said[1] and "1 runs of other" in said[1]
    assert len(json.loads((out / "results.json").read_text())["runs"]) == n
    with pytest.raises(Exception, match="--resume"):
        C.run_continual(TINY_C, out, prepared=prep, log=lambda *_: None)


def test_merge_sums_the_changes_of_overlapping_deltas(prep, tmp_path):
    seq = C.Sequencer(TINY_C, prep)
    setting = seq.setting(1e-2, 0)
    mask = seq.base_mask(setting)
    tuned = [C.train_masked(prep.base, mask, prep.train[t], setting)[0] for t in C.SEQUENCE[:2]]
    paths = [seq._save_delta(m, mask, tmp_path / f"{i}.safetensors") for i, m in enumerate(tuned)]
    one, report = C._merge(prep.base, paths[:1])  # one delta: its model, bit for bit
    assert report["overlap"] == 0
    assert all(
        torch.equal(p, q) for p, q in zip(one.parameters(), tuned[0].parameters(), strict=True)
    )
    model, report = C._merge(prep.base, paths)
    assert report["overlap"] == report["entries"] > 0  # one mask: every entry written twice
    merged = dict(model.named_parameters())
    base = dict(prep.base.named_parameters())
    a, b = (dict(m.named_parameters()) for m in tuned)
    for n, m in mask.items():
        want = base[n] + (a[n] - base[n]) + (b[n] - base[n])
        assert torch.allclose(merged[n][m], want[m], atol=1e-6)
        assert torch.equal(merged[n][~m], base[n][~m])


def _cli(argv, capsys):
    from dowser.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.usefixtures("data_env")
def test_cli_bench_continual(tmp_path, capsys, monkeypatch):
    quick = replace(TINY_C, methods=("full-ft", "merge"))
    monkeypatch.setitem(C.CONTINUAL_PRESETS, "quick", quick)
    out = tmp_path / "cont"
    args = ["bench", "continual", "--quick", "--out", out, "--quiet"]
    code, stdout, _ = _cli(args, capsys)
    assert code == 0 and "| merge |" in stdout
    assert json.loads((out / "results.json").read_text())["sequence"] == list(C.SEQUENCE)
    code, _, err = _cli(args, capsys)
    assert code == 2 and "not empty" in err and "--resume" in err and "Traceback" not in err
    assert _cli([*args, "--resume"], capsys)[0] == 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == 2
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = _cli(["bench", "continual", "--out", afile, "--quiet"], capsys)
    assert code == 2 and "not a directory" in err and afile.read_text() == "mine"


def test_unknown_tasks_and_methods_are_clear_errors():
    from dowser.errors import DowserError

    with pytest.raises(DowserError, match="sequence"):
        C.prepare_continual(replace(TINY_C, sequence=("digits-low", "fashion")))
    with pytest.raises(DowserError, match="once each"):
        C.prepare_continual(replace(TINY_C, sequence=("digits-low", "digits-low")))
    with pytest.raises(DowserError, match="unknown continual method"):
        C.prepare_continual(replace(TINY_C, methods=("dowser",)))
