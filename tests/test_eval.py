"""Evaluation: candidate likelihood against a direct computation; forgetting metrics."""

from __future__ import annotations

import math

import pytest
import torch

from dowser.eval import (
    best_h,
    candidate_accuracy,
    candidate_logprobs,
    h_score,
    mean_stderr,
    upstream_at,
)
from dowser.eval.metrics import edit_distance, error_rate, normalize_words, word_error_rate
from dowser.tiny import build_model
from dowser.train.data import Example


def direct_logprob(model, tok, prompt: str, answer: str) -> float:
    prefix = tok(prompt + "\n")["input_ids"]
    full = tok(prompt + "\n" + answer + tok.eos_token)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    return sum(float(logp[t - 1, full[t]]) for t in range(len(prefix), len(full)))


def test_candidate_logprobs_match_a_direct_computation():
    model, tok = build_model("llama")
    examples = [Example([("the sky is", "")]), Example([("grass is", "")])]
    cands = ["blue", "green", "a very long answer"]
    got = candidate_logprobs(model, tok, examples, cands, batch_size=4)
    assert got.shape == (2, 3)
    for i, ex in enumerate(examples):
        for j, c in enumerate(cands):
            assert got[i, j].item() == pytest.approx(
                direct_logprob(model, tok, ex.turns[0][0], c), abs=1e-4
            )
    mean = candidate_logprobs(model, tok, examples, cands, normalize="mean")
    assert (mean > got).all()  # per-token averages of negative numbers


def test_candidate_accuracy_after_teaching_the_answer():
    model, tok = build_model("llama")
    examples = [Example([("colour of the sky?", "")])]
    cands = ["blue", "green"]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = tok("colour of the sky?\ngreen" + tok.eos_token, return_tensors="pt")["input_ids"]
    for _ in range(30):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert candidate_accuracy(model, tok, examples, cands, [1]) == 1.0
    assert candidate_accuracy(model, tok, examples, cands, [0]) == 0.0


def test_metrics():
    assert h_score(0.5, 0.5) == 0.5 and h_score(0, 0) == 0
    assert h_score(1.0, 0.5) == pytest.approx(2 / 3)
    m, se = mean_stderr([1.0, 2.0, 3.0])
    assert m == 2.0 and se == pytest.approx(math.sqrt(1 / 3))
    assert mean_stderr([4.0]) == (4.0, 0.0)
    frontier = [(0.2, 0.9), (0.6, 0.7), (0.8, 0.3)]
    assert upstream_at(frontier, 0.4) == pytest.approx(0.8)
    assert upstream_at(frontier, 0.7) == pytest.approx(0.5)
    assert upstream_at(frontier, 0.9) is None and upstream_at(frontier, 0.1) is None
    assert best_h(frontier) == pytest.approx(h_score(0.7, 0.6))


def test_upstream_at_the_frontier_ends_and_on_ties():
    frontier = [(0.6, 0.7), (0.2, 0.9), (0.8, 0.3)]  # any order: sorted by A_down
    assert upstream_at(frontier, 0.2) == 0.9  # the ends belong to the frontier
    assert upstream_at(frontier, 0.8) == pytest.approx(0.3)
    assert upstream_at(frontier, 0.6) == pytest.approx(0.7)  # a point itself, not an interpolation
    assert upstream_at([(0.5, 0.7)], 0.5) == 0.7  # one point: only its own A_down
    assert upstream_at([(0.5, 0.7)], 0.4) is None and upstream_at([], 0.5) is None
    # two sweep points with the same A_down (first, middle or last): no division by zero, and
    # the same answer wherever the tie sits: the better A_up (the other is off the frontier)
    assert upstream_at([(0.2, 0.9), (0.2, 0.5), (0.8, 0.3)], 0.2) == 0.9
    assert upstream_at([(0.2, 0.9), (0.6, 0.75), (0.6, 0.7), (0.8, 0.3)], 0.6) == pytest.approx(
        0.75
    )
    assert upstream_at([(0.2, 0.9), (0.8, 0.5), (0.8, 0.3)], 0.8) == pytest.approx(0.5)


def test_upstream_at_skips_learning_rates_past_the_peak():
    # the highest rate over-trains: A_down fell back to 0.53 and A_up to 0.19; at A_down 0.5
    # the method does better at a lower rate, so that point is off the frontier
    points = [(0.40, 0.72), (0.58, 0.57), (0.61, 0.33), (0.53, 0.19)]
    assert upstream_at(points, 0.5) == pytest.approx(0.72 - 0.15 * 0.10 / 0.18)
    assert upstream_at(points, 0.61) == pytest.approx(0.33)
    # lower is better (WER): dominance flips
    wers = [(0.2, 0.1), (0.6, 0.3), (0.5, 0.5)]
    assert upstream_at(wers, 0.4, higher_is_better=False) == pytest.approx(0.2)
    assert upstream_at(wers, 0.4) is None  # read as "higher is better", (0.2, 0.1) is beaten


def test_edit_distance_and_error_rates():
    assert edit_distance("kitten", "sitting") == 3  # two substitutions, one insertion
    assert edit_distance("ab", "ba") == 2 and edit_distance("abc", "abc") == 0
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3
    assert edit_distance("abc", "ac") == 1 and edit_distance("ac", "abc") == 1
    assert edit_distance(["the", "cat"], ["a", "cat", "sat"]) == 2  # over word lists
    assert normalize_words("The CAT's hat, (sat)!  on-it") == [
        "the",
        "cat's",
        "hat",
        "sat",
        "on",
        "it",
    ]
    assert error_rate(["abcd", "ef"], ["abed", "ef"]) == pytest.approx(1 / 6)  # CER: totals
    assert error_rate([["a"]], [["b", "c", "d"]]) == 3.0  # insertions count: above 1
    with pytest.raises(ValueError, match="empty"):
        error_rate([""], ["abc"])
    with pytest.raises(ValueError):
        error_rate(["a", "b"], ["a"])  # one hypothesis per reference
    assert word_error_rate(["The cat sat."], ["the cat, sat"]) == 0.0
    assert word_error_rate(["a b c d", "e f"], ["a x c", "e f g"]) == pytest.approx(3 / 6)


@pytest.mark.parametrize("arch", ["llava", "paligemma"])
def test_vision_candidates_batched_equal_one_at_a_time(arch, tmp_path):
    from PIL import Image

    model, processor = build_model(arch)
    Image.new("RGB", (32, 32), (0, 90, 200)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (20, 200, 20)).save(tmp_path / "b.png")
    examples = [
        Example([("colour?", "")], tmp_path / "a.png"),
        Example([("what is the colour?", "")], tmp_path / "b.png"),
    ]
    cands = ["blue", "green", "dark red"]
    batched = candidate_logprobs(model, processor, examples, cands, batch_size=6)
    single = candidate_logprobs(model, processor, examples, cands, batch_size=1)
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-4)


def test_bad_normalisation_is_refused():
    from dowser import DowserError

    model, tok = build_model("llama")
    with pytest.raises(DowserError, match="normalize"):
        candidate_logprobs(model, tok, [Example([("q", "")])], ["a"], normalize="avg")
