"""Subcommands of retrospective validation: ``replay`` and ``archive build``.

Heavy imports happen inside the handlers so ``triage --help`` stays fast.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
from pathlib import Path
from typing import Any

from triage.cli.common import SubParsers, config_args, load_config, setup_logging
from triage.core.errors import InputError

log = logging.getLogger(__name__)


def _load_card(path: Path | None) -> dict[str, Any] | None:
    """Return the model card at ``path`` (None when no path or no file). Raises InputError if invalid."""
    if path is None or not path.exists():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read model card {path}: {e}") from e


def _replay(args: argparse.Namespace) -> int:
    from triage.replay.run import Options, Via, parse_hostport, run

    cfg = load_config(args, **{"replay.workers": args.workers})
    setup_logging(cfg.logging.level)
    card_path = Path(args.card) if args.card else (
        Path(args.model).with_suffix(".json") if args.model else cfg.model.card_path)
    via = None
    model = None
    if args.via:
        host, port = parse_hostport(args.via)
        db = cfg.database_url if cfg.database.shared else cfg.storage.db_path
        via = Via(host, port, db, args.calling_ae, args.called_ae, args.timeout)
        card = _load_card(card_path)
    else:
        from triage.inference.model import OnnxModel

        model = OnnxModel.load_files(args.model or cfg.model.onnx_path, card_path, cfg.model.threads)
        card = model.card
    profile = None
    if args.site_profile:
        from triage.profile import read_profile

        sha = str((card or {}).get("sha256", "")) or None
        profile = read_profile(args.site_profile, sha)
        if profile.adaptation is not None:
            if model is None:
                raise InputError("a site profile with an adapted model applies where the model "
                                 "runs: set it as model.site_profile in the daemon, not with --via")
            from triage.inference.model import load_adapted

            model = load_adapted(profile.adaptation, cfg.model.threads)
            card = model.card
    if args.scheduler and args.engine != "dask":
        raise InputError("--scheduler needs --engine dask")
    if args.via and args.engine != "in-process":
        raise InputError("--via sends to a running daemon: it takes no --engine")
    opts = Options(Path(args.archive), Path(args.labels), Path(args.out), cfg.replay.workers,
                   args.force, via, progress=not args.no_progress, site_profile=profile,
                   engine=args.engine, scheduler=args.scheduler)
    report = run(opts, cfg, model, card)
    log.info("replay: %d studies (%d in the metrics); AUC %s; wrote %s", report["studies"],
             report["n"], "-" if report["auc"] is None else f"{report['auc']:.4f}",
             Path(args.out) / "report.html")
    return 0


def _add_replay(sub: SubParsers) -> None:
    p = sub.add_parser(
        "replay", help="retrospective validation on a labelled DICOM archive, with turnaround",
        description="Score every study of a DICOM archive as the daemon would (or through a "
                    "running daemon with --via), then write DIR/report.json and DIR/report.html: "
                    "AUC and operating points with intervals, calibration, subgroups, drift and a "
                    "FIFO-versus-triage reading simulation. Re-runs skip studies already scored.")
    config_args(p)
    p.add_argument("archive", metavar="ARCHIVE", help="directory tree of DICOM files (DICOMDIR optional)")
    p.add_argument("--labels", metavar="CSV", required=True,
                   help="StudyInstanceUID or AccessionNumber, label (1/0)[, arrival_time, read_time]")
    p.add_argument("--out", metavar="DIR", required=True, help="where results and reports go")
    p.add_argument("--via", metavar="HOST:PORT",
                   help="send studies to this running daemon and read its results from the "
                        "database under --data-dir (its storage.data_dir)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="decoder processes, or the LocalCluster's workers with --engine dask "
                        "(override replay.workers)")
    p.add_argument("--engine", choices=("in-process", "dask"), default="in-process",
                   help="score here with a decoder pool (default), or on Dask distributed: "
                        "the same results, chunk by chunk, resumable")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="with --engine dask: a running scheduler (e.g. tcp://10.0.0.5:8786) "
                        "whose workers see the archive and the model at the same paths; "
                        "default: a LocalCluster on this machine")
    p.add_argument("--force", action="store_true", help="score every study again")
    p.add_argument("--model", metavar="ONNX", help="model file (default: model.path)")
    p.add_argument("--card", metavar="JSON", help="model card (default: the model's .json)")
    p.add_argument("--calling-ae", default="TRIAGE_SCU", help="our AE title with --via (default TRIAGE_SCU)")
    p.add_argument("--called-ae", default="TRIAGE", help="the daemon's AE title (default TRIAGE)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="S",
                   help="with --via: give up after this many seconds without a new result")
    p.add_argument("--site-profile", metavar="PROFILE",
                   help="tier with a site profile's thresholds (from `triage site calibrate`)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_replay)


def _archive_build(args: argparse.Namespace) -> int:
    from triage.replay.synthetic import BuildOptions, build

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # it narrates every tile at INFO
    try:
        start = _dt.date.fromisoformat(args.start)
    except ValueError as e:
        raise InputError(f"--start {args.start!r} is not a date (YYYY-MM-DD)") from e
    images = Path(args.images)
    labels = build(BuildOptions(images, Path(args.manifest) if args.manifest else images / "manifest.csv",
                                Path(args.out), args.split, args.limit, args.matrix, args.seed, start,
                                args.per_day, args.workers, ages=not args.no_age))
    log.info("labels written to %s", labels)
    return 0


def _add_archive(sub: SubParsers) -> None:
    p = sub.add_parser("archive", help="build a labelled DICOM archive from an image data set",
                       description="Tools for replay archives.")
    asub = p.add_subparsers(dest="archive_command", metavar="ACTION")
    asub.required = True
    b = asub.add_parser(
        "build", help="turn labelled images plus a manifest into a DICOM archive and labels CSV",
        description="Write one synthetic patient and study per image (CR/DX, MONOCHROME1/2, "
                    "12-16 bits, uncompressed/JPEG-LS/JPEG 2000, some VOI tags, some lateral "
                    "decoys), arriving on working days; and ARCHIVE/labels.csv. Deterministic "
                    "with --seed.")
    config_args(b)
    b.add_argument("--images", metavar="DIR", required=True, help="folder the manifest's paths are under")
    b.add_argument("--manifest", metavar="CSV", help="path,label,split,sha256 (default: DIR/manifest.csv)")
    b.add_argument("--out", metavar="ARCHIVE", required=True, help="archive folder to write")
    b.add_argument("--split", help="only this split (e.g. val)")
    b.add_argument("--limit", type=int, metavar="N", help="at most N images, chosen with --seed")
    b.add_argument("--matrix", type=int, default=2048, metavar="PX", help="rows of each image (default 2048)")
    b.add_argument("--seed", type=int, default=0, help="seed of every choice (default 0)")
    b.add_argument("--start", default="2025-01-06", help="first working day (default 2025-01-06)")
    b.add_argument("--per-day", type=int, default=80, metavar="N", help="studies per working day (default 80)")
    b.add_argument("--workers", type=int, default=1, metavar="N", help="encoding processes (default 1)")
    b.add_argument("--no-age", action="store_true",
                   help="leave PatientAge and PatientBirthDate out (the input guard's image check decides)")
    b.set_defaults(func=_archive_build)


def add(sub: SubParsers) -> None:
    """Add ``replay`` and ``archive``."""
    _add_replay(sub)
    _add_archive(sub)
