"""``triage backup`` and ``triage restore``: a consistent copy of the record and its files.

A backup is a folder holding the database (``triage.sqlite``, made with
SQLite's online backup API, or ``database.sql`` from ``pg_dump``), every file
the database refers to under ``data/`` (received instances, heatmaps, built
result objects) and ``manifest.json`` with the sha256 of each. The manifest is
written last, so a folder without one is an unfinished backup.

Consistency comes from the order: the database is copied first, as one
snapshot, and the files listed are the ones *that snapshot* refers to. Every
such file was durable before its row was committed (the spool syncs and renames
before recording) and is never rewritten afterwards, so it can be copied while
the daemon keeps running. A file deleted in between (retention purging a study
reported long ago) is listed under ``missing`` and the backup says so.

A restore goes into an empty data directory (and, for PostgreSQL, an empty
database): every sha256 is checked before anything is written, and the files are
assembled in a temporary sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, make_url

from triage import __version__
from triage.core.errors import TriageError
from triage.store.database import UnknownRevision, known_revisions, make_engine

log = logging.getLogger(__name__)

FORMAT = "triage-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SQLITE_FILE = "triage.sqlite"
PG_FILE = "database.sql"
FILES = "data"
CHUNK = 1 << 20

# Every file the record refers to, as a path relative to the data directory.
REFERENCED = (
    "SELECT 'spool/' || relpath FROM instances",
    "SELECT 'spool/' || old_relpath FROM replacements",
    "SELECT 'spool/' || new_relpath FROM replacements",
    "SELECT heatmap_path FROM image_results WHERE heatmap_path IS NOT NULL",
    "SELECT relpath FROM result_objects WHERE relpath IS NOT NULL",
)


class BackupError(TriageError):
    """A backup cannot be taken or restored; the message says why."""


@dataclass(frozen=True)
class Summary:
    """What a backup or restore did: files copied, their bytes, the database revision, and
    the referenced files that were gone (backup only)."""

    files: int
    bytes: int
    revision: str | None
    missing: tuple[str, ...] = ()


def sha256_file(path: Path) -> tuple[str, int]:
    """Return (hex sha256, size) of a file. Raises OSError."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: Path, dst: Path) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` (0600, synced), hashing what was written; return (sha256, size)."""
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    h = hashlib.sha256()
    size = 0
    with src.open("rb") as fin, open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                                     "wb") as fout:
        while block := fin.read(CHUNK):
            h.update(block)
            fout.write(block)
            size += len(block)
        fout.flush()
        os.fsync(fout.fileno())
    return h.hexdigest(), size


def _safe_relpath(rel: str) -> str:
    """Return ``rel`` when it stays inside its root; raise BackupError otherwise (a damaged
    or hostile record or manifest must not make us read or write outside it)."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise BackupError(f"refusing a path outside the data directory: {rel!r}")
    return p.as_posix()


def referenced_files(conn: Connection) -> list[str]:
    """Return every file (relative to the data directory) the database refers to, sorted."""
    out: set[str] = set()
    for sql in REFERENCED:
        out.update(_safe_relpath(str(r[0])) for r in conn.execute(text(sql)))
    return sorted(out)


def _revision(conn: Connection) -> str | None:
    if not inspect(conn).has_table("alembic_version"):  # never migrated
        return None
    return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()


def _empty_dest(dest: Path, what: str) -> None:
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{what} {dest} is not empty: give a new or empty folder")


# -- backup --------------------------------------------------------------------


def backup(data_root: Path, database_url: str, dest: Path) -> Summary:
    """Copy the database (one snapshot) and every file it refers to into ``dest``, a new or
    empty folder outside the data directory; write the manifest last. Returns a Summary.

    Works while a daemon runs on the same data directory. Raises BackupError.
    """
    data_root, dest = data_root.resolve(), dest.resolve()
    if dest == data_root or data_root in dest.parents:
        raise BackupError(f"backup folder {dest} is inside the data directory {data_root}")
    _empty_dest(dest, "backup folder")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(dest, 0o700)
    if database_url:
        database, rels, revision = _pg_snapshot(database_url, dest)
    else:
        database, rels, revision = _sqlite_snapshot(data_root / SQLITE_FILE, dest)
    files, missing, total = {}, [], 0
    for rel in rels:
        src = data_root / rel
        if not src.is_file():
            missing.append(rel)
            continue
        digest, size = _copy(src, dest / FILES / rel)
        files[rel] = {"sha256": digest, "size": size}
        total += size
    _sync_tree(dest / FILES)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "triage_version": __version__, "revision": revision,
                "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "database": database, "files": files, "missing": missing}
    from triage.files import write_atomic

    write_atomic(dest / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True), fsync=True)
    _fsync(dest)
    if missing:
        log.warning("backup: %d referenced file(s) were gone when copied (purged since the "
                    "snapshot?); they are listed under 'missing' in the manifest", len(missing))
    return Summary(len(files), total, revision, tuple(missing))


def _sync_tree(root: Path) -> None:
    """fsync every folder under ``root`` (the files were synced as they were written)."""
    if not root.exists():
        return
    for d, _, _ in os.walk(root):
        _fsync(Path(d))


def _sqlite_snapshot(db_path: Path, dest: Path) -> tuple[dict[str, Any], list[str], str | None]:
    if not db_path.is_file():
        raise BackupError(f"no database at {db_path}: has `triage serve` run with this data "
                          "directory?")
    out = dest / SQLITE_FILE
    # Opened read-write so SQLite can take its shared WAL lock; nothing is written.
    src = sqlite3.connect(f"{db_path.as_uri()}?mode=rw", uri=True, timeout=30)
    dst = sqlite3.connect(out)
    try:
        src.execute("PRAGMA busy_timeout=30000")
        # All pages in one step: one read transaction, so one consistent snapshot even while
        # the daemon commits (WAL readers never block the writer).
        src.backup(dst)
        # A self-contained file: no -wal beside it.
        dst.execute("PRAGMA journal_mode=DELETE")
        dst.commit()
    except sqlite3.Error as e:
        raise BackupError(f"cannot copy the database {db_path}: {e}") from e
    finally:
        dst.close()
        src.close()
    os.chmod(out, 0o600)
    _fsync(out)
    engine = make_engine(out)
    try:
        with engine.connect() as conn:
            revision = _revision(conn)
            rels = referenced_files(conn) if revision is not None else []
    finally:
        engine.dispose()
    digest, size = sha256_file(out)
    return {"kind": "sqlite", "file": SQLITE_FILE, "sha256": digest, "size": size}, rels, revision


def _libpq(database_url: str) -> tuple[str, dict[str, str]]:
    """Return (a libpq URI without the password, the environment carrying it) for ``database_url``,
    so the password never shows in the process list."""
    url = make_url(database_url)
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    plain = url.set(drivername="postgresql", password=None)
    return plain.render_as_string(hide_password=False), env


def _run(cmd: list[str], env: dict[str, str], what: str) -> None:
    if shutil.which(cmd[0]) is None:
        raise BackupError(f"{cmd[0]} is not installed (Debian package postgresql-client)")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["no message"])[-1]
        raise BackupError(f"{what} failed ({cmd[0]} exit {r.returncode}): {tail}")


def _pg_snapshot(database_url: str, dest: Path) -> tuple[dict[str, Any], list[str], str | None]:
    """pg_dump of one exported snapshot, and the files listed from that same snapshot."""
    engine = make_engine(database_url)
    uri, env = _libpq(database_url)
    out = dest / PG_FILE
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                snap = conn.execute(text("SELECT pg_export_snapshot()")).scalar()
                revision = _revision(conn)
                if revision is None:
                    raise BackupError("the database in database.url holds no triage tables: "
                                      "has `triage serve` run with it?")
                rels = referenced_files(conn)
                # pg_dump sees exactly what this transaction sees, while it stays open.
                _run(["pg_dump", "--no-owner", "--no-privileges", f"--snapshot={snap}",
                      "--file", str(out), "--dbname", uri], env, "pg_dump")
    except BackupError:
        raise
    except Exception as e:
        raise BackupError(f"cannot read the database (database.url): "
                          f"{str(e).splitlines()[0]}") from e
    finally:
        engine.dispose()
    os.chmod(out, 0o600)
    _fsync(out)
    digest, size = sha256_file(out)
    return ({"kind": "postgresql", "file": PG_FILE, "sha256": digest, "size": size},
            rels, revision)


# -- restore -------------------------------------------------------------------


def read_manifest(src: Path) -> dict[str, Any]:
    """Return the manifest of the backup in ``src``. Raises BackupError when it is missing
    (not a backup, or an unfinished one), unreadable or of an unknown format."""
    try:
        manifest = json.loads((src / MANIFEST).read_text())
    except FileNotFoundError:
        raise BackupError(f"{src} holds no {MANIFEST}: not a triage backup, or one that did "
                          "not finish") from None
    except (OSError, ValueError) as e:
        raise BackupError(f"cannot read {src / MANIFEST}: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{src / MANIFEST} is not a triage backup manifest of format "
                          f"version {FORMAT_VERSION}")
    return dict(manifest)


def _expected(manifest: dict[str, Any]) -> Iterator[tuple[str, str, int]]:
    """Every file the backup holds: (path relative to the backup, sha256, size)."""
    db = manifest["database"]
    yield _safe_relpath(str(db["file"])), str(db["sha256"]), int(db["size"])
    for rel, meta in manifest["files"].items():
        yield f"{FILES}/{_safe_relpath(rel)}", str(meta["sha256"]), int(meta["size"])


def verify(src: Path) -> dict[str, Any]:
    """Check every file of the backup in ``src`` against its manifest; return the manifest.
    Raises BackupError naming the first file missing or differing."""
    manifest = read_manifest(src)
    for rel, digest, size in _expected(manifest):
        try:
            got, n = sha256_file(src / rel)
        except OSError as e:
            raise BackupError(f"backup file {rel} cannot be read: {e.strerror or e}") from e
        if (got, n) != (digest, size):
            raise BackupError(f"backup file {rel} does not match its sha256 in the manifest "
                              "(damaged or altered): nothing was restored")
    return manifest


def _check_revision(revision: str | None) -> None:
    known, head = known_revisions()
    if revision is not None and revision not in known:
        raise UnknownRevision(
            f"the backup's database is at revision {revision!r}, which triage {__version__} "
            f"(newest revision {head!r}) does not know: restore it with the triage that took it")


def restore(src: Path, data_root: Path, database_url: str) -> Summary:
    """Restore the backup in ``src`` into ``data_root``, which must be absent or empty (and,
    with ``database_url``, into that database, which must hold no tables). Every sha256 is
    checked first. Returns a Summary. Raises BackupError or UnknownRevision."""
    src, data_root = src.resolve(), data_root.resolve()
    _empty_dest(data_root, "data directory")
    manifest = verify(src)
    _check_revision(manifest.get("revision"))
    kind = manifest["database"]["kind"]
    if (kind == "postgresql") != bool(database_url):
        want = "a PostgreSQL database.url" if kind == "postgresql" else "no database.url (SQLite)"
        raise BackupError(f"this backup holds a {kind} database: the config must name {want}")
    if database_url:
        _pg_check_empty(database_url)
    data_root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{data_root.name}.restore-", dir=data_root.parent))
    try:
        total = _place_files(src, work, manifest["files"].items())
        if kind == "sqlite":
            _copy(src / SQLITE_FILE, work / SQLITE_FILE)
        _sync_tree(work)
        if database_url:  # before the files are in place: a failed load leaves nothing behind
            _pg_load(database_url, src / PG_FILE)
        if data_root.exists():
            data_root.rmdir()  # empty, checked above
        os.replace(work, data_root)
        _fsync(data_root.parent)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return Summary(len(manifest["files"]), total, manifest.get("revision"))


def _place_files(src: Path, work: Path, files: Iterable[tuple[str, dict[str, Any]]]) -> int:
    total = 0
    for rel, meta in files:
        digest, size = _copy(src / FILES / rel, work / _safe_relpath(rel))
        if digest != meta["sha256"]:  # changed since verify(): the backup is being altered
            raise BackupError(f"backup file {FILES}/{rel} changed while it was restored")
        total += size
    return total


def _pg_check_empty(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            n = conn.execute(text(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema NOT IN "
                "('pg_catalog', 'information_schema')")).scalar()
    except Exception as e:
        raise BackupError(f"cannot open the database (database.url): "
                          f"{str(e).splitlines()[0]}") from e
    finally:
        engine.dispose()
    if n:
        raise BackupError(f"the database in database.url is not empty ({n} table(s)): restore "
                          "into a new, empty database")


def _pg_load(database_url: str, dump: Path) -> None:
    uri, env = _libpq(database_url)
    _run(["psql", "--no-psqlrc", "--quiet", "--single-transaction", "-v", "ON_ERROR_STOP=1",
          "--file", str(dump), "--dbname", uri], env, "loading the database with psql")
