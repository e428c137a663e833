"""LIME explanations on demand, computed in the background and cached beside the heatmaps.

The study page asks (a button per image); :class:`Explainer` queues the image
and a thread hands each one to a fresh helper process (``forkserver``, as the
decoder pool starts its own), which prepares the spooled file with the model
card's chain (:func:`triage.imaging.prepare.prepare`, so MONAI and torch stay
out of the serving process), runs :func:`triage.inference.explain.lime_map`
against the ONNX model in onnxruntime, and writes the overlay PNG atomically,
readable by the daemon's user only. A crash or a stuck job costs that one
explanation. The cached file's name carries the study version, so new images
(a new version) get a new explanation; the file is served from ``heatmaps/``
like the Grad-CAM overlays.

Paths come from the database (the instance's spool path) and from a digest of the
Study Instance UID, never from header values.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_io.ids import uid_key

log = logging.getLogger(__name__)

TIMEOUT_S = 300.0
MAX_PENDING = 16
COMPUTING, READY, FAILED = "computing", "ready", "failed"
CRASHED = "the explanation could not be computed (the daemon's log has the details)"


def lime_relpath(study_uid: str, instance_id: int, version: int) -> str:
    """Return the cached LIME overlay's path relative to the data directory."""
    key = uid_key(study_uid)
    return f"heatmaps/{key[:2]}/{key}/i{instance_id}_v{version}_lime.png"


@dataclass(frozen=True)
class Target:
    """One image to explain: where it is spooled and where its overlay goes."""

    instance_id: int
    spool_path: str
    transfer_syntax: str | None
    relpath: str  # the overlay, relative to the data directory


def explain_file(path: str, transfer_syntax: str | None, model_path: str, card: dict[str, Any],
                 out: str, samples: int, segments: int, seed: int) -> str | None:
    """Prepare one file with the card's chain, explain the model's P(abnormal) with LIME and
    write the overlay PNG at ``out``; return None, or the reason it could not be explained.

    Runs in a helper process (it loads the MONAI chain).
    """
    import numpy as np

    from triage.files import write_atomic
    from triage.imaging.heatmap import overlay, png_bytes, upsample
    from triage.imaging.prepare import display_copy, init, prepare
    from triage.inference.explain import lime_map
    from triage.inference.model import onnx_session

    init(card)
    p = prepare(0, path, transfer_syntax)
    if p.x is None:
        return p.reason or "the image could not be read"
    mean, std = float(card["preprocess"]["mean"]), float(card["preprocess"]["std"])
    sess = onnx_session(model_path, threads=1)  # leave the cores to scoring

    def predict(grey: np.ndarray) -> np.ndarray:
        x = ((grey - mean) / std)[:, None].astype(np.float32)
        return np.asarray(sess.run(["probability"], {"image": x})[0])

    grey = np.asarray(p.x[0], dtype=np.float64) * std + mean
    lm = lime_map(grey, predict, samples, segments, seed)
    shown = p.display if p.display is not None else display_copy(grey)
    rgb = overlay(shown, upsample(lm.heat, shown.shape[:2]))
    write_atomic(out, png_bytes(rgb))
    return None


def _child(conn: Any, args: tuple[Any, ...]) -> None:
    try:
        conn.send(explain_file(*args))
    except Exception:  # reported to the parent in words; the traceback goes to the log
        logging.getLogger(__name__).exception("LIME explanation failed")
        conn.send(CRASHED)
    finally:
        conn.close()


class Explainer:
    """Queues LIME explanations and computes them one at a time in helper processes."""

    def __init__(self, data_root: Path, model_path: Path, card: dict[str, Any],
                 samples: int = 1000, segments: int = 50, seed: int = 0,
                 timeout_s: float = TIMEOUT_S) -> None:
        self.data_root, self.model_path, self.card = Path(data_root), Path(model_path), card
        self.samples, self.segments, self.seed, self.timeout_s = samples, segments, seed, timeout_s
        self._queue: queue.Queue[Target | None] = queue.Queue(MAX_PENDING)
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._failed: dict[str, str] = {}
        self._thread: threading.Thread | None = None
        self._proc: Any = None
        self._closed = False

    def state(self, relpath: str) -> tuple[str | None, str | None]:
        """Return (state, reason) of an overlay: ready, computing, failed (with the reason),
        or (None, None) when nobody asked yet."""
        with self._lock:
            if relpath in self._pending:
                return COMPUTING, None
            if relpath in self._failed:
                return FAILED, self._failed[relpath]
        if (self.data_root / relpath).is_file():
            return READY, None
        return None, None

    def request(self, target: Target) -> str:
        """Ask for ``target``'s explanation; return its state afterwards (a full queue leaves
        it unasked: None is returned as "busy")."""
        st, _ = self.state(target.relpath)
        if st in (READY, COMPUTING) or self._closed:
            return st or "busy"
        with self._lock:
            self._failed.pop(target.relpath, None)
            try:
                self._queue.put_nowait(target)
            except queue.Full:
                return "busy"
            self._pending.add(target.relpath)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lime", daemon=True)
                self._thread.start()
        return COMPUTING

    def close(self) -> None:
        """Stop: the job in hand is ended, queued ones are dropped."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.kill()
        if self._thread is not None:
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._closed:
            target = self._queue.get()
            if target is None:
                return
            try:
                reason = self._compute(target)
            except Exception:
                log.exception("LIME explanation of image #%d failed", target.instance_id)
                reason = CRASHED
            with self._lock:
                self._pending.discard(target.relpath)
                if reason is not None:
                    self._failed[target.relpath] = reason
            if reason is None:
                log.info("LIME explanation of image #%d ready", target.instance_id)
            else:
                log.warning("LIME explanation of image #%d: %s", target.instance_id, reason)

    def _compute(self, t: Target) -> str | None:
        ctx = multiprocessing.get_context("forkserver")
        parent, child = ctx.Pipe(duplex=False)
        args = (t.spool_path, t.transfer_syntax, str(self.model_path), self.card,
                str(self.data_root / t.relpath), self.samples, self.segments, self.seed)
        proc = ctx.Process(target=_child, args=(child, args), name="lime", daemon=True)
        self._proc = proc
        proc.start()
        child.close()
        try:
            if not parent.poll(self.timeout_s):
                proc.kill()
                return f"the explanation took longer than {self.timeout_s:g} s and was stopped"
            try:
                reason: str | None = parent.recv()
            except EOFError:
                return CRASHED
            return reason
        finally:
            proc.join(timeout=10)
            parent.close()
            self._proc = None
