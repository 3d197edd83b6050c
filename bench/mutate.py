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

    python bench/mutate.py                       # the committed sample, from scratch (make mutate)
    python bench/mutate.py --sample 1            # every mutant (about a day on 2 cores)
    python bench/mutate.py --modules dowser.mask # one module; the others are carried over
    python bench/mutate.py --keep                # reuse mutants/: re-test only what did not die
    python bench/mutate.py --report-only         # after `mutmut run`: just read and compare
    mutmut show dowser.mask.x_build_mask__mutmut_12    # one survivor's diff

Sampling: a full run costs hours per module on 2 cores (a surviving mutant runs every test that
reaches it), so a run can test a seeded random share of each module's mutants (`--sample 0.05
--seed 0`): the ceil(share x count) mutants whose sha256(seed:name) is smallest, so a mutant keeps
its place in the sample when other functions change. The score is then an estimate, given with a
95 % Wilson interval. `make mutate` uses the committed file's share and seed.

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
Counts compare only between runs of the same share and seed: a run with another sampling than the
committed one is refused unless --rebase says it replaces the baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mutate_report import change_of, markdown, sample_words, sampling, totals_of

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


GENERATE = """
import os, sys
from mutmut.__main__ import create_mutants, set_mutant_under_test
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths()
create_mutants(int(sys.argv[1]))
"""


def generate_mutants(max_children: int) -> None:
    """mutmut's own first step (copy src/, write every mutant and its meta file), no tests run.

    A sampled run needs the mutants' names before it can choose among them; `mutmut run` then
    finds them written and does not make them again.
    """
    (WORK / "bench").mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-c", GENERATE, str(max_children)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        sys.exit(f"mutate: mutmut could not generate the mutants: {tail[0]}")


def all_mutants(path: str) -> list[str]:
    """Every mutant's name in one module, from the meta file mutmut wrote for it."""
    meta = WORK / f"{path}.meta"
    return sorted(json.loads(meta.read_text())["exit_code_by_key"]) if meta.exists() else []


def sample(names: list[str], share: float, seed: int) -> list[str]:
    """The ceil(share * len(names)) names with the smallest sha256(f"{seed}:{name}").

    A name's rank depends on the name alone, so a module whose other functions change keeps the
    same sampled mutants in the functions that did not. share >= 1 keeps every name.
    """
    if share >= 1:
        return list(names)
    k = math.ceil(share * len(names))
    digest = {n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest() for n in names}
    return sorted(sorted(names, key=digest.__getitem__)[:k])


def run_mutmut(targets: list[str], max_children: int) -> None:
    """`mutmut run` on these mutant names or patterns (all when empty); failures end in one line."""
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe if exe.exists() else shutil.which("mutmut") or "mutmut"), "run"]
    cmd += ["--max-children", str(max_children), *targets]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # mutmut copies also_copy files without making their folder (bench/mutate.py: the plugin)
    (WORK / "bench").mkdir(parents=True, exist_ok=True)
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if code != 0:
        sys.exit(
            f"mutate: `mutmut run` ({len(targets) or 'all'} targets) failed (exit {code}); if it "
            "stopped at the stats or "
            "clean run, a selected test fails: run pytest on [tool.mutmut]'s test selection"
        )


def retest_survivors(paths: list[str], names: set[str]) -> int:
    """Forget every verdict but 'killed' of these mutants in mutants/, so that mutmut re-tests them.

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
            if key in names and code is not None and status_by_exit_code[code] != "killed":
                codes[key] = None
                forgotten += 1
        meta.write_text(json.dumps(data, indent=4))
    return forgotten


def read_verdicts(paths: list[str], names: set[str]) -> dict[str, dict]:
    """Per module, the counts of each verdict among these mutants and the survivors' names.

    `population` is every mutant of the module, `mutants` those tested (the sample); `other`
    gathers suspicious, segfault, skipped and type-check verdicts; `not_checked` counts sampled
    mutants mutmut never ran (an interrupted run).
    """
    from mutmut.stats import status_by_exit_code

    out = {}
    for path in paths:
        meta = WORK / f"{path}.meta"
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        tested = {k: c for k, c in codes.items() if k in names}
        counts = {"population": len(codes), "mutants": len(tested)}
        counts |= {s.replace(" ", "_"): 0 for s in STATUSES} | {"other": 0, "not_checked": 0}
        survivors = []
        for key, code in tested.items():
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


def ratchet(old: dict | None, new: dict, rebase: bool = False) -> str | None:
    """None when the survivors of the modules in both runs did not grow, else why (one line).

    Counts compare only under the same sampling: another share or seed is refused unless
    `rebase` (the run then becomes the baseline).
    """
    if old is None:
        return None
    if sampling(old) != sampling(new):
        if rebase:
            return None
        return (
            f"mutate: this run samples {sampling(new)}, the committed results {sampling(old)}: "
            "counts do not compare; pass the committed --sample/--seed, or --rebase to replace "
            "the baseline"
        )
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


def main(argv: list[str] | None = None) -> int:
    """Run mutmut over the configured math modules, write the results, apply the ratchet."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default="", help="comma-separated, e.g. dowser.mask,dowser.scores")
    ap.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--keep", action="store_true", help="reuse mutants/, re-test non-killed ones")
    ap.add_argument("--report-only", action="store_true", help="read mutants/, do not run mutmut")
    ap.add_argument("--note", default="", help="how the run was made, kept in the results file")
    ap.add_argument(
        "--sample",
        type=float,
        default=None,
        help="share of each module's mutants "
        "tested, in (0, 1] (default: the committed results' share)",
    )
    ap.add_argument("--seed", type=int, default=None, help="which sample (default: committed)")
    ap.add_argument("--rebase", action="store_true", help="accept another sampling as baseline")
    args = ap.parse_args(argv)
    if args.sample is not None and not 0 < args.sample <= 1:
        sys.exit(f"mutate: --sample {args.sample} is not a share in (0, 1]; e.g. --sample 0.05")
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
    smp = sampling(old) if old is not None else {"share": 1.0, "seed": 0}
    smp = {
        "share": smp["share"] if args.sample is None else args.sample,
        "seed": smp["seed"] if args.seed is None else args.seed,
    }

    start = time.monotonic()
    if not args.report_only and not args.keep and WORK.exists():
        shutil.rmtree(WORK)  # a fresh run: no verdict survives a change of the tests
    if not args.report_only:
        generate_mutants(args.max_children)
    picked = {m: sample(all_mutants(paths[m]), smp["share"], smp["seed"]) for m in chosen}
    names = {n for ns in picked.values() for n in ns}
    if not args.report_only:
        if args.keep:
            forgotten = retest_survivors([paths[m] for m in chosen], names)
            print(f"mutate: re-testing {forgotten} verdicts")
        targets = sorted(names) if smp["share"] < 1 else [f"{m}.*" for m in chosen]
        print(f"mutate: testing {len(names)} mutants ({sample_words({'sample': smp})})")
        run_mutmut(
            targets if len(chosen) < len(paths) or smp["share"] < 1 else [], args.max_children
        )
    wall = time.monotonic() - start

    modules = read_verdicts([paths[m] for m in chosen], names)
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
    totals = totals_of(modules)
    res = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": None if args.report_only else round(wall, 1),
        "machine": f"{os.cpu_count()} x {cpu_model()}, {platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "mutmut": pkg_version("mutmut"),
        "torch": pkg_version("torch"),
        "max_children": args.max_children,
        "run": "report-only" if args.report_only else ("keep" if args.keep else "fresh"),
        "sample": smp,
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
    why = ratchet(old, res, rebase=args.rebase)
    if why:
        (WORK / "mutation.json").write_text(json.dumps(res, indent=2) + "\n")
        print(why, file=sys.stderr)
        return 1
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    REPORT.write_text(markdown(res, changes) + "\n")
    print(
        f"mutate: {totals['killed']} killed, {totals['survived']} survived of "
        f"{totals['mutants']} tested mutants ({totals['score']:.1%}, 95 % interval "
        f"{totals['interval'][0]:.1%} to {totals['interval'][1]:.1%}) in {wall / 60:.1f} min; baseline "
        f"{old_from}; wrote {RESULTS.relative_to(ROOT)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
