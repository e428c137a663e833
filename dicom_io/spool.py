"""The durable spool: every acknowledged instance lives here, byte for byte as received.

Layout under the spool root (no header value ever reaches a path; only digests do)::

    .tmp/<random>.part                         being written, never acknowledged
    <ss>/<study-key>/<sop-key>_<content16>.dcm  durable, acknowledged

A received file that already lies on the spool's file system (the listener's
temp file) is not copied: its data is synced where it was written, and a hard
link into ``.tmp`` then the same rename give it its durable name
(:meth:`Spool.adopt`).

``ss`` is the first two hex digits of the study key, to keep directories small.
The content digest in the name makes a byte-identical resend land on the same
path (idempotent) and a changed resend land beside the old version, which is
kept: acknowledged data is never deleted.

The layout is safe for a spool that several daemons share (e.g. over NFS):
temp names are random, every durable file appears by one atomic rename, and
two daemons receiving the same bytes write the same path with the same content.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dicom_io.ids import uid_key

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"


class SpoolError(Exception):
    """Writing to the spool failed; ``out_of_space`` says whether the disk is full."""

    def __init__(self, message: str, out_of_space: bool = False) -> None:
        super().__init__(message)
        self.out_of_space = out_of_space


@dataclass(frozen=True)
class SpoolEntry:
    """Where a received instance now lives, and what it is."""

    path: Path
    relpath: str
    sha256: str
    size: int
    existed: bool  # True when a byte-identical copy was already durable


class _CannotLink(Exception):
    """A received file cannot be hard-linked into the spool (not an OSError, so that
    :meth:`Spool._commit` passes it through: the caller copies the file instead)."""


def _spool_error(e: OSError) -> SpoolError:
    """The SpoolError for a failed write (``out_of_space`` for ENOSPC and EDQUOT)."""
    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
    return SpoolError(f"spool write failed: {e.strerror or e}", out_of_space=full)


def _datasync(fd: int) -> None:
    """Make a file's data (and its size) durable; its times need not be."""
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A directory of durably written DICOM files."""

    def __init__(self, root: Path, fsync: bool = True, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.tmp = self.root / TMP_DIR
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)

    def free_bytes(self) -> int:
        """Return the bytes available to us on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def has_room(self, incoming: int = 0) -> bool:
        """Return True when writing ``incoming`` bytes keeps the free-space reserve."""
        return self.free_bytes() - incoming >= self.min_free_bytes

    def path_for(self, study_uid: str, sop_uid: str, sha256: str) -> Path:
        """Return the durable path of an instance with this content digest."""
        skey = uid_key(study_uid)
        return self.root / skey[:2] / skey / f"{uid_key(sop_uid)}_{sha256[:16]}.dcm"

    def write(self, study_uid: str, sop_uid: str, data: bytes) -> SpoolEntry:
        """Durably write ``data``: temp file, fsync, rename, fsync the directory.

        Returns the entry once the bytes would survive a crash. Raises SpoolError
        (with ``out_of_space`` set for ENOSPC/EDQUOT); a failed write leaves no
        file at the durable path.
        """
        digest = hashlib.sha256(data).hexdigest()
        return self._commit(study_uid, sop_uid, digest, len(data),
                            lambda tmp: self._write_tmp(tmp, data))

    def _commit(self, study_uid: str, sop_uid: str, digest: str, size: int,
                place: Callable[[Path], None]) -> SpoolEntry:
        """Have ``place(tmp)`` create the synced temp file ``tmp`` (a copy or a link), rename
        it to its durable path and fsync the directory (when that path already holds these
        bytes, only the directory sync)."""
        final = self.path_for(study_uid, sop_uid, digest)
        rel = final.relative_to(self.root).as_posix()
        if final.exists() and final.stat().st_size == size:
            # A resend of what an earlier attempt renamed: its name is synced now, if that
            # attempt stopped before it could.
            self._sync_dir(final.parent)
            return SpoolEntry(final, rel, digest, size, existed=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        try:
            place(tmp)
            self._ensure_dir(final.parent)
            os.replace(tmp, final)
            self._sync_dir(final.parent)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _spool_error(e) from e
        return SpoolEntry(final, rel, digest, size, existed=False)

    def write_file(self, study_uid: str, sop_uid: str, source: Path,
                   chunk: int = 1 << 20) -> SpoolEntry:
        """Durably copy the file ``source`` into the spool, as :meth:`write` does with bytes,
        reading it in chunks: a large data set is never held in memory."""
        sha = hashlib.sha256()
        size = 0
        with open(source, "rb") as fh:
            while block := fh.read(chunk):
                sha.update(block)
                size += len(block)

        def blocks() -> Iterator[bytes]:
            with open(source, "rb") as fh:
                yield from iter(lambda: fh.read(chunk), b"")

        return self._commit(study_uid, sop_uid, sha.hexdigest(), size,
                            lambda tmp: self._write_tmp(tmp, blocks()))

    def adopt(self, study_uid: str, sop_uid: str, source: Path,
              chunk: int = 1 << 20) -> SpoolEntry:
        """Durably keep the received file ``source`` in the spool, as :meth:`write_file` does,
        but without copying it when it lies on the spool's file system: its data is synced
        where it was written as it arrived, hard-linked to a spool temp name and renamed to
        its durable name (the same rename and directory sync as a copy; the caller's name
        for it may then go). Where it cannot be linked (another file system, a policy that
        forbids it) it is copied by :meth:`write_file`.
        """
        try:
            same_fs = os.stat(source).st_dev == os.stat(self.tmp).st_dev
        except OSError:
            same_fs = False
        if not same_fs:
            return self.write_file(study_uid, sop_uid, source, chunk)
        sha = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as fh:
                while block := fh.read(chunk):
                    sha.update(block)
                    size += len(block)
                if self.fsync:
                    _datasync(fh.fileno())
        except OSError as e:
            raise _spool_error(e) from e

        def link(tmp: Path) -> None:
            try:
                os.link(source, tmp)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise  # a full disk is refused as such, not retried as a copy
                raise _CannotLink(e.strerror or str(e)) from e

        try:
            return self._commit(study_uid, sop_uid, sha.hexdigest(), size, link)
        except _CannotLink as e:
            log.debug("cannot link a received file into the spool (%s); copying it", e)
            return self.write_file(study_uid, sop_uid, source, chunk)

    def _sync_dir(self, d: Path) -> None:
        """Sync a directory (when fsync is on), so the names in it survive a power cut."""
        if self.fsync:
            _fsync_dir(d)

    def _write_tmp(self, tmp: Path, data: bytes | Iterable[bytes]) -> None:
        """Write ``data`` (bytes, or blocks of them) to a new file ``tmp``, fsynced if set."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the daemon's user only
        try:
            for block in ((data,) if isinstance(data, bytes) else data):
                view = memoryview(block)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
            if self.fsync:
                _datasync(fd)
        finally:
            os.close(fd)

    def _ensure_dir(self, d: Path) -> None:
        if d.is_dir():
            return
        created = []
        p = d
        while not p.exists():
            created.append(p)
            p = p.parent
        for c in reversed(created):
            c.mkdir(mode=0o700, exist_ok=True)
        if self.fsync:
            # A new directory entry is durable only once its parent is synced.
            for c in reversed(created):
                _fsync_dir(c.parent)

    def cleanup_temp(self, older_than_s: float = 0.0) -> int:
        """Delete leftover temp files (never acknowledged); return how many.

        ``older_than_s`` spares files written to within that many seconds: on a
        spool shared by several daemons, another daemon may be writing one now.
        """
        n = 0
        cutoff = time.time() - older_than_s
        for f in self.tmp.glob("*.part"):
            try:
                if older_than_s and f.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:
                continue  # its writer renamed or removed it meanwhile
            f.unlink(missing_ok=True)
            n += 1
        if n:
            log.info("removed %d unacknowledged temp file(s) from the spool", n)
        return n

    def files(self) -> Iterator[Path]:
        """Yield every durable instance file in the spool."""
        yield from self.root.glob("??/*/*.dcm")
