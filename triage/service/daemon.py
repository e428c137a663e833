"""Wiring: :func:`build_daemon` assembles the daemon; :func:`serve` runs it until SIGTERM.

Tests start the same wired daemon non-blocking on free ports and stop it
cleanly, so what is tested is what runs.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Any

from dicom_io.scp import ScpSettings, StoreScp
from dicom_io.spool import Spool
from dicom_io.store_status import Refusal
from triage.config import Config
from triage.core.errors import TriageError
from triage.inference import selftest
from triage.inference.guard import load_guard
from triage.inference.model import OnnxModel
from triage.profile import SiteProfile, applied_thresholds, drift_reference, read_profile
from triage.service.datadir import DataDirLock, check_ports
from triage.service.explain import Explainer
from triage.service.health import CONTENT_TYPE as METRICS_CONTENT_TYPE
from triage.service.health import CountingRecorder, Metrics, health
from triage.service.jobs import Jobs
from triage.service.pull import Puller
from triage.service.sender import OutboxSender
from triage.service.worker import ScoringWorker
from triage.store.database import open_db, unavailable
from triage.store.leases import LeaderLease, node_id, release_all
from triage.store.repository import Store
from triage.web.app import Ops, build_app
from triage.web.pages import ModelInfo, Pages
from triage.web.security import check_exposure
from triage.web.server import WebServer
from triage.web.stow import StowReceiver

log = logging.getLogger(__name__)

# On a spool several daemons share, a temp file younger than this may be another
# daemon's C-STORE in progress; older ones are leftovers of a crash.
SHARED_TEMP_GRACE_S = 3600.0
# Jobs that only the leader runs when several daemons share the database.
LEADER_JOBS = ("complete-studies", "render-worklist", "drift-watch", "purge-reported",
               "render-on-change")


@dataclass
class Daemon:
    """The wired daemon. ``start()`` returns at once; ``stop()`` shuts down cleanly."""

    cfg: Config
    store: Store
    spool: Spool
    scp: StoreScp
    worker: ScoringWorker
    pages: Pages
    web: WebServer
    sender: OutboxSender
    jobs: Jobs = field(default_factory=Jobs)
    puller: Puller | None = None
    lock: DataDirLock | None = None
    metrics: Metrics | None = None
    # With a shared database: this daemon's lease on the leader's jobs (None: the only daemon).
    leader: LeaderLease | None = None
    _seen: object = None  # the store's fingerprint at the last render-on-change
    # What the operator chose to run with anyway (a failed model self-test).
    warnings: tuple[str, ...] = ()

    def is_leader(self) -> bool:
        """Whether this daemon runs the leader's jobs now (always, when it is the only one)."""
        return self.leader is None or self.leader.held

    @property
    def dicom_port(self) -> int:
        """The bound DICOM port."""
        return self.scp.port

    @property
    def web_port(self) -> int:
        """The bound web port (the worklist is at http://web.host:web_port/)."""
        return self.web.port

    def start(self) -> None:
        """Recover the spool and render the worklist; start the web server, the listener, the
        scheduled jobs, the outbox sender and the worker. Raises TriageError or OSError when an
        address is in use."""
        self.spool.cleanup_temp(SHARED_TEMP_GRACE_S if self.leader is not None else 0.0)
        self.store.reconcile(self.spool)
        if self.leader is not None:
            self.leader.tick()
        elif release_all(self.store):
            log.info("claims left by the previous run were released")
        if self.is_leader() or not self.pages.worklist_html.exists():
            self.pages.render_worklist()
        self.web.start()
        try:
            self.scp.start()
        except BaseException:
            self.web.stop()
            raise
        self.worker.on_result = self._on_result
        self.jobs.start(self._intervals())  # before the worker, so no result misses its render
        for src in self.cfg.pull.sources:  # the first poll now, not one interval after start
            self.jobs.soon(f"pull-first:{src.name}", self._leader_only(self._poll(src.name)), 1.0)
        self.sender.start()  # outbox rows left by a previous run are sent first
        self.worker.start()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the listener, the scheduler and the worker are alive and the database
        answers, with the detail (``database_error`` says why it does not)."""
        db_error = self.store.unavailable_reason()
        ok, detail = health({"listener": lambda: self.scp.alive,
                             "scheduler": lambda: self.jobs.alive,
                             "worker": lambda: self.worker.alive,
                             "database": lambda: db_error is None})
        if db_error is not None:
            detail["database_error"] = db_error
        if self.cfg.pull.sources:  # a PACS that does not answer is a detail, not a failed probe
            detail["pull"] = self._pull_detail()
        if self.warnings:  # alive, but not as validated: say so without failing the probe
            detail["warnings"] = list(self.warnings)
        return ok, detail

    def _pull_detail(self) -> dict[str, Any]:
        from triage.store import pulls

        try:
            states = pulls.states(self.store)
        except Exception as e:
            if not unavailable(e):
                raise
            return {}
        out: dict[str, Any] = {}
        for src in self.cfg.pull.sources:
            st = states.get(src.name)
            out[src.name] = {"polled": st is not None and st.last_poll_at is not None,
                             "ok": st is not None and st.failures == 0,
                             "failures_in_a_row": st.failures if st else 0,
                             "last_ok_at": st.last_ok_at if st else None,
                             "next_try_at": st.next_try_at if st else None,
                             "error": st.last_error if st else None}
        return out

    def _poll(self, name: str) -> Any:
        def run() -> Any:
            assert self.puller is not None
            return self.puller.poll_due(name)
        return run

    def _on_result(self, result_id: int) -> None:
        if self.metrics is not None and result_id:
            try:
                self.metrics.observe_result(result_id)
            except Exception:
                log.exception("could not observe the scoring latency")
        self.sender.wake()
        if self.is_leader():  # other daemons' results reach the page through render-on-change
            self.jobs.soon("render-after-result", self._leader_only(self.pages.render_worklist),
                           self.cfg.worklist.render_debounce_s)

    def _leader_only(self, fn: Any) -> Any:
        """``fn`` run only while this daemon is the leader (returns None otherwise)."""
        def run() -> Any:
            return fn() if self.is_leader() else None
        return run

    def render_on_change(self) -> bool:
        """Render the worklist when the database changed since the last look (another
        daemon's result, a study marked reported there); return whether it rendered."""
        seen = self.store.fingerprint()
        if seen == self._seen:
            return False
        self.pages.render_worklist()
        self._seen = seen
        return True

    def _intervals(self) -> dict[str, tuple[float, Any]]:
        jobs = self._job_functions()
        if self.leader is None:
            return jobs
        lease = self.leader
        out = {name: (sec, self._leader_only(fn)
                      if name in LEADER_JOBS or name.startswith("pull:") else fn)
               for name, (sec, fn) in jobs.items()}
        out["leader-lease"] = (lease.lease_s / 3, lease.tick)
        out["render-on-change"] = (max(0.5, self.cfg.worklist.render_debounce_s),
                                   self._leader_only(self.render_on_change))
        return out

    def _job_functions(self) -> dict[str, tuple[float, Any]]:
        quiet, wl = self.cfg.studies.quiet_period_s, self.cfg.worklist
        jobs: dict[str, tuple[float, Any]] = {
            "complete-studies": (self.cfg.studies.sweep_interval_s, lambda: self._complete(quiet)),
            "render-worklist": (wl.render_interval_s, self.pages.render_worklist),
            "drift-watch": (self.cfg.drift.interval_s, self.check_drift),
        }
        if wl.retention_days > 0:
            jobs["purge-reported"] = (wl.purge_interval_s, self.purge)
        for src in self.cfg.pull.sources:
            jobs[f"pull:{src.name}"] = (src.every_s, self._poll(src.name))
        return jobs

    def _complete(self, quiet: float) -> list[int]:
        """Complete the studies quiet for ``quiet`` seconds; the worker starts on them at once."""
        ids = self.store.complete_quiet_studies(quiet)
        if ids:
            self.worker.wake()
        return ids

    def check_drift(self) -> Any:
        """Run the drift watch now; returns its verdict. An alert shows on the next render."""
        from triage.service.drift_watch import check_drift

        guard = self.worker.guard
        return check_drift(self.store, drift_reference(self.worker.model.card, self.worker.profile),
                           self.cfg.drift, guard.expected_refusal_rate if guard else None)

    def purge(self) -> Any:
        """Purge studies reported more than ``worklist.retention_days`` ago; returns what went.

        Does nothing when retention is off (0 days).
        """
        from triage.store.retention import Purged, purge_reported

        days = self.cfg.worklist.retention_days
        if days <= 0:
            return Purged()
        return purge_reported(self.store, self.spool.root, self.cfg.storage.root,
                              days * 86400.0, self.store.clock())

    def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop accepting associations and requests, finish those in flight, stop the jobs."""
        self.scp.stop(drain_timeout_s)
        self.web.stop()
        if self.pages.explainer is not None:
            self.pages.explainer.close()
        self.worker.stop()
        self.sender.stop()
        self.jobs.stop()
        if self.leader is not None:
            self.leader.release()  # another daemon takes the leader's jobs over at once
        self.store.engine.dispose()
        if self.lock is not None:
            self.lock.release()


def scp_settings(cfg: Config) -> ScpSettings:
    """Translate the config's DICOM section into listener settings."""
    d = cfg.dicom
    return ScpSettings(
        host=d.host, port=d.port, ae_title=d.ae_title,
        allowed_calling_aes=d.allowed_calling_aes, accept_any_calling_ae=d.accept_any_calling_ae,
        max_associations=d.max_associations, max_pdu=d.max_pdu,
        max_dataset_bytes=d.max_dataset_mb * 2**20, max_pixels=d.max_pixels,
        peers=_peers(cfg),
        tls_cert=d.tls_cert, tls_key=d.tls_key, tls_ca=d.tls_ca,
        network_timeout_s=d.network_timeout_s, dimse_timeout_s=d.dimse_timeout_s,
        acse_timeout_s=d.acse_timeout_s,
    )


def _peers(cfg: Config) -> dict[str, tuple[str, ...]]:
    """``dicom.peers``, plus each pull source's AE title from its host: a PACS we retrieve from
    by C-MOVE C-STOREs to us under its own title."""
    import ipaddress
    import socket

    peers = {ae: list(hosts) for ae, hosts in cfg.dicom.peers.items()}
    for src in cfg.pull.sources:
        try:
            addrs = [str(ipaddress.ip_address(src.host))]
        except ValueError:
            try:
                addrs = sorted({str(a[4][0]) for a in socket.getaddrinfo(src.host, None)})
            except OSError as e:
                log.warning("pull source %s: %s does not resolve (%s); it cannot C-STORE to us "
                            "until it does and the daemon restarts", src.name, src.host, e)
                continue
        hosts = peers.setdefault(src.ae_title, [])
        hosts += [a for a in addrs if a not in hosts]
    return {ae: tuple(hosts) for ae, hosts in peers.items()}


def build_daemon(cfg: Config) -> Daemon:
    """Open and migrate the database, open the spool and wire the listener.

    Returns a Daemon that is not yet started, holding the data directory's lock.
    Raises TriageError when the data directory cannot be used or another daemon
    holds it, or when a configured port is taken (then nothing has been created).
    """
    check_exposure(cfg.web)
    # The model and any site profile are checked before anything is created on disk.
    model = load_model(cfg)
    profile = load_site_profile(cfg, model)
    if profile is not None and profile.adaptation is not None:
        from triage.inference.model import load_adapted

        model = load_adapted(profile.adaptation, cfg.model.threads)
        log.info("scoring with %s's model adapted to this site (sha256 %s)", profile.path.name,
                 model.sha256[:12])
    warnings = check_model_on_this_cpu(cfg, model)
    guard = load_guard(cfg.guard, model.card)
    prototypes = load_prototypes(cfg, model)
    # worker.tier_overrides against the model's tiers: a misspelt or inverted one stops here.
    applied_thresholds(model.thresholds, profile, cfg.worker.tier_overrides)
    st = cfg.storage
    # One daemon per data directory, and nothing created or migrated before the
    # directory is free and the ports can be bound. With a shared (PostgreSQL)
    # database the directory is shared on purpose: claims and the leader lease
    # in the database coordinate the daemons instead.
    lock = None if cfg.database.shared else DataDirLock(st.root)
    if lock is not None:
        lock.check()
    check_ports((cfg.dicom.host, cfg.dicom.port, "dicom.port"),
                (cfg.web.host, cfg.web.port, "web.port"))
    try:
        # The daemon's user only: the database and spool hold patient data.
        st.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        if st.root.stat().st_mode & 0o077:
            log.warning("data directory %s was readable by others: now 0700", st.root)
            os.chmod(st.root, 0o700)
    except OSError as e:
        raise TriageError(f"data directory {st.root} is not usable: {e.strerror or e}") from e
    if lock is not None:
        lock.acquire()
    try:
        return _wire(cfg, model, profile, guard, lock, prototypes, warnings)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def open_store(cfg: Config) -> Store:
    """Open and migrate the configured database; return its Store. Raises TriageError when
    the database cannot be opened (a server that does not answer, a bad URL)."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return Store(open_db(cfg.database_url, cfg.database.sqlite_busy_timeout_s))
    except (SQLAlchemyError, ValueError) as e:
        where = "database.url" if cfg.database.url else f"{cfg.storage.db_path}"
        raise TriageError(f"cannot open the database ({where}): "
                          f"{str(e).splitlines()[0]}") from e


def _wire(cfg: Config, model: OnnxModel, profile: SiteProfile | None, guard: Any,
          lock: DataDirLock | None, prototypes: Any = None,
          warnings: tuple[str, ...] = ()) -> Daemon:
    st = cfg.storage
    try:
        spool = Spool(st.spool_dir, fsync=st.fsync, min_free_bytes=st.min_free_mb * 2**20)
    except OSError as e:
        raise TriageError(f"data directory {st.root} is not usable: {e.strerror or e}") from e
    store = open_store(cfg)
    node = node_id()
    leader = LeaderLease(store, node, cfg.database.leader_lease_s) if cfg.database.shared else None
    metrics = Metrics(store)
    sender = OutboxSender(cfg.results, store, st.root,
                          gate=None if leader is None else lambda: leader.held)
    worker = ScoringWorker(cfg, store, model, st.root, profile=profile, guard=guard, node=node,
                           prototypes=prototypes)
    pages = Pages(store, st.root / "www", model_info(worker, warnings), cfg.worklist,
                  gate=None if leader is None else lambda: leader.held)
    pages.explainer = Explainer(st.root, model.path, dict(model.card))  # LIME on demand
    scp = StoreScp(scp_settings(cfg), spool, CountingRecorder(store, metrics))
    ops = Ops(health=lambda: daemon.health(), metrics=metrics.text,
              metrics_content_type=METRICS_CONTENT_TYPE)
    stow = StowReceiver(scp.take, lambda calling, sop_class, sop_uid, status, why: scp.refuse(
        calling, sop_class, sop_uid, Refusal(status, why)), spool.tmp,
        cfg.dicom.max_dataset_mb * 2**20)
    app = build_app(pages, st.root, cfg.web, ops, stow)
    daemon = Daemon(cfg, store, spool, scp, worker, pages, WebServer(cfg.web, app), sender,
                    lock=lock, metrics=metrics, leader=leader, warnings=warnings,
                    puller=Puller(cfg, store, scp) if cfg.pull.sources else None)
    return daemon


def model_info(worker: ScoringWorker, warnings: tuple[str, ...] = ()) -> ModelInfo:
    """Return what the pages show of the worker's model (thresholds with overrides applied)."""
    card = worker.model.card
    return ModelInfo(worker.model_name, worker.model_sha, str(card.get("created", "")),
                     dict(worker.thresholds), worker.thresholds_source, warnings)


def check_model_on_this_cpu(cfg: Config, model: OnnxModel) -> tuple[str, ...]:
    """Run the model's self-test with the daemon's own session; return the warnings to show.

    Raises TriageError (one line, naming the CPU's features) on a mismatch unless
    ``model.allow_cpu_mismatch`` is set; then the mismatch is returned as a warning
    for the worklist banner and ``/healthz``. A card whose self-test block cannot
    be used is a TriageError too.
    """
    result = selftest.check(model.session, model.card, model.path, cfg.model.threads)
    if result.ok:
        log.info("%s", result.message)
        return ()
    if not cfg.model.allow_cpu_mismatch:
        raise TriageError(f"{result.message}: scores here would differ from the validated "
                          f"ones; refusing to start (set model.allow_cpu_mismatch = true to "
                          f"run anyway)")
    log.warning("%s: running anyway (model.allow_cpu_mismatch = true)", result.message)
    return (f"{result.message}. Scores and tiers may differ from the model card's; running "
            f"because model.allow_cpu_mismatch = true.",)


def load_model(cfg: Config) -> OnnxModel:
    """Load the configured ONNX model and its card. Raises TriageError when unusable."""
    m = cfg.model
    if not m.onnx_path.exists():
        raise TriageError(f"model file {m.onnx_path} not found (config key model.path)")
    return OnnxModel.load_files(m.onnx_path, m.card_path, threads=m.threads)


def load_site_profile(cfg: Config, model: OnnxModel) -> SiteProfile | None:
    """Read ``model.site_profile`` if set; None otherwise.

    Raises ConfigError (one line) when it cannot be read or was fitted for
    another model than the one loaded.
    """
    path = cfg.model.site_profile_path
    if path is None:
        return None
    profile = read_profile(path, str(model.card.get("sha256", "")))
    log.info("operating points from %s", profile.source)
    return profile


def load_prototypes(cfg: Config, model: OnnxModel) -> Any:
    """Read ``model.prototypes`` if set (None otherwise). Raises ConfigError naming the path
    when it cannot be read, is damaged, or was made for another model."""
    from triage.inference.prototypes import load_for, summary

    path = cfg.model.prototypes_path
    if path is None:
        return None
    protos = load_for(path, model)
    log.info("few-shot prototypes from %s: %s", path, summary(protos))
    return protos


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
    except BaseException as e:
        if daemon.lock is not None:
            daemon.lock.release()
        if not isinstance(e, OSError):
            raise
        raise TriageError(f"cannot listen on {cfg.dicom.host}:{cfg.dicom.port}: "
                          f"{e.strerror or e}") from e
    log.info("triage is running; data in %s; worklist at http://%s:%d/", cfg.storage.root,
             cfg.web.host, daemon.web_port)
    # Python runs signal handlers in the main thread, but the kernel may deliver a SIGTERM
    # to any of the daemon's threads (under strace, often another one); then nothing wakes a
    # main thread blocked in an untimed wait. Waking twice a second lets the handler run.
    while not stop.wait(0.5):
        pass
    daemon.stop()
    log.info("triage stopped cleanly")
    return 0
