"""``triage backup`` while a real daemon receives studies, and ``triage restore`` into an empty
data directory: every instance acknowledged before the backup started and every result is
there, every file matches its sha256, and a daemon started on the restored directory scores
what was left. On SQLite and on a real PostgreSQL server; plus the refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from tests import synth
from tests.conftest import send, storescu, wait_for
from tests.peers import StoreScp
from triage.service.daemon import Daemon
from triage.store import backup as bk
from triage.store import schema as db
from triage.store.backup import BackupError, sha256_file
from triage.store.database import make_engine

SMALL = synth.SynthSpec(rows=96, columns=96)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``triage ARGS`` in a fresh process, as an operator would."""
    return subprocess.run([sys.executable, "-m", "triage", *args], capture_output=True,
                          text=True, timeout=300)


def config_args(tmp_path: Path, data: Path, url: str) -> list[str]:
    """--config (naming the database when it is PostgreSQL) and --data-dir for the CLI."""
    cfg = tmp_path / f"cli-{data.name}.toml"
    cfg.write_text(f'[database]\nurl = "{url}"\n' if url else "")
    return ["--config", str(cfg), "--data-dir", str(data)]


def record(engine_target: Path | str) -> tuple[set[str], set[tuple[str, int, str]],
                                               list[tuple[str, str]]]:
    """(SOP Instance UIDs, results as (study UID, version, tier), each instance's spool path
    and sha256) in a database."""
    engine = make_engine(engine_target)
    try:
        with engine.connect() as c:
            sops = set(c.scalars(select(db.Instance.sop_instance_uid)))
            results = {(u, v, t) for u, v, t in c.execute(
                select(db.Study.study_uid, db.Result.version, db.Result.tier)
                .join(db.Study, db.Study.id == db.Result.study_id))}
            files = [(r, h) for r, h in c.execute(select(db.Instance.relpath,
                                                          db.Instance.sha256))]
    finally:
        engine.dispose()
    return sops, results, files


class Stream:
    """A pynetdicom SCU sending one-image studies, one association each, until stopped;
    ``acked`` holds the SOP Instance UIDs answered 0x0000, in order."""

    def __init__(self, port: int) -> None:
        self.port, self.acked, self.stop = port, [], threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            ds = synth.make_dataset(SMALL, study_uid=generate_uid())
            if send(self.port, [ds]) == [0]:
                self.acked.append(str(ds.SOPInstanceUID))

    def __enter__(self) -> Stream:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)


def all_scored(d: Daemon) -> bool:
    """True when every study of daemon ``d`` has a final state and none is left to score."""
    with d.store.read() as s:
        states = list(s.scalars(select(db.Study.state)))
    return bool(states) and all(st == db.SCORED for st in states)


def sent(d: Daemon) -> bool:
    """True when daemon ``d`` has outbox rows and every one is sent."""
    with d.store.read() as s:
        states = list(s.scalars(select(db.Delivery.state)))
    return bool(states) and all(st == db.SENT for st in states)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """'' (the SQLite file in the data directory) or a new, empty PostgreSQL database."""
    return "" if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))


@pytest.mark.slow
def test_backup_under_load_restores_every_acknowledged_instance_and_result(
        daemon_factory: Callable[..., Daemon], tmp_path: Path, db_url: str,
        request: pytest.FixtureRequest) -> None:
    var, dest, new = tmp_path / "var", tmp_path / "backup", tmp_path / "restored"
    pacs = StoreScp(tmp_path / "pacs").start()
    request.addfinalizer(pacs.stop)
    # A PACS to send results to, so the backup also holds built SR and overlay objects.
    over = {"results.destinations": [{"ae_title": "PACS", "host": "127.0.0.1",
                                      "port": pacs.port}],
            **({"database.url": db_url} if db_url else {})}
    d = daemon_factory(var, **over)
    first = synth.write_study(tmp_path / "first", n_images=2, spec=SMALL)
    assert storescu(d.dicom_port, *first).returncode == 0
    wait_for(lambda: all_scored(d), timeout=120)
    wait_for(lambda: sent(d), timeout=120)  # its SR and overlays built and delivered
    with Stream(d.dicom_port) as stream:
        wait_for(lambda: len(stream.acked) >= 3, timeout=120)
        # What was acknowledged and decided before the backup started.
        acked = {str(dcmread(p).SOPInstanceUID) for p in first} | set(stream.acked)
        _, results, _ = record(db_url or var / "triage.sqlite")
        run = cli("backup", *config_args(tmp_path, var, db_url), str(dest))
        assert run.returncode == 0, run.stderr
        n = len(stream.acked)
        wait_for(lambda: len(stream.acked) >= n + 2, timeout=120)  # the daemon kept receiving
    assert "backed up the database (revision 0014)" in run.stdout
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["missing"] == []
    assert {rel.split("/")[0] for rel in manifest["files"]} == {"spool", "heatmaps", "outbox"}

    # Restore into an empty directory (and an empty database) and check the record.
    new_url = str(request.getfixturevalue("pg_server").create_database()) if db_url else ""
    run = cli("restore", *config_args(tmp_path, new, new_url), str(dest))
    assert run.returncode == 0, run.stderr
    assert "every sha256 matched" in run.stdout
    sops, got_results, instances = record(new_url or new / "triage.sqlite")
    assert acked <= sops
    assert results and results <= got_results
    for relpath, digest in instances:  # each spool file is the one the record names
        assert sha256_file(new / "spool" / relpath)[0] == digest
    # The restored directory is a working one: a daemon starts on it and scores what the
    # backup caught before it was scored.
    d2 = daemon_factory(new, **({"database.url": new_url} if new_url else {}))
    wait_for(lambda: all_scored(d2), timeout=180)


def test_restore_refuses_a_used_directory_and_a_damaged_backup(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    var, dest = tmp_path / "var", tmp_path / "backup"
    d = daemon_factory(var)
    assert send(d.dicom_port, [synth.make_dataset(SMALL)]) == [0]
    wait_for(lambda: all_scored(d), timeout=120)
    summary = bk.backup(var, "", dest)
    assert summary.files >= 2 and summary.missing == ()  # the instance and its heatmap
    # Not into the daemon's own directory, nor into a used one.
    run = cli("restore", "--data-dir", str(var), str(dest))
    assert run.returncode == 2 and "is not empty" in run.stderr, run.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("x")
    run = cli("restore", "--data-dir", str(used), str(dest))
    assert run.returncode == 2 and "is not empty" in run.stderr
    # Nor a second backup into the same folder, nor a backup inside the data directory.
    with pytest.raises(BackupError, match="not empty"):
        bk.backup(var, "", dest)
    with pytest.raises(BackupError, match="inside the data directory"):
        bk.backup(var, "", var / "b")
    # A backup from a newer triage (its revision unknown here) is not restored by this one.
    manifest_path = dest / "manifest.json"
    original = manifest_path.read_text()
    manifest_path.chmod(0o600)
    manifest_path.write_text(original.replace('"revision": "0014"', '"revision": "0099"'))
    run = cli("restore", "--data-dir", str(tmp_path / "newer"), str(dest))
    assert run.returncode == 2 and "revision '0099'" in run.stderr, run.stderr
    assert "restore it with the triage that took it" in run.stderr
    manifest_path.write_text(original)
    # One flipped byte in one file: refused before anything is written.
    rel = next(iter(json.loads((dest / "manifest.json").read_text())["files"]))
    f = dest / "data" / rel
    f.chmod(0o600)
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    target = tmp_path / "fresh"
    run = cli("restore", "--data-dir", str(target), str(dest))
    assert run.returncode == 2 and "does not match its sha256" in run.stderr, run.stderr
    assert not target.exists()
    # A folder without a manifest (an unfinished backup) is not a backup.
    (dest / "manifest.json").unlink()
    run = cli("restore", "--data-dir", str(target), str(dest))
    assert run.returncode == 2 and "not a triage backup" in run.stderr


def test_a_referenced_file_gone_before_it_is_copied_is_listed_as_missing(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    var = tmp_path / "var"
    d = daemon_factory(var)
    assert send(d.dicom_port, [synth.make_dataset(SMALL)]) == [0]
    wait_for(lambda: all_scored(d), timeout=120)
    heatmap = next((var / "heatmaps").rglob("*.png"))
    heatmap.unlink()  # as retention would between the snapshot and the copy
    rel = heatmap.relative_to(var).as_posix()
    run = cli("backup", "--data-dir", str(var), str(tmp_path / "b"))
    assert run.returncode == 0, run.stderr
    assert "1 referenced file(s) were already gone" in run.stdout
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["missing"] == [rel] and rel not in manifest["files"]
    assert cli("restore", "--data-dir", str(tmp_path / "r"), str(tmp_path / "b")).returncode == 0
