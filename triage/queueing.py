"""The worklist's ageing rule, in one pure function shared by the worklist and ``replay``.

Ranks follow :func:`triage.worker.tier_rank`: ``unscored`` 0, ``routine`` 1,
then the operating points from the lowest threshold (2, e.g. ``abnormal``)
upwards; a higher rank is read sooner. A study whose rank is below the lowest
operating point (routine or unscored; the worklist also treats ``pending``
this way) and that has waited longer than ``worklist.routine_max_wait_min``
minutes is lifted to the lowest operating point's rank, so nothing starves.
Within one rank the study that has waited longest is read first.

The worklist helper (:func:`triage.worklist.place`) applies the same rule to
bands; ``tests/test_turnaround.py`` checks the two agree.
"""

from __future__ import annotations

from typing import Any, Protocol

UNSCORED_RANK = 0
ROUTINE_RANK = 1
LIFT_RANK = 2  # the lowest operating point: where an aged study is lifted to


class AgeingConfig(Protocol):
    """What the rule reads from the config (``[worklist]``)."""

    @property
    def routine_max_wait_min(self) -> float:
        """Minutes a routine study may wait before it is lifted (0: never)."""
        ...


def is_aged(waited_min: Any, max_wait_min: float) -> Any:
    """True when a study that has waited ``waited_min`` minutes is past the limit.

    A limit of 0 (or less) turns ageing off. The comparison is strict: a study
    is lifted only once it has waited *longer* than the limit. ``waited_min``
    may be a numpy array; the result is then elementwise (or False when off).
    """
    return max_wait_min > 0 and waited_min > max_wait_min


def effective_rank(tier_rank: int, waited_min: float, cfg: AgeingConfig,
                   lift_rank: int | None = LIFT_RANK) -> int:
    """Return the rank a study is read at: its tier's rank, or ``lift_rank`` once aged.

    Only ranks below ``lift_rank`` (routine, unscored) age. Pass ``lift_rank=None``
    when the model has no operating point: nothing is lifted then, as on the worklist.
    """
    if lift_rank is not None and tier_rank < lift_rank and is_aged(waited_min,
                                                                    cfg.routine_max_wait_min):
        return lift_rank
    return tier_rank
