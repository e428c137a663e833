"""The scheduled drift watch: recent image scores from the database, judged by :mod:`triage.core.drift`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update

from triage.config import DriftConfig
from triage.core.drift import METADATA_FIELDS, DriftVerdict, assess
from triage.store.schema import Alert, DriftCheck, ImageResult

log = logging.getLogger(__name__)


def check_drift(store: Any, card: Mapping[str, Any], cfg: DriftConfig) -> DriftVerdict:
    """Run the drift watch on the most recent scored images; record the check and any alert.

    Returns the verdict. An alert stays active until a check passes.
    """
    with store.read() as s:
        rows = s.execute(select(ImageResult).where(ImageResult.probability.is_not(None))
                         .order_by(ImageResult.scored_at.desc()).limit(cfg.window)).scalars().all()
        scores = [r.probability for r in rows]
        meta = [{f: getattr(r, f) for f in METADATA_FIELDS} for r in rows]
    verdict = assess(card, scores, meta, cfg)
    now = time.time()
    with store.write() as s:
        s.add(DriftCheck(at=now, n=verdict.n, psi=verdict.psi, ks=verdict.ks,
                         unseen=json.dumps(verdict.unseen), alert=verdict.alert,
                         summary=verdict.summary))
        s.execute(update(Alert).where(Alert.kind == "drift", Alert.active.is_(True))
                  .values(active=False))
        if verdict.alert:
            s.add(Alert(at=now, kind="drift", message=f"{verdict.summary}. {verdict.action}",
                        active=True))
    (log.warning if verdict.alert else log.info)("drift check: %s", verdict.summary)
    return verdict
