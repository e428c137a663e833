"""``triage pull``: a backfill from one pull source, or a dry run that lists what it would get."""

from __future__ import annotations

import argparse
import re

from triage.cli.common import SubParsers, config_args, load_config
from triage.core.errors import InputError

_SINCE = re.compile(r"(\d{1,3})d?")


def since_days(text: str) -> int:
    """Days from ``--since`` ("7d" or "7"). Raises InputError outside 1..365."""
    m = _SINCE.fullmatch(text.strip())
    if m is None or not 1 <= int(m.group(1)) <= 365:
        raise InputError(f"--since {text!r}: give a number of days from 1 to 365, e.g. 7d")
    return int(m.group(1))


def _pull(args: argparse.Namespace) -> int:
    from dicom_io.ids import uid_hash
    from dicom_io.scp import StoreScp
    from dicom_io.spool import Spool
    from triage.core.errors import TriageError
    from triage.service.daemon import open_store, scp_settings
    from triage.service.datadir import DataDirLock
    from triage.service.pull import Puller

    cfg = load_config(args)
    src = cfg.pull.source(args.source)
    days = since_days(args.since) if args.since else src.lookback_days
    if (src.retrieve == "c-move" and not args.dry_run and not cfg.database.shared
            and DataDirLock(cfg.storage.root).holder() is None):
        raise TriageError(f"{src.name} retrieves by C-MOVE to our listener, and no `triage serve` "
                          f"runs on {cfg.storage.root}: start it first (or use --dry-run)")
    st = cfg.storage
    spool = Spool(st.spool_dir, fsync=st.fsync, min_free_bytes=st.min_free_mb * 2**20)
    store = open_store(cfg)
    try:
        # C-GET's instances arrive on our own association: they take the listener's path here.
        scp = StoreScp(scp_settings(cfg), spool, store)
        report = Puller(cfg, store, scp).poll(src.name, days, dry_run=args.dry_run)
    finally:
        store.engine.dispose()
    verb = "would retrieve" if args.dry_run else "retrieved"
    for w in report.wanted:
        print(f"study {uid_hash(w.study_uid)} of {w.study_date or 'no date'}: {verb} "
              f"{w.new_instances} instance(s) in {len(w.series)} series")
    done = sum(w.new_instances for w in report.wanted) if args.dry_run else report.retrieved
    print(f"{src.name}: {report.studies_found} stud{'y' if report.studies_found == 1 else 'ies'} "
          f"in the last {days} day(s); {verb} {done} instance(s) of {len(report.wanted)}"
          + (f"; {report.failed} failed" if report.failed else ""))
    for e in report.errors:
        print(f"error: {e}")
    for e in report.partial:
        print(f"incomplete: {e}")
    return 0 if report.ok and not report.partial else 1


def add(sub: SubParsers) -> None:
    """Add ``pull``."""
    p = sub.add_parser("pull", help="backfill from a pull source (C-FIND, then C-MOVE or C-GET)",
                       description="Query one [[pull.sources]] PACS for the studies of the last "
                       "days and retrieve what this node does not hold, through the same durable "
                       "path as the daemon's polls. C-MOVE sends to the running daemon's "
                       "listener; C-GET stores here.")
    config_args(p)
    p.add_argument("--source", required=True, metavar="NAME", help="the source's name")
    p.add_argument("--since", metavar="Nd", help="days back from today (default: the source's "
                   "lookback_days), e.g. 7d")
    p.add_argument("--dry-run", action="store_true", help="list what would be retrieved; "
                   "retrieve and record nothing")
    p.set_defaults(func=_pull)
