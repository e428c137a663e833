"""The durability promise, proven at the system-call level.

``triage serve`` runs under strace while one C-STORE arrives. The recorded calls
must show: the temp file fsynced, then renamed to its durable name, then its
directory fsynced, then the database commit made durable (SQLite's WAL synced),
and only then the C-STORE response written to the association's socket. A kill
test cannot show this: a killed process leaves the page cache intact, so it
passes with fsync turned off; this test does not.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import synth
from tests.conftest import free_port, model_for_tests, port_open, send, wait_for

TRACED = "fsync,fdatasync,rename,renameat,renameat2,link,linkat,write,pwrite64,sendto,sendmsg"
LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)$")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(t) for t in text]
    return out


def _calls(log: Path) -> list[tuple[int, str, str]]:
    """(thread id, syscall, the rest of the line) in the order strace saw them enter. A call
    that another thread interrupted is printed as ``fsync(7</d> <unfinished ...>``: its
    arguments are there, its closing parenthesis is not."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = LINE.match(line)
        if m and "resumed>" not in line:
            out.append((int(m.group(1)), m.group(2), m.group(3)))
    return out


def _first(calls: list[tuple[int, str, str]], start: int, pred) -> int:  # type: ignore[no-untyped-def]
    for i in range(start, len(calls)):
        if pred(*calls[i]):
            return i
    raise AssertionError("expected system call not found in the trace")


@pytest.mark.parametrize("receive_dir", ["spool's file system", "another file system"])
def test_fsync_rename_dirsync_commit_then_response(tmp_path: Path, receive_dir: str) -> None:
    """The listener receives into a temp file. On the spool's file system that file is synced
    and linked to a spool temp name; elsewhere it is copied to a spool temp file, which is
    synced. Either way the temp name is then renamed, and the order below holds."""
    if shutil.which("strace") is None:
        pytest.fail("strace is not installed (scripts/system-deps.sh installs it)")
    env = dict(os.environ)
    received = Path(tempfile.gettempdir())
    if receive_dir == "another file system":
        received = Path("/dev/shm")
        if not received.is_dir() or received.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("no /dev/shm on another file system than the test's temp directory")
        env["TMPDIR"] = str(received)
    elif received.stat().st_dev != tmp_path.stat().st_dev:
        pytest.skip("the temp directory is on another file system than the test's data")
    port, web = free_port(), free_port()
    data = tmp_path / "var"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[dicom]\nport = {port}\n[web]\nport = {web}\n'
                   f'[storage]\ndata_dir = "{data}"\nmin_free_mb = 0\n'
                   '[studies]\nquiet_period_s = 3600\n[drift]\ninterval_s = 3600\n'
                   f'[model]\npath = "{model_for_tests()}"\n[worker]\nprocesses = 1\n'
                   '[guard]\npath = ""\n')
    log = tmp_path / "strace.log"
    proc = subprocess.Popen(["strace", "-f", "-qq", "-yy", "-s", "300", "-e", f"trace={TRACED}",
                             "-o", str(log), sys.executable, "-m", "triage", "serve",
                             "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_for(lambda: port_open(port) and port_open(web) or proc.poll() is not None,
                 timeout=180)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        ds = synth.make_dataset(synth.SynthSpec(rows=64, columns=64))
        assert send(port, [ds]) == [0]
    finally:
        for child in _children(proc.pid):
            os.kill(child, signal.SIGTERM)
        proc.communicate(timeout=120)

    calls = _calls(log)
    spool_tmp = str(data / "spool" / ".tmp")
    # 1. The temp file's content is synced: the spool's own temp file, or the received one.
    linked = receive_dir == "spool's file system"
    temp_file = (lambda a: f"<{received}/" in a and ".dcm>" in a) if linked else \
        (lambda a: f"<{spool_tmp}/" in a and ".part>" in a)
    i_fsync = _first(calls, 0, lambda t, c, a: c in ("fsync", "fdatasync") and temp_file(a))
    handler = calls[i_fsync][0]
    i_named = i_fsync
    if linked:  # the received file is linked to a spool temp name (no copy)
        i_named = _first(calls, i_fsync, lambda t, c, a: t == handler and c in ("link", "linkat")
                         and f"{spool_tmp}/" in a and ".part\"" in a)
    # 2. Then renamed to its durable name, by the same thread.
    i_rename = _first(calls, i_named, lambda t, c, a: t == handler
                      and c in ("rename", "renameat", "renameat2")
                      and ".part\"" in a and ".dcm\"" in a and f"{data / 'spool'}/" in a)
    target = re.findall(r'"([^"]+\.dcm)"', calls[i_rename][2])[-1]
    directory = os.path.dirname(target)
    # 3. Then the directory that now names it is synced.
    i_dir = _first(calls, i_rename, lambda t, c, a: t == handler and c == "fsync"
                   and f"<{directory}>" in a)
    # 4. Then the database commit is made durable: SQLite syncs its write-ahead log.
    i_commit = _first(calls, i_dir, lambda t, c, a: t == handler and c in ("fsync", "fdatasync")
                      and "triage.sqlite-wal>" in a)
    # 5. And the first thing written back to the sender after the data arrived is the response,
    #    after all of the above.
    i_response = _first(calls, i_fsync, lambda t, c, a: c in ("write", "sendto", "sendmsg")
                        and f"127.0.0.1:{port}->" in a)
    assert i_fsync < i_rename < i_dir < i_commit < i_response, (
        i_fsync, i_rename, i_dir, i_commit, i_response)
    # The durable file is the one the database recorded.
    assert Path(target).exists() and Path(target).is_relative_to(data / "spool")
