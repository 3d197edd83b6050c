"""What bench/mutate.py writes: the score with its interval, the tables, each survivor's change."""

from __future__ import annotations

import math


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion hits/n ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def change_of(name: str, path: str) -> str:
    """A survivor's change on one line: the removed lines, '->', the added lines."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    try:
        diff = get_diff_for_mutant(name, path=path).splitlines()[2:]
    except Exception as e:  # a mutant file from another run: say so, do not stop the report
        return f"(no diff: {e})"
    old = " / ".join(s[1:].strip() for s in diff if s.startswith("-"))
    new = " / ".join(s[1:].strip() for s in diff if s.startswith("+"))
    return f"{old}  ->  {new}"


def sampling(res: dict) -> dict:
    """A results file's sampling ({"share", "seed"}); files from before sampling tested all."""
    return res.get("sample", {"share": 1.0, "seed": 0})


def markdown(res: dict, changes: dict[str, str]) -> str:
    """The results as a table per module, then every survivor with its change."""
    t = res["totals"]
    minutes = f"{res['wall_s'] / 60:.0f} min" if res["wall_s"] is not None else "time not measured"
    lines = [
        "# Mutation testing of the math modules",
        "",
        f"`make mutate` (bench/mutate.py, mutmut {res['mutmut']}, torch {res['torch']}) on "
        f"{res['machine']}, {res['date']}: {minutes} with {res['max_children']} workers. "
        f"Tested: {sample_words(res)}. Score = killed + timeout over tested mutants with tests: "
        f"**{t['score']:.1%}** (95 % interval {t['interval'][0]:.1%} to {t['interval'][1]:.1%}; "
        f"{t['survived']} of {t['mutants']} tested mutants survive).",
        "",
        "| module | mutants | tested | killed | survived | timeout | no tests | other | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in res["modules"].items():
        lines.append(
            f"| {name} | {m.get('population', m['mutants'])} | {m['mutants']} | {m['killed']} | "
            f"{m['survived']} | {m['timeout']} | {m['no_tests']} | {m['other']} | {score(m):.1%} |"
        )
    lines += ["", "## Survivors", "", "`mutmut show NAME` prints the diff of one.", ""]
    for name, m in res["modules"].items():
        if m["survivors"]:
            lines += [f"### {name} ({m['survived']})", ""]
            for s in m["survivors"]:
                change = f": `{changes[s]}`" if s in changes else " (carried over)"
                lines.append(f"- `{s.rpartition('.')[2]}`{change}")
            lines.append("")
    return "\n".join(lines)


def sample_words(res: dict) -> str:
    """'every mutant' or 'a 5 % sample (seed 0) of each module's mutants'."""
    smp = sampling(res)
    if smp["share"] >= 1:
        return "every mutant"
    return f"a {smp['share']:.0%} sample (seed {smp['seed']}) of each module's mutants"


def totals_of(modules: dict[str, dict]) -> dict:
    """Summed counts over modules, the score and its 95 % Wilson interval."""
    keys = ("population", "mutants", "killed", "survived", "timeout", "no_tests", "other")
    totals = {
        k: sum(m.get(k, m["mutants"] if k == "population" else 0) for m in modules.values())
        for k in keys
    }
    totals["score"] = round(score(totals), 4)
    caught = totals["killed"] + totals["timeout"]
    totals["interval"] = [
        round(x, 4) for x in wilson(caught, totals["mutants"] - totals["no_tests"])
    ]
    return totals


def score(m: dict) -> float:
    """(killed + timeout) / (mutants - no tests): the share of testable mutants caught."""
    tested = m["mutants"] - m["no_tests"]
    return (m["killed"] + m["timeout"]) / tested if tested else 0.0
