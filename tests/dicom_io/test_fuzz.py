"""Fuzzing the live listener with hypothesis: mutated data sets over real associations.

Each example is a Part 10 file whose data set has been mutated (bit flips,
truncation, wrong VRs, huge lengths, bad UIDs, a transfer syntax that does not
match the data, corrupt compressed streams) and is sent byte for byte as it
is by pynetdicom's chunked send. Every one must get a C-STORE status or a
clean abort of its association; the daemon stays up with bounded memory; and
a clean study sent afterwards is scored.

The default suite runs ``FUZZ_QUICK`` examples; the ``fuzz`` tier (excluded
by default: ``pytest -m fuzz``) runs ``TRIAGE_FUZZ_EXAMPLES`` (10,000 unless
set) and prints its figures.
"""

from __future__ import annotations

import io
import os
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import _config

from dicom_io import store_status as status
from tests import synth
from tests.conftest import scu, send_and_wait_scored
from tests.dicom_bytes import dataset_body
from triage.service.daemon import Daemon

FUZZ_QUICK = 300
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on invalid UIDs
SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless)
ANSWERS = {status.SUCCESS, status.OUT_OF_RESOURCES, status.TOO_LARGE, status.TOO_MANY_PIXELS,
           status.DATASET_MISMATCH, status.UNREADABLE, status.UNEXPECTED, status.BAD_UID}
VRS = [b"AE", b"AS", b"CS", b"DA", b"DS", b"FD", b"IS", b"LO", b"OB", b"OW", b"PN", b"SQ",
       b"UI", b"UL", b"UN", b"US", b"UT", b"\x00\x00", b"ZZ"]


def _bodies() -> dict[str, tuple[str, bytes, str, str]]:
    """Base data sets: {name: (transfer syntax, body bytes, SOP class, SOP instance)}."""
    out = {}
    spec = synth.SynthSpec(rows=32, columns=32)
    for name, ts in (("explicit", ExplicitVRLittleEndian), ("implicit", ImplicitVRLittleEndian)):
        ds = synth.make_dataset(spec)
        ds.file_meta.TransferSyntaxUID = ts
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True, implicit_vr=ts == ImplicitVRLittleEndian,
                   little_endian=True)
        out[name] = (ts, dataset_body(buf.getvalue()), str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    ds = synth.make_dataset(spec)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + os.urandom(200)])  # a corrupt J2K stream
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    out["j2k"] = (JPEG2000Lossless, dataset_body(buf.getvalue()), str(ds.SOPClassUID),
                  str(ds.SOPInstanceUID))
    return out


BODIES = _bodies()


def _part10(ts: str, body: bytes, sop_class: str, sop_uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = generate_uid(prefix="1.2.826.0.1.3680043.10.1.")
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + body


def _flip(body: bytes, positions: list[int]) -> bytes:
    b = bytearray(body)
    for p in positions:
        b[p % len(b)] ^= 1 << (p % 8)
    return bytes(b)


def _tags(body: bytes, explicit: bool) -> list[int]:
    """Offsets of element headers at the data set's top level (best effort)."""
    out, i = [], 0
    while i + 8 <= len(body):
        out.append(i)
        if explicit:
            vr = body[i + 4:i + 6]
            if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
                length = struct.unpack("<I", body[i + 8:i + 12])[0]
                i += 12 + (0 if length == 0xFFFFFFFF else length)
                if length == 0xFFFFFFFF:
                    break
            else:
                i += 8 + struct.unpack("<H", body[i + 6:i + 8])[0]
        else:
            length = struct.unpack("<I", body[i + 4:i + 8])[0]
            if length == 0xFFFFFFFF:
                break
            i += 8 + length
    return out


# Each kind of damage gets its own share of the examples (hypothesis favours the first
# element of sampled_from, so the kind is not drawn).
KINDS = ("flip", "truncate", "vr", "length", "uid", "syntax", "pixels")


@st.composite
def mutated(draw: Any, kind: str) -> tuple[str, bytes, str, str, str]:
    """(transfer syntax, Part 10 bytes' body, SOP class, SOP instance, mutation kind)."""
    base = draw(st.sampled_from(sorted(BODIES)))
    ts, body, sop_class, sop_uid = BODIES[base]
    if kind == "flip":
        body = _flip(body, draw(st.lists(st.integers(0, 8 * len(body)), min_size=1, max_size=8)))
    elif kind == "truncate":
        body = body[:draw(st.integers(0, len(body) - 1))]
    elif kind == "vr" and ts != ImplicitVRLittleEndian:
        at = draw(st.sampled_from(_tags(body, True)))
        vr = draw(st.one_of(st.sampled_from(VRS), st.binary(min_size=2, max_size=2)))
        body = body[:at + 4] + vr + body[at + 6:]
    elif kind == "length":
        offsets = _tags(body, ts != ImplicitVRLittleEndian)
        at = draw(st.sampled_from(offsets))
        huge = draw(st.one_of(st.sampled_from([0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFF, 0x10000000]),
                              st.integers(0x8000, 0xFFFFFFFF)))
        if ts == ImplicitVRLittleEndian:
            body = body[:at + 4] + struct.pack("<I", huge) + body[at + 8:]
        else:
            body = body[:at + 6] + struct.pack("<H", huge & 0xFFFF) + body[at + 8:]
    elif kind == "uid":
        junk = draw(st.one_of(
            st.sampled_from(["", "1.2.abc", "0.0.0", "1." * 40, "9" * 65, "1.2..3", "\x00\x01"]),
            st.text(alphabet="0123456789.abc \x00", max_size=80)))
        needle = draw(st.sampled_from([b"\x20\x00\x0d\x00", b"\x20\x00\x0e\x00"]))  # study, series
        at = body.find(needle)
        if at >= 0 and ts != ImplicitVRLittleEndian:
            value = junk.encode("latin-1")
            value += b"\x00" * (len(value) % 2)
            n = struct.unpack("<H", body[at + 6:at + 8])[0]
            body = body[:at + 6] + struct.pack("<H", len(value)) + value + body[at + 8 + n:]
    elif kind == "syntax":  # the data as it is (or lightly damaged) under another syntax
        ts = draw(st.sampled_from([s for s in SYNTAXES if s != ts]))
        body = _flip(body, draw(st.lists(st.integers(0, 8 * len(body)), max_size=2)))
    elif kind == "pixels":  # a well-formed data set whose pixel bytes are noise
        tail = draw(st.integers(16, 512))
        body = body[:-tail] + draw(st.binary(min_size=tail, max_size=tail))
    return ts, body, sop_class, sop_uid, f"{base}/{kind}"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Peer:
    """One association at a time to the daemon, re-opened after an abort."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ae = scu(syntaxes=tuple(str(s) for s in SYNTAXES))
        self.assoc: Any = None

    def store(self, path: Path) -> int | str:
        if self.assoc is None or not self.assoc.is_established:
            self.assoc = self.ae.associate("127.0.0.1", self.port, ae_title="TRIAGE")
            assert self.assoc.is_established, "the daemon stopped accepting associations"
        try:
            rsp = self.assoc.send_c_store(path)
        except (ValueError, AttributeError, RuntimeError):
            return "not sent"  # our own sender could not frame it: nothing reached the daemon
        if not self.assoc.is_established:
            self.assoc = None
            return "abort"
        return int(rsp.Status) if "Status" in rsp else "abort"

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def run_fuzz(d: Daemon, tmp_path: Path, examples: int) -> Counter[Any]:
    """Send ``examples`` mutated data sets; return the outcome counts."""
    peer = Peer(d.dicom_port)
    outcomes: Counter[Any] = Counter()
    path = tmp_path / "fuzz.dcm"
    rss_before = _rss_kib()
    _config.STORE_SEND_CHUNKED_DATASET = True  # send each file's bytes as they are
    try:
        for kind in KINDS:
            share = -(-examples // len(KINDS))

            @settings(max_examples=share, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(mutated(kind))
            def one(case: tuple[str, bytes, str, str, str]) -> None:
                ts, body, sop_class, sop_uid, kind = case
                path.write_bytes(_part10(ts, body, sop_class, sop_uid))
                outcome = peer.store(path)
                outcomes[outcome] += 1
                outcomes[f"kind:{kind.split('/')[1]}"] += 1
                assert outcome in ("abort", "not sent") or outcome in ANSWERS, hex(int(outcome))
                assert d.scp.alive

            one()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        peer.close()
    outcomes["rss_growth_mib"] = (_rss_kib() - rss_before) // 1024
    return outcomes


def _clean_study_is_scored(d: Daemon) -> None:
    send_and_wait_scored(d, timeout=300)


def _check(d: Daemon, outcomes: Counter[Any], examples: int) -> None:
    sent = sum(v for k, v in outcomes.items() if not str(k).startswith(("kind:", "rss")))
    assert sent >= examples
    assert outcomes["rss_growth_mib"] < 256, outcomes
    assert d.scp.alive and d.worker.alive
    _clean_study_is_scored(d)


def test_mutated_data_sets_get_a_status_or_a_clean_abort(daemon: Daemon, tmp_path: Path) -> None:
    outcomes = run_fuzz(daemon, tmp_path, FUZZ_QUICK)
    _check(daemon, outcomes, FUZZ_QUICK)
    # The mutations reach the daemon's refusals, not only its success path.
    assert sum(outcomes[c] for c in ANSWERS - {status.SUCCESS}) > 0, outcomes


@pytest.mark.fuzz
def test_fuzz_tier(daemon: Daemon, tmp_path: Path) -> None:
    examples = int(os.environ.get("TRIAGE_FUZZ_EXAMPLES", "10000"))
    outcomes = run_fuzz(daemon, tmp_path, examples)
    print("\nfuzz outcomes:", {(hex(k) if isinstance(k, int) else k): v
                               for k, v in sorted(outcomes.items(), key=str)})
    _check(daemon, outcomes, examples)
