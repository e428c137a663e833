"""When to try again: exponential backoff for the outbox (pure)."""

from __future__ import annotations


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Return the wait after the ``attempts``-th failed attempt: initial_s * 2**(attempts - 1),
    never more than ``max_s``. Raises ValueError for attempts < 1 or a non-positive initial_s.
    """
    if attempts < 1 or initial_s <= 0:
        raise ValueError("attempts must be >= 1 and initial_s > 0")
    exponent = min(attempts - 1, 60)  # 2**60 outgrows any max_s; no float overflow
    return float(min(max_s, initial_s * 2.0**exponent))


def exhausted(attempts: int, max_attempts: int) -> bool:
    """Return True when ``attempts`` failed attempts use up the allowance (dead letter)."""
    return attempts >= max_attempts
