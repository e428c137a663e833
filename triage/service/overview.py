"""``triage status``: what the daemon has, at a glance, read straight from the database."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from triage.config import Config
from triage.core.errors import TriageError
from triage.service.datadir import DataDirLock
from triage.store import outbox
from triage.store import schema as db
from triage.store.database import current_revision, make_engine
from triage.store.leases import leader_holder
from triage.store.repository import Store
from triage.store.schema import DriftCheck, Rejection, Result


def gather(cfg: Config) -> dict[str, Any]:
    """Return the status as a JSON-ready dict. Raises TriageError when there is no database."""
    path = cfg.storage.db_path
    if not cfg.database.shared and not path.exists():
        raise TriageError(f"no database at {path}: has `triage serve` run with this data directory?")
    engine = make_engine(cfg.database_url)
    try:
        store = Store(engine)
        counts = store.counts()
        with store.read() as s:
            failed_results = s.scalar(select(func.count()).select_from(Result)
                                      .where(Result.state == db.FAILED)) or 0
            last = s.scalar(select(DriftCheck).order_by(DriftCheck.at.desc()).limit(1))
            last_source = s.scalar(select(Result.thresholds_source)
                                   .order_by(Result.id.desc()).limit(1))
            day_ago = time.time() - 86400
            rejected = s.scalar(select(func.count()).select_from(Rejection)
                                .where(Rejection.at >= day_ago)) or 0
        sends = outbox.totals(store)
        pulled = _pull_states(store)
        revision = current_revision(engine)
        leader = leader_holder(store) if cfg.database.shared else None
    finally:
        engine.dispose()
    if cfg.database.shared:
        # Several daemons, perhaps on several machines: the leader lease names one of them.
        daemon: dict[str, Any] = {"leader": None if leader is None else leader[0],
                                  "leader_lease_left_s": None if leader is None else
                                  round(max(0.0, leader[1] - time.time()), 1)}
    else:
        pid = DataDirLock(cfg.storage.root).holder()
        daemon = {"running": pid is not None, "pid": pid or None}
    return {
        "daemon": daemon,
        "database": engine.url.render_as_string(hide_password=True) if cfg.database.shared
        else str(path), "schema_revision": revision,
        "studies": counts, "failed_results": failed_results,
        "backlog": counts[db.COMPLETE], "receiving": counts[db.RECEIVING],
        "refused_last_24h": rejected,
        "last_drift_check": None if last is None else {
            "at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.at)),
            "n": last.n, "psi": last.psi, "ks": last.ks, "alert": last.alert,
            "summary": last.summary},
        "outbox": {**{state: sum(d[state] for d in sends.values()) for state in db.OUTBOX_STATES},
                   "destinations": sends,
                   "configured": [d.label for d in cfg.results.destinations]},
        "pull": {src.name: pulled.get(src.name) for src in cfg.pull.sources},
        "model": _model(cfg),
        "thresholds": {"configured_site_profile": cfg.model.site_profile or None,
                       "last_result": last_source},
    }


def _pull_states(store: Store) -> dict[str, dict[str, Any]]:
    """Each pull source's last poll as recorded (empty before revision 0014 is applied)."""
    import dataclasses

    from sqlalchemy.exc import OperationalError, ProgrammingError

    from triage.store import pulls

    try:
        return {name: dataclasses.asdict(st) for name, st in pulls.states(store).items()}
    except (OperationalError, ProgrammingError):
        return {}


def _pull_line(name: str, st: dict[str, Any] | None) -> str:
    def when(t: float | None) -> str:
        return "never" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    if st is None:
        return f"  {name}: not polled yet"
    if st["failures"]:
        return (f"  {name}: FAILING ({st['failures']} poll(s) in a row; next try "
                f"{when(st['next_try_at'])}): {st['last_error']}; last success "
                f"{when(st['last_ok_at'])}")
    return (f"  {name}: ok, last poll {when(st['last_poll_at'])}, {st['retrieved_total']} "
            "instance(s) retrieved in all")


def _model(cfg: Config) -> dict[str, Any]:
    card_path = cfg.model.card_path
    try:
        card = json.loads(Path(card_path).read_text())
    except (OSError, ValueError):
        return {"path": str(cfg.model.onnx_path), "card": "missing or unreadable"}
    return {"name": card.get("name"), "sha256": card.get("sha256"), "path": str(cfg.model.onnx_path)}


def _daemon_line(d: dict[str, Any]) -> str:
    if "leader" in d:  # a shared database: several daemons
        if d["leader"] is None or not d["leader_lease_left_s"]:
            return "daemons: NO LEADER holds the lease (is any `triage serve` running?)"
        return f"daemons: leader {d['leader']} (lease {d['leader_lease_left_s']:g} s left)"
    if not d["running"]:
        return ("daemon: NOT RUNNING on this data directory (start it with `triage serve`); "
                "the figures below are from its database")
    return f"daemon: running (pid {d['pid']})" if d["pid"] else "daemon: running"


def render(st: dict[str, Any]) -> str:
    """Return the status as a few human-readable lines."""
    s = st["studies"]
    d = st["daemon"]
    lines = [
        _daemon_line(d),
        "studies: " + ", ".join(f"{state} {s[state]}" for state in db.STUDY_STATES),
        f"backlog: {st['backlog']} complete stud{'y' if st['backlog'] == 1 else 'ies'} waiting to be scored",
        f"refused C-STOREs in the last 24 h: {st['refused_last_24h']}",
    ]
    d = st["last_drift_check"]
    lines.append("last drift check: never" if d is None else
                 f"last drift check: {d['at']} {'ALERT' if d['alert'] else 'ok'}: {d['summary']}")
    lines.append(_outbox_line(st["outbox"]))
    if st["pull"]:
        lines.append("pull sources:")
        lines += [_pull_line(name, p) for name, p in st["pull"].items()]
    m = st["model"]
    lines.append(f"model: {m.get('name')} sha256 {str(m.get('sha256'))[:12]} ({m['path']})")
    t = st["thresholds"]
    lines.append("thresholds: " + (f"site profile {t['configured_site_profile']}"
                                   if t["configured_site_profile"] else "the model card's")
                 + (f"; last result scored with the {t['last_result']}" if t["last_result"] else ""))
    lines.append(f"database: {st['database']} (schema {st['schema_revision']})")
    return "\n".join(lines)


def _outbox_line(o: dict[str, Any]) -> str:
    if not o["destinations"] and not o["configured"]:
        return "results out: none (no [[results.destinations]] configured)"
    line = (f"results out (PACS, RIS, EHR): {o[db.PENDING]} pending, {o[db.SENT]} sent, "
            f"{o[db.DEAD]} dead letter{'' if o[db.DEAD] == 1 else 's'}")
    if o[db.DEAD]:
        line += " (`triage outbox list` shows them, `triage outbox retry` queues them again)"
    for dest, n in sorted(o["destinations"].items()):
        line += f"\n  {dest}: {n[db.PENDING]} pending, {n[db.SENT]} sent, {n[db.DEAD]} dead"
    return line
