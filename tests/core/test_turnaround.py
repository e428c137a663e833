"""The turnaround simulation on cases solvable by hand, its invariants, and the shared ageing rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triage.core import turnaround
from triage.core.tiers import LIFT_RANK
from triage.core.tiers import rank as tier_rank
from triage.core.turnaround import ReaderModel, simulate
from triage.core.worklist import Row, effective_rank, is_aged, place

OFF = 0.0
ROUTINE, ABNORMAL, URGENT = 1, 2, 3


def ttr(arrivals: list[float], ranks: list[int], durations: list[float], policy: str,
        readers: int = 1, ageing=OFF) -> list[float]:  # type: ignore[no-untyped-def]
    fin = simulate(arrivals, ranks, durations, readers, policy, ageing)
    return [round(float(f - a), 9) for f, a in zip(fin, arrivals, strict=True)]


# --- by hand ---------------------------------------------------------------------

def test_one_reader_fifo_reads_in_arrival_order() -> None:
    # 0-10 study 0; 10-20 study 1; 20-30 study 2.
    assert ttr([0, 1, 2], [ROUTINE, ROUTINE, ABNORMAL], [10, 10, 10], "fifo") == [10, 19, 28]


def test_one_reader_triage_reads_the_abnormal_study_first_once_it_is_waiting() -> None:
    # At t=0 only study 0 is there; at t=10 study 2 (abnormal) goes before study 1.
    assert ttr([0, 1, 2], [ROUTINE, ROUTINE, ABNORMAL], [10, 10, 10], "triage") == [10, 29, 18]


def test_higher_tier_first_then_longest_waiting() -> None:
    # All wait at t=10: urgent (3), then the two abnormal ones by arrival, then routine.
    got = ttr([0, 1, 2, 3, 4], [ROUTINE, ABNORMAL, ROUTINE, URGENT, ABNORMAL], [10] * 5, "triage")
    # order: 0 (0-10), 3 (10-20), 1 (20-30), 4 (30-40), 2 (40-50)
    assert got == [10, 29, 48, 17, 36]


def test_ageing_lifts_a_routine_study_that_waited_longer_than_the_limit() -> None:
    # At t=10 study 1 has waited 9 min. Limit 5: lifted to the abnormal rank; it
    # arrived before study 2, so it is read first, as in FIFO.
    args = ([0, 1, 2], [ROUTINE, ROUTINE, ABNORMAL], [10, 10, 10])
    assert ttr(*args, "triage", ageing=5.0) == [10, 19, 28]
    # Limit 9: it has waited exactly 9, not longer, so it is not lifted.
    assert ttr(*args, "triage", ageing=9.0) == [10, 29, 18]


def test_two_readers() -> None:
    arr, ranks, dur = [0, 0, 0, 0], [ROUTINE, ROUTINE, ABNORMAL, ABNORMAL], [10, 10, 10, 10]
    assert ttr(arr, ranks, dur, "fifo", readers=2) == [10, 10, 20, 20]
    assert ttr(arr, ranks, dur, "triage", readers=2) == [20, 20, 10, 10]


def test_an_idle_reader_waits_for_the_next_arrival() -> None:
    assert ttr([0, 100], [ROUTINE, ROUTINE], [10, 10], "fifo") == [10, 10]


def test_reduction_for_positives_with_fixed_reading_times() -> None:
    arrivals = np.array([0.0, 1.0, 2.0])
    ranks = np.array([ROUTINE, ROUTINE, ABNORMAL])
    labels = np.array([0, -1, 1])  # study 1 is unlabelled: queued, not summarised
    agg, runs = turnaround.simulate_seeds(arrivals, ranks, labels, ReaderModel(1, 10.0, 0.0), OFF,
                                          range(3), 8.0)
    assert agg["fifo"]["pos"] == {"n": 1, "mean": 28.0, "median": 28.0, "p90": 28.0}
    assert agg["triage"]["pos"]["mean"] == 18.0 and agg["triage"]["neg"]["mean"] == 10.0
    assert agg["fifo"]["all"]["n"] == 3
    assert agg["reduction_pos"]["mean"] == {"mean": 10.0, "ci_lower": 10.0, "ci_upper": 10.0}
    assert agg["reduction_pos"]["relative_mean"]["mean"] == pytest.approx(10 / 28)
    assert agg["seeds"] == 3 and len(runs) == 3


def test_no_known_arrivals_draws_a_poisson_stream_per_seed() -> None:
    ranks = np.array([ROUTINE, ABNORMAL] * 50)
    labels = np.array([0, 1] * 50)
    agg, runs = turnaround.simulate_seeds(None, ranks, labels, ReaderModel(1, 5.0, 0.5), OFF,
                                          range(4), 10.0)
    means = [r["fifo"]["pos"]["mean"] for r in runs]
    assert len(set(means)) == 4  # each seed its own arrivals and reading times
    lo, hi = agg["reduction_pos"]["mean"]["ci_lower"], agg["reduction_pos"]["mean"]["ci_upper"]
    assert lo <= agg["reduction_pos"]["mean"]["mean"] <= hi


def test_reading_times_and_poisson_arrivals_have_the_configured_means() -> None:
    rng = np.random.default_rng(0)
    t = turnaround.reading_times(40_000, ReaderModel(1, 6.0, 0.5), rng)
    assert t.mean() == pytest.approx(6.0, rel=0.02) and t.std() / t.mean() == pytest.approx(0.5, rel=0.03)
    assert set(turnaround.reading_times(3, ReaderModel(1, 6.0, 0.0), None)) == {6.0}
    gaps = np.diff(turnaround.poisson_arrivals(40_000, 12.0, rng))
    assert gaps.mean() == pytest.approx(5.0, rel=0.02)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        simulate([0], [1], [1], 1, "lifo", OFF)
    with pytest.raises(ValueError):
        simulate([0, 1], [1], [1], 1, "fifo", OFF)
    with pytest.raises(ValueError):
        ReaderModel(0, 5.0)


# --- invariants -------------------------------------------------------------------

cases = st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 60), min_size=n, max_size=n),
    st.lists(st.integers(0, 3), min_size=n, max_size=n),
    st.lists(st.integers(1, 15), min_size=n, max_size=n),
    st.integers(1, 3), st.sampled_from([0.0, 5.0, 30.0])))


@settings(max_examples=150, deadline=None)
@given(cases)
def test_every_study_is_read_once_and_the_work_is_conserved(case) -> None:  # type: ignore[no-untyped-def]
    arrivals, ranks, durations, readers, wait = case
    a, d = np.array(arrivals, float), np.array(durations, float)
    fins = {p: simulate(a, ranks, d, readers, p, wait) for p in turnaround.POLICIES}
    for fin in fins.values():
        assert np.all(fin >= a + d)  # nothing is read before it arrives
        starts = sorted(zip(fin - d, fin, strict=True))
        # at no moment do more than `readers` reads overlap
        events = sorted([(s, 1) for s, _ in starts] + [(f, -1) for _, f in starts],
                        key=lambda e: (e[0], e[1]))
        assert max(np.cumsum([e for _, e in events])) <= readers
    if readers == 1:
        # one reader who never idles while work waits ends at the same time in any order
        assert fins["fifo"].max() == pytest.approx(fins["triage"].max())
        order = np.lexsort((np.arange(len(a)), a))
        assert np.all(np.diff(fins["fifo"][order]) > 0)


# --- the ageing rule is the worklist's ----------------------------------------------

THRESHOLDS = {"abnormal": 0.3, "urgent": 0.8}


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["routine", "unscored", "abnormal", "urgent"]), st.integers(0, 20_000),
       st.integers(0, 300))
def test_queueing_rule_agrees_with_the_worklist(tier: str, waited_s: int, max_wait_min: int) -> None:
    placed = place(Row(study_id=1, tier=tier, waiting_since=0.0), float(waited_s), THRESHOLDS,
                   float(max_wait_min))
    rank = tier_rank(tier, THRESHOLDS)
    lifted = effective_rank(rank, waited_s / 60.0, float(max_wait_min))
    assert placed.aged == (lifted != rank)
    if placed.aged:
        assert lifted == LIFT_RANK == tier_rank(placed.band, THRESHOLDS)


def test_ageing_is_off_at_zero_and_without_operating_points() -> None:
    assert effective_rank(ROUTINE, 10_000.0, 0.0) == ROUTINE
    assert not is_aged(10_000.0, 0.0)
    assert effective_rank(ROUTINE, 200.0, 120.0, None) == ROUTINE
