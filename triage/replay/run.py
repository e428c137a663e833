"""``triage replay`` end to end: scan, score what is left, write report.json and report.html.

:func:`run` is the one entry point (the CLI calls it, and so do tests). It
resumes from ``DIR/results.jsonl`` unless ``force`` is set.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from triage import __version__
from triage.core import tiers
from triage.core.errors import InputError, TriageError
from triage.core.tiers import UNSCORED
from triage.files import write_atomic
from triage.profile import SiteProfile, applied_thresholds, thresholds_source
from triage.replay.archive import ArchiveStudy, Skipped, scan_archive
from triage.replay.labels import read_labels
from triage.replay.records import ResultsFile, StudyRecord, check_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Via:
    """Where the running daemon is, and how to reach its results."""

    host: str
    port: int
    db_path: Path | str  # the SQLite file, or a shared database's URL
    calling_ae: str = "TRIAGE_SCU"
    called_ae: str = "TRIAGE"
    timeout_s: float = 600.0  # most seconds without any new result before giving up
    poll_s: float = 0.5


@dataclass(frozen=True)
class Options:
    """What one replay run does."""

    archive: Path
    labels: Path
    out: Path
    workers: int = 2
    force: bool = False
    via: Via | None = None
    progress: bool = True
    site_profile: SiteProfile | None = None
    engine: str = "in-process"  # or "dask"
    scheduler: str | None = None  # a Dask scheduler's address; None: a LocalCluster

ENGINES = ("in-process", "dask")


def parse_hostport(text: str) -> tuple[str, int]:
    """Return (host, port) from "HOST:PORT". Raises InputError when malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--via {text!r} is not HOST:PORT")
    return host, int(port)


def _in_process(todo: Sequence[ArchiveStudy], model: Any, cfg: Any, workers: int,
                save: Callable[[list[StudyRecord]], None], profile: SiteProfile | None) -> None:
    from triage.inference.guard import load_guard
    from triage.replay.scorers import InProcessScorer

    thresholds = applied_thresholds(model.thresholds, profile, cfg.worker.tier_overrides)
    per_chunk = max(4, 4 * workers)
    guard = load_guard(cfg.guard, model.card)
    with InProcessScorer(model, thresholds, workers, cfg.worker.batch_size, guard) as scorer:
        for i in range(0, len(todo), per_chunk):
            save(scorer.score(todo[i:i + per_chunk]))


def _dask(todo: Sequence[ArchiveStudy], opts: Options, model: Any, cfg: Any,
          save: Callable[[list[StudyRecord]], None]) -> None:
    from triage.replay.distributed import model_spec, run_dask

    thresholds = applied_thresholds(model.thresholds, opts.site_profile, cfg.worker.tier_overrides)
    run_dask(todo, model_spec(model, cfg, thresholds), opts.workers, opts.scheduler, save)


def _via(todo: Sequence[ArchiveStudy], via: Via, save: Callable[[list[StudyRecord]], None]) -> None:
    """Send every study, then collect results until all are in or none came for ``timeout_s``.

    Raises TriageError when the daemon leaves studies without a result.
    """
    from triage.replay.scorers import ViaScorer

    scorer = ViaScorer(via.host, via.port, via.db_path, via.calling_ae, via.called_ae)
    pending: dict[str, tuple[ArchiveStudy, list[str]]] = {}
    try:
        for s in todo:
            problems = scorer.send(s)
            if len(problems) == len(s.instances):  # nothing stored: the daemon will never score it
                save([_not_stored(s, problems)])
            else:
                pending[s.study_uid] = (s, problems)
        last = time.monotonic()
        while pending:
            got = scorer.collect(s for s, _ in pending.values())
            if got:
                save([_merge(rec, pending.pop(uid)[1]) for uid, rec in got.items()])
                last = time.monotonic()
            elif time.monotonic() - last > via.timeout_s:
                raise TriageError(f"{len(pending)} studies have no result from the daemon after "
                                  f"{via.timeout_s:.0f} s; re-run to collect them")
            else:
                time.sleep(via.poll_s)
    finally:
        scorer.close()


def _not_stored(s: ArchiveStudy, problems: list[str]) -> StudyRecord:
    return StudyRecord(s.study_uid, s.accession_number, "unscored", None, UNSCORED, problems, [],
                       s.patient_sex, s.study_date, s.study_time, "", "via")


def _merge(rec: StudyRecord, problems: list[str]) -> StudyRecord:
    return replace(rec, reasons=[*rec.reasons, *problems]) if problems else rec


def _score(todo: Sequence[ArchiveStudy], opts: Options, model: Any, cfg: Any,
           store: ResultsFile, total: int) -> list[StudyRecord]:
    """Score ``todo``, appending each chunk's records to ``store``; return them."""
    new: list[StudyRecord] = []
    bar = tqdm(total=total, initial=total - len(todo), unit="study", desc="replay",
               disable=not opts.progress)

    def save(records: list[StudyRecord]) -> None:
        store.append(records)
        new.extend(records)
        bar.update(len(records))

    try:
        if not todo:
            pass  # everything was scored by an earlier run: start no decoder or association
        elif opts.via is not None:
            _via(todo, opts.via, save)
        elif opts.engine == "dask":
            _dask(todo, opts, model, cfg, save)
        else:
            _in_process(todo, model, cfg, opts.workers, save, opts.site_profile)
    finally:
        bar.close()
    return new


def _thresholds(records: Sequence[StudyRecord], model: Any, cfg: Any) -> tuple[dict[str, Any], list[str]]:
    """Return the thresholds the results were tiered with, and warnings if they differ."""
    seen = [json.dumps(r.thresholds, sort_keys=True) for r in records if r.thresholds]
    if model is not None and hasattr(model, "thresholds"):
        mine = json.dumps({**model.thresholds, **cfg.worker.tier_overrides}, sort_keys=True)
        seen = seen or [mine]
    if not seen:
        return {}, ["no operating-point thresholds are known for these results"]
    common = Counter(seen).most_common()
    note = (f"results were tiered with {len(common)} different threshold sets; "
            "the commonest is reported")
    warnings = [note] if len(common) > 1 else []
    return dict(json.loads(common[0][0])), warnings


def _retier(records: Sequence[StudyRecord], thresholds: dict[str, float | None]
            ) -> list[StudyRecord]:
    """Return the records tiered at ``thresholds`` (a site profile applied to earlier scores)."""
    return [replace(r, tier=tiers.priority(r.probability, thresholds), thresholds=dict(thresholds))
            for r in records]


def _meta(opts: Options, card: Mapping[str, Any] | None, records: Sequence[StudyRecord],
          skipped: Sequence[Skipped], warnings: list[str]) -> dict[str, Any]:
    shas = {r.model_sha256 for r in records if r.model_sha256}
    card_sha = str((card or {}).get("sha256", ""))
    if card_sha and shas - {card_sha}:
        warnings.append(f"some results come from a model other than the model card's "
                        f"({card_sha[:12]}...): drift and card comparison may not apply")
    return {"triage_version": __version__, "archive": str(opts.archive),
            "archive_name": opts.archive.name, "labels": str(opts.labels),
            "mode": f"via {opts.via.host}:{opts.via.port}" if opts.via else opts.engine,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "model_name": str((card or {}).get("name", "unknown")),
            "model_sha256": card_sha or min(shas, default=""),
            "thresholds_source": thresholds_source(opts.site_profile),
            "site_profile": str(opts.site_profile.path.resolve()) if opts.site_profile else None,
            "skipped_files": {"count": len(skipped),
                              "reasons": dict(Counter(s.reason for s in skipped))},
            "warnings": warnings}


def _selftest(model: Any, cfg: Any, warnings: list[str]) -> dict[str, Any] | None:
    """Return the model self-test on this CPU (None for a scorer without a session); a
    mismatch or an unusable card block becomes a warning on the report."""
    from triage.inference import selftest

    if getattr(model, "session", None) is None:
        return None
    try:
        result = selftest.check(model.session, model.card, model.path, cfg.model.threads)
    except TriageError as e:
        warnings.append(f"model self-test not possible: {e}")
        return None
    if not result.ok:
        warnings.append(f"{result.message}: this replay's scores may differ from what the "
                        f"model scores on the machine that validated it")
    return result.to_dict()


def run(opts: Options, cfg: Any, model: Any = None, card: Mapping[str, Any] | None = None
        ) -> dict[str, Any]:
    """Replay ``opts.archive``; write DIR/results.jsonl, report.json and report.html.

    In-process mode needs ``model`` (an OnnxModel); ``--via`` needs none, and
    ``card`` (the model card) is used for drift and the card comparison when
    given. Returns the report. Raises InputError for bad inputs and TriageError
    when the daemon does not deliver every result.
    """
    from triage.replay.html import render
    from triage.replay.report import build_report

    if opts.via is None and model is None:
        raise InputError("in-process replay needs a model")
    if opts.engine not in ENGINES:
        raise InputError(f"unknown replay engine {opts.engine!r} (one of {', '.join(ENGINES)})")
    card = card if card is not None else getattr(model, "card", None)
    labels = read_labels(opts.labels)
    studies, skipped = scan_archive(opts.archive)
    if not studies:
        raise InputError(f"archive {opts.archive} holds no DICOM study")
    store = ResultsFile(opts.out, opts.force)
    done = store.load()
    check_model(done, str((card or {}).get("sha256", "")) if opts.via is None else "", opts.force)
    todo = [s for s in studies if s.study_uid not in done]
    log.info("%d studies, %d already scored, %d to score", len(studies), len(studies) - len(todo), len(todo))
    new = {r.study_uid: r for r in _score(todo, opts, model, cfg, store, len(studies))}
    records = [new.get(s.study_uid) or done[s.study_uid] for s in studies]
    warnings: list[str] = []
    if opts.site_profile is not None:
        thresholds = applied_thresholds({}, opts.site_profile, cfg.worker.tier_overrides)
        records = _retier(records, thresholds)
    else:
        thresholds, warnings = _thresholds(records, model if opts.via is None else None, cfg)
    report, inputs = build_report(records, labels, thresholds, card, cfg)
    if report["unmatched_labels"]["count"]:
        log.warning("%d label rows match no study in the archive (listed in report.json)",
                    report["unmatched_labels"]["count"])
    meta = _meta(opts, card, records, skipped, warnings)
    if opts.via is None:
        meta["selftest"] = _selftest(model, cfg, warnings)
    report = {"meta": meta, **report}
    write_atomic(opts.out / "report.json", json.dumps(report, indent=2, allow_nan=False))
    write_atomic(opts.out / "report.html", render(report, inputs))
    return report
