"""merge_deltas / `dowser merge-deltas`: deltas of one base merged bit for bit where they are
disjoint, overlaps combined by sum or mean (checked by hand) or refused, other bases refused
with nothing written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dowser import Mask
from dowser.cli import main
from dowser.errors import DowserError
from dowser.fingerprint import model_digests, model_fingerprints
from dowser.hf import load_model
from dowser.tiny import build_checkpoint
from dowser.train.artifacts import apply_delta, save_delta
from dowser.train.compose import merge_deltas, round_once

UP = "model.layers.1.mlp.up_proj.weight"  # 128 x 64
Q = "model.layers.0.self_attn.q_proj.weight"  # 64 x 64
NORM = "model.layers.1.post_attention_layernorm.weight"  # 64
NORM0 = "model.layers.0.input_layernorm.weight"  # 64


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_checkpoint("llama", tmp_path_factory.mktemp("ckpt") / "llama")


def flat_mask(shape, idx) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m.view(-1)[idx] = True
    return m


PERM = torch.randperm(128 * 64, generator=torch.Generator().manual_seed(0))
A = flat_mask((128, 64), PERM[:800])
B = flat_mask((128, 64), PERM[800:1600])  # disjoint from A
C = flat_mask((128, 64), PERM[400:1200])  # shares PERM[400:800] with A
QA = flat_mask((64, 64), torch.arange(0, 4096, 7))


def make_delta(model_dir, path, masks: dict, dense: list, seed: int):
    """(path, tuned model): the masked entries and dense tensors of the base moved randomly."""
    model, _, _ = load_model(model_dir)
    names = [*masks, *dense]
    fps, digests = model_fingerprints(model, names), model_digests(model, names)
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name][m] += 0.1 * torch.randn(int(m.sum()), generator=g)
        for name in dense:
            params[name] += 0.1 * torch.randn(params[name].shape, generator=g)
    save_delta(model, Mask(masks), path, base_fingerprints=fps, dense=dense, base_digests=digests)
    return path, model


def one_line_error(err: str) -> str:
    """The command's error line (the rest of stderr is progress bars), checked to be one."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("dowser merge-deltas: error")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    return errors[0]


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def deltas(llama_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("deltas")
    return {
        "a": make_delta(llama_dir, d / "a.safetensors", {UP: A, Q: QA}, [NORM], seed=1),
        "b": make_delta(llama_dir, d / "b.safetensors", {UP: B}, [NORM0], seed=2),
        "c": make_delta(llama_dir, d / "c.safetensors", {UP: C}, [NORM], seed=3),
    }


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_disjoint_deltas_merge_bit_for_bit(llama_dir, deltas, order):
    paths = [deltas[k][0] for k in order]
    merged, _, _ = load_model(llama_dir)
    base = state(merged)
    report = merge_deltas(merged, paths)
    # apply_delta refuses the second delta on the first one's output (UP's digest changed),
    # so the reference is each delta applied alone to the base, on its own entries
    alone = {}
    for key in "ab":
        alone[key], _, _ = load_model(llama_dir)
        apply_delta(alone[key], deltas[key][0])
    expected = state(alone["a"])
    expected[UP][B] = alone["b"].get_parameter(UP)[B]
    expected[NORM0] = alone["b"].get_parameter(NORM0).detach()
    with pytest.raises(DowserError, match="another base model"):
        apply_delta(alone["a"], deltas["b"][0])
    for name, p in merged.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert report["overlap"] == 0 and report["rule"] == "sum"
    assert report["tensors"][UP] == {"entries": 1600, "overlap": 0}
    assert report["tensors"][Q] == {"entries": int(QA.sum()), "overlap": 0}
    assert set(report["tensors"]) == {UP, Q, NORM, NORM0}
    entries = {"a": 800 + int(QA.sum()) + 64, "b": 800 + 64}
    assert [d["entries"] for d in report["deltas"]] == [entries[k] for k in order]
    assert report["entries"] == sum(entries.values())
    # the merge did something: every entry either delta moved differs from the base
    moved = merged.get_parameter(UP) != base[UP]
    assert torch.equal(moved, A | B)


def by_hand(b: float, va: float, vc: float, rule: str) -> float:
    """The rule in Python float64, then one rounding to float32 by numpy."""
    change = (va - b) + (vc - b)
    return float(np.float32(b + (change if rule == "sum" else change / 2)))


@pytest.mark.parametrize("rule", ["sum", "mean"])
def test_overlapping_entries_are_combined_by_the_rule(llama_dir, deltas, rule):
    (pa, tuned_a), (pc, tuned_c) = deltas["a"], deltas["c"]
    model, _, _ = load_model(llama_dir)
    base = state(model)
    report = merge_deltas(model, [pa, pc], overlap=rule)
    assert report["tensors"][UP] == {"entries": 1200, "overlap": 400}
    assert report["tensors"][NORM] == {"entries": 64, "overlap": 64}  # dense in both
    assert report["overlap"] == 464 and report["rule"] == rule
    got, b = state(model)[UP].view(-1), base[UP].view(-1)
    va, vc = state(tuned_a)[UP].view(-1), state(tuned_c)[UP].view(-1)
    for i in PERM[400:410].tolist() + PERM[790:800].tolist():  # shared entries
        expected = by_hand(float(b[i]), float(va[i]), float(vc[i]), rule)
        assert float(got[i]) == expected, i
        assert got[i] != va[i] and got[i] != vc[i]
    only_a, only_c = PERM[:400], PERM[800:1200]
    assert torch.equal(got[only_a], va[only_a]) and torch.equal(got[only_c], vc[only_c])
    untouched = ~(A | C).view(-1)
    assert torch.equal(got[untouched], b[untouched])
    norm, nb = state(model)[NORM], base[NORM]
    na, nc = state(tuned_a)[NORM], state(tuned_c)[NORM]
    for i in (0, 17, 63):
        assert float(norm[i]) == by_hand(float(nb[i]), float(na[i]), float(nc[i]), rule)


def test_refuse_names_the_first_shared_tensor_and_writes_nothing(llama_dir, deltas):
    model, _, _ = load_model(llama_dir)
    before = state(model)
    pa, pc = deltas["a"][0], deltas["c"][0]
    with pytest.raises(DowserError, match=f"400 entries of {UP} are written by {pa} and {pc}"):
        merge_deltas(model, [pa, pc], overlap="refuse")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    report = merge_deltas(model, [pa, deltas["b"][0]], overlap="refuse")  # disjoint: fine
    assert report["overlap"] == 0


def test_a_delta_of_another_base_is_refused_before_anything_is_written(
    llama_dir, deltas, tmp_path, capsys
):
    other, _, _ = load_model(llama_dir)
    with torch.no_grad():
        other.get_parameter(UP).view(-1)[int(PERM[5000])] += 1e-3  # an entry no mask trains
    other.save_pretrained(tmp_path / "other")
    foreign, _ = make_delta(tmp_path / "other", tmp_path / "x.safetensors", {UP: B}, [], seed=4)
    model, _, _ = load_model(llama_dir)
    before = state(model)
    with pytest.raises(DowserError, match=f"x.safetensors was made from another base .*{UP}"):
        merge_deltas(model, [deltas["a"][0], foreign])  # the good one comes first
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    out = tmp_path / "merged"
    argv = ["merge-deltas", deltas["a"][0], foreign, "--base", llama_dir, "--out", out]
    assert main([str(a) for a in argv]) == 2
    assert "another base model" in one_line_error(capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize(
    "deltas_given, options, needle",
    [
        (["a", "c"], ["--overlap", "refuse"], f"400 entries of {UP}"),
        (["a", "missing"], [], "missing.safetensors does not exist"),
        (["a", "a"], [], "is given twice"),
    ],
)
def test_command_line_refusals_are_one_line_and_write_nothing(
    llama_dir, deltas, tmp_path, capsys, deltas_given, options, needle
):
    paths = [deltas[k][0] if k in deltas else tmp_path / f"{k}.safetensors" for k in deltas_given]
    out = tmp_path / "merged"
    argv = ["merge-deltas", *paths, "--base", llama_dir, "--out", out, *options]
    assert main([str(a) for a in argv]) == 2
    assert needle in one_line_error(capsys.readouterr().err)
    assert not out.exists()


def test_command_line_writes_the_merged_checkpoint_and_says_how(
    llama_dir, deltas, tmp_path, capsys
):
    (pa, _), (pc, _) = deltas["a"], deltas["c"]
    out = tmp_path / "merged"
    argv = ["merge-deltas", pa, pc, "--base", llama_dir, "--out", out, "--overlap", "mean"]
    assert main([str(a) for a in argv]) == 0
    text = capsys.readouterr().out
    assert f"{pa}: {800 + int(QA.sum()) + 64:,} entries of 3 tensors" in text
    assert f"{pc}: 864 entries of 2 tensors" in text
    assert "overlap: 464 entries of 2 tensors" in text and "mean of their changes" in text
    expected, _, _ = load_model(llama_dir)
    merge_deltas(expected, [pa, pc], overlap="mean")
    written, _, _ = load_model(out)
    for name, p in written.named_parameters():
        assert torch.equal(p, expected.get_parameter(name)), name
    kept = {f.name for f in llama_dir.iterdir() if not f.name.endswith(".safetensors")}
    assert kept <= {f.name for f in out.iterdir()}  # tokenizer files come along
    assert main([str(a) for a in argv]) == 2  # a second time: --out is not empty
    assert "--overwrite" in capsys.readouterr().err


def test_library_refuses_a_bad_rule_and_no_deltas(llama):
    with pytest.raises(DowserError, match="overlap='max': choose one of sum, mean, refuse"):
        merge_deltas(llama, ["x"], overlap="max")
    with pytest.raises(DowserError, match="at least one delta"):
        merge_deltas(llama, [])


def test_round_once_rounds_a_single_time():
    """torch casts float64 -> bfloat16/float16 through float32 (two roundings); round_once
    must land where one correct rounding does: numpy's float64 -> float16, and by hand."""
    x = torch.tensor([1 + 2**-8 + 2**-40, 1 + 2**-8, 1 + 3 * 2**-8], dtype=torch.float64)
    assert x.to(torch.bfloat16)[0] == 1.0  # the double rounding this guards against
    assert round_once(x, torch.bfloat16).tolist() == [1 + 2**-7, 1.0, 1 + 2**-6]
    g = torch.Generator().manual_seed(0)
    half = (torch.rand(2000, generator=g, dtype=torch.float64) * 8 - 4).numpy().astype(np.float16)
    above = np.nextafter(half, np.float16(np.inf))
    mid = (torch.from_numpy(half).double() + torch.from_numpy(above).double()) / 2  # exact ties
    near = mid + mid.abs() * torch.randn(2000, generator=g, dtype=torch.float64) * 2**-35
    for values in (mid, near, torch.randn(2000, generator=g, dtype=torch.float64)):
        expected = torch.from_numpy(values.numpy().astype(np.float16))
        assert torch.equal(round_once(values, torch.float16), expected)
    assert torch.equal(round_once(near, torch.float32), near.float())
