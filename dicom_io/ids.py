"""Identifiers that are safe to log and to use in file names."""

from __future__ import annotations

import hashlib


def uid_hash(uid: str | None, n: int = 12) -> str:
    """Return a short, stable, non-reversible tag for a UID (for logs).

    UIDs can embed dates or device serials, so logs carry this hash instead.
    """
    return hashlib.sha256((uid or "").encode("ascii", "replace")).hexdigest()[:n]


def uid_key(uid: str) -> str:
    """Return a file-name-safe key derived from a UID (hex only, 32 characters).

    Header values never reach a path: only this digest does.
    """
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:32]
