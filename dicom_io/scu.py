"""Sending: C-STORE DICOM files, as they are encoded, to a listener.

Each file is sent in its own transfer syntax (nothing is transcoded), over one
association per call. Only the storage SOP classes the files actually use are
proposed, one presentation context per (SOP class, transfer syntax) pair.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE

from dicom_io.ids import uid_hash

log = logging.getLogger(__name__)

NO_REPLY = -1
MAX_CONTEXTS = 128  # the DICOM limit on presentation contexts in one association


class SendError(Exception):
    """The association could not be set up; the message says why."""


@dataclass(frozen=True)
class Outgoing:
    """One file to send: its path, SOP class and transfer syntax."""

    path: Path
    sop_class_uid: str
    transfer_syntax: str


def outgoing(path: str | Path) -> Outgoing:
    """Return what sending ``path`` needs from its file meta. Raises SendError if unreadable."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
        return Outgoing(Path(path), str(ds.file_meta.MediaStorageSOPClassUID),
                        str(ds.file_meta.TransferSyntaxUID))
    except Exception as e:
        raise SendError(f"{Path(path).name}: not a sendable DICOM file ({type(e).__name__})") from e


def _ae(calling_ae: str, files: Sequence[Outgoing], timeout_s: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax) for f in files})
    if len(pairs) > MAX_CONTEXTS:
        raise SendError(f"{len(pairs)} (SOP class, transfer syntax) pairs exceed {MAX_CONTEXTS}")
    for sop, ts in pairs:
        ae.add_requested_context(sop, [ts])
    return ae


# C-STORE statuses after which the destination holds the instance: success, and
# the warnings "coercion of data elements", "elements discarded" and "data set
# does not match SOP class" (PS3.4 B.2.3), plus pynetdicom's generic warning.
STORED = frozenset({0x0000, 0x0001, 0xB000, 0xB006, 0xB007})


def stored(status: int) -> bool:
    """Return True when a C-STORE ``status`` means the destination kept the instance."""
    return status in STORED


@dataclass(frozen=True)
class Tls:
    """DICOM over TLS to one destination: the client context and the name its certificate bears."""

    context: ssl.SSLContext
    server_hostname: str  # sent as SNI; checked against the certificate when the context says so


def tls_client(host: str, ca_file: str = "", cert_file: str = "", key_file: str = "",
               check_hostname: bool = True) -> Tls:
    """Return TLS settings that verify the destination's certificate (against ``ca_file``, or
    the system's CAs) and, with ``cert_file``/``key_file``, present ours.

    Raises SendError when a file cannot be loaded.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = check_hostname
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file or None)
    except (OSError, ssl.SSLError) as e:
        raise SendError(f"TLS files cannot be loaded: {e}") from e
    return Tls(ctx, host)


def send_files(host: str, port: int, files: Sequence[Outgoing], calling_ae: str,
               called_ae: str, timeout_s: float = 60.0, tls: Tls | None = None,
               on_status: Callable[[Outgoing, int], None] | None = None) -> list[int]:
    """C-STORE every file over one association; return each status (-1: no reply).

    ``tls`` secures the association; ``on_status`` is called after each reply,
    in order, so a caller can record progress as it happens. Raises SendError
    when the association is rejected or cannot be established (including a
    failed TLS handshake).
    """
    if not files:
        return []
    ae = _ae(calling_ae, files, timeout_s)
    tls_args = (tls.context, tls.server_hostname) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise SendError(f"association with {called_ae}@{host}:{port} {why}")
    out = []
    try:
        for f in files:
            out.append(_send_one(assoc, f))
            if on_status is not None:
                on_status(f, out[-1])
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _send_one(assoc: object, f: Outgoing) -> int:
    try:
        rsp = assoc.send_c_store(f.path)  # type: ignore[attr-defined]
    except (ValueError, RuntimeError) as e:  # no accepted context, or a dead association
        log.warning("could not send %s: %s", uid_hash(f.path.name), e)
        return NO_REPLY
    return int(rsp.Status) if "Status" in rsp else NO_REPLY
