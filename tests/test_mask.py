"""Masks: exact counts, nesting, ties, scopes, bit-packed files, model checks."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama, token_batches

import dowser
from dowser import DowserError, Mask
from dowser.mask import _pack, _unpack
from dowser.ranking import lowest_k, round_half_up


@pytest.fixture(scope="module")
def probed():
    model = tiny_llama(layers=3)
    scores = dowser.probe(model, batches=token_batches(64), num_probes=2, progress=False)
    return model, scores


@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.37, 0.5, 1.0])
def test_tensor_scope_counts_are_exact_and_lowest_scores_train(probed, ratio):
    model, scores = probed
    mask = dowser.build_mask(model, scores, update_ratio=ratio)
    assert len(mask) == 3 * 7  # attn + mlp of every decoder layer, not the head
    for name, m in mask.items():
        assert m.dtype == torch.bool and m.shape == scores.dense(name).shape
        assert int(m.sum()) == round_half_up(ratio * m.numel())
        s = scores.dense(name)
        if 0 < m.sum() < m.numel():
            assert s[m].max() <= s[~m].min()  # every trainable score <= every frozen one


def test_smaller_ratio_is_nested_in_larger(probed):
    model, scores = probed
    for scope in ("tensor", "row", "layer", "global"):
        masks = [
            dowser.build_mask(model, scores, update_ratio=r, scope=scope) for r in (0.05, 0.1, 0.3)
        ]
        for small, large in zip(masks, masks[1:], strict=False):
            for name in small:
                assert not (small[name] & ~large[name]).any(), (scope, name)


def test_ties_are_broken_by_position_deterministically():
    flat = torch.tensor([3.0, 1.0, 1.0, 1.0, 0.5, 1.0])
    (m,) = lowest_k([flat], 3)
    assert m.tolist() == [False, True, True, False, True, False]
    a, b = torch.ones(2, 2), torch.ones(3)
    ma, mb = lowest_k([a, b], 5)
    assert ma.all() and mb.tolist() == [True, False, False]
    again = lowest_k([a, b], 5)
    assert torch.equal(again[0], ma) and torch.equal(again[1], mb)


def test_lowest_k_radix_select_matches_sorting():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 20, (n,), generator=g).float() / 7 for n in (50, 1, 33)]
    order = torch.cat(xs).double() * 1e6 + torch.arange(84) * 1e-3  # value, then position
    for k in (0, 1, 17, 42, 83, 84):
        want = torch.zeros(84, dtype=torch.bool)
        want[order.argsort()[:k]] = True
        got = torch.cat([m.reshape(-1) for m in lowest_k(xs, k)])
        assert torch.equal(got, want), k


def test_scopes(probed):
    model, scores = probed
    row = dowser.build_mask(model, scores, update_ratio=0.25, scope="row")
    for m in row.values():
        assert (m.sum(1) == round_half_up(0.25 * m.shape[1])).all()
    layer = dowser.build_mask(model, scores, update_ratio=0.2, scope="layer")
    for i in range(3):
        ms = [m for n, m in layer.items() if f"layers.{i}." in n]
        total = sum(m.numel() for m in ms)
        assert sum(int(m.sum()) for m in ms) == round_half_up(0.2 * total)
    glob = dowser.build_mask(model, scores, update_ratio=0.2, scope="global")
    assert glob.num_trainable() == round_half_up(0.2 * glob.numel())
    with pytest.raises(DowserError, match="scope"):
        dowser.build_mask(model, scores, scope="block")


def test_targets_and_last_layers(probed):
    model, scores = probed
    attn = dowser.build_mask(model, scores, targets="attn")
    assert len(attn) == 12 and all("self_attn" in n for n in attn)
    last = dowser.build_mask(model, scores, last_layers=2)
    assert sorted({int(n.split(".")[2]) for n in last}) == [1, 2]
    head = dowser.build_mask(model, scores, targets="lm_head")
    assert list(head) == ["lm_head.weight"]
    regex = dowser.build_mask(model, scores, targets=r"down_proj")
    assert len(regex) == 3
    with pytest.raises(DowserError, match="last_layers"):
        dowser.build_mask(model, scores, last_layers=4)
    with pytest.raises(DowserError, match="selects none"):
        dowser.build_mask(model, scores, targets="nothing_matches_this")


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_ratio(probed, ratio):
    model, scores = probed
    with pytest.raises(DowserError, match=r"outside \(0, 1\]"):
        dowser.build_mask(model, scores, update_ratio=ratio)


def test_pack_round_trip_odd_sizes():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (8,), (9,), (3, 5), (2, 3, 4)]:
        t = torch.rand(shape, generator=g) > 0.5
        packed = _pack(t)
        assert packed.dtype == torch.uint8 and packed.numel() == (t.numel() + 7) // 8
        assert torch.equal(_unpack(packed, list(shape)), t)


def test_save_load_summary_and_check(probed, tmp_path):
    model, scores = probed
    mask = dowser.build_mask(model, scores, update_ratio=0.1, last_layers=2)
    path = mask.save(tmp_path / "mask.safetensors")
    back = Mask.load(path, model=model)
    assert list(back) == list(mask)
    assert all(torch.equal(back[n], mask[n]) for n in mask)
    assert back.meta["update_ratio"] == 0.1 and back.meta["last_layers"] == 2
    text = back.summary()
    assert "attn" in text and "mlp" in text and "10.0%" in text
    assert [r["layer"] for r in back.stats()] == [1, 1, 2, 2]
    # a file that is smaller than the bits it claims: corrupt
    with pytest.raises(DowserError, match="exists"):
        mask.save(path)
    other = tiny_llama(seed=1, layers=3)
    with pytest.raises(DowserError, match="does not fit this model.*other values"):
        Mask.load(path, model=other)
    smaller = tiny_llama(layers=1)
    with pytest.raises(DowserError, match="missing weights"):
        back.check(smaller)


def test_mask_from_plain_dict():
    model = tiny_llama()
    w = dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    mask = Mask({"model.layers.1.mlp.up_proj.weight": torch.zeros_like(w, dtype=torch.bool)})
    mask.check(model)  # names and shapes only: no fingerprint
    assert mask.info["model.layers.1.mlp.up_proj.weight"] == {"layer": 1, "kind": "mlp"}
    with pytest.raises(DowserError, match="bool"):
        Mask({"x": torch.zeros(3)})
    bad = Mask({"model.layers.1.mlp.up_proj.weight": torch.zeros(3, 3, dtype=torch.bool)})
    with pytest.raises(DowserError, match="another shape"):
        bad.check(model)


def test_nan_scores_are_refused(probed):
    model, scores = probed
    name = scores.names[0]
    f = scores.factors[name]
    saved = f.psi.clone()
    f.psi[0, 0] = float("nan")
    try:
        with pytest.raises(DowserError, match="NaN"):
            dowser.build_mask(model, scores)
    finally:
        f.psi.copy_(saved)


def test_lowest_k_from_functions_equals_from_tensors():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randint(0, 9, s, generator=g).float() for s in ((4, 5), (7,), (3, 3))]
    calls = []

    def source(x):
        def make():
            calls.append(1)
            return x.clone()

        return make

    for k in (0, 5, 20, 36):
        direct = lowest_k(xs, k)
        lazy = lowest_k([source(x) for x in xs], k)
        assert all(torch.equal(a, b) for a, b in zip(direct, lazy, strict=True)), k
    assert calls  # the functions were used


def test_negative_zero_counts_as_zero():
    (m,) = lowest_k([torch.tensor([1.0, -0.0, 0.0, 2.0])], 2)
    assert m.tolist() == [False, True, True, False]


def test_a_ratio_too_small_for_a_matrix_warns(probed):
    model, scores = probed
    with pytest.warns(UserWarning, match="too small to leave any entry"):
        dowser.build_mask(model, scores, update_ratio=0.001)
