"""Reading labelled CSVs (``path,label[,split,sha256]``): one reader for train and archive build."""

from __future__ import annotations

import csv
from pathlib import Path

from triage.core.errors import InputError


def read_labelled_rows(csv_path: Path) -> list[dict[str, str]]:
    """Return the CSV's rows, each with a ``path`` and a ``label`` of "0" or "1".

    Raises InputError on an unreadable file, missing columns or a bad label
    (the message names the row, counting the header as row 1).
    """
    try:
        with csv_path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as e:
        raise InputError(f"cannot read manifest {csv_path}: {e}") from e
    if not rows or not {"path", "label"} <= set(rows[0]):
        raise InputError(f"manifest {csv_path} needs columns path,label[,split,sha256]")
    for i, r in enumerate(rows, start=2):
        if (r["label"] or "").strip() not in ("0", "1"):
            raise InputError(f"manifest {csv_path} row {i}: label {r['label']!r} is not 0 or 1")
    return rows
