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
decoder holds hundreds of MB). :meth:`DecoderPool.start` starts every process
and runs its initialiser (importing torch and MONAI takes seconds of CPU) at
once, without waiting for them, rather than when the first study arrives.

Several threads may call :meth:`DecoderPool.map` at once (the worker scores
studies side by side). Their jobs share the processes; a deadline counts the
jobs queued ahead; and the one-at-a-time retry after a crash or a timeout runs
alone, so that a crash is only ever blamed on the job that caused it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

log = logging.getLogger(__name__)

CRASHED = "pixel data crashed the decoder"


class PoolClosed(RuntimeError):
    """The pool was closed while jobs were still wanted (the daemon is stopping)."""


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


def _ready() -> int:
    """A job that does nothing: submitted once per process to start it early."""
    return os.getpid()


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
        # Held to submit, and for the whole of a one-at-a-time retry (see the module's docstring).
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()
        self._outstanding = 0  # jobs submitted and not finished
        self._closed = False

    def __enter__(self) -> DecoderPool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the worker processes now, each running its initialiser (without waiting)."""
        with self._lock:
            self._closed = False
            if self._pool is None:
                self._pool = self._new_pool()
                for _ in range(self.processes):  # one job per process starts them all
                    self._pool.submit(_ready)

    def _new_pool(self) -> ProcessPoolExecutor:
        ctx = multiprocessing.get_context("forkserver")
        parent = os.getpid() if self.watch_parent else None
        return ProcessPoolExecutor(self.processes, mp_context=ctx, initializer=_start,
                                   initargs=(parent, self.init, self.initargs))

    def _restart(self) -> None:
        if self._closed:
            raise PoolClosed("the decoder pool was closed")
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
        """Submit one job; its future may raise BrokenProcessPool (or CancelledError when
        another caller's retry restarted the processes)."""
        with self._lock:
            if self._closed:
                raise PoolClosed("the decoder pool was closed")
            if self._pool is None:
                self.start()
            assert self._pool is not None
            f = self._pool.submit(self.job, *args)
        with self._count_lock:
            self._outstanding += 1
        f.add_done_callback(self._finished)
        return f

    def _finished(self, _: Future[Any]) -> None:
        with self._count_lock:
            self._outstanding -= 1

    def map(self, jobs: Sequence[Sequence[Any]]) -> list[Any]:
        """Return each job's result, in order. Raises nothing for a crashed process."""
        if not jobs:
            return []
        try:
            with self._lock:
                with self._count_lock:
                    ahead = self._outstanding
                futures = [self.submit(j) for j in jobs]
            if self.timeout_s is None:
                return [f.result() for f in futures]
            # Each image may take timeout_s of one process: the jobs queued ahead and these
            # get that many rounds.
            rounds = -(-(ahead + len(jobs)) // self.processes)
            _, late = wait(futures, timeout=self.timeout_s * rounds)
            if not late:
                return [f.result() for f in futures]
            log.error("%d image(s) still decoding after %g s; decoding these images one at a "
                      "time", len(late), self.timeout_s * rounds)
        except BrokenProcessPool:
            log.error("a decoder process died; decoding these images one at a time")
        except CancelledError:
            log.warning("decoder processes were restarted meanwhile; decoding these images "
                        "one at a time")
        with self._lock:
            if self._closed:  # killed by close(kill=True): nobody wants these answers now
                raise PoolClosed("the decoder pool was closed")
            return self._one_at_a_time(jobs)

    def _one_at_a_time(self, jobs: Sequence[Sequence[Any]]) -> list[Any]:
        """Run each job alone in fresh processes (the caller holds the lock)."""
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

    def close(self, wait: bool = True, kill: bool = False) -> None:
        """Shut the processes down, cancelling what has not started; with ``kill``, kill
        them at once (for a caller whose jobs are all answered: a process may still be
        starting). Later calls raise :class:`PoolClosed` until :meth:`start`."""
        self._closed = True  # first: a one-at-a-time retry holding the lock stops at its next job
        with self._lock:
            self._closed = True
            if self._pool is not None:
                if kill:
                    self._kill(self._pool)
                else:
                    self._pool.shutdown(wait=wait, cancel_futures=True)
                self._pool = None
