"""Turnaround simulation: how much sooner would abnormal studies have been read? (pure)

A reading room is modelled as ``readers`` radiologists who each read one study
at a time, taking that study's reading time (minutes). Studies arrive at known
times. Whenever a reader is free they take the next study from the queue:

- ``fifo``: the study that arrived first;
- ``triage``: the highest :func:`triage.core.worklist.effective_rank` (the tier's
  rank, lifted by the worklist's ageing rule), then the one that arrived first.

A study's *time to read* is the minutes from its arrival until its read is
finished. Both orders see the same arrivals and the same per-study reading
times, so their difference is due to the order alone. Randomness (reading
times, Poisson arrivals) comes only from the ``rng`` the caller passes.
Readers work around the clock: there are no shifts or breaks in the model.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from triage.core.tiers import LIFT_RANK
from triage.core.worklist import is_aged

POLICIES = ("fifo", "triage")


@dataclass(frozen=True)
class ReaderModel:
    """The reading room: how many readers, and how long a read takes."""

    readers: int = 1
    minutes_per_study: float = 5.0
    reading_time_cv: float = 0.0  # coefficient of variation of a read (0: fixed)

    def __post_init__(self) -> None:
        if self.readers < 1 or self.minutes_per_study <= 0 or self.reading_time_cv < 0:
            raise ValueError("readers >= 1, minutes_per_study > 0 and reading_time_cv >= 0")


def reading_times(n: int, model: ReaderModel, rng: np.random.Generator | None) -> np.ndarray:
    """Return ``n`` reading times in minutes: fixed, or gamma with the model's mean and CV.

    Raises ValueError when a CV > 0 is asked for without an ``rng``.
    """
    if model.reading_time_cv == 0:
        return np.full(n, float(model.minutes_per_study))
    if rng is None:
        raise ValueError("random reading times need an rng")
    shape = 1.0 / model.reading_time_cv ** 2
    return rng.gamma(shape, model.minutes_per_study / shape, n)


def poisson_arrivals(n: int, rate_per_hour: float, rng: np.random.Generator) -> np.ndarray:
    """Return ``n`` arrival times (minutes from 0) of a Poisson stream at ``rate_per_hour``.

    Raises ValueError for a rate <= 0.
    """
    if rate_per_hour <= 0:
        raise ValueError("the Poisson rate must be > 0")
    return np.cumsum(rng.exponential(60.0 / rate_per_hour, n))


def _pick(queue: list[int], t: float, policy: str, arrivals: np.ndarray, ranks: np.ndarray,
          max_wait_min: float, lift_rank: int | None) -> int:
    """Return the position in ``queue`` of the study a free reader takes at time ``t``."""
    q = np.asarray(queue)
    arr = arrivals[q]
    if policy == "fifo":
        return int(np.lexsort((q, arr))[0])
    eff = ranks[q].copy()
    if lift_rank is not None:
        # is_aged is written with scalar operators, so it also works elementwise here.
        aged = np.broadcast_to(is_aged(t - arr, max_wait_min), eff.shape)
        eff[(eff < lift_rank) & aged] = lift_rank
    return int(np.lexsort((q, arr, -eff))[0])


def simulate(arrivals: Sequence[float] | np.ndarray, ranks: Sequence[int] | np.ndarray,
             durations: Sequence[float] | np.ndarray,
             readers: int, policy: str, max_wait_min: float,
             lift_rank: int | None = LIFT_RANK) -> np.ndarray:
    """Return each study's finish time (minutes) when read in ``policy`` order.

    ``ranks`` are tier ranks (see :func:`triage.core.tiers.rank`); ``max_wait_min`` is the
    worklist's ageing limit (0: off); ``durations`` the
    minutes each study's read takes. Raises ValueError for an unknown policy or
    inputs of different lengths.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; expected one of {POLICIES}")
    a = np.asarray(arrivals, dtype=np.float64)
    r = np.asarray(ranks, dtype=np.int64)
    d = np.asarray(durations, dtype=np.float64)
    if not len(a) == len(r) == len(d):
        raise ValueError("arrivals, ranks and durations must have the same length")
    order = np.lexsort((np.arange(len(a)), a))
    start = float(a.min()) if len(a) else 0.0
    free = [(start, k) for k in range(readers)]  # every reader is free from the first arrival
    finish = np.empty(len(a))
    queue: list[int] = []
    nxt = done = 0
    while done < len(a):
        t, reader = heapq.heappop(free)
        while nxt < len(a) and a[order[nxt]] <= t:
            queue.append(int(order[nxt]))
            nxt += 1
        if not queue:  # nothing waiting: this reader is next free when the next study arrives
            heapq.heappush(free, (float(a[order[nxt]]), reader))
            continue
        i = queue.pop(_pick(queue, t, policy, a, r, max_wait_min, lift_rank))
        finish[i] = t + d[i]
        heapq.heappush(free, (float(finish[i]), reader))
        done += 1
    return finish


def summary(minutes: np.ndarray) -> dict[str, float | int | None]:
    """Return n, mean, median and 90th percentile of times in minutes (None when empty)."""
    if len(minutes) == 0:
        return {"n": 0, "mean": None, "median": None, "p90": None}
    m = np.asarray(minutes, dtype=np.float64)
    return {"n": len(m), "mean": float(m.mean()), "median": float(np.median(m)),
            "p90": float(np.percentile(m, 90))}


def run_once(arrivals: np.ndarray, ranks: np.ndarray, labels: np.ndarray, model: ReaderModel,
             max_wait_min: float, rng: np.random.Generator | None,
             lift_rank: int | None = LIFT_RANK) -> dict[str, dict[str, Any]]:
    """Simulate both orders once with shared reading times.

    ``labels`` holds 1, 0, or -1 for unlabelled (those are queued and read but
    not summarised). Returns {policy: {"pos": summary, "neg": summary, "all": summary}}.
    """
    durations = reading_times(len(arrivals), model, rng)
    out: dict[str, dict[str, Any]] = {}
    for policy in POLICIES:
        ttr = simulate(arrivals, ranks, durations, model.readers, policy, max_wait_min, lift_rank) - arrivals
        out[policy] = {"pos": summary(ttr[labels == 1]), "neg": summary(ttr[labels == 0]),
                       "all": summary(ttr)}
    return out


def _interval(values: Sequence[float | None], confidence: float) -> dict[str, float | None]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "ci_lower": None, "ci_upper": None}
    tail = (1 - confidence) / 2 * 100
    return {"mean": float(v.mean()), "ci_lower": float(np.percentile(v, tail)),
            "ci_upper": float(np.percentile(v, 100 - tail))}


def _reduction(run: Mapping[str, Mapping[str, Any]], stat: str) -> float | None:
    f, t = run["fifo"]["pos"][stat], run["triage"]["pos"][stat]
    return None if f is None or t is None else float(f - t)


def _relative(run: Mapping[str, Mapping[str, Any]]) -> float | None:
    f, t = run["fifo"]["pos"]["mean"], run["triage"]["pos"]["mean"]
    return None if f is None or t is None or f == 0 else float((f - t) / f)


def aggregate(runs: Sequence[Mapping[str, Mapping[str, Any]]],
              confidence: float = 0.95) -> dict[str, Any]:
    """Return the across-seed picture of several :func:`run_once` results.

    For each policy and class: the seed-average of mean, median and p90. For
    positives: the reduction (FIFO minus triage) of mean, median and p90 with a
    percentile interval across seeds, and the relative reduction of the mean.
    """
    out: dict[str, Any] = {}
    for policy in POLICIES:
        out[policy] = {}
        for cls in ("pos", "neg", "all"):
            stats = {s: _interval([r[policy][cls][s] for r in runs], confidence)["mean"]
                     for s in ("mean", "median", "p90")}
            out[policy][cls] = {"n": runs[0][policy][cls]["n"] if runs else 0, **stats}
    out["reduction_pos"] = {s: _interval([_reduction(r, s) for r in runs], confidence)
                            for s in ("mean", "median", "p90")}
    out["reduction_pos"]["relative_mean"] = _interval([_relative(r) for r in runs], confidence)
    out["seeds"] = len(runs)
    return out


def simulate_seeds(arrivals: np.ndarray | None, ranks: np.ndarray, labels: np.ndarray,
                   model: ReaderModel, max_wait_min: float, seeds: Sequence[int],
                   poisson_rate_per_hour: float, confidence: float = 0.95,
                   lift_rank: int | None = LIFT_RANK) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run :func:`run_once` for each seed and return (aggregate, per-seed runs).

    ``arrivals`` None means no arrival times are known: each seed then draws a
    Poisson stream at ``poisson_rate_per_hour`` and a random order of studies.
    """
    runs = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        if arrivals is None:
            times = poisson_arrivals(len(ranks), poisson_rate_per_hour, rng)
            arr = times[rng.permutation(len(ranks))]
        else:
            arr = np.asarray(arrivals, dtype=np.float64)
        runs.append(run_once(arr, ranks, labels, model, max_wait_min, rng, lift_rank))
    return aggregate(runs, confidence), runs
