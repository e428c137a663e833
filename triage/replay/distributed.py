"""``triage replay --engine dask``: the same scoring, spread over a Dask cluster.

The archive is cut into the chunks the in-process engine scores one after
the other (:func:`chunks`), and each chunk becomes one Dask task. A task runs
the daemon's own code in the worker process: :func:`triage.imaging.prepare.prepare`
per image, the input guard, batched onnxruntime inference
(:func:`triage.inference.scoring.infer`) and the study rule
(:func:`triage.replay.scorers.make_record`). The chunks and their batches are
the in-process engine's, so the records are the same (a test checks it).

Each chunk's records are appended to ``results.jsonl`` as it finishes, in
whatever order chunks finish, so an interrupted run resumes where it stopped
and a progress bar counts studies. Without ``--scheduler`` a LocalCluster of
``replay.workers`` single-threaded processes runs on this machine; with one,
every Dask worker must see the archive and the model at the same paths
(shared storage). A worker that dies takes its chunk to another worker
(Dask's own retry); the decoder pool's per-image timeout does not apply here.

Only replay imports Dask: the daemon never does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triage.config import GuardConfig
from triage.replay.archive import ArchiveStudy
from triage.replay.records import StudyRecord

log = logging.getLogger(__name__)

# Per worker process: the model, the guard and the preprocessing chain, built once.
_WORKER: dict[str, Any] = {}


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the model and tier as the caller does (picklable)."""

    onnx_path: str
    card: dict[str, Any]
    threads: int
    thresholds: dict[str, float | None]
    batch_size: int
    guard: GuardConfig


def chunks(todo: Sequence[ArchiveStudy], workers: int) -> list[list[ArchiveStudy]]:
    """Cut ``todo`` into the chunks the in-process engine scores (4 studies per worker)."""
    per_chunk = max(4, 4 * workers)
    return [list(todo[i:i + per_chunk]) for i in range(0, len(todo), per_chunk)]


def _loaded(spec: ModelSpec) -> tuple[Any, Any]:
    """The worker's model and guard for ``spec`` (loaded at its first chunk)."""
    key = (spec.onnx_path, spec.threads, spec.guard)
    if _WORKER.get("key") != key:
        from triage.imaging import prepare
        from triage.inference.guard import load_guard
        from triage.inference.model import OnnxModel

        model = OnnxModel(spec.onnx_path, spec.card, spec.threads)
        guard = load_guard(spec.guard, spec.card)
        prepare.init(spec.card, guard.input_card)
        _WORKER.update(key=key, model=model, guard=guard)
    return _WORKER["model"], _WORKER["guard"]


def score_chunk(studies: list[ArchiveStudy], spec: ModelSpec) -> list[StudyRecord]:
    """Score one chunk in this (worker) process; return one record per study, in order.
    Raises nothing for bad images: each becomes an unscored image with the daemon's reason."""
    from triage.imaging import prepare
    from triage.inference.scoring import infer
    from triage.replay.scorers import records_of

    model, guard = _loaded(spec)
    jobs = [(k, inst.path, inst.transfer_syntax)
            for k, inst in enumerate(i for s in studies for i in s.instances)]
    prepared = [prepare.prepare(*job) for job in jobs]
    if guard is not None:
        guard.judge(prepared)
    scores = infer(model, prepared, spec.batch_size)
    return records_of(studies, prepared, scores, spec.thresholds, str(spec.card.get("sha256", "")))


def client(scheduler: str | None, workers: int) -> Any:
    """A Dask client on ``scheduler`` (an address), or on a new LocalCluster of ``workers``
    single-threaded processes (no dashboard). Raises OSError when the scheduler cannot be
    reached."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler, timeout="30s")
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.WARNING)
    return Client(cluster)


def run_dask(todo: Sequence[ArchiveStudy], spec: ModelSpec, workers: int,
             scheduler: str | None, save: Callable[[list[StudyRecord]], None]) -> None:
    """Score ``todo`` on Dask, calling ``save`` with each chunk's records as it finishes."""
    from dask.distributed import as_completed

    c = client(scheduler, workers)
    try:
        parts = chunks(todo, workers)
        log.info("dask: %d chunks of up to %d studies on %s", len(parts), len(parts[0]),
                 c.scheduler.address)
        futures = [c.submit(score_chunk, chunk, spec, pure=False) for chunk in parts]
        for fut in as_completed(futures):
            save(fut.result())
    finally:
        cluster = c.cluster if scheduler is None else None
        c.close()
        if cluster is not None:
            cluster.close()


def model_spec(model: Any, cfg: Any, thresholds: dict[str, float | None]) -> ModelSpec:
    """The picklable description of ``model`` (an OnnxModel) that Dask workers load."""
    return ModelSpec(str(Path(model.path).resolve()), dict(model.card), cfg.model.threads,
                     dict(thresholds), cfg.worker.batch_size, cfg.guard)
