"""Shared-data tier: every real-world file in ../shared/dicom sent with DCMTK storescu."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from dicom_io.scp import STORAGE_SOP_CLASSES, UNCOMPRESSED
from dicom_io.store_status import Refusal
from dicom_io.validate import check
from tests.conftest import scu, shared_path, storescu
from triage.service.daemon import Daemon
from triage.store.schema import Instance, Rejection, Replacement

pytestmark = pytest.mark.shared

# storescu proposes only uncompressed syntaxes unless told which compressed one to offer.
PROPOSE = {
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.70": "-xs", "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.1.99": "-xd",
}


def _expectation(path: Path) -> str:
    """What the listener should do, judged from the file alone with pydicom."""
    try:
        ds = dcmread(path, force=True)
        sop_class = str(ds.SOPClassUID)
        ts = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
    except Exception:
        return "unsendable"
    if sop_class not in STORAGE_SOP_CLASSES:
        return "context-rejected"
    try:
        check(ds, sop_class, str(ds.SOPInstanceUID), compressed=ts not in UNCOMPRESSED)
    except Refusal:
        return "refused"
    except Exception:
        return "refused"
    return "stored"


def _assert_same_data_set(stored: Path, original: Path) -> None:
    """Element-for-element equality, pixel bytes included.

    DCMTK re-serialises what it sends (undefined-length sequences become
    explicit-length), so the stored bytes equal what came off the wire, not
    always the file's bytes; the values, and the pixel data bytes, must match.
    """
    a, b = dcmread(stored), dcmread(original, force=True)
    # An odd-length value is padded to even length on the wire (PS3.5 7.1.1).
    pad = len(a.PixelData) - len(b.PixelData)
    assert pad in (0, 1) and a.PixelData[: len(b.PixelData)] == b.PixelData, original.name
    if "TransferSyntaxUID" in b.file_meta:  # a file without meta travels as implicit VR
        assert a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID, original.name
    for elem in b:
        if 2 < elem.tag.group < 0xFFFC and elem.VR != "SQ":  # senders may drop trailing padding
            if elem.tag != 0x7FE00010:
                assert a[elem.tag].value == elem.value, f"{original.name}: {elem.tag} differs"


def _counts(d: Daemon) -> tuple[int, int]:
    """(instances stored or replaced, refusals) so far."""
    with d.store.read() as s:
        stored = (s.scalar(select(func.count()).select_from(Instance)) or 0) + (
            s.scalar(select(func.count()).select_from(Replacement)) or 0)
        return stored, s.scalar(select(func.count()).select_from(Rejection)) or 0


def test_every_shared_file_is_stored_verbatim_or_refused_and_the_daemon_stays_up(daemon: Daemon) -> None:
    root = shared_path("dicom")
    files = sorted(p for sub in ("chest", "other_cr", "broken") for p in (root / sub).glob("*.dcm"))
    assert len(files) >= 30
    outcomes: dict[str, str] = {}
    for f in files:
        expected = _expectation(f)
        before = _counts(daemon)
        ts = ""
        try:
            ts = str(dcmread(f, force=True, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        except Exception:
            pass
        flags = ("-R", PROPOSE[ts]) if ts in PROPOSE else ("-R",)
        r = storescu(daemon.dicom_port, f, extra=flags)
        after = _counts(daemon)
        if after[0] > before[0]:
            got = "stored"
            ds = dcmread(f, force=True, stop_before_pixels=True)
            with daemon.store.read() as s:
                inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID)))
            assert inst is not None
            _assert_same_data_set(daemon.spool.root / inst.relpath, f)
        elif after[1] > before[1]:
            got = "refused"
        elif any(m in r.stderr for m in ("No presentation context", "No valid Presentation Context",
                                         "No Acceptable Presentation Contexts")):
            got = "context-rejected"
        else:
            got = "unsendable"
        outcomes[f.name] = got
        sender_gave_up = got == "unsendable" and f.parent.name == "broken"
        if not sender_gave_up and not (expected == "unsendable" and got == "context-rejected"):
            assert got == expected, f"{f.name}: expected {expected}, got {got}\n{r.stderr[-800:]}"
    # Every chest file a sender can read is accepted verbatim.
    for f in files:
        if f.parent.name == "chest" and outcomes[f.name] != "unsendable":
            assert outcomes[f.name] == "stored", f.name
    assert "refused" in outcomes.values()
    assoc = scu().associate("127.0.0.1", daemon.dicom_port, ae_title="TRIAGE")
    assert assoc.send_c_echo().Status == 0
    assoc.release()
