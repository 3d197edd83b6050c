"""pytest plugin for mutmut's own test runs (`-p bench.mutmut_plugin` in pyproject's [tool.mutmut]).

Kept apart from bench/mutate.py so that mutmut's pytest processes import nothing but this.
"""

from __future__ import annotations

import json
from pathlib import Path


def pytest_collection_modifyitems(items: list) -> None:
    """pytest hook, loaded in mutmut's own pytest runs (see pyproject).

    Two things mutmut 3.8 needs here: it reads `item._nodeid`, which pytest 9 no longer sets
    (without it the first test errors and the run stops); and in forkserver mode it passes a
    mutant's tests in no particular order, so the fastest ones (durations from its stats run)
    go first: with -x a killed mutant then costs its quickest failing test, not a slow one.
    """
    for item in items:
        item.__dict__.setdefault("_nodeid", item.nodeid)
    stats = Path("mutmut-stats.json")  # mutmut runs pytest inside mutants/
    if stats.exists():
        durations = json.loads(stats.read_text()).get("duration_by_test", {})
        items.sort(key=lambda item: durations.get(item.nodeid, float("inf")))
