"""The long run of the reader's fuzz test: 10,000 or more hostile inputs, counted by outcome.

Runs the cases of ``tests/fuzzing.py`` (the suite's ``tests/test_fuzz.py`` runs 300 of them)
through ``read_xray_bytes`` with the fuzz pixel limit (4 Mpx) and ``min_size=64``, and prints,
as markdown: the count of each outcome (``ok`` or the typed error), the outcomes per mutation,
crashes (any other exception) with their case, the slowest case, the largest Python-visible
allocation of one case (tracemalloc, beyond the input) and the process's peak resident memory.

``--bombs-only`` runs only the unmutated bombs and reports each one's outcome, time and peak;
run it with ``PYTHONPATH`` pointing at an older checkout to compare (see docs/robustness.md).

Usage::

    PYTHONPATH=src .venv/bin/python benchmarks/fuzz_inputs.py --cases 10000
    PYTHONPATH=src .venv/bin/python benchmarks/fuzz_inputs.py --bombs-only
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import resource
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzzing  # tests/fuzzing.py, shared with the suite
import pneumoloc


def _run(case: fuzzing.Case) -> tuple[str, str | None]:
    try:
        return fuzzing.run_case(case), None
    except Exception as exc:  # a crash: counted and listed
        return "crash: " + type(exc).__name__, f"{case.label}: {type(exc).__name__}: {exc}"[:300]


def run_cases(n: int, seed: int, real: int, trace: bool) -> dict:
    outcomes: collections.Counter[str] = collections.Counter()
    by_mutation: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    crashes: list[str] = []
    slowest = (0.0, "")
    largest = (0, "")
    if trace:
        tracemalloc.start()
    started = time.perf_counter()
    for case in fuzzing.cases(n, seed=seed, real_limit=real):
        held = tracemalloc.get_traced_memory()[0] if trace else 0
        if trace:
            tracemalloc.reset_peak()
        t = time.perf_counter()
        outcome, crash = _run(case)
        seconds = time.perf_counter() - t
        if trace:
            largest = max(largest, (tracemalloc.get_traced_memory()[1] - held, case.label))
        slowest = max(slowest, (seconds, case.label))
        outcomes[outcome] += 1
        by_mutation[case.mutation][outcome] += 1
        if crash:
            crashes.append(crash)
    return {
        "cases": n,
        "seed": seed,
        "seconds": time.perf_counter() - started,
        "outcomes": dict(outcomes.most_common()),
        "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
        "crashes": crashes,
        "slowest_case": {"seconds": slowest[0], "case": slowest[1]},
        "largest_case": {"bytes": largest[0], "case": largest[1]} if trace else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_bombs() -> list[dict]:
    rows = []
    tracemalloc.start()
    for name, data in fuzzing.bombs():
        case = fuzzing.Case(0, name, "none", data)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        t = time.perf_counter()
        outcome, crash = _run(case)
        rows.append(
            {
                "bomb": name,
                "bytes": len(data),
                "outcome": outcome,
                "seconds": time.perf_counter() - t,
                "peak_mib": (tracemalloc.get_traced_memory()[1] - held) / 2**20,
                "crash": crash,
            }
        )
    tracemalloc.stop()
    return rows


def _machine() -> str:
    return (
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, pneumoloc from {Path(pneumoloc.__file__).parent}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--real", type=int, default=4, help="real files per data set and class")
    parser.add_argument("--no-trace", action="store_true", help="skip the per-case tracemalloc")
    parser.add_argument("--bombs-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # corrupt files make pydicom and Pillow warn by the thousand

    print(f"machine: {_machine()}\ncommand: {' '.join(sys.argv)}\n")
    if args.bombs_only:
        rows = run_bombs()
        print("| bomb | file bytes | outcome | seconds | peak MiB |\n|---|---:|---|---:|---:|")
        for r in rows:
            print(
                f"| {r['bomb']} | {r['bytes']:,} | {r['outcome']} | {r['seconds']:.2f} | "
                f"{r['peak_mib']:.1f} |"
            )
        result: object = rows
    else:
        res = run_cases(args.cases, args.seed, args.real, trace=not args.no_trace)
        print(f"{res['cases']} cases (seed {res['seed']}) in {res['seconds']:.0f} s\n")
        print("| outcome | cases |\n|---|---:|")
        for outcome, count in res["outcomes"].items():
            print(f"| {outcome} | {count} |")
        names = list(res["outcomes"])
        print("\n| mutation | " + " | ".join(names) + " |")
        print("|---|" + "---:|" * len(names))
        for mutation, counts in res["by_mutation"].items():
            print(f"| {mutation} | " + " | ".join(str(counts.get(n, 0)) for n in names) + " |")
        print(f"\ncrashes: {len(res['crashes'])}")
        for line in res["crashes"][:50]:
            print("  " + line)
        print(
            f"slowest case: {res['slowest_case']['seconds']:.2f} s ({res['slowest_case']['case']})"
        )
        if res["largest_case"]:
            mib = res["largest_case"]["bytes"] / 2**20
            print(f"largest case: {mib:.1f} MiB traced ({res['largest_case']['case']})")
        print(f"peak resident memory of the run: {res['peak_rss_mib']:.0f} MiB")
        result = res
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
