"""Backoff for the outbox: doubling from the initial wait, capped, never negative."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triage.core.retry import backoff_s, exhausted


def test_backoff_doubles_then_caps() -> None:
    assert [backoff_s(n, 10.0, 900.0) for n in range(1, 9)] == [
        10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 900.0]


@given(st.integers(1, 10_000), st.floats(0.001, 1e4), st.floats(0.001, 1e6))
def test_backoff_is_monotonic_and_bounded(n: int, initial: float, cap: float) -> None:
    cap = max(cap, initial)
    a, b = backoff_s(n, initial, cap), backoff_s(n + 1, initial, cap)
    assert initial <= a <= b <= cap


def test_backoff_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        backoff_s(0, 1.0, 2.0)


def test_dead_letter_after_the_allowance() -> None:
    assert not exhausted(2, 3) and exhausted(3, 3)
