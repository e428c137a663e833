"""DICOMweb STOW-RS as origin server: ``POST /dicomweb/studies[/{StudyInstanceUID}]``.

The body (``multipart/related; type="application/dicom"``) is parsed as it
streams in, never held whole: each part goes to a temp file in the spool's own
folder, and when the part ends it takes exactly the listener's path for a
C-STORE (:meth:`dicom_io.scp.StoreScp.take`: room, size and pixel limits,
validation, fsync, rename, directory sync, database record). The answer is sent
only after every part is durable or refused, so a 200 means every instance is
safe on disk, as a C-STORE's 0x0000 does.

Answers (PS3.18 10.5.3): 200 when every instance was stored; 202 when some were
and others failed (their FailureReason is the C-STORE status the listener would
have given); 409 when none was; 503 with Retry-After when none was for a reason
that passes (disk below its reserve, database unavailable); 400 for a body
without parts; 415 for another media type.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
# C-STORE statuses that say "try again later", not "this instance is at fault".
TRANSIENT = frozenset({0xA700, 0xA703})
TOO_LARGE, UNREADABLE, MISMATCH = 0xA701, 0xC210, 0xA900

# take(path, transfer syntax, SOP class, SOP instance, calling) -> (status, outcome, header)
Take = Callable[[Path, str, str, str, str], tuple[int, str | None, Any]]
# refuse(calling, SOP class, SOP instance, status, reason): record a part refused before take.
Refuse = Callable[[str, str, str, int, str], None]


@dataclass(frozen=True)
class Stored:
    """One part's end: its UIDs (as far as they could be read) and the status it got."""

    sop_class_uid: str
    sop_instance_uid: str
    status: int
    outcome: str | None


class _Body:
    """The parser's callbacks for one request: parts to temp files, each taken as it ends."""

    def __init__(self, take: Take, refuse: Refuse, tmp_dir: Path, max_part_bytes: int,
                 study_uid: str | None, calling: str) -> None:
        self.take, self.refuse, self.tmp_dir, self.max_part = take, refuse, tmp_dir, max_part_bytes
        self.study_uid, self.calling = study_uid, calling
        self.results: list[Stored] = []
        self._fh: Any = None
        self._path: Path | None = None
        self._size = 0
        self._header: tuple[bytes, bytes] = (b"", b"")
        self._headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict[str, Any]:
        return {"on_part_begin": self._begin, "on_part_data": self._data,
                "on_part_end": self._end, "on_header_field": self._field,
                "on_header_value": self._value, "on_header_end": self._header_end}

    def _begin(self) -> None:
        fd, name = tempfile.mkstemp(suffix=".stow", dir=self.tmp_dir)  # mode 0600
        self._fh, self._path, self._size, self._headers = os.fdopen(fd, "wb"), Path(name), 0, {}

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header = (self._header[0] + data[start:end], self._header[1])

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header = (self._header[0], self._header[1] + data[start:end])

    def _header_end(self) -> None:
        self._headers[self._header[0].strip().lower()] = self._header[1].strip()
        self._header = (b"", b"")

    def _data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._size <= self.max_part:  # past the limit the rest is read and dropped
            self._fh.write(data[start:end])

    def _end(self) -> None:
        self._fh.close()
        path, self._fh, self._path = self._path, None, None
        assert path is not None
        try:
            self.results.append(self._take(path))
        finally:
            path.unlink(missing_ok=True)  # the spool keeps its own link to what it took

    def _refused(self, status: int, reason: str, sop_class: str = "", sop_uid: str = "") -> Stored:
        self.refuse(self.calling, sop_class, sop_uid, status, reason)
        return Stored(sop_class, sop_uid, status, None)

    def _take(self, path: Path) -> Stored:
        media = parse_options_header(self._headers.get(b"content-type", b""))[0]
        if media not in (b"application/dicom", b""):
            return self._refused(UNREADABLE, f"a part of type {media.decode('latin-1')[:40]!r}, "
                                 "not application/dicom")
        if self._size > self.max_part:
            return self._refused(TOO_LARGE, f"part of {self._size / 2**20:.0f} MiB is larger "
                                 f"than the {self.max_part / 2**20:.0f} MiB limit")
        try:
            ds = dcmread(path, stop_before_pixels=True)
            meta = ds.file_meta
            sop_class, sop_uid = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
            ts = str(meta.TransferSyntaxUID)
            study = str(ds.get("StudyInstanceUID", ""))
        except Exception as e:
            return self._refused(UNREADABLE, f"part of {self._size} bytes is not a DICOM "
                                 f"file ({type(e).__name__})")
        if self.study_uid is not None and study != self.study_uid:
            return self._refused(MISMATCH, "StudyInstanceUID differs from the request URL's",
                                 sop_class, sop_uid)
        status, outcome, _header = self.take(path, ts, sop_class, sop_uid, self.calling)
        return Stored(sop_class, sop_uid, status, outcome)

    def abandon(self) -> None:
        """Close and remove the part in progress (a body cut short)."""
        if self._fh is not None:
            self._fh.close()
        if self._path is not None:
            self._path.unlink(missing_ok=True)


def response_dataset(results: list[Stored]) -> Dataset:
    """The Store Instances Response (PS3.18 10.5.3.3): ReferencedSOPSequence for what was
    stored, FailedSOPSequence (with FailureReason) for what was not."""
    out = Dataset()
    ok = [r for r in results if r.status == 0]
    bad = [r for r in results if r.status != 0]
    if ok:
        out.ReferencedSOPSequence = [_ref(r) for r in ok]
    if bad:
        out.FailedSOPSequence = [_ref(r, failure=r.status) for r in bad]
    return out


def _ref(r: Stored, failure: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = r.sop_class_uid or None
    item.ReferencedSOPInstanceUID = r.sop_instance_uid or None
    if failure is not None:
        item.FailureReason = failure
    return item


def http_status(results: list[Stored]) -> int:
    """200 all stored, 202 some, 409 none, 503 none for a passing reason."""
    stored = sum(r.status == 0 for r in results)
    if stored == len(results):
        return 200
    if stored:
        return 202
    return 503 if all(r.status in TRANSIENT for r in results) else 409


class StowReceiver:
    """The endpoint: ``await receiver(request)`` answers one STOW-RS request."""

    def __init__(self, take: Take, refuse: Refuse, tmp_dir: Path, max_part_bytes: int) -> None:
        self.take, self.refuse, self.tmp_dir, self.max_part = take, refuse, tmp_dir, max_part_bytes

    async def __call__(self, request: Request) -> Response:
        media, params = parse_options_header(request.headers.get("content-type", ""))
        kind = params.get(b"type", b"application/dicom").strip(b'"')
        boundary = params.get(b"boundary")
        if media != b"multipart/related" or kind != b"application/dicom" or not boundary:
            return PlainTextResponse('415 Unsupported Media Type: send multipart/related; '
                                     'type="application/dicom" with a boundary\n', status_code=415)
        study_uid = request.path_params.get("study_uid")
        body = _Body(self.take, self.refuse, self.tmp_dir, self.max_part, study_uid, "STOW-RS")
        parser = MultipartParser(boundary, cast(Any, body.callbacks()))
        try:
            async for chunk in request.stream():
                if chunk:
                    # Writing parts and taking them (fsync, database) block: off the event loop.
                    await run_in_threadpool(parser.write, chunk)
            await run_in_threadpool(parser.finalize)
        except Exception as e:
            body.abandon()
            log.warning("STOW-RS body refused after %d part(s): %s", len(body.results), e)
            if not body.results:
                return PlainTextResponse(f"400 Bad Request: the multipart body cannot be "
                                         f"parsed ({type(e).__name__})\n", status_code=400)
        if not body.results:
            return PlainTextResponse("400 Bad Request: the body holds no instance\n",
                                     status_code=400)
        code = http_status(body.results)
        headers = {"Retry-After": "30"} if code == 503 else {}
        log.info("STOW-RS: %d of %d instance(s) stored (HTTP %d)",
                 sum(r.status == 0 for r in body.results), len(body.results), code)
        return JSONResponse(response_dataset(body.results).to_json_dict(), status_code=code,
                            media_type=DICOM_JSON, headers=headers)
