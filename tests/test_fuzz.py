"""Fuzzing the one reader: every hostile input ends in a typed error or a valid image.

Seeded mutations (truncation, flipped bits, random bytes, huge integers and declared sizes,
duplicated or cut slices) of synthetic DICOMs (native 8/16-bit, implicit VR, deflated, JPEG
Baseline, RLE), PNGs and JPEGs, of real RSNA and Kermany files from ../shared/data when
present, and of bombs (deflate, compressed-frame, JPEG, PNG, element floods); see
:mod:`fuzzing`. No case may raise anything but a :class:`~pneumoloc.errors.PneumolocError`,
take more than a few seconds, or allocate more than a bound; ``benchmarks/fuzz_inputs.py``
runs the same cases by the ten thousand (docs/robustness.md).
"""

from __future__ import annotations

import collections
import resource
import time
import tracemalloc

import pytest

import fuzzing

N_CASES = 300
SEED = 14
# Python-visible allocations of one case beyond its input: the 16 MiB header budget of a
# deflated DICOM, or the limit's 4 Mpx x 16 bits twice, with slack (a 1 GiB bomb needed 3 GB).
MAX_CASE_BYTES = 48_000_000
MAX_CASE_SECONDS = 5.0
MAX_RSS_GROWTH_MB = 300


@pytest.mark.timeout(180)
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_fuzzed_inputs_end_in_typed_errors_or_valid_images() -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    crashes: list[str] = []
    worst_bytes = (0, "")
    worst_seconds = (0.0, "")
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tracemalloc.start()
    try:
        for case in fuzzing.cases(N_CASES, seed=SEED):
            held = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            started = time.perf_counter()
            try:
                outcome = fuzzing.run_case(case)
            except Exception as exc:  # a crash: reported below, with the case
                outcome = "crash"
                crashes.append(f"{case.label}: {type(exc).__name__}: {exc}"[:300])
            seconds = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1] - held
            outcomes[outcome] += 1
            worst_bytes = max(worst_bytes, (peak, case.label))
            worst_seconds = max(worst_seconds, (seconds, case.label))
    finally:
        tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before

    assert not crashes, "\n".join(crashes)
    assert sum(outcomes.values()) == N_CASES
    assert outcomes[fuzzing.OK] > 0 and outcomes["ImageTooLargeError"] > 0, outcomes
    assert outcomes["TruncatedImageError"] > 0, outcomes
    assert worst_bytes[0] < MAX_CASE_BYTES, worst_bytes
    assert worst_seconds[0] < MAX_CASE_SECONDS, worst_seconds
    assert rss_growth < MAX_RSS_GROWTH_MB, rss_growth


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_bomb_is_refused_or_read_at_the_limit() -> None:
    """The bombs as built: those past the limit are refused as too large or corrupt, the two
    built exactly at the limit are read."""
    at_limit = {"deflate-at-limit.dcm", "png-at-limit.png"}
    for name, data in fuzzing.bombs():
        outcome = fuzzing.run_case(fuzzing.Case(0, name, "none", data))
        if name in at_limit:
            assert outcome == fuzzing.OK, name
        else:
            assert outcome in ("ImageTooLargeError", "TruncatedImageError"), (name, outcome)


def test_cases_are_reproducible() -> None:
    first = [(c.seed_name, c.mutation, c.data) for c in fuzzing.cases(60, seed=3)]
    again = [(c.seed_name, c.mutation, c.data) for c in fuzzing.cases(60, seed=3)]
    assert first == again
    assert {c.mutation for c in fuzzing.cases(200, seed=3)} == set(fuzzing.MUTATIONS)
