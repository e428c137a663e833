"""Tiers and operating points: the one definition of their order.

A model card names operating points (``abnormal``, ``urgent``, ...), each a
threshold on the calibrated probability (None: never reached). A score's tier
is the point with the highest threshold it reaches, else ``routine``; a study
with no score is ``unscored``; the worklist adds ``pending`` for studies that
have no result yet. Every ordering of tiers in triage (the worklist's bands,
the rise/fall of a tier between versions, the ageing lift, the replay's
reading simulation and report) comes from the functions here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

ROUTINE = "routine"
UNSCORED = "unscored"
PENDING = "pending"
BASE_TIERS = (ROUTINE, UNSCORED, PENDING)
BANDS = (ROUTINE, PENDING)  # the worklist's bands below the operating points

UNSCORED_RANK = 0
ROUTINE_RANK = 1
LIFT_RANK = 2  # the lowest operating point: where an aged study is lifted to

Thresholds = Mapping[str, float | None]


def operating_points(thresholds: Thresholds) -> list[tuple[str, float]]:
    """Return the reachable operating points, lowest threshold first (ties by name)."""
    return sorted(((n, float(t)) for n, t in thresholds.items()
                   if t is not None and n not in BASE_TIERS), key=lambda nt: (nt[1], nt[0]))


def ordered(thresholds: Thresholds) -> list[tuple[str, float | None]]:
    """Return every operating point, lowest threshold first, unreachable ones (None) last."""
    reachable = operating_points(thresholds)
    never = sorted((n, None) for n, t in thresholds.items() if t is None and n not in BASE_TIERS)
    return [*reachable, *never]


def priority(probability: float | None, thresholds: Thresholds) -> str:
    """Return the tier of ``probability``: the name of the highest threshold it reaches.

    Returns ``routine`` when no threshold is reached and ``unscored`` for a None
    or NaN probability.
    """
    if probability is None or not math.isfinite(probability):
        return UNSCORED
    reached = [n for n, t in operating_points(thresholds) if probability >= t]
    return reached[-1] if reached else ROUTINE


def rank(tier: str, thresholds: Thresholds) -> int:
    """Return how soon a tier is read: pending 0, routine and unscored 1, then points from the
    lowest up.

    An unscored study (refused by the guard, or unreadable) is never demoted below a routine
    one: it keeps its first-come place among them. A tier the thresholds do not name (a
    result from an older model) ranks with ``routine``.
    """
    if tier == PENDING:
        return UNSCORED_RANK
    if tier == UNSCORED:  # a refused or unreadable study is read in its first-come place
        return ROUTINE_RANK
    names = [n for n, _ in operating_points(thresholds)]
    return LIFT_RANK + names.index(tier) if tier in names else ROUTINE_RANK


def lift_tier(thresholds: Thresholds) -> str | None:
    """Return the tier an aged study is lifted into: the lowest reachable point, or None."""
    points = operating_points(thresholds)
    return points[0][0] if points else None


def band_order(thresholds: Thresholds, tiers: Iterable[str] = ()) -> list[str]:
    """Return the worklist's bands, most urgent first.

    Operating points by threshold, highest first (unreachable ones after them);
    tiers in ``tiers`` that the thresholds do not name follow; then routine (where unscored
    studies sit in their first-come place) and pending.
    """
    points = [n for n, _ in sorted(operating_points(thresholds), key=lambda nt: (-nt[1], nt[0]))]
    points += [n for n, t in ordered(thresholds) if t is None]
    unknown = sorted({t for t in tiers if t not in thresholds and t not in BASE_TIERS})
    return [*points, *unknown, *BANDS]


def change(before: str | None, after: str, thresholds: Thresholds) -> str | None:
    """Return "rise", "fall" or None for a tier that went from ``before`` to ``after``."""
    if before is None or rank(before, thresholds) == rank(after, thresholds):
        return None
    return "rise" if rank(after, thresholds) > rank(before, thresholds) else "fall"


def study_outcome(probs: Iterable[float], thresholds: Thresholds) -> tuple[float | None, str]:
    """Return a study's (probability, tier): the maximum over its eligible images.

    A study without an eligible image has (None, ``unscored``).
    """
    values = list(probs)
    if not values:
        return None, UNSCORED
    p = max(values)
    return p, priority(p, thresholds)
