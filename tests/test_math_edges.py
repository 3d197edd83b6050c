"""Edges of the ranking, selection and probed-output math that mutation testing found unpinned:
refusals, ties broken by position on rows wide enough for an unstable sort to differ, the
offset keeping zero-gradient entries rankable, layer bounds, and exact counts past 2**24."""

from __future__ import annotations

import resource
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama

from dowser.errors import DowserError
from dowser.probing.outputs import all_logits, last_logits, peak_memory
from dowser.ranking import combine_task, lowest_k, lowest_per_row, soft_scale
from dowser.selection import last_layers_only, select_weights
from dowser.targets import all_targets

WIDE = 2048  # torch's unstable CPU sort reorders ties on rows this wide (stable=True does not)


# --- lowest_k -----------------------------------------------------------------------------


def test_lowest_k_refuses_nan():
    with pytest.raises(DowserError, match="NaN"):
        lowest_k([torch.tensor([0.1, float("nan"), 0.3])], 1)


def test_lowest_k_of_every_entry_selects_all_even_one():
    # k equal to the number of entries selects each of them, down to a single one
    assert lowest_k([torch.tensor([0.5])], 1)[0].tolist() == [True]
    assert lowest_k([torch.tensor([0.5])], 0)[0].tolist() == [False]


def test_lowest_k_counts_exactly_past_float32_integers():
    # 2**24 + 1 equal entries: a float32 histogram would count 2**24 and select them all
    n = (1 << 24) + 1
    m = lowest_k([torch.zeros(n)], n - 1)[0]
    assert int(m.sum()) == n - 1 and not bool(m[-1])  # ties go to the lower index


# --- lowest_per_row -----------------------------------------------------------------------


def test_lowest_per_row_refuses_nan_and_negatives_each_alone():
    with pytest.raises(DowserError, match="NaN or negative"):
        lowest_per_row(torch.tensor([[0.5, -0.1]]), 0.5, False)
    with pytest.raises(DowserError, match="NaN or negative"):
        lowest_per_row(torch.tensor([[0.5, float("nan")]]), 0.5, False)


def test_lowest_per_row_accepts_zero_scores_and_breaks_ties_by_index():
    for transposed in (False, True):
        score = torch.zeros(3, WIDE)  # (d_out, d_in): every entry tied at 0
        m = lowest_per_row(score.T if transposed else score, 0.25, transposed)
        rows = m.T if transposed else m
        expected = torch.zeros(3, WIDE, dtype=torch.bool)
        expected[:, : WIDE // 4] = True  # the lowest indices of each output row
        assert torch.equal(rows, expected)


# --- combine_task --------------------------------------------------------------------------


def test_ratio_key_uses_a_thousandth_of_the_mean_gradient():
    up = torch.tensor([1.0, 1.0, 3.0])
    task = torch.tensor([0.0, 4.0, 2.0])  # mean 2: eps = 2e-3
    key = combine_task(up, task, 1, "ratio")
    assert key.tolist() == pytest.approx([1 / 2e-3, 1 / 4.002, 3 / 2.002], rel=1e-6)


def test_ratio_key_with_no_task_gradient_ranks_by_the_upstream_score():
    up = torch.tensor([3.0, 1.0, 2.0])
    key = combine_task(up, torch.zeros(3), 1, "ratio")
    # G = 0 everywhere: eps is the floor 1e-30, the key stays finite, >= 0 and in S's order
    assert torch.isfinite(key).all() and (key >= 0).all()
    assert key.tolist() == pytest.approx([3e30, 1e30, 2e30], rel=1e-5)
    assert lowest_k([key], 1)[0].tolist() == [False, True, False]


# --- soft_scale ----------------------------------------------------------------------------


def test_soft_scale_ties_rank_in_position_order():
    score = torch.zeros(2, WIDE)
    pool = torch.zeros(2, WIDE, dtype=torch.bool)
    pool[1] = True  # n = WIDE entries, all tied
    s = soft_scale(score, pool)
    assert s.dtype == torch.float32
    assert torch.equal(s[0], torch.zeros(WIDE))
    assert torch.equal(s[1], 1 - torch.arange(WIDE, dtype=torch.float32) / WIDE)


# --- selection.last_layers_only ------------------------------------------------------------


def test_last_layers_only_keeps_the_last_n_layers_and_bounds_n():
    model = tiny_llama(layers=3)
    targets = {t.param: t for t in all_targets(model)}
    scores = SimpleNamespace(targets=targets)  # last_layers_only reads only .targets
    names = list(targets)

    def layers(kept):
        return sorted({targets[n].layer for n in kept if targets[n].group == "decoder"})

    one = last_layers_only(model, scores, names, 1)
    assert layers(one) == [2] and "lm_head.weight" in one  # outside the decoder: kept
    assert last_layers_only(model, scores, names, 3) == names  # n = depth: everything
    for bad in (0, 4, True, 1.0):
        with pytest.raises(DowserError, match="last_layers"):
            last_layers_only(model, scores, names, bad)


def test_targets_decoder_selects_every_decoder_weight_and_only_those():
    model = tiny_llama(layers=2)
    targets = {t.param: t for t in all_targets(model)}
    scores = SimpleNamespace(targets=targets, names=list(targets))
    decoder = [n for n, t in targets.items() if t.group == "decoder"]
    assert decoder and len(decoder) < len(targets)  # lm_head lies outside the decoder
    assert select_weights(scores, "decoder") == decoder
    assert select_weights(scores, "attn,mlp,other") == decoder


# --- probing.outputs -----------------------------------------------------------------------


def test_all_logits_without_a_mask_takes_every_position_in_order():
    b, t, v = 2, 3, 5
    logits = torch.randn(b, t, v, generator=torch.Generator().manual_seed(0))
    rows = [logits[i, j] for i in range(b) for j in range(t)]
    for batch in ({}, {"attention_mask": torch.ones(b, t + 1)}):  # none, or not matching
        f = all_logits(logits, batch)
        assert f.shape == (b * t, v) and torch.equal(f, torch.stack(rows))
    assert torch.equal(all_logits(logits, {"attention_mask": torch.ones(b, t)}), f)
    assert torch.equal(last_logits(logits, {}), logits[:, -1])


def test_peak_memory_reports_the_host_peak_in_bytes(monkeypatch):
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("reads the peak resident set from /proc (Linux)")
    line = next(s for s in status.read_text().splitlines() if s.startswith("VmHWM:"))
    hwm = int(line.split()[1]) * 1024  # the kernel's high-water mark of the resident set, bytes
    peak = peak_memory()
    assert "host" in peak and all(k.startswith("cuda:") for k in peak if k != "host")
    # the same peak as the kernel's, in the same unit (the two counters differ by a few pages)
    assert hwm / 2 < peak["host"] < hwm * 2
    # Linux reports ru_maxrss in KiB: exactly 1024 bytes each
    monkeypatch.setattr(resource, "getrusage", lambda who: SimpleNamespace(ru_maxrss=1000))
    assert peak_memory()["host"] == 1_024_000
