"""Mutation testing of the math modules (`make mutate`), with a ratchet on surviving mutants.

mutmut 3 (configured in pyproject's [tool.mutmut]: which files, which tests) copies src/ and
tests/ into mutants/, plants one small change at a time in the math modules (a `<` for a `<=`,
a `+ 1`, a dropped argument, ...), and runs the tests that called the changed function. A
mutant is killed when a test fails, survives when they all pass: a survivor is a plausible bug
the tests cannot see. This script runs mutmut, reads its verdict for every mutant from the meta
files under mutants/, and writes

    bench/results/mutation.json   per module: mutants, killed, survived, timeout, no tests,
                                  other, and the surviving mutants' names; the wall time, date,
                                  machine, mutmut and torch versions, the tests used
    bench/results/mutation.md     the same as tables, and each survivor's change (old -> new)

    python bench/mutate.py                       # everything, from scratch (make mutate)
    python bench/mutate.py --modules dowser.mask # one module; the others are carried over
    python bench/mutate.py --keep                # reuse mutants/: re-test only what did not die
    python bench/mutate.py --report-only         # after `mutmut run`: just read and compare
    mutmut show dowser.mask.x_build_mask__mutmut_12    # one survivor's diff

The ratchet: the number of surviving mutants only goes down. The baseline is the results file
as committed (`git show HEAD:bench/results/mutation.json`; without git or a committed file, the
file on disk). The survivors of the modules present in both the baseline and this run are
summed on each side; a mutant that no selected test reaches counts as a survivor, so dropping
a test cannot lower the sum. When this run's sum is higher, the script prints one line naming
the modules that gained survivors, leaves the results file as it was (the candidate goes to
mutants/mutation.json) and exits 1. A module new to the list, or one dropped from it, counts
neither way. New code in a module brings new mutants: its tests must kill them, or the sum
grows and the ratchet fails. A run that left mutants unchecked (interrupted) cannot be compared
and fails as well. The verdicts do not come from mutmut's cache unless --keep is given: a fresh
run is the honest one (mutmut keeps a survivor's verdict even after a new test would kill it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "mutation.json"
REPORT = RESULTS.with_suffix(".md")
WORK = ROOT / "mutants"  # mutmut's working copy; its meta files hold the verdicts
STATUSES = ("killed", "survived", "timeout", "no tests")  # anything else counts as "other"


def mutmut_config() -> dict:
    """pyproject's [tool.mutmut] table."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def module_of(path: str) -> str:
    """'src/dowser/train/masking.py' -> 'dowser.train.masking' (mutmut's own naming)."""
    return path.removeprefix("src/").removesuffix(".py").replace("/", ".")


def pkg_version(name: str) -> str:
    """The installed version of a distribution, or 'absent'."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "absent"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_mutmut(modules: list[str], max_children: int) -> None:
    """`mutmut run` from the repository root; any failure ends this script with one line."""
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe if exe.exists() else shutil.which("mutmut") or "mutmut"), "run"]
    cmd += ["--max-children", str(max_children), *(f"{m}.*" for m in modules)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # mutmut copies also_copy files without making their folder (bench/mutate.py: the plugin)
    (WORK / "bench").mkdir(parents=True, exist_ok=True)
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if code != 0:
        sys.exit(
            f"mutate: `{' '.join(cmd[1:])}` failed (exit {code}); if it stopped at the stats or "
            "clean run, a selected test fails: run pytest on [tool.mutmut]'s test selection"
        )


def retest_survivors(paths: list[str]) -> int:
    """Forget every verdict but 'killed' in mutants/, so that mutmut re-tests those mutants.

    mutmut keeps a verdict until the function's source changes, so a survivor would stay one
    after a new test kills it. Returns how many verdicts were forgotten.
    """
    from mutmut.stats import status_by_exit_code

    forgotten = 0
    for path in paths:
        meta = WORK / f"{path}.meta"
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        for key, code in codes.items():
            if code is not None and status_by_exit_code[code] != "killed":
                codes[key] = None
                forgotten += 1
        meta.write_text(json.dumps(data, indent=4))
    return forgotten


def read_verdicts(paths: list[str]) -> dict[str, dict]:
    """Per module, the counts of each verdict and the sorted names of the survivors.

    `other` gathers suspicious, segfault, skipped and type-check verdicts; `not_checked`
    counts mutants mutmut never ran (an interrupted run).
    """
    from mutmut.stats import status_by_exit_code

    out = {}
    for path in paths:
        meta = WORK / f"{path}.meta"
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        counts = {"mutants": len(codes), **{s.replace(" ", "_"): 0 for s in STATUSES}}
        counts |= {"other": 0, "not_checked": 0}
        survivors = []
        for key, code in codes.items():
            status = status_by_exit_code[code]
            if status == "not checked":
                counts["not_checked"] += 1
            elif status in STATUSES:
                counts[status.replace(" ", "_")] += 1
            else:
                counts["other"] += 1
            if status == "survived":
                survivors.append(key)
        survivors.sort(key=lambda k: (k.rpartition("__mutmut_")[0], int(k.rpartition("_")[2])))
        out[module_of(path)] = {**counts, "path": path, "survivors": survivors}
    return out


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


def baseline() -> tuple[dict | None, str]:
    """The committed results (git HEAD), else the file on disk, else None; and where from."""
    rel = RESULTS.relative_to(ROOT).as_posix()
    try:
        shown = subprocess.run(
            ["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True, check=False
        )
        if shown.returncode == 0:
            return json.loads(shown.stdout), f"git HEAD:{rel}"
    except OSError:
        pass
    if RESULTS.exists():
        return json.loads(RESULTS.read_text()), rel
    return None, "none"


def ratchet(old: dict | None, new: dict) -> str | None:
    """None when the survivors of the modules in both runs did not grow, else why (one line)."""
    if old is None:
        return None
    common = sorted(set(old["modules"]) & set(new["modules"]))

    def alive(res: dict, m: str) -> int:  # a mutant no test reaches is a survivor too
        return res["modules"][m]["survived"] + res["modules"][m].get("no_tests", 0)

    before = sum(alive(old, m) for m in common)
    after = sum(alive(new, m) for m in common)
    if after <= before:
        return None
    grew = [
        f"{m} +{alive(new, m) - alive(old, m)}" for m in common if alive(new, m) > alive(old, m)
    ]
    return (
        f"mutate: {after} surviving mutants in {len(common)} modules, up from {before} in the "
        f"committed results ({', '.join(grew)}); kill them with tests (bench/results/mutation.md "
        "lists each change) or explain them"
    )


def markdown(res: dict, changes: dict[str, str]) -> str:
    """The results as a table per module, then every survivor with its change."""
    t = res["totals"]
    minutes = f"{res['wall_s'] / 60:.0f} min" if res["wall_s"] is not None else "time not measured"
    lines = [
        "# Mutation testing of the math modules",
        "",
        f"`make mutate` (bench/mutate.py, mutmut {res['mutmut']}, torch {res['torch']}) on "
        f"{res['machine']}, {res['date']}: {minutes} with {res['max_children']} workers. "
        "Score = killed + timeout over mutants with tests: "
        f"**{t['score']:.1%}** ({t['survived']} of {t['mutants']} mutants survive).",
        "",
        "| module | mutants | killed | survived | timeout | no tests | other | score |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in res["modules"].items():
        lines.append(
            f"| {name} | {m['mutants']} | {m['killed']} | {m['survived']} | {m['timeout']} | "
            f"{m['no_tests']} | {m['other']} | {score(m):.1%} |"
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


def score(m: dict) -> float:
    """(killed + timeout) / (mutants - no tests): the share of testable mutants caught."""
    tested = m["mutants"] - m["no_tests"]
    return (m["killed"] + m["timeout"]) / tested if tested else 0.0


def pytest_collection_modifyitems(items: list) -> None:
    """pytest hook, loaded in mutmut's own pytest runs by `-p bench.mutate` (see pyproject).

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


def main(argv: list[str] | None = None) -> int:
    """Run mutmut over the configured math modules, write the results, apply the ratchet."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default="", help="comma-separated, e.g. dowser.mask,dowser.scores")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", action="store_true", help="reuse mutants/, re-test non-killed ones")
    ap.add_argument("--report-only", action="store_true", help="read mutants/, do not run mutmut")
    ap.add_argument("--note", default="", help="how the run was made, kept in the results file")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # mutmut reads pyproject.toml and writes mutants/ in the working directory
    cfg = mutmut_config()
    paths = {module_of(p): p for p in cfg["only_mutate"]}
    chosen = [m.strip() for m in args.modules.split(",") if m.strip()] or list(paths)
    unknown = sorted(set(chosen) - set(paths))
    if unknown:
        sys.exit(
            f"mutate: {', '.join(unknown)} not in [tool.mutmut] only_mutate; use {list(paths)}"
        )
    old, old_from = baseline()

    start = time.monotonic()
    if not args.report_only:
        if args.keep:
            print(f"mutate: re-testing {retest_survivors([paths[m] for m in chosen])} verdicts")
        elif WORK.exists():
            shutil.rmtree(WORK)  # a fresh run: no verdict survives a change of the tests
        run_mutmut(chosen if len(chosen) < len(paths) else [], args.max_children)
    wall = time.monotonic() - start

    modules = read_verdicts([paths[m] for m in chosen])
    unchecked = {m: v["not_checked"] for m, v in modules.items() if v["not_checked"]}
    if unchecked:
        sys.exit(f"mutate: the run left mutants unchecked ({unchecked}); run it again to finish")
    carried = []
    if old is not None and len(chosen) < len(paths):
        for name in paths:
            if name not in modules and name in old["modules"]:
                modules[name] = old["modules"][name]
                carried.append(name)
    modules = {name: modules[name] for name in paths if name in modules}
    totals = {k: sum(m[k] for m in modules.values()) for k in ("mutants", "killed", "survived")}
    totals |= {k: sum(m[k] for m in modules.values()) for k in ("timeout", "no_tests", "other")}
    totals["score"] = round(score(totals), 4)
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": None if args.report_only else round(wall, 1),
        "machine": f"{os.cpu_count()} x {cpu_model()}, {platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "mutmut": pkg_version("mutmut"),
        "torch": pkg_version("torch"),
        "max_children": args.max_children,
        "run": "report-only" if args.report_only else ("keep" if args.keep else "fresh"),
        "tests": cfg.get("pytest_add_cli_args_test_selection", []),
        "carried_over": carried,  # modules not run this time: their figures are the baseline's
        "totals": totals,
        "modules": {
            n: {k: v for k, v in m.items() if k != "not_checked"} for n, m in modules.items()
        },
    }
    if args.note:
        res["note"] = args.note
    changes = {
        s: change_of(s, m["path"])
        for name, m in modules.items()
        if name not in carried
        for s in m["survivors"]
    }
    why = ratchet(old, res)
    if why:
        (WORK / "mutation.json").write_text(json.dumps(res, indent=2) + "\n")
        print(why, file=sys.stderr)
        return 1
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    REPORT.write_text(markdown(res, changes) + "\n")
    print(
        f"mutate: {totals['killed']} killed, {totals['survived']} survived of "
        f"{totals['mutants']} mutants ({totals['score']:.1%}) in {wall / 60:.1f} min; baseline "
        f"{old_from}; wrote {RESULTS.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
