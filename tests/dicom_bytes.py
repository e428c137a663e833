"""Byte-level helpers for tests: where a Part 10 file's data set starts."""

from __future__ import annotations

import io
from pathlib import Path

from pydicom.filereader import _read_file_meta_info, read_preamble


def dataset_body(data: bytes | Path) -> bytes:
    """Return the bytes after the preamble and the file meta group (the data set as sent)."""
    raw = data.read_bytes() if isinstance(data, Path) else data
    fp = io.BytesIO(raw)
    read_preamble(fp, force=True)
    _read_file_meta_info(fp)
    return raw[fp.tell():]
