"""Writing files so that no reader ever sees half of one: temp file, optional fsync, rename.

Every page, report, model card and overlay triage writes goes through
:func:`write_atomic`. Files are created readable by the daemon's user only
(0600) unless told otherwise. The durable path for received DICOM, which also
syncs the directory, is the spool's (:mod:`dicom_io.spool`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE = 0o600


def write_atomic(path: str | Path, data: str | bytes, fsync: bool = False,
                 mode: int = PRIVATE) -> Path:
    """Write ``data`` to a temp file beside ``path`` and rename it into place; return the path.

    ``fsync`` makes the content durable before the rename (for files that are
    not regenerated at start). Parent folders are created. Raises OSError.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
