"""Mask recipes: the |W| power, task gradients, task-aware and structured masks, the study."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_llama, token_batches
from test_cli import FAST, run
from test_forgetting import TINY, data_env  # noqa: F401  (the fixture)
from torch import nn

import dowser
from dowser import DowserError, Scores, build_mask
from dowser.baselines.masks import magnitude_scores, random_scores
from dowser.forgetting.matched import best_h, matched
from dowser.forgetting.recipes import RECIPES, recipe_presets
from dowser.forgetting.recipes_report import markdown, summarize_recipes
from dowser.probing.task import task_gradients
from dowser.ranking import combine_task, lowest_k, soft_scale
from dowser.train.soft import UpdateScale

PROBE = {"num_samples": 4, "batch_size": 2, "num_probes": 2, "seq_len": 8, "progress": False}


def labelled(vocab: int = 64, n: int = 2) -> list[dict]:
    batches = token_batches(vocab, n=n)
    for b in batches:
        b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return batches


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_weight_power_scales_the_factor(gamma, tmp_path):
    model = tiny_llama()
    one = dowser.probe(model, **PROBE)
    other = dowser.probe(model, weight_power=gamma, **PROBE)
    assert other.meta["weight_power"] == gamma and one.weight_power == 1.0
    w = dict(model.named_parameters())
    for name in one.names:
        expected = w[name].detach().abs().pow(gamma) * one.outer(name)
        torch.testing.assert_close(other.dense(name), expected)
    again = one.with_weight_power(gamma)  # no new probe: the factors do not depend on gamma
    torch.testing.assert_close(again.dense(one.names[0]), other.dense(one.names[0]))
    assert one.weight_power == 1.0
    other.save(tmp_path / "s.safetensors")
    loaded = Scores.load(tmp_path / "s.safetensors", model=model)
    torch.testing.assert_close(loaded.dense(one.names[0]), other.dense(one.names[0]))


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "1"])
def test_weight_power_refuses_bad_values(bad):
    with pytest.raises(DowserError, match="weight_power"):
        dowser.probe(tiny_llama(), weight_power=bad, **PROBE)
    if not isinstance(bad, str):
        with pytest.raises(DowserError, match="weight_power"):
            magnitude_scores(tiny_llama()).with_weight_power(bad)


@pytest.mark.parametrize("reduction", ["abs", "fisher"])
def test_task_gradients_match_autograd_and_leave_the_model_as_it_was(reduction):
    model = tiny_llama()
    batches = labelled()
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(model.named_parameters())[name]
    marker = torch.full_like(param, 7.0)
    param.grad = marker.clone()
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()}
    g = task_gradients(model, batches, reduction=reduction)
    # expected: per batch, the gradient of that batch's loss
    ref = model.__class__(model.config).eval()
    ref.load_state_dict(model.state_dict())
    total = torch.zeros_like(param)
    for b in batches:
        ref.zero_grad()
        ref(**b).loss.backward()
        grad = dict(ref.named_parameters())[name].grad
        total += grad.abs() if reduction == "abs" else grad.square()
    torch.testing.assert_close(g.dense(name), total / len(batches))
    assert g.weight_power == 0 and g.meta["num_samples"] == 6
    for n, p in model.named_parameters():
        assert p.requires_grad == before[n][0] and torch.equal(p, before[n][1])
    assert torch.equal(param.grad, marker) and not model.training


def test_task_gradients_refuse_batches_without_labels():
    with pytest.raises(DowserError, match="labels"):
        task_gradients(tiny_llama(), token_batches(64))
    with pytest.raises(DowserError, match="no batches"):
        task_gradients(tiny_llama(), [])


def test_combine_rules():
    up = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    task = torch.tensor([[0.0, 5.0, 4.0, 9.0], [1.0, 0.0, 0.0, 0.0]])
    k = 2

    def pick(rule):
        return lowest_k([combine_task(up, task, k, rule)], k)[0]

    # split: the 4 lowest S are the first row; of them the 2 largest |g| (9.0 and 5.0)
    assert pick("split").nonzero().tolist() == [[0, 1], [0, 3]]
    # task: the 2 largest |g| anywhere
    assert pick("task").nonzero().tolist() == [[0, 1], [0, 3]]
    # ratio: lowest S / (g + eps): 0.4/9 and 0.2/5 lowest
    assert pick("ratio").nonzero().tolist() == [[0, 1], [0, 3]]
    task2 = torch.tensor([[0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 0.0, 0.0]])
    assert combine_task(up, task2, k, "split")[1].isinf().all()  # outside the pool
    assert pick_rule(up, task2, "task") == [[1, 0], [1, 1]]
    assert pick_rule(up, task2, "split") == [[0, 0], [0, 1]]  # ties: by position
    # a pool of 4 k = 8: every entry is a candidate, so split = task
    assert pick_rule(up, task2, "split", pool=4.0) == [[1, 0], [1, 1]]


def pick_rule(up, task, rule, k=2, pool=2.0):
    return lowest_k([combine_task(up, task, k, rule, pool)], k)[0].nonzero().tolist()


def test_task_aware_mask_trains_the_task_entries_among_the_unimportant():
    model = tiny_llama()
    scores = dowser.probe(model, **PROBE)
    g = task_gradients(model, labelled())
    mask = build_mask(model, scores, update_ratio=0.2, task_scores=g, combine="split")
    assert mask.meta["combine"] == "split" and mask.meta["task_examples"] == 6
    for name, m in mask.items():
        k = math.floor(0.2 * m.numel() + 0.5)
        assert int(m.sum()) == k
        pool = lowest_k([scores.dense(name)], 2 * k)[0]
        assert bool((m <= pool).all())  # inside the 2 rho least important
        gd = g.dense(name)
        assert gd[m].min() >= gd[pool & ~m].max()  # the largest |g| of the pool
    # random "task" scores in a pool of half: a random mask that avoids the important half
    half = build_mask(model, scores, update_ratio=0.1, task_scores=random_scores(model), pool=5)
    for name, m in half.items():
        k = math.floor(0.1 * m.numel() + 0.5)
        assert bool((m <= lowest_k([scores.dense(name)], 5 * k)[0]).all())
    task_only = build_mask(model, scores, update_ratio=0.1, task_scores=g, combine="task")
    for name, m in task_only.items():
        assert g.dense(name)[m].min() >= g.dense(name)[~m].max()


def test_task_aware_mask_errors():
    model = tiny_llama()
    scores = dowser.probe(model, **PROBE)
    g = task_gradients(model, labelled(), layers=r"layers\.0\.")
    with pytest.raises(DowserError, match="do not cover"):
        build_mask(model, scores, task_scores=g)
    full = task_gradients(model, labelled())
    with pytest.raises(DowserError, match="scope"):
        build_mask(model, scores, task_scores=full, scope="layer")
    with pytest.raises(DowserError, match="combine"):
        build_mask(model, scores, task_scores=full, combine="sum")
    with pytest.raises(DowserError, match="entries"):
        build_mask(model, scores, task_scores=full, structure="row")
    with pytest.raises(DowserError, match="pool"):
        build_mask(model, scores, task_scores=full, pool=0.5)
    other = task_gradients(tiny_llama(seed=3), labelled())
    with pytest.raises(DowserError, match="do not fit"):
        build_mask(model, scores, task_scores=other)


@pytest.mark.parametrize("structure", ["row", "column"])
def test_structured_masks_train_whole_lines(structure):
    model = tiny_llama()
    scores = magnitude_scores(model)
    mask = build_mask(model, scores, update_ratio=0.25, structure=structure)
    assert mask.meta["structure"] == structure
    for name, m in mask.items():
        axis = 1 if structure == "row" else 0
        lines = m.all(dim=axis)
        assert torch.equal(lines, m.any(dim=axis))  # a line is all in or all out
        n = m.shape[1 - axis]
        assert int(lines.sum()) == math.floor(0.25 * n + 0.5)
        s = scores.dense(name).sum(dim=axis)
        assert s[lines].max() <= s[~lines].min()  # the lowest summed scores
    with pytest.raises(DowserError, match="structure"):
        build_mask(model, scores, structure="block")
    with pytest.raises(DowserError, match="scope"):
        build_mask(model, scores, structure="row", scope="global")


def test_structured_masks_on_a_transposed_weight():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50))
    scores = random_scores(model, seed=0)
    mask = build_mask(model, scores, update_ratio=0.25, structure="row")
    name = next(n for n in mask if n.endswith("mlp.c_fc.weight"))
    m = mask[name]  # Conv1D: stored (d_in, d_out) = (16, 64)
    # a "row" is an output unit: a column of the stored weight
    assert m.shape == (16, 64) and torch.equal(m.all(dim=0), m.any(dim=0))
    assert int(m.all(dim=0).sum()) == 16


def test_mask_cli_options(checkpoint_dirs, tmp_path, capsys):
    llama = checkpoint_dirs["llama"]
    scores_path = tmp_path / "s.safetensors"
    code, out, err = run(
        ["probe", llama, "--out", scores_path, "--weight-power", "0", *FAST], capsys
    )
    assert code == 0, err
    assert Scores.load(scores_path).weight_power == 0
    rows = [{"prompt": f"count to {i}", "answer": " ".join(map(str, range(i)))} for i in range(6)]
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    for extra in (
        ["--structure", "row", "--weight-power", "0.5"],
        ["--task-data", data, "--task-examples", "4", "--combine", "ratio"],
    ):
        out_path = tmp_path / f"m{len(extra)}.safetensors"
        code, out, err = run(
            ["mask", scores_path, "--model", llama, "--out", out_path, *extra], capsys
        )
        assert code == 0, err
        meta = dowser.Mask.load(out_path).meta
        assert meta["structure"] == ("row" if "--structure" in extra else "entry")
        assert meta["weight_power"] == (0.5 if "--structure" in extra else 0.0)
        if "--task-data" in extra:
            assert meta["combine"] == "ratio" and meta["task_examples"] == 4
    code, _, err = run(
        ["mask", scores_path, "--model", llama, "--out", tmp_path / "x.safetensors"]
        + ["--task-data", tmp_path / "missing.jsonl"],
        capsys,
    )
    assert code != 0 and "missing.jsonl" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:  # a parser error, before anything loads
        run(["probe", llama, "--out", tmp_path / "y", "--weight-power", "-1"], capsys)
    assert exc.value.code == 2 and "--weight-power" in capsys.readouterr().err


def _record(method, lr, seed, a_up, a_down):
    return {
        "task": "t",
        "phase": "frontier",
        "method": method,
        "lr": lr,
        "seed": seed,
        "a_up": a_up,
        "a_down": a_down,
    }


def test_matched_and_best_h_are_paired_by_seed():
    records = [_record("zero-shot", 0.0, 0, 0.9, 0.1)]
    for s in (0, 1):
        records += [
            _record("full-ft", 1, s, 0.5, 0.9),
            _record("full-ft", 2, s, 0.3, 1.0),
            _record("random-mask", 1, s, 0.8, 0.2),
            _record("random-mask", 2, s, 0.4, 1.0),
            _record("better", 1, s, 0.85 + 0.01 * s, 0.2),
            _record("better", 2, s, 0.45 + 0.01 * s, 1.0),
        ]
    m = matched(records, ("random-mask",), levels=(0.5,), ys=("a_up",))["t"]["0.5"]
    assert m["a_down"] == pytest.approx(0.55)  # halfway from 0.1 to 1.0
    d = m["methods"]["better"]["a_up_minus_random-mask"]
    assert d["mean"] == pytest.approx(0.055) and d["n"] == 2 and d["se"] == pytest.approx(0.005)
    h = best_h(records, ("random-mask",))["t"]["better"]
    assert h["h_minus_random-mask"]["mean"] > 0 and h["h"]["n"] == 2


def test_recipe_summary_renders():
    records = [_record("zero-shot", 0.0, 0, 0.9, 0.1)]
    for method, up in (("full-ft", 0.5), ("random-mask", 0.6), ("spider", 0.62), ("dowser", 0.7)):
        records += [_record(method, 1, s, up, 0.5 + 0.1 * s) for s in (0, 1)]
        records += [_record(method, 2, s, up - 0.2, 0.9) for s in (0, 1)]
    summary = summarize_recipes(records)
    summary["costs"] = {"dowser": {"seconds": 1.0, "examples": 0, "state_mib": 0.1}}
    text = markdown(summary)
    assert "| dowser |" in text and "Cost of making the mask" in text


@pytest.mark.parametrize("model", ["llava", "whisper-tiny-en"])
def test_recipe_presets_are_valid(model):
    from dowser.forgetting.bench import _check_task_methods, plan

    presets = recipe_presets(model)
    for config in presets.values():
        _check_task_methods(config)
        baselines = ("zero-shot", "full-ft", "random-mask", "spider")
        assert all(m in RECIPES or m in baselines for m in config.methods)
        assert plan(config, config.downstream[0], "frontier")
    assert set(RECIPES) <= set(presets["full"].methods) or model != "llava"


@pytest.mark.usefixtures("data_env")
def test_bench_recipes_command_runs_the_study(tmp_path, capsys, monkeypatch):
    from dataclasses import replace

    import dowser.forgetting.recipes as recipes

    tiny = replace(
        TINY,
        downstream=("digits",),
        methods=(
            "zero-shot",
            "full-ft",
            "random-mask",
            "spider",
            "dowser",
            "dowser-task-split",
            "dowser-rows",
        ),
        depth_methods=(),
        ratio_methods=(),
    )
    monkeypatch.setattr(recipes, "recipe_presets", lambda model: {"quick": tiny})
    code, out, err = run(["bench", "recipes", "--quick", "--out", tmp_path, "--quiet"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "recipes.json").read_text())
    assert set(summary["best_h"]["digits"]) == set(tiny.methods)
    assert 0 < summary["costs"]["dowser-task-split"]["examples"] <= 256
    assert summary["costs"]["dowser"]["examples"] == 0
    assert "| dowser-rows |" in (tmp_path / "recipes.md").read_text()
    code, _, err = run(["bench", "recipes", "--quick", "--out", tmp_path, "--quiet"], capsys)
    assert code != 0 and "--resume" in err  # results are never overwritten unasked


def test_soft_scale_ranks_within_the_pool():
    score = torch.tensor([[0.4, 0.1, 0.3, 0.2]])
    pool = torch.tensor([[True, True, False, True]])
    s = soft_scale(score, pool)
    torch.testing.assert_close(s, torch.tensor([[1 - 2 / 3, 1.0, 0.0, 1 - 1 / 3]]))


def test_update_scale_gives_each_entry_its_own_learning_rate():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
    b.load_state_dict(a.state_dict())
    s = torch.rand(3, 4)
    s[0] = 0.0
    opt_a = torch.optim.AdamW(a.parameters(), lr=0.1, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=0.1, weight_decay=0.1)
    w0 = a.weight.detach().clone()
    x = torch.randn(5, 4)
    with UpdateScale(a, {"weight": s}).attach(opt_a) as scaler:
        before_a, before_b = a.weight.detach().clone(), b.weight.detach().clone()
        a(x).square().sum().backward()
        b(x).square().sum().backward()
        opt_a.step()
        opt_b.step()
        step_a = a.weight.detach() - before_a
        step_b = b.weight.detach() - before_b
        torch.testing.assert_close(step_a, scaler.scale("weight") * step_b)
    assert torch.equal(a.weight[0], w0[0])  # scale 0: bit-identical
    assert not scaler._handles  # removed on exit
    with pytest.raises(DowserError, match=r"\[0, 1\]"):
        UpdateScale(a, {"weight": s + 1})
    with pytest.raises(DowserError, match="do not fit"):
        UpdateScale(a, {"weight": s.T})
