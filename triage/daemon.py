"""Wiring: :func:`build_daemon` assembles the daemon; :func:`serve` runs it until SIGTERM.

Tests start the same wired daemon non-blocking on free ports and stop it
cleanly, so what is tested is what runs.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from dicom_io.scp import ScpSettings, StoreScp
from dicom_io.spool import Spool
from triage import db
from triage.config import Config
from triage.errors import TriageError
from triage.store import Store
from triage.worker import ScoringWorker

log = logging.getLogger(__name__)


class _Periodic(threading.Thread):
    """Run ``fn`` every ``interval`` seconds until stopped; errors are logged, not fatal."""

    def __init__(self, name: str, interval: float, fn: Any) -> None:
        super().__init__(name=name, daemon=True)
        self.interval, self.fn = interval, fn
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.fn()
            except Exception:
                log.exception("periodic job %s failed", self.name)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=5)


@dataclass
class Daemon:
    """The wired daemon. ``start()`` returns at once; ``stop()`` shuts down cleanly."""

    cfg: Config
    store: Store
    spool: Spool
    scp: StoreScp
    worker: ScoringWorker
    _jobs: list[_Periodic] = field(default_factory=list)

    @property
    def dicom_port(self) -> int:
        """The bound DICOM port."""
        return self.scp.port

    def start(self) -> None:
        """Recover the spool, then start the listener and the background jobs."""
        self.spool.cleanup_temp()
        self.store.reconcile(self.spool)
        self.scp.start()
        self.worker.start()
        quiet = self.cfg.studies.quiet_period_s
        self._jobs = [
            _Periodic("complete-studies", self.cfg.studies.sweep_interval_s,
                      lambda: self.store.complete_quiet_studies(quiet)),
            _Periodic("drift-watch", self.cfg.drift.interval_s, self.check_drift),
        ]
        for job in self._jobs:
            job.start()

    def check_drift(self) -> Any:
        """Run the drift watch now; returns its verdict."""
        from triage.drift import check_drift

        return check_drift(self.store, self.worker.model.card, self.cfg.drift)

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting associations, finish those in flight, stop the jobs."""
        self.scp.stop(drain_timeout_s)
        for job in self._jobs:
            job.stop()
        self.worker.stop()
        self.store.engine.dispose()


def scp_settings(cfg: Config) -> ScpSettings:
    """Translate the config's DICOM section into listener settings."""
    d = cfg.dicom
    return ScpSettings(
        host=d.host, port=d.port, ae_title=d.ae_title,
        allowed_calling_aes=d.allowed_calling_aes, accept_any_calling_ae=d.accept_any_calling_ae,
        max_associations=d.max_associations, max_pdu=d.max_pdu,
        network_timeout_s=d.network_timeout_s, dimse_timeout_s=d.dimse_timeout_s,
        acse_timeout_s=d.acse_timeout_s,
    )


def build_daemon(cfg: Config) -> Daemon:
    """Open and migrate the database, open the spool and wire the listener.

    Returns a Daemon that is not yet started. Raises TriageError when the data
    directory cannot be used.
    """
    st = cfg.storage
    try:
        st.root.mkdir(parents=True, exist_ok=True)
        spool = Spool(st.spool_dir, fsync=st.fsync, min_free_bytes=st.min_free_mb * 2**20)
    except OSError as e:
        raise TriageError(f"data directory {st.root} is not usable: {e.strerror or e}") from e
    store = Store(db.open_db(st.db_path))
    model = load_model(cfg)
    worker = ScoringWorker(cfg, store, model, st.root)
    return Daemon(cfg, store, spool, StoreScp(scp_settings(cfg), spool, store), worker)


def load_model(cfg: Config) -> Any:
    """Load the configured ONNX model and its card. Raises TriageError when unusable."""
    import triage.compat  # noqa: F401  (before monai)
    from triage.scoring import OnnxModel

    m = cfg.model
    if not m.onnx_path.exists():
        raise TriageError(f"model file {m.onnx_path} not found (config key model.path)")
    return OnnxModel.load_files(m.onnx_path, m.card_path, threads=m.threads)


def serve(cfg: Config) -> int:
    """Run the daemon until SIGTERM or SIGINT; return the exit status."""
    daemon = build_daemon(cfg)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s: finishing associations in flight, then exiting",
                 signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        daemon.start()
    except OSError as e:
        raise TriageError(f"cannot listen on {cfg.dicom.host}:{cfg.dicom.port}: "
                          f"{e.strerror or e}") from e
    log.info("triage is running; data in %s", cfg.storage.root)
    stop.wait()
    daemon.stop()
    log.info("triage stopped cleanly")
    return 0
