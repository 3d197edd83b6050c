"""Forgetting metrics: H-score, seed statistics, and trade-off frontiers.

A_up is the mean accuracy over the upstream (pretrained) tasks after fine-tuning, A_down the
downstream accuracy. Their harmonic mean

    H = 2 A_up A_down / (A_up + A_down)

is high only when both are. Every sparse mask trades learning for keeping, so methods are
compared along their learning-rate sweeps: each sweep is a frontier of (A_down, A_up) points,
summarised by its best H and by A_up at a common downstream level (linear interpolation
between the sweep's points, ordered by A_down).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def h_score(a_up: float, a_down: float) -> float:
    """Harmonic mean of upstream and downstream accuracy (0 when both are 0)."""
    total = a_up + a_down
    return 2 * a_up * a_down / total if total > 0 else 0.0


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def upstream_at(
    points: Sequence[tuple[float, float]], a_down: float, *, higher_is_better: bool = True
) -> float | None:
    """A_up (or any y) interpolated at downstream accuracy `a_down` on the frontier of
    (A_down, y) points, one per learning rate.

    The frontier is the set of points no other point beats on both axes: a learning rate so
    high that A_down fell again, with y worse too, is off it (the method reaches that A_down
    with a better y at a lower rate). Its points are ordered by A_down; between two
    neighbours y is interpolated linearly. None when `a_down` lies outside the frontier's
    range (the method never got there). `higher_is_better=False` for y like WER.
    """
    sign = 1.0 if higher_is_better else -1.0
    pts = sorted(
        (x, y)
        for x, y in points
        if not any(u >= x and sign * v >= sign * y and (u, v) != (x, y) for u, v in points)
    )
    if not pts or not pts[0][0] <= a_down <= pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= a_down <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (a_down - x0) / (x1 - x0)
    return pts[-1][1]  # a single point equal to a_down


def best_h(points: Sequence[tuple[float, float]]) -> float:
    """The best H-score over a frontier of (A_down, A_up) points."""
    return max(h_score(up, down) for down, up in points)


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance: substitutions + deletions + insertions turning `ref` into `hyp`."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def normalize_words(text: str) -> list[str]:
    """Words for WER: lower case, punctuation other than apostrophes dropped."""
    return "".join(c if c.isalnum() or c == "'" else " " for c in text.lower()).split()


def error_rate(refs: Sequence[Sequence], hyps: Sequence[Sequence]) -> float:
    """Corpus error rate: total edit distance over total reference length (WER over word
    lists, CER over strings). Insertions count, so it can exceed 1."""
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("the references are empty")
    return sum(edit_distance(r, h) for r, h in zip(refs, hyps, strict=True)) / total


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """WER of transcripts after `normalize_words` (case and punctuation do not count)."""
    return error_rate([normalize_words(r) for r in refs], [normalize_words(h) for h in hyps])
