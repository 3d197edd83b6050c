"""bench/mutate.py's own logic, without running mutmut: the seeded sample, the score's
interval, and the ratchet (survivors only go down; another sampling is refused)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
mutate = pytest.importorskip("mutate")
report = pytest.importorskip("mutate_report")

NAMES = [f"dowser.mask.x_f__mutmut_{i}" for i in range(1, 201)]


def test_the_sample_is_seeded_sized_and_stable():
    picked = mutate.sample(NAMES, 0.05, 0)
    assert len(picked) == 10 and set(picked) <= set(NAMES) and picked == sorted(picked)
    assert picked == mutate.sample(list(reversed(NAMES)), 0.05, 0)  # order does not matter
    assert picked != mutate.sample(NAMES, 0.05, 1)
    assert mutate.sample(NAMES, 1.0, 0) == NAMES
    assert len(mutate.sample(NAMES[:3], 0.05, 0)) == 1  # ceil: every module gets one
    # a mutant added elsewhere can push out at most one of the sample, never reorder it
    grown = mutate.sample([*NAMES, "dowser.mask.x_g__mutmut_1"], 0.05, 0)
    assert len(set(picked) & set(grown)) >= len(picked) - 1


def test_wilson_interval():
    low, high = report.wilson(166, 181)
    assert low < 166 / 181 < high and (round(low, 3), round(high, 3)) == (0.868, 0.949)
    assert report.wilson(0, 0) == (0.0, 1.0)
    assert report.wilson(10, 10)[1] == 1.0


def result(survived: int, share: float = 0.05, no_tests: int = 0) -> dict:
    module = {"survived": survived, "no_tests": no_tests, "mutants": 20}
    return {"sample": {"share": share, "seed": 0}, "modules": {"dowser.mask": module}}


def test_ratchet_only_lets_survivors_go_down():
    assert mutate.ratchet(None, result(9)) is None
    assert mutate.ratchet(result(3), result(3)) is None
    assert mutate.ratchet(result(3), result(2)) is None
    why = mutate.ratchet(result(3), result(4))
    assert "4 surviving mutants" in why and "dowser.mask +1" in why
    assert mutate.ratchet(result(3), result(2, no_tests=2)) is not None  # untested counts
    why = mutate.ratchet(result(3, share=1.0), result(0))
    assert "counts do not compare" in why and "--rebase" in why
    assert mutate.ratchet(result(3, share=1.0), result(5), rebase=True) is None
    old = {"modules": {"dowser.mask": {"survived": 1, "no_tests": 0}}}  # before sampling
    assert report.sampling(old) == {"share": 1.0, "seed": 0}
