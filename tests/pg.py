"""A real PostgreSQL server for the tests: ``initdb`` and ``pg_ctl`` in a temp dir on a free port.

PostgreSQL refuses to run as root, so when the tests run as root the cluster
belongs to the ``postgres`` system user (created by the Debian package) and
every server command runs as that user (``runuser``). Tests that need the
server skip, with the reason, when no PostgreSQL binaries are installed
(scripts/system-deps.sh installs the Debian package ``postgresql``).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port

SUPERUSER = "triage"


def bin_dir() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres (newest version), or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                  key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(dirs[-1]).parent if dirs else None


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' user to run PostgreSQL as")
    return ["runuser", "-u", "postgres", "--", *cmd]


@dataclass
class PgServer:
    """One throw-away PostgreSQL cluster listening on 127.0.0.1 only, trust auth."""

    bindir: Path
    root: Path
    port: int

    @property
    def data(self) -> Path:
        """The cluster's data directory."""
        return self.root / "data"

    def _run(self, *args: str) -> None:
        r = subprocess.run(_as_owner([*args]), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            log = self.root / "server.log"
            raise AssertionError(f"{args[0]} failed: {r.stdout}{r.stderr}"
                                 + (log.read_text() if log.exists() else ""))

    def start(self) -> PgServer:
        """initdb, then start the server; returns self once it accepts connections."""
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
                  "--auth=trust", "--encoding=UTF8", "--no-instructions")
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server on the existing cluster; returns once it accepts connections."""
        # Speed over durability: the server outlives every daemon a test kills, and the
        # cluster is deleted afterwards.
        opts = (f"-p {self.port} -h 127.0.0.1 -k {self.root} -c fsync=off "
                "-c full_page_writes=off -c max_connections=200")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l",
                  str(self.root / "server.log"), "-o", opts, "-w", "-t", "60", "start")

    def halt(self) -> None:
        """Stop the server (fast shutdown: sessions are cut, transactions in flight roll
        back) and keep the cluster, as an outage does; :meth:`resume` starts it again."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w",
                  "stop")

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete the cluster."""
        subprocess.run(_as_owner([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m",
                                  "fast", "-w", "stop"]), capture_output=True, timeout=120)
        shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """Create an empty database with a fresh name; return its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={SUPERUSER} "
                             "dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_server() -> PgServer:
    """Start a cluster in a new temp dir; skips the test when PostgreSQL is not installed."""
    bindir = bin_dir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or under "
                    "/usr/lib/postgresql/*/bin; scripts/system-deps.sh installs it)")
    root = Path(tempfile.mkdtemp(prefix="triage-pg-"))
    os.chmod(root, 0o700)
    return PgServer(bindir, root, free_port()).start()
