"""Sending: C-STORE DICOM files, as they are encoded, to a listener.

Each file is sent in its own transfer syntax (nothing is transcoded), over one
association per call. Only the storage SOP classes the files actually use are
proposed, one presentation context per (SOP class, transfer syntax) pair.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
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


def send_files(host: str, port: int, files: Sequence[Outgoing], calling_ae: str,
               called_ae: str, timeout_s: float = 60.0) -> list[int]:
    """C-STORE every file over one association; return each status (-1: no reply).

    Raises SendError when the association is rejected or cannot be established.
    """
    if not files:
        return []
    ae = _ae(calling_ae, files, timeout_s)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise SendError(f"association with {called_ae}@{host}:{port} was not established")
    out = []
    try:
        for f in files:
            out.append(_send_one(assoc, f))
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
