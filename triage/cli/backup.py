"""``triage backup DEST`` and ``triage restore SRC``: the database and its files, with sha256s."""

from __future__ import annotations

import argparse
from pathlib import Path

from triage.cli.common import SubParsers, config_args, load_config


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _backup(args: argparse.Namespace) -> int:
    from triage.store.backup import backup

    cfg = load_config(args)
    done = backup(cfg.storage.root, cfg.database.url, Path(args.dest))
    print(f"backed up the database (revision {done.revision or 'none'}) and {done.files} "
          f"file(s), {_mib(done.bytes)}, to {args.dest}")
    if done.missing:
        print(f"warning: {len(done.missing)} referenced file(s) were already gone (listed "
              "under 'missing' in the manifest)")
    return 0


def _restore(args: argparse.Namespace) -> int:
    from triage.store.backup import restore

    cfg = load_config(args)
    done = restore(Path(args.src), cfg.storage.root, cfg.database.url)
    print(f"restored the database (revision {done.revision or 'none'}) and {done.files} "
          f"file(s), {_mib(done.bytes)}, into {cfg.storage.root}; every sha256 matched. "
          "`triage serve` with this config migrates it if needed")
    return 0


def add(sub: SubParsers) -> None:
    """Add ``backup`` and ``restore``."""
    p = sub.add_parser("backup", help="copy the database and the files it refers to (daemon may run)",
                       description="Copy one consistent snapshot of the database (SQLite's "
                                   "online backup, or pg_dump) and every file it refers to "
                                   "into DEST, with a manifest of sha256s. Safe while "
                                   "`triage serve` runs.")
    config_args(p)
    p.add_argument("dest", metavar="DEST", help="a new or empty folder outside the data directory")
    p.set_defaults(func=_backup)

    p = sub.add_parser("restore", help="restore a backup into an empty data directory",
                       description="Check every sha256 of the backup in SRC, then restore it "
                                   "into storage.data_dir, which must be absent or empty (and "
                                   "into database.url, which must hold no tables).")
    config_args(p)
    p.add_argument("src", metavar="SRC", help="a folder written by `triage backup`")
    p.set_defaults(func=_restore)
