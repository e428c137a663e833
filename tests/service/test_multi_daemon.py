"""Two `triage serve` processes on one PostgreSQL database and one data directory.

The instances of every study are split across both daemons; one daemon is
killed with SIGKILL while it holds a claim on a study it is scoring. The other
one takes over its claims and the leader's jobs, and every study is scored
exactly once with every acknowledged instance on disk and in the database.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests import synth
from tests.conftest import echo_ok, free_port, send, serve_config, wait_for
from tests.dicom_bytes import dataset_body
from triage.store.database import make_engine

pytestmark = pytest.mark.slow

N_STUDIES = 12
LEASE_S = 3.0


def _config(tmp: Path, name: str, data: Path, url: str) -> tuple[Path, int]:
    port = free_port()
    extra = (f"max_studies_in_flight = 2\nclaim_lease_s = {LEASE_S}\n"
             f'[database]\nurl = "{url}"\nleader_lease_s = {LEASE_S}\n')
    return serve_config(tmp / f"{name}.toml", data, port, extra), port


def _start(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _rows(engine: Any, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as c:
        return list(c.execute(text(sql), params).all())


def test_two_daemons_share_the_work_and_survive_a_kill_9_mid_scoring(
        pg_url: str, tmp_path: Path) -> None:
    data = tmp_path / "shared-var"
    (cfg_a, port_a), (cfg_b, port_b) = (_config(tmp_path, n, data, pg_url) for n in "ab")
    a = _start(cfg_a, tmp_path / "a.log")
    wait_for(lambda: echo_ok(port_a), timeout=90)
    b = _start(cfg_b, tmp_path / "b.log")
    engine = make_engine(pg_url)
    try:
        wait_for(lambda: echo_ok(port_b), timeout=90)
        # Every study's two instances arrive at different daemons.
        acked: dict[str, bytes] = {}
        studies = []
        for i in range(N_STUDIES):
            paths = synth.write_study(tmp_path / "src" / str(i), n_images=2,
                                      spec=synth.SynthSpec(rows=512, columns=512, seed=i))
            studies.append(paths)
            for path, port in zip(paths, (port_a, port_b), strict=True):
                assert send(port, [path]) == [0]
                acked[path.stem] = path.read_bytes()  # write_study names files by SOP UID
        t_sent = time.monotonic()

        # Mid-scoring: a study claimed by A (its PID is in its claims) and not yet scored.
        mark = f":{a.pid}:"
        held = wait_for(lambda: _rows(engine, "SELECT id FROM studies WHERE state = 'complete' "
                                      "AND claimed_by LIKE :m", m=f"%{mark}%"),
                        timeout=120, interval=0.01)
        a.send_signal(signal.SIGKILL)
        a.wait(30)
        t_kill = time.monotonic()
        claimed = [r[0] for r in held]
        scored_at_kill = _rows(engine, "SELECT count(*) FROM results")[0][0]
        assert scored_at_kill < N_STUDIES
        # A died holding its claims: they are still its, until they run out.
        assert _rows(engine, "SELECT count(*) FROM studies WHERE claimed_by LIKE :m",
                     m=f"%{mark}%")[0][0] >= 1

        wait_for(lambda: _rows(engine, "SELECT count(*) FROM results")[0][0] >= N_STUDIES,
                 timeout=240, interval=0.2)
        t_done = time.monotonic()
        per_study = _rows(engine, "SELECT s.id, s.state, s.n_instances, count(r.id) FROM studies s"
                                  " LEFT JOIN results r ON r.study_id = s.id AND r.version = s.version"
                                  " GROUP BY s.id")
        assert len(per_study) == N_STUDIES
        assert all(state == "scored" and n == 2 and results == 1
                   for _, state, n, results in per_study), per_study
        assert _rows(engine, "SELECT count(*) FROM results")[0][0] == N_STUDIES
        assert set(claimed) <= {sid for sid, *_ in per_study}
        # Nothing acknowledged is lost: every instance is recorded once, its bytes on disk.
        inst = {uid: (rel, sha) for uid, rel, sha in
                _rows(engine, "SELECT sop_instance_uid, relpath, sha256 FROM instances")}
        assert set(inst) == set(acked)
        for uid, sent in acked.items():
            rel, sha = inst[uid]
            on_disk = (data / "spool" / rel).read_bytes()
            assert hashlib.sha256(on_disk).hexdigest() == sha
            assert dataset_body(on_disk) == dataset_body(sent)
        # B took over the leader's jobs: it holds the lease, and it rendered the worklist.
        [(holder,)] = _rows(engine, "SELECT holder FROM leases WHERE name = 'leader'")
        assert f":{b.pid}:" in holder
        def rendered() -> bool:
            try:
                doc = json.loads((data / "www" / "worklist.json").read_text())
            except (OSError, ValueError):
                return False
            return sorted(r["state"] for r in doc["studies"]) == ["scored"] * N_STUDIES

        wait_for(rendered, timeout=60, interval=0.2)
        print(f"\nmulti-daemon: {N_STUDIES} studies x 2 instances split across 2 daemons; "
              f"A killed holding {len(claimed)} claim(s) with {scored_at_kill} result(s) "
              f"recorded; all scored {t_done - t_kill:.1f} s after the kill "
              f"({t_done - t_sent:.1f} s after the last send; leases {LEASE_S:g} s)")
    finally:
        for p in (a, b):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        engine.dispose()
    assert b.returncode == 0
