"""One daemon per data directory; nothing created before the ports are known to be free.

Real ``triage serve`` processes against a real running daemon and real sockets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port, make_config, serve_config
from triage.core.errors import TriageError
from triage.service.daemon import build_daemon


def _serve(cfg: Path) -> subprocess.CompletedProcess[str]:
    """Run ``triage serve``; a daemon that keeps running is a failure (it should exit at once)."""
    proc = subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the second daemon kept running on a data directory already in use")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_second_daemon_on_the_same_data_directory_exits_at_once_naming_the_holder(
        daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    data = tmp_path / "var"
    first = daemon_factory(data)
    cfg = serve_config(tmp_path / "second.toml", data, free_port())
    r = _serve(cfg)
    assert r.returncode == 2
    [line] = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert f"pid {os.getpid()}" in line and "in use" in line
    # The first daemon is untouched, and in-process a second build fails the same way.
    with pytest.raises(TriageError, match=f"pid {os.getpid()}"):
        build_daemon(make_config(data))
    assert first.scp.port > 0
    first.stop(drain_timeout_s=5)
    # Once the first has stopped, the directory is free again.
    again = build_daemon(make_config(data))
    assert again.lock is not None and again.lock.held
    again.lock.release()
    again.store.engine.dispose()


def test_nothing_is_created_when_a_port_is_taken(tmp_path: Path) -> None:
    data = tmp_path / "never"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = _serve(serve_config(tmp_path / "c.toml", data, port))
    assert r.returncode == 2 and f"127.0.0.1:{port}" in r.stderr
    assert not data.exists()
