"""``triage outbox list`` and ``triage outbox retry``: the dead letters of results sent to the PACS,
the RIS (HL7) or the EHR (FHIR)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from triage.cli.common import SubParsers, config_args, load_config

if TYPE_CHECKING:
    from triage.store.repository import Store


def _store(args: argparse.Namespace) -> Store:
    """Return the daemon's store (not migrated: that is `serve`'s job). Raises TriageError."""
    from triage.core.errors import TriageError
    from triage.store.database import make_engine
    from triage.store.repository import Store

    cfg = load_config(args)
    if not cfg.database.shared and not cfg.storage.db_path.exists():
        raise TriageError(f"no database at {cfg.storage.db_path}: has `triage serve` run with "
                          "this data directory?")
    return Store(make_engine(cfg.database_url))


def _list(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from triage.store import outbox

    store = _store(args)
    try:
        dead = outbox.dead_letters(store, args.limit)
    finally:
        store.engine.dispose()
    if args.json:
        print(json.dumps([dataclasses.asdict(d) for d in dead], indent=2))
        return 0
    if not dead:
        print("no dead letters: every result object was sent or is still being tried")
    for d in dead:
        print(f"#{d.delivery_id} dead: {d.kind} of study #{d.study_id} v{d.result_version} "
              f"(sop {d.sop_uid_hash}) to {d.destination} after {d.attempts} attempt(s): "
              f"{d.last_error or 'no error recorded'}")
    return 0


def _retry(args: argparse.Namespace) -> int:
    import time

    from triage.store import outbox

    store = _store(args)
    try:
        n = outbox.retry(store, time.time(), args.destination)
    finally:
        store.engine.dispose()
    where = f" for {args.destination}" if args.destination else ""
    print(f"queued {n} dead letter(s){where} again; a running `triage serve` sends them shortly")
    return 0


def add(sub: SubParsers) -> None:
    """Add ``outbox`` with its ``list`` and ``retry`` subcommands."""
    p = sub.add_parser("outbox", help="results sent to the PACS, RIS or EHR: list and retry dead letters",
                       description="The durable outbox of SRs, overlays, HL7 and FHIR messages "
                                   "sent to the destinations in [[results.destinations]]. "
                                   "A dead letter's error may quote what the destination "
                                   "answered.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    q = actions.add_parser("list", help="list the dead letters (objects that ran out of attempts)")
    config_args(q)
    q.add_argument("--limit", type=int, default=100, metavar="N", help="show at most N (100)")
    q.add_argument("--json", action="store_true", help="print JSON instead of text")
    q.set_defaults(func=_list)
    r = actions.add_parser("retry", help="queue the dead letters again with fresh attempts",
                           description="Move dead letters back to pending with a fresh "
                                       "allowance of results.max_attempts attempts.")
    config_args(r)
    r.add_argument("--destination", metavar="NAME",
                   help="only this destination's (its name, or AE@host:port)")
    r.set_defaults(func=_retry)
