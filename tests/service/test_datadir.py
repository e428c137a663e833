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

from tests.conftest import free_port, make_config, send_and_wait_scored, serve_config
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


def test_data_directory_is_0700_and_every_file_in_it_is_the_daemons_users_only(
        daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import stat


    data = tmp_path / "var"
    d = daemon_factory(data)
    send_and_wait_scored(d, timeout=60)
    d.pages.render_worklist()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = [p for p in data.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".dcm", ".png", ".sqlite", ".html", ".json", ".lock"} <= kinds, kinds
    loose = [(p.relative_to(data).as_posix(), oct(stat.S_IMODE(p.stat().st_mode)))
             for p in files if p.stat().st_mode & 0o077]
    assert loose == []


def test_status_says_whether_a_daemon_is_running_in_the_words_of_its_json(
        daemon_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    from tests.conftest import model_for_tests

    data = tmp_path / "var"
    d = daemon_factory(data)
    cfg = tmp_path / "status.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{data}"\n[model]\npath = "{model_for_tests()}"\n')

    def status(*extra: str) -> str:
        r = subprocess.run([sys.executable, "-m", "triage", "status", "--config", str(cfg),
                            *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    doc = json.loads(status("--json"))
    assert doc["daemon"] == {"running": True, "pid": os.getpid()}
    text = status()
    assert f"daemon: running (pid {os.getpid()})" in text
    # The text uses the JSON's state names, every one of them.
    studies_line = next(ln for ln in text.splitlines() if ln.startswith("studies:"))
    assert [part.split()[0] for part in studies_line.removeprefix("studies: ").split(", ")] == \
        list(doc["studies"])
    d.stop(drain_timeout_s=5)
    assert json.loads(status("--json"))["daemon"] == {"running": False, "pid": None}
    assert "daemon: NOT RUNNING" in status()


def test_make_serve_passes_flags_through() -> None:
    import re

    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    recipe = re.search(r"^serve:.*\n\t(.+)$", makefile, re.M)
    assert recipe is not None and recipe.group(1).split()[-2:] == ["serve", "$(ARGS)"]
