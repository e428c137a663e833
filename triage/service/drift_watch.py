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
from triage.inference.guard import REFUSAL_PREFIXES
from triage.store.schema import Alert, DriftCheck, ImageResult

log = logging.getLogger(__name__)


def check_drift(store: Any, card: Mapping[str, Any], cfg: DriftConfig,
                expected_refusal_rate: float | None = None) -> DriftVerdict:
    """Run the drift watch on the most recent scored images; record the check and any alert.

    With ``expected_refusal_rate`` (the input guard's on validation), the share
    of the most recent images that the guard refused is judged against it.
    Returns the verdict. An alert stays active until a check passes.
    """
    with store.read() as s:
        rows = s.execute(select(ImageResult).where(ImageResult.probability.is_not(None))
                         .order_by(ImageResult.scored_at.desc()).limit(cfg.window)).scalars().all()
        scores = [r.probability for r in rows]
        # Inputs are judged on every recent image, refused ones included (an adult refused by
        # its header age is still an adult the site sends).
        recent = s.execute(select(ImageResult).order_by(ImageResult.scored_at.desc())
                           .limit(cfg.window)).scalars().all()
        meta = [{f: getattr(r, f) for f in METADATA_FIELDS} for r in recent]
        refused = sum(1 for r in recent if r.probability is None and r.reason
                      and r.reason.startswith(REFUSAL_PREFIXES))
    verdict = assess(card, scores, meta, cfg, refused=refused, judged=len(recent),
                     expected_refusal_rate=expected_refusal_rate)
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
