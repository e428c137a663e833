"""The decoder pool: image jobs in separate processes, where a crash costs one image.

Decoding (JPEG 2000 costs about 0.5 s of CPU per radiograph) and the MONAI
chain run in a pool of processes, which also uses the cores; and a native
decoder that aborts on a corrupt stream (GDCM does) then kills a helper
process, never the caller. When a process dies, the batch is retried one job
at a time in fresh processes, so only the job that crashes is lost, and it is
answered by the caller's ``on_crash``. The daemon and ``triage replay`` use
this one pool with the same job functions.

Processes are started with ``forkserver``, never forked from a process that
holds the listener's threads and sockets, and each exits by itself once its
parent is gone (after a ``kill -9`` nobody would tell it, and an orphaned
decoder holds hundreds of MB).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger(__name__)

CRASHED = "pixel data crashed the decoder"


def timed_out(seconds: float) -> str:
    """The reason given for an image whose decoding was stopped after ``seconds``."""
    return f"decoding took longer than {seconds:g} s and was stopped"


def _exit_with(parent_pid: int, interval_s: float = 1.0) -> None:
    """Exit this process once ``parent_pid`` is gone."""
    while True:
        time.sleep(interval_s)
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass  # the pid exists under another user: the parent is alive


def _start(parent_pid: int | None, init: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    if parent_pid is not None:
        threading.Thread(target=_exit_with, args=(parent_pid,), name="orphan-watch",
                         daemon=True).start()
    if init is not None:
        init(*initargs)


class DecoderPool:
    """Runs ``job(*args)`` for each args tuple in worker processes, isolating crashes.

    ``on_crash(*args, CRASHED)`` answers for a job whose process died, and
    ``on_crash(*args, timed_out(timeout_s))`` for one still running after
    ``timeout_s`` (its process is killed: a hung decoder never stops the
    others). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, processes: int, job: Callable[..., Any],
                 on_crash: Callable[..., Any], init: Callable[..., Any] | None = None,
                 initargs: tuple[Any, ...] = (), watch_parent: bool = True,
                 timeout_s: float | None = None) -> None:
        self.processes, self.job, self.on_crash = processes, job, on_crash
        self.init, self.initargs = init, initargs
        self.watch_parent = watch_parent
        self.timeout_s = timeout_s
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> DecoderPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes (they start lazily otherwise)."""
        if self._pool is None:
            self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("forkserver")
        parent = os.getpid() if self.watch_parent else None
        return ProcessPoolExecutor(self.processes, mp_context=ctx, initializer=_start,
                                   initargs=(parent, self.init, self.initargs))

    def _restart(self) -> None:
        if self._pool is not None:
            self._kill(self._pool)
        self._pool = self._new_pool()

    @staticmethod
    def _kill(pool: ProcessPoolExecutor) -> None:
        """Shut ``pool`` down without waiting, killing its processes (one may be hung)."""
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.kill()

    def submit(self, args: Sequence[Any]) -> Future[Any]:
        """Submit one job; its future may raise BrokenProcessPool."""
        self.start()
        assert self._pool is not None
        return self._pool.submit(self.job, *args)

    def map(self, jobs: Sequence[Sequence[Any]]) -> list[Any]:
        """Return each job's result, in order. Raises nothing for a crashed process."""
        if not jobs:
            return []
        try:
            futures = [self.submit(j) for j in jobs]
            if self.timeout_s is None:
                return [f.result() for f in futures]
            # Each image may take timeout_s of one process: the whole batch gets that many rounds.
            rounds = -(-len(jobs) // self.processes)
            _, late = wait(futures, timeout=self.timeout_s * rounds)
            if not late:
                return [f.result() for f in futures]
            log.error("%d image(s) still decoding after %g s; decoding these images one at a "
                      "time", len(late), self.timeout_s * rounds)
        except BrokenProcessPool:
            log.error("a decoder process died; decoding these images one at a time")
        out = []
        for j in jobs:
            self._restart()
            try:
                out.append(self.submit(j).result(timeout=self.timeout_s))
            except BrokenProcessPool:
                out.append(self.on_crash(*j, CRASHED))
            except TimeoutError:
                log.error("an image took longer than %g s to decode; its decoder was stopped",
                          self.timeout_s)
                out.append(self.on_crash(*j, timed_out(self.timeout_s or 0.0)))
        self._restart()
        return out

    def close(self, wait: bool = True) -> None:
        """Shut the processes down, cancelling what has not started."""
        if self._pool is not None:
            self._pool.shutdown(wait=wait, cancel_futures=True)
            self._pool = None
