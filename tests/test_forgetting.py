"""The forgetting benchmark end to end on a tiny LLaVA and small data files in the real formats."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from forgetting_data import write_fashion, write_wordnet

from dowser.errors import DowserError
from dowser.eval.likelihood import candidate_accuracy
from dowser.forgetting import tasks as T
from dowser.forgetting.bench import (
    PRESETS,
    BenchConfig,
    Runner,
    load_tasks,
    lr_grid,
    plan,
    prepare,
    read_runs,
    run_benchmark,
)
from dowser.forgetting.encode import Encoded, encode
from dowser.forgetting.merges import merge
from dowser.forgetting.methods import (
    ANALYSIS,
    MASKED,
    MERGED,
    METHODS,
    SOFT,
    Setting,
    fine_tune,
)
from dowser.forgetting.model import BaseConfig, pretrained
from dowser.forgetting.refresh import REFRESH
from dowser.forgetting.report import markdown, summarize
from dowser.train.data import Example, SupervisedDataset

TINY = BenchConfig(
    base=BaseConfig(
        layers=2,
        width=32,
        vision_width=16,
        vision_layers=1,
        vocab=320,
        steps=30,
        batch_size=8,
        lr=3e-3,
    ),
    upstream_train=80,
    upstream_test=20,
    downstream=("digits", "wordnet-topic"),
    downstream_train=48,
    downstream_test=20,
    methods=(*METHODS, *ANALYSIS),
    lrs=(1e-3, 1e-2),
    seeds=(0,),
    last_layers=2,
    steps=4,
    batch_size=4,
    depths=(1,),
    depth_methods=("dowser", "dare"),
    ratios=(0.5,),
    ratio_methods=("random-mask", "model-tailor"),
    probe={"num_samples": 4, "batch_size": 2, "num_probes": 2, "seq_len": 12},
)


@pytest.fixture(scope="module")
def data_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    env = {
        "DOWSER_FASHION_MNIST": str(write_fashion(root / "fashion")),
        "DOWSER_WORDNET": str(write_wordnet(root / "wordnet")),
        "DOWSER_CACHE": str(root / "cache"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        yield env


@pytest.fixture(scope="module")
def prep(data_env):
    return prepare(TINY, progress=False)


# --- data ---------------------------------------------------------------------------------------


def test_fashion_reads_idx_files_balanced_and_seeded(data_env):
    task = T.fashion_mnist(50, 30, seed=1)
    assert task.candidates[9] == "ankle boot" and task.has_images
    assert task.train.images.shape == (50, 28, 28) and len(task.test) == 30
    assert np.bincount(task.test.labels, minlength=10).tolist() == [3] * 10
    # the fake images put a bar at the class's height: labels and images stay paired
    for img, y in zip(task.train.images, task.train.labels, strict=True):
        assert img[2 + 2 * y, 10] == 255
    again = T.fashion_mnist(50, 30, seed=1)
    assert np.array_equal(task.train.labels, again.train.labels)


def test_wordnet_parsing_and_disjoint_splits(data_env):
    synsets = T.read_wordnet()
    assert len(synsets) == 4 * 240
    offset, pos, lexfile, word, definition = synsets[0]
    assert pos == "n" and lexfile in T.TOPICS and word == "word0"
    assert '"' not in definition and "word0" not in definition
    pos_task = T.wordnet_pos(40, 20, synsets=synsets)
    topic = T.wordnet_topic(40, 16, synsets=synsets)
    assert set(pos_task.candidates) == {"noun", "verb", "adjective", "adverb"}
    assert np.bincount(pos_task.test.labels).tolist() == [5, 5, 5, 5]
    # no definition is both in a train and a test split, nor in both tasks
    for task in (pos_task, topic):
        assert not set(task.train.prompts) & set(task.test.prompts)
    strip = lambda ps: {p.split(": ", 1)[1] for p in ps}  # noqa: E731
    assert not strip(pos_task.train.prompts + pos_task.test.prompts) & strip(
        topic.train.prompts + topic.test.prompts
    )
    assert topic.candidates == tuple(T.TOPICS.values())


def test_missing_data_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("DOWSER_WORDNET", str(tmp_path))
    monkeypatch.setenv("DOWSER_FASHION_MNIST", str(tmp_path))
    with pytest.raises(DowserError, match="apt-get install wordnet-base"):
        T.read_wordnet()
    with pytest.raises(DowserError, match="apt-get install dataset-fashion-mnist"):
        T.fashion_mnist(10, 10)


def test_digits_split_is_held_out_and_balanced():
    task = T.digits(100, seed=0)
    assert len(task.test) == 100 and len(task.train) == 1797 - 100
    assert np.bincount(task.test.labels).tolist() == [10] * 10
    assert task.train.images.dtype == np.uint8 and task.train.images.max() == 255


@pytest.mark.skipif(not Path(T.WORDNET_DIR, "data.noun").is_file(), reason="wordnet-base absent")
def test_real_wordnet_has_every_synset(monkeypatch):
    monkeypatch.delenv("DOWSER_WORDNET", raising=False)
    synsets = T.read_wordnet()
    assert len(synsets) == 117659  # WordNet 3.0
    assert sum(p == "n" for _, p, _, _, _ in synsets) == 82115
    butter = "an edible emulsion of fat globules made by churning milk or cream; for cooking and table use"
    assert ("07848338", "n", "13", "butter", butter) in synsets


# --- encoding and scoring ---------------------------------------------------------------------------


def test_fast_encoding_scores_like_the_general_path(prep):
    """The benchmark's bulk encoder and scorer agree with dowser.eval's per-example path."""
    task = prep.upstream[0]
    cands, labels, k = prep.tests[task.name]
    from dowser.forgetting.bench import accuracy
    from dowser.forgetting.encode import to_pil

    fast = accuracy(prep.base, prep.tests[task.name])
    images = to_pil(task.test.images)
    examples = [Example([(p, "")], im) for p, im in zip(task.test.prompts, images, strict=True)]
    slow = candidate_accuracy(prep.base, prep.processor, examples, task.candidates, labels)
    assert fast == pytest.approx(slow)


def test_mixed_batches_keep_images_in_row_order(prep):
    img = prep.upstream[0]
    txt = prep.upstream[1]
    a = encode(prep.processor, img.test.prompts[:3], [["x"]] * 3, img.test.images[:3])
    b = encode(prep.processor, txt.test.prompts[:2], [["y"]] * 2)
    both = Encoded.cat([b, a])
    batch = both.batch([4, 0, 2])  # image 2, text, image 0
    assert torch.equal(batch["pixel_values"], a.pixel_values[[2, 0]])
    one = SupervisedDataset([Example([(txt.test.prompts[0], "y")])], prep.processor)[0]
    assert torch.equal(batch["input_ids"][1, : len(one["input_ids"])], one["input_ids"])


def test_encoder_refuses_chat_templates(prep):
    tok = prep.processor.tokenizer
    tok.chat_template = "{{ messages }}"
    try:
        with pytest.raises(DowserError, match="chat template"):
            encode(prep.processor, ["hi"], [["a"]])
    finally:
        tok.chat_template = None


# --- methods --------------------------------------------------------------------------------------


def test_pretraining_is_cached_and_learns(data_env, prep, monkeypatch):
    _, tasks, _, corpus = load_tasks(TINY)
    path = Path(prep.pretraining["path"])
    assert path.name.startswith("llava-") and (path / "model.safetensors").is_file()
    assert prep.pretraining["final_loss"] < prep.pretraining["first_loss"] - 0.5  # it learned

    def fail(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr("dowser.forgetting.model.train_loop", fail)
    assert [t.name for t in tasks] == ["fashion", "wordnet-pos", "wordnet-define"]
    assert pretrained(TINY.base, tasks, corpus) == path
    # another config is another model
    with pytest.raises(AssertionError, match="trained again"):
        pretrained(replace(TINY.base, seed=1), tasks, corpus)


@pytest.mark.parametrize("method", MASKED)
def test_masked_methods_leave_frozen_entries_bit_identical(prep, method):
    setting = Setting(1e-2, 1, 0.25, 0, 3, 4)
    data = prep.train["digits"]
    tuned, losses = fine_tune(method, prep.base, data, setting, bank=prep.bank, task="digits")
    assert len(losses) == 3
    before, after = prep.base.state_dict(), tuned.state_dict()
    changed = 0
    for name, w0 in before.items():
        diff = after[name] != w0
        if ".layers.1." in name and name.endswith("proj.weight") and "language" in name:
            # at most rho of each tuned matrix moved (entries with zero gradient may stay);
            # a soft mask's pool is SOFT times larger; a refreshed mask trains REFRESH masks
            times = SOFT.get(method, REFRESH.get(method, 1))
            assert diff.sum() <= round(times * 0.25 * w0.numel())
            changed += int(diff.sum())
        elif "norm" in name and ".layers.1." in name and "language" in name:
            continue  # the tuned layer's norms train densely
        else:
            assert not diff.any(), name
    assert changed > 0


def test_lora_and_spider_and_full_ft_train_only_the_tuned_layers(prep):
    setting = Setting(1e-2, 1, 0.1, 0, 3, 4)
    for method in ("full-ft", "lora", "spider"):
        tuned, _ = fine_tune(
            method, prep.base, prep.train["digits"], setting, bank=prep.bank, task="digits"
        )
        after = tuned.state_dict()
        moved = {n for n, w in prep.base.state_dict().items() if not torch.equal(after[n], w)}
        assert moved and all(".layers.1." in n and "language" in n for n in moved), method


def test_merges_keep_the_update_ratio(prep):
    setting = Setting(1e-2, 2, 0.2, 0, 3, 4)
    data = prep.train["digits"]
    tuned, _ = fine_tune("full-ft", prep.base, data, setting, bank=prep.bank, task="digits")
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    w0 = prep.base.state_dict()[name]
    for method in MERGED:
        merged = merge(method, prep.base, tuned, data, setting)
        moved = int((merged.state_dict()[name] != w0).sum())
        if method == "model-tailor":  # compensation moves kept columns' entries too
            assert moved > 0
        elif method == "dare":  # each change survives with probability rho: binomial count
            n = w0.numel()
            assert abs(moved - 0.2 * n) < 4 * (n * 0.2 * 0.8) ** 0.5
        else:
            assert 0 < moved <= round(0.2 * w0.numel()), method
    # the full-ft model itself is untouched by merging
    assert not torch.equal(tuned.state_dict()[name], w0)


# --- the whole benchmark --------------------------------------------------------------------------


def test_benchmark_runs_every_method_writes_reports_and_resumes(data_env, tmp_path):
    lines = []
    result = run_benchmark(TINY, tmp_path, progress=False, log=lines.append)
    names = [m["name"] for m in result["methods"]]
    assert names == [*METHODS, *ANALYSIS]
    for m in result["methods"]:
        assert 0 <= m["a_up"] <= 1 and 0 <= m["a_down"] <= 1
        assert m["h_score"] == pytest.approx(
            np.mean([t["methods"][m["name"]]["h_score"]["mean"] for t in result["tasks"].values()])
        )
    runs = [json.loads(x) for x in (tmp_path / "runs.jsonl").read_text().splitlines()]
    expected = 0
    for task in TINY.downstream:
        expected += sum(len(plan(TINY, task, phase)) for phase in ("frontier", "depth", "ratio"))
    assert len(runs) == expected
    zero = [r for r in runs if r["method"] == "zero-shot"]
    assert len({(r["a_up"], r["upstream"]["fashion"]) for r in zero}) == 1  # same base model
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"] == json.loads(json.dumps(result["methods"]))
    assert {"machine", "config", "pretraining", "runs", "tasks"} <= set(saved)
    digits = saved["tasks"]["digits"]["methods"]
    assert [p["last_layers"] for p in digits["dowser"]["depth"]] == [1, 2]
    assert [p["update_ratio"] for p in digits["model-tailor"]["ratio"]] == [0.1, 0.5]
    md = (tmp_path / "results.md").read_text()
    assert "| dowser |" in md and "by depth (N)" in md and "by ratio (rho)" in md
    for png in ("frontier-digits.png", "depth-digits.png", "ratio-wordnet-topic.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"

    # resuming runs nothing new and reproduces the summary
    lines.clear()
    again = run_benchmark(TINY, tmp_path, resume=True, progress=False, log=lines.append)
    assert len(lines) == 1  # the model line only: every run was already done
    assert again["methods"] == result["methods"]


def test_runs_are_deterministic(prep):
    runner = Runner(TINY, prep, progress=False)
    run = {
        "task": "digits",
        "phase": "frontier",
        "method": "dowser",
        "lr": 1e-2,
        "last_layers": 2,
        "update_ratio": 0.1,
        "seed": 0,
    }
    a, b = runner.execute(run), runner.execute(run)
    assert (a["a_up"], a["a_down"], a["final_loss"]) == (b["a_up"], b["a_down"], b["final_loss"])


def test_summary_picks_best_lr_and_interpolates_matched_upstream():
    def rec(method, lr, up, down):
        return {
            "task": "t",
            "phase": "frontier",
            "method": method,
            "lr": lr,
            "last_layers": 4,
            "update_ratio": 0.1,
            "seed": 0,
            "a_up": up,
            "a_down": down,
            "h_score": 2 * up * down / (up + down),
        }

    records = [
        rec("full-ft", 1, 0.8, 0.5),
        rec("full-ft", 2, 0.4, 1.0),
        rec("dowser", 1, 0.9, 0.6),
        rec("dowser", 2, 0.7, 0.95),
    ]
    out = summarize(records, TINY)
    table = out["tasks"]["t"]["methods"]
    assert out["tasks"]["t"]["matched_level"] == pytest.approx(0.9)
    assert table["dowser"]["best_lr"] == 2
    # dowser at A_down 0.9: between (0.6, 0.9) and (0.95, 0.7) -> 0.9 - 0.2 * 0.3 / 0.35
    assert table["dowser"]["a_up_matched"] == pytest.approx(0.9 - 0.2 * 0.3 / 0.35)
    assert table["full-ft"]["a_up_matched"] == pytest.approx(0.8 - 0.4 * 0.4 / 0.5)
    # a method measured on one task of two says so in the overall table
    other = [dict(r, task="u") for r in records if r["method"] == "full-ft"]
    both = summarize(records + other, TINY)
    rows = {m["name"]: m for m in both["methods"]}
    assert rows["dowser"]["tasks"] == ["t"] and rows["full-ft"]["tasks"] == ["t", "u"]
    text = markdown(both)
    assert "| dowser (t) |" in text and "| full-ft |" in text


def test_learning_rate_grids():
    assert lr_grid(TINY, "full-ft") == [1e-3, 1e-2]
    assert lr_grid(TINY, "dowser") == [1e-2, 0.1]  # masks: 10x
    assert lr_grid(TINY, "lora") == [3e-3, 3e-2]
    assert lr_grid(TINY, "random-mask", 0.5) == [2e-3, 2e-2]  # rho 0.5: 5x fewer x 10
    assert lr_grid(TINY, "dare", 0.5) == [1e-3, 1e-2]  # merges reuse full-ft's runs
    assert lr_grid(TINY, "zero-shot") == [0.0]
    sweeps = plan(TINY, "digits", "depth")
    assert {(r["method"], r["lr"]) for r in sweeps} == {
        (m, lr) for m in TINY.depth_methods for lr in lr_grid(TINY, m)
    }
    assert plan(replace(TINY, sweep_tasks=("digits",)), "wordnet-topic", "ratio") == []
    # a task may have fewer frontier rows than the others
    fewer = replace(TINY, task_methods={"wordnet-topic": ("zero-shot", "dowser")})
    assert {r["method"] for r in plan(fewer, "wordnet-topic", "frontier")} == {
        "zero-shot",
        "dowser",
    }
    assert {r["method"] for r in plan(fewer, "digits", "frontier")} == set(TINY.methods)


@pytest.mark.parametrize(
    "task_methods, message",
    [
        ({"wordnet-topc": ("dowser",)}, "not a downstream task"),
        ({"digits": ("dowser", "dowser-data")}, "may only leave methods out"),
    ],
)
def test_task_methods_typos_fail_before_anything_runs(tmp_path, task_methods, message):
    config = replace(TINY, methods=("zero-shot", "dowser"), task_methods=task_methods)
    with pytest.raises(DowserError, match=message):
        run_benchmark(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sweep_points_are_the_best_over_learning_rates():
    def rec(phase, lr, n, up, down):
        return {
            "task": "t",
            "phase": phase,
            "method": "dowser",
            "lr": lr,
            "last_layers": n,
            "update_ratio": 0.1,
            "seed": 0,
            "a_up": up,
            "a_down": down,
            "h_score": 2 * up * down / (up + down),
        }

    records = [
        rec("frontier", 1, 4, 0.8, 0.8),
        rec("depth", 1, 1, 0.9, 0.2),
        rec("depth", 2, 1, 0.7, 0.6),
        rec("depth", 3, 1, 0.2, 0.9),
    ]
    depth = summarize(records, TINY)["tasks"]["t"]["methods"]["dowser"]["depth"]
    assert [(p["last_layers"], p["lr"]) for p in depth] == [(1, 2), (2, 1)]
    assert depth[0]["a_up"]["mean"] == 0.7


def test_presets_name_known_methods():
    for config in PRESETS.values():
        for m in (*config.methods, *config.depth_methods, *config.ratio_methods):
            assert m in METHODS or m in ANALYSIS
    demo = PRESETS["demo"]
    assert {"full-ft", "dowser", "random-mask", "lora"} <= set(demo.methods)
    assert len(demo.seeds) >= 2  # the demo shows its spread


# --- command line ---------------------------------------------------------------------------------


def _cli(argv, capsys):
    from dowser.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_demo(data_env, tmp_path, capsys, monkeypatch):
    demo = replace(
        TINY,
        downstream=("digits",),
        methods=PRESETS["demo"].methods,
        seeds=PRESETS["demo"].seeds,
        depth_methods=(),
        ratio_methods=(),
    )
    monkeypatch.setitem(PRESETS, "demo", demo)
    out = tmp_path / "demo"
    code, stdout, _ = _cli(["demo", "--out", out, "--quiet"], capsys)
    assert code == 0
    assert "| dowser |" in stdout and "A_up" in stdout
    assert " ± " in stdout.split("| dowser |")[2].splitlines()[0]  # per task: mean ± se
    assert {p.name for p in out.iterdir()} >= {
        "results.json",
        "results.md",
        "runs.jsonl",
        "frontier-digits.png",
        "scores.safetensors",
        "mask.safetensors",
    }
    methods = json.loads((out / "results.json").read_text())["methods"]
    assert [m["name"] for m in methods] == list(demo.methods)
    assert all({"name", "a_up", "a_down", "h_score"} <= set(m) for m in methods)
    code, _, err = _cli(["demo", "--out", out, "--quiet"], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert _cli(["demo", "--out", out, "--quiet", "--overwrite"], capsys)[0] == 0


def test_cli_bench_forgetting_quick_and_resume(data_env, tmp_path, capsys, monkeypatch):
    quick = replace(
        TINY,
        downstream=("wordnet-topic",),
        methods=("zero-shot", "dowser", "dare"),
        depth_methods=("dowser",),
        ratio_methods=(),
    )
    monkeypatch.setitem(PRESETS, "quick", quick)
    out = tmp_path / "bench"
    code, stdout, _ = _cli(["bench", "forgetting", "--quick", "--out", out, "--quiet"], capsys)
    assert code == 0 and (out / "depth-wordnet-topic.png").is_file()
    n = len((out / "runs.jsonl").read_text().splitlines())
    code, stdout, _ = _cli(
        ["bench", "forgetting", "--quick", "--out", out, "--resume", "--quiet"], capsys
    )
    assert code == 0 and len((out / "runs.jsonl").read_text().splitlines()) == n


def test_cli_bench_forgetting_without_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DOWSER_WORDNET", str(tmp_path / "none"))
    code, _, err = _cli(["bench", "forgetting", "--out", tmp_path / "o", "--quiet"], capsys)
    assert code == 2
    assert err.startswith("dowser bench: error:") and "wordnet-base" in err
    assert "Traceback" not in err


def test_bad_outputs_and_caches_are_clear_errors_that_keep_files(
    data_env, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(PRESETS, "full", TINY)
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, _, err = _cli(["bench", "forgetting", "--out", afile, "--quiet"], capsys)
    assert code == 2 and "not a directory" in err and afile.read_text() == "mine"
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.jsonl").write_text('{"mine": 1}\n')
    code, _, err = _cli(["bench", "forgetting", "--out", out, "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err and "--resume" in err
    # the cache is a file: nothing in --out is touched even with --overwrite
    code, _, err = _cli(
        ["bench", "forgetting", "--out", out, "--cache", afile, "--overwrite", "--quiet"], capsys
    )
    assert code == 2 and "DOWSER_CACHE" in err and "Traceback" not in err
    assert (out / "runs.jsonl").read_text() == '{"mine": 1}\n'
    with pytest.raises(DowserError, match=r"resume it \(--resume\) or allow overwriting"):
        run_benchmark(TINY, out, progress=False)


def test_a_run_cut_short_while_written_is_done_again(tmp_path):
    """kill -9 while a run's line is written: --resume keeps the whole lines, drops the cut
    one from the file and runs it again; a bad line elsewhere is not silently skipped."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "runs.jsonl").write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "acc')
    path, records = read_runs(out, resume=True, overwrite=False)
    assert records == [{"key": "a"}, {"key": "b"}]
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n'
    assert read_runs(out, resume=False, overwrite=True)[1] == []
    (out / "runs.jsonl").write_text('{"key": "a"}\n{"ke\n{"key": "c"}\n')
    with pytest.raises(DowserError, match=r"runs.jsonl:2 is not a run record; remove that line"):
        read_runs(out, resume=True, overwrite=False)


def test_a_corrupt_cached_model_is_a_clear_error(data_env, prep, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(Path(prep.pretraining["path"]).parent, cache / "forgetting")
    path = cache / "forgetting" / Path(prep.pretraining["path"]).name
    (path / "model.safetensors").write_bytes(b"not a model")
    with pytest.raises(DowserError, match="delete that directory"):
        prepare(TINY, cache=cache, progress=False)


# --- the estimator study --------------------------------------------------------------------------


def test_spearman():
    from dowser.forgetting.estimators import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(np.sqrt(3) / 2)  # ties: mean ranks
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_cli_bench_estimators(data_env, tmp_path, capsys, monkeypatch):
    from dowser.forgetting import estimators as E

    methods = ("dowser", "dowser-gradient", "dowser-tokenwise", "random-mask")
    study = E.StudyConfig(
        replace(
            TINY,
            downstream=("digits", "wordnet-topic"),
            sweep_tasks=("digits",),
            methods=("zero-shot", "full-ft", *methods),
            depth_methods=("dowser", "dowser-activation", "random-mask"),
            ratio_methods=("dowser-log-probs", "random-mask"),
        ),
        kl_examples=8,
        kl_draws=2,
    )
    monkeypatch.setitem(E.PRESETS, "quick", study)
    out = tmp_path / "est"
    code, stdout, _ = _cli(["bench", "estimators", "--quick", "--out", out, "--quiet"], capsys)
    assert code == 0 and "Spearman" in stdout
    for name in ("estimators.json", "estimators.md", "estimators-kl.png", "estimators-h.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "estimators.json").read_text())
    where = [(s["task"], s["last_layers"], s["update_ratio"]) for s in summary["settings"]]
    assert where == [("digits", 2, 0.1), ("digits", 1, 0.1), ("digits", 2, 0.5)] + [
        ("wordnet-topic", 2, 0.1)
    ]
    first = summary["settings"][0]["methods"]
    assert set(first) == set(methods)
    for m in first.values():
        assert m["kl"]["n"] == m["kl_absolute"]["n"] == 2  # draws (x seeds for random-mask)
        assert m["kl"]["mean"] > 0 and m["forgetting"]["n"] == 1
        assert len(m["frontier"]) == len(TINY.lrs)
    # random masks are far from the model's important weights: their KL is the largest
    assert max(first, key=lambda n: first[n]["kl_absolute"]["mean"]) == "random-mask"
    ranking = [r["h_score"] for r in summary["ranking"]]
    assert ranking == sorted(ranking, reverse=True)
    rho = summary["spearman"]["kl"]
    assert rho is None or -1 <= rho <= 1
    n = len((out / "runs.jsonl").read_text().splitlines())
    code, _, _ = _cli(
        ["bench", "estimators", "--quick", "--out", out, "--quiet", "--resume"], capsys
    )
    assert code == 0 and len((out / "runs.jsonl").read_text().splitlines()) == n
