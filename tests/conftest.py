"""Shared fixtures: a real daemon on a free loopback port, real senders, shared data."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE

from dicom_io.scp import STORAGE_SOP_CLASSES
from triage import config as config_mod
from triage.config import Config
from triage.service.daemon import Daemon, build_daemon

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TRIAGE_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Return a path under ../shared, skipping the test (with the reason) when absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared data not found at {p}: the shared-data tier needs ../shared")
    return p


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Return True when something accepts TCP connections on ``host:port``."""
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def serve_config(path: Path, data: Path, dicom_port: int, extra: str = "",
                 guard: bool = False) -> Path:
    """Write a config for a ``triage serve`` subprocess: free ports, test model, fast study
    completion; the guard network off unless ``guard`` (phantoms are not radiographs)."""
    path.write_text(f'[dicom]\nport = {dicom_port}\n[web]\nport = {free_port()}\n'
                    f'[storage]\ndata_dir = "{data}"\nmin_free_mb = 0\n'
                    '[studies]\nquiet_period_s = 0.3\nsweep_interval_s = 0.1\n'
                    f'[model]\npath = "{model_for_tests()}"\n'
                    + ('' if guard else '[guard]\npath = ""\n')
                    + '[worker]\nprocesses = 1\npoll_interval_s = 0.1\n' + extra)
    return path


def wait_for(pred: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def send_and_wait_scored(d: Any, timeout: float) -> str:
    """Send one small synthetic study to daemon ``d`` and wait until it is scored; return its UID."""
    from pydicom.uid import generate_uid
    from sqlalchemy import select

    from tests import synth
    from triage.store import schema as db

    uid = generate_uid()
    assert send(d.dicom_port, [synth.make_dataset(synth.SynthSpec(rows=96, columns=96),
                                                  study_uid=uid)]) == [0]

    def scored() -> bool:
        with d.store.read() as s:
            return s.scalar(select(db.Study.state).where(db.Study.study_uid == uid)) == db.SCORED

    wait_for(scored, timeout=timeout)
    return str(uid)


def model_for_tests() -> Path:
    """The tiny model trained once per session (tests never depend on the shipped weights)."""
    from .model_fixtures import tiny_model

    return tiny_model().onnx


def make_config(data_dir: Path, **overrides: Any) -> Config:
    """A config for tests: free ports, short quiet period, tiny model, data under ``data_dir``."""
    cfg = config_mod.load()
    cfg = config_mod.override(cfg, **{"storage.data_dir": str(data_dir), "dicom.port": 0,
                                      "web.port": 0, "studies.quiet_period_s": 0.5,
                                      "studies.sweep_interval_s": 0.1,
                                      "storage.min_free_mb": 0,
                                      "model.path": str(model_for_tests()),
                                      "worker.processes": 1, "worker.poll_interval_s": 0.1,
                                      "drift.interval_s": 3600.0,
                                      # The guard network is tested on its own (tests/inference/
                                      # test_guard.py); elsewhere only the header check runs.
                                      "guard.path": ""})
    return config_mod.override(cfg, **overrides) if overrides else cfg


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start wired daemons on free ports; every one is stopped at teardown."""
    started: list[Daemon] = []

    def start(data_dir: Path | None = None, **overrides: Any) -> Daemon:
        cfg = make_config(data_dir or tmp_path / "var", **overrides)
        d = build_daemon(cfg)
        d.start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop(drain_timeout_s=5)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """One running daemon with the default test config."""
    return daemon_factory()


def scu(calling: str = "TRIAGE_SCU", syntaxes: tuple[str, ...] = ("1.2.840.10008.1.2.1",)) -> AE:
    """A pynetdicom SCU proposing the storage SOP classes in ``syntaxes`` (explicit VR LE)."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop in STORAGE_SOP_CLASSES:
        for ts in syntaxes:  # one context per syntax, so each can be used as-is
            ae.add_requested_context(sop, [ts])
    ae.add_requested_context("1.2.840.10008.1.1")
    return ae


def echo_ok(port: int) -> bool:
    """True when a C-ECHO to the listener on ``port`` succeeds (it is up and answering)."""
    a = scu().associate("127.0.0.1", port, ae_title="TRIAGE")
    ok = a.is_established and a.send_c_echo().Status == 0
    if a.is_established:
        a.release()
    return bool(ok)


def send(port: int, datasets: list[Dataset | Path], calling: str = "TRIAGE_SCU",
         called: str = "TRIAGE") -> list[int]:
    """Send over one association with pynetdicom; return each C-STORE status (-1: no reply)."""
    ae = scu(calling)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established, "association was not accepted"
    out = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            out.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return out


def storescu(port: int, *paths: Path, calling: str = "STORESCU", extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run DCMTK's storescu against the listener and return the finished process."""
    if shutil.which("storescu") is None:
        pytest.fail("DCMTK storescu is not installed (make system-deps installs it)")
    cmd = ["storescu", "-aet", calling, "-aec", "TRIAGE", *extra, "127.0.0.1", str(port),
           *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def replace_cfg(cfg: Config, section: str, **changes: Any) -> Config:
    """Return ``cfg`` with fields of one section replaced (test helper)."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **changes)})


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MiB tmpfs, so a full disk is a real ENOSPC (needs root to mount)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """One real PostgreSQL server for the session (tests/pg.py); skips when not installed."""
    from tests.pg import start_server

    server = start_server()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: Any) -> str:
    """The URL of a new, empty database on the session's PostgreSQL server."""
    return str(pg_server.create_database())
