"""The decoder pool: results in order, and a process that dies costs only its own job."""

from __future__ import annotations

import os

from triage.inference.decoders import CRASHED, DecoderPool, timed_out

_STATE: dict[str, int] = {}


def _init(offset: int) -> None:
    _STATE["offset"] = offset


def _job(key: int, value: int) -> tuple[int, int, int]:
    if value < 0:
        os._exit(3)  # what a native decoder's abort looks like from outside
    return key, value + _STATE["offset"], os.getpid()


def _crashed(key: int, value: int, reason: str) -> tuple[int, str]:
    return key, reason


def test_results_come_back_in_order_from_initialised_processes() -> None:
    with DecoderPool(2, _job, _crashed, _init, (100,)) as pool:
        out = pool.map([(k, k * 10) for k in range(8)])
    assert [(k, v) for k, v, _ in out] == [(k, k * 10 + 100) for k in range(8)]
    assert os.getpid() not in {pid for _, _, pid in out}


def test_a_crash_costs_only_the_job_that_crashed() -> None:
    jobs = [(0, 1), (1, -1), (2, 3), (3, -5), (4, 5)]
    with DecoderPool(2, _job, _crashed, _init, (0,)) as pool:
        out = pool.map(jobs)
        again = pool.map([(9, 9)])  # the pool is usable afterwards
    assert out[1] == (1, CRASHED) and out[3] == (3, CRASHED)
    assert [o[:2] for i, o in enumerate(out) if i in (0, 2, 4)] == [(0, 1), (2, 3), (4, 5)]
    assert again[0][:2] == (9, 9)


def test_empty_map_starts_nothing() -> None:
    pool = DecoderPool(1, _job, _crashed)
    assert pool.map([]) == [] and pool._pool is None


def _hang_or_job(key: int, value: int) -> tuple[int, int, int]:
    if value == 13:
        import time

        time.sleep(3600)  # a decoder stuck in a loop on a pathological stream
    return _job(key, value)


def test_a_hung_decoder_is_stopped_and_costs_only_its_own_job() -> None:
    jobs = [(0, 1), (1, 13), (2, 3)]
    with DecoderPool(2, _hang_or_job, _crashed, _init, (0,), timeout_s=3) as pool:
        out = pool.map(jobs)
        again = pool.map([(9, 9)])  # the pool is usable afterwards
    assert out[1] == (1, timed_out(3))
    assert [out[0][:2], out[2][:2]] == [(0, 1), (2, 3)]
    assert again[0][:2] == (9, 9)


def test_callers_in_several_threads_share_the_processes_and_a_crash_is_blamed_on_its_own_job() -> None:
    import threading

    results: dict[int, list[tuple[int, object]]] = {}

    def call(who: int, jobs: list[tuple[int, int]]) -> None:
        results[who] = [o[:2] for o in pool.map(jobs)]

    with DecoderPool(2, _hang_or_job, _crashed, _init, (0,), timeout_s=30) as pool:
        calls = [(w, [(w * 100 + k, w * 100 + k) for k in range(4)]) for w in range(1, 5)]
        calls[1] = (2, [(200, 200), (201, -1), (202, 202)])  # thread 2 holds a job that crashes
        threads = [threading.Thread(target=call, args=c) for c in calls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert results[2] == [(200, 200), (201, CRASHED), (202, 202)]
    for w in (1, 3, 4):  # their jobs may have been retried alone, never blamed
        assert results[w] == [(w * 100 + k, w * 100 + k) for k in range(4)]


def test_start_runs_every_initialiser_before_the_first_job() -> None:
    import time

    with DecoderPool(2, _job, _crashed, _init, (7,)) as pool:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the processes come up by themselves
            procs = getattr(pool._pool, "_processes", None) or {}
            if len(procs) == 2:
                break
            time.sleep(0.05)
        assert len(procs) == 2
        assert pool.map([(1, 1)])[0][:2] == (1, 8)


def test_closing_with_kill_stops_a_map_in_flight_without_blaming_its_images() -> None:
    import threading

    from triage.inference.decoders import PoolClosed

    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(pool.map([(0, 1), (1, 13)]))  # 13 hangs
        except PoolClosed as e:
            outcome.append(e)

    pool = DecoderPool(2, _hang_or_job, _crashed, _init, (0,), timeout_s=600)
    pool.start()
    t = threading.Thread(target=call)
    t.start()
    import time

    time.sleep(3)  # the hanging job is running (this is not a wait for a result)
    pool.close(kill=True)
    t.join(60)
    assert not t.is_alive() and len(outcome) == 1 and isinstance(outcome[0], PoolClosed)
    try:
        pool.map([(2, 2)])
    except PoolClosed:
        pass
    else:
        raise AssertionError("a closed pool took new jobs")
    pool.start()  # a started pool takes jobs again
    assert pool.map([(3, 3)])[0][:2] == (3, 3)
    pool.close()
