"""The DICOM listener: C-ECHO and durable C-STORE on pynetdicom.

The C-STORE handler, in order: checks free space, parses and validates the
data set, writes it durably to the spool (temp file, fsync, rename, fsync the
directory), hands it to the recorder (the application's database), and only
then answers 0x0000. Any refusal gets a specific status and a logged reason.
Nothing slow (decoding, scoring) happens here: the sender's timeout is not ours.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom import _config as _pnd_config
from pynetdicom.association import Association

from dicom_io import store_status as status
from dicom_io.header import Header
from dicom_io.ids import uid_hash
from dicom_io.spool import Spool, SpoolEntry, SpoolError
from dicom_io.store_status import Refusal
from dicom_io.validate import check

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
}

UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
# pynetdicom accepts, within a proposed context, the first syntax in *our* list
# that the sender offered. Compressed syntaxes come first so that a sender that
# offers its file's own encoding alongside the uncompressed defaults (as DCMTK's
# storescu does) sends it as-is: data is stored as received, never transcoded.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    JPEG2000Lossless, JPEG2000, JPEGLSLossless, JPEGLSNearLossless, JPEGLosslessSV1,
    JPEGLossless, JPEGExtended12Bit, JPEGBaseline8Bit, RLELossless,
    DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
)


@dataclass(frozen=True)
class ReceivedInstance:
    """An instance that is durable in the spool, ready to be recorded."""

    header: Header
    transfer_syntax: str
    calling_ae: str
    entry: SpoolEntry


class Recorder(Protocol):
    """Where the SCP records what it stored or refused (the application's database)."""

    def record_instance(self, inst: ReceivedInstance) -> str:
        """Record a durable instance; return 'stored', 'duplicate', 'replaced' or 'moved'."""

    def record_rejection(self, calling_ae: str, sop_class_uid: str | None,
                         sop_uid: str | None, refusal: Refusal) -> None:
        """Record a refused C-STORE."""


@dataclass(frozen=True)
class ScpSettings:
    """Network settings of the listener (a plain mirror of the config section)."""

    host: str = "127.0.0.1"
    port: int = 11112
    ae_title: str = "TRIAGE"
    allowed_calling_aes: Sequence[str] = ()
    accept_any_calling_ae: bool = False
    max_associations: int = 16
    max_pdu: int = 262144
    max_dataset_bytes: int = 512 * 2**20
    max_pixels: int = 100_000_000
    # {calling AE title: [host address or network, ...]}: a title listed here is
    # accepted only from its hosts; titles in allowed_calling_aes only from loopback.
    peers: Mapping[str, Sequence[str]] = field(default_factory=dict)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""  # set: clients must present a certificate this CA signed
    network_timeout_s: float = 60.0
    dimse_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0


def _is_loopback(host: str) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def _in(host: str, networks: Sequence[str]) -> bool:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return False
    addr = getattr(addr, "ipv4_mapped", None) or addr
    return any(addr in ipaddress.ip_network(n, strict=False) for n in networks)


def admit(settings: ScpSettings, calling: str, host: str) -> str | None:
    """Return None when ``calling`` may associate from ``host``, else the rule that refuses it.

    Default-deny, as PACS modality tables are: a title in ``peers`` only from its
    hosts; a title in ``allowed_calling_aes`` only from loopback; any title from
    anywhere only with ``accept_any_calling_ae``.
    """
    calling = calling.strip()
    if calling in settings.peers:
        if _in(host, settings.peers[calling]):
            return None
        return (f"dicom.peers: {calling!r} is allowed only from "
                f"{', '.join(settings.peers[calling])}")
    if settings.accept_any_calling_ae:
        return None
    if calling in settings.allowed_calling_aes:
        if _is_loopback(host):
            return None
        return (f"dicom.allowed_calling_aes: {calling!r} is allowed only from loopback; "
                "list it in dicom.peers with its host")
    return f"{calling!r} is in neither dicom.peers nor dicom.allowed_calling_aes"


class _GatedAE(AE):
    """An AE whose calling-AE check also looks at the caller's host.

    pynetdicom reads ``require_calling_aet`` in the association's own thread
    while negotiating as acceptor; answering with the caller's own title admits
    it, and a list without it makes pynetdicom reject the association with
    "calling AE title not recognised", as it would for an unknown title.
    """

    gate: Callable[[str, str], str | None] | None = None

    @property  # type: ignore[override]
    def require_calling_aet(self) -> list[str]:
        assoc = threading.current_thread()
        if self.gate is None or not isinstance(assoc, Association) or not assoc.is_acceptor:
            return list(self._require_calling_aet)
        calling = str(assoc.requestor.ae_title or "").strip()
        refusal = self.gate(calling, str(assoc.requestor.address))
        if refusal is None:
            return [calling]
        assoc.triage_refusal = refusal  # type: ignore[attr-defined]
        return ["\x00"]  # no calling title equals it

    @require_calling_aet.setter
    def require_calling_aet(self, ae_titles: list[str]) -> None:
        AE.require_calling_aet.fset(self, ae_titles)  # type: ignore[attr-defined]


CONTEXT_RESULTS = {0x01: "rejected by us", 0x02: "no reason given",
                   0x03: "abstract syntax (SOP class) not supported",
                   0x04: "none of the proposed transfer syntaxes is supported"}


class StoreScp:
    """A running (or startable) C-ECHO / C-STORE listener."""

    def __init__(self, settings: ScpSettings, spool: Spool, recorder: Recorder) -> None:
        self.settings = settings
        self.spool = spool
        self.recorder = recorder
        self._server: Any = None
        self._stopping = threading.Event()
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        s = self.settings
        # Received data sets go to a temporary file as they arrive, not into memory
        # (pynetdicom's chunked receive); the handler checks the size, then streams
        # the file into the spool (or links it there: Spool.adopt). pynetdicom deletes
        # its name for the file after the handler.
        _pnd_config.STORE_RECV_CHUNKED_DATASET = True
        ae = _GatedAE(ae_title=s.ae_title)
        ae.require_called_aet = True
        # Every association passes admit(): the calling title against its hosts.
        ae.gate = lambda calling, host: admit(s, calling, host)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu
        ae.network_timeout = s.network_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.acse_timeout = s.acse_timeout_s
        ae.add_supported_context(VERIFICATION)
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        return ae

    @property
    def alive(self) -> bool:
        """Whether the listener is started and its accept loop is running."""
        server = self._server
        if server is None or server.socket.fileno() < 0:
            return False
        # socketserver clears this event while serve_forever() runs and sets it on exit.
        done = getattr(server, "_BaseServer__is_shut_down", None)
        return done is None or not done.is_set()

    @property
    def port(self) -> int:
        """The bound TCP port (useful when the configured port was 0)."""
        if self._server is None:
            raise RuntimeError("listener not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and start serving in background threads; returns at once."""
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ACCEPTED, self._on_accepted),
        ]
        s = self.settings
        ctx = self._tls_context()
        self._server = self.ae.start_server((s.host, s.port), block=False, evt_handlers=handlers,
                                            ssl_context=ctx)
        log.info("DICOM listener %s on %s:%d%s", s.ae_title, s.host, self.port,
                 (" (TLS, client certificates required)" if s.tls_ca else " (TLS)") if ctx else "")

    def _tls_context(self) -> ssl.SSLContext | None:
        """The server's TLS context (TLS only on the port), or None when TLS is off."""
        s = self.settings
        if not s.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(s.tls_cert, s.tls_key or None)
        if s.tls_ca:
            ctx.load_verify_locations(cafile=s.tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def stop(self, drain_timeout_s: float = 30.0) -> bool:
        """Stop accepting associations, let those in flight finish, then stop.

        Returns True when every association finished within the timeout.
        """
        if self._server is None:
            return True
        self._stopping.set()
        server, self._server = self._server, None
        server.shutdown()
        deadline = time.monotonic() + drain_timeout_s
        while server.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        left = server.active_associations
        for assoc in left:
            assoc.abort()
        if left:
            log.warning("aborted %d association(s) still open after %.0f s", len(left), drain_timeout_s)
        log.info("DICOM listener stopped")
        return not left

    # --- handlers -------------------------------------------------------

    def _on_echo(self, event: Any) -> int:
        return status.SUCCESS

    def _on_rejected(self, event: Any) -> None:
        assoc = event.assoc
        req = assoc.requestor
        called = str(getattr(req.primitive, "called_ae_title", "") or "").strip()
        reason = getattr(assoc, "triage_refusal", None)
        if reason is None:
            reason = (f"called AE title {called!r} is not {self.settings.ae_title!r}"
                      if called and called != self.settings.ae_title
                      else f"more than dicom.max_associations ({self.settings.max_associations}) "
                           "associations at once")
        log.warning("association from %s (calling AE %r, called AE %r) rejected: %s",
                    req.address, str(req.ae_title).strip(), called, reason)

    def _on_accepted(self, event: Any) -> None:
        refused = event.assoc.rejected_contexts
        if not refused:
            return
        req = event.assoc.requestor
        what = "; ".join(f"{STORAGE_SOP_CLASSES.get(str(cx.abstract_syntax), cx.abstract_syntax)}: "
                         f"{CONTEXT_RESULTS.get(cx.result, f'result {cx.result}')}"
                         for cx in refused)
        log.info("association from %s (calling AE %r): %d presentation context(s) refused: %s",
                 req.address, str(req.ae_title).strip(), len(refused), what)

    def _on_store(self, event: Any, calling: str | None = None) -> int:
        calling = calling or str(event.assoc.requestor.ae_title).strip()
        req = event.request
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        try:
            outcome, header = self._store(event, calling, sop_class, sop_uid)
        except Refusal as r:
            self._refuse(calling, sop_class, sop_uid, r)
            return r.status
        except Exception as e:  # the handler must answer, whatever happened
            failure = Refusal(status.UNEXPECTED, f"unexpected {type(e).__name__}: {e}")
            log.exception("C-STORE of %s failed unexpectedly", uid_hash(sop_uid))
            self._refuse(calling, sop_class, sop_uid, failure)
            return failure.status
        log.info("C-STORE %s: instance %s of study %s from %s", outcome, uid_hash(sop_uid),
                 uid_hash(header.study_uid), calling)
        return status.SUCCESS

    def on_store(self, event: Any, calling: str | None = None) -> int:
        """Answer a C-STORE request on any association: the listener's, or one this node
        opened itself (a C-GET's, whose sub-operations arrive on the same association; pass
        the peer's AE title as ``calling``). Returns the status to send."""
        return self._on_store(event, calling)

    def _store(self, event: Any, calling: str, sop_class: str,
               sop_uid: str) -> tuple[str, Header]:
        return self.ingest(Path(event.dataset_path), str(event.context.transfer_syntax),
                           sop_class, sop_uid, calling)

    def ingest(self, path: Path, ts: str, sop_class: str, sop_uid: str,
               calling: str) -> tuple[str, Header]:
        """Take one received data set (the file at ``path``, without its File Meta, in
        transfer syntax ``ts``, or a Part 10 file) on the durable path: check room and size,
        validate against ``sop_class``/``sop_uid``, move it into the spool (durably), record
        it. Returns (the recorder's outcome, the header). Raises Refusal with the status to
        answer; the file is then left where it was, for the caller to remove."""
        if not self.spool.has_room():
            raise Refusal(status.OUT_OF_RESOURCES,
                          f"free disk space below reserve ({self.spool.free_bytes() // 2**20} MiB free)")
        size = path.stat().st_size
        limit = self.settings.max_dataset_bytes
        if size > limit:
            raise Refusal(status.TOO_LARGE, f"data set of {size / 2**20:.0f} MiB is larger than "
                          f"the {limit / 2**20:.0f} MiB limit")
        if not self.spool.has_room(size):
            raise Refusal(status.OUT_OF_RESOURCES, "instance would take free disk space below reserve")
        try:
            # Values over 1 MiB (the pixel data) stay on disk: only the header is read.
            ds = dcmread(path, defer_size="1 MiB")
            header = check(ds, sop_class, sop_uid, compressed=ts not in UNCOMPRESSED,
                           transfer_syntax=ts, max_pixels=self.settings.max_pixels)
        except Refusal:
            raise
        except Exception as e:
            raise Refusal(status.UNREADABLE, f"data set cannot be parsed: {type(e).__name__}: {e}") from e
        del ds  # only the header goes on; the bytes are streamed from the file
        try:
            entry = self.spool.adopt(header.study_uid, header.sop_instance_uid, path)
        except SpoolError as e:
            code = status.OUT_OF_RESOURCES if e.out_of_space else status.UNEXPECTED
            raise Refusal(code, str(e)) from e
        outcome = self.recorder.record_instance(ReceivedInstance(header, ts, calling, entry))
        return outcome, header

    def take(self, path: Path, ts: str, sop_class: str, sop_uid: str,
             calling: str) -> tuple[int, str | None, Header | None]:
        """:meth:`ingest` for another transport than a C-STORE (DICOMweb STOW-RS): returns
        (the C-STORE status it would have answered, the outcome, the header) instead of
        raising, and records and logs a refusal exactly as the listener does."""
        if sop_class not in STORAGE_SOP_CLASSES:
            r = Refusal(status.SOP_CLASS_NOT_SUPPORTED,
                        f"SOP class {sop_class or '(none)'} is not one triage stores")
            self._refuse(calling, sop_class, sop_uid, r)
            return r.status, None, None
        try:
            outcome, header = self.ingest(path, ts, sop_class, sop_uid, calling)
        except Refusal as r:
            self._refuse(calling, sop_class, sop_uid, r)
            return r.status, None, None
        except Exception as e:
            failure = Refusal(status.UNEXPECTED, f"unexpected {type(e).__name__}: {e}")
            log.exception("storing %s failed unexpectedly", uid_hash(sop_uid))
            self._refuse(calling, sop_class, sop_uid, failure)
            return failure.status, None, None
        log.info("%s %s: instance %s of study %s", calling, outcome, uid_hash(sop_uid),
                 uid_hash(header.study_uid))
        return status.SUCCESS, outcome, header

    def refuse(self, calling: str, sop_class: str, sop_uid: str, r: Refusal) -> None:
        """Log and record a refusal decided before :meth:`take` could run (a STOW-RS part that
        is not DICOM at all)."""
        self._refuse(calling, sop_class, sop_uid, r)

    def _refuse(self, calling: str, sop_class: str, sop_uid: str, r: Refusal) -> None:
        log.warning("C-STORE refused 0x%04X for instance %s from %s: %s",
                    r.status, uid_hash(sop_uid), calling, r.reason)
        try:
            self.recorder.record_rejection(calling, sop_class or None, sop_uid or None, r)
        except Exception:
            log.exception("could not record the refusal of %s", uid_hash(sop_uid))

