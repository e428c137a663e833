"""The durable spool: atomic writes, idempotent resends, kept versions, temp clean-up."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicom_io.spool import Spool, SpoolError


def test_write_is_durable_and_named_by_digests_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    data = b"DICM" * 1000
    entry = spool.write("1.2.3", "1.2.3.4", data)
    assert entry.path.read_bytes() == data
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert not entry.existed
    assert "1.2.3" not in entry.relpath  # no header value in the path
    assert list(spool.tmp.iterdir()) == []


def test_identical_resend_is_idempotent_and_changed_resend_keeps_both(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    a = spool.write("1.2", "1.2.5", b"first")
    again = spool.write("1.2", "1.2.5", b"first")
    b = spool.write("1.2", "1.2.5", b"second")
    assert again.existed and again.path == a.path
    assert b.path != a.path and a.path.read_bytes() == b"first" and b.path.read_bytes() == b"second"
    assert sorted(spool.files()) == sorted([a.path, b.path])


@settings(max_examples=30, deadline=None)
@given(uid=st.text(min_size=1, max_size=64))
def test_hostile_uids_never_escape_the_spool(tmp_path_factory: pytest.TempPathFactory, uid: str) -> None:
    root = tmp_path_factory.mktemp("spool")
    entry = Spool(root).write(uid, uid, b"x")
    assert entry.path.resolve().is_relative_to(root.resolve())


def test_cleanup_removes_only_unacknowledged_temp_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.write("1.2", "1.2.6", b"durable")
    (spool.tmp / "abc.part").write_bytes(b"half")
    assert spool.cleanup_temp() == 1
    assert kept.path.exists() and list(spool.tmp.iterdir()) == []


def test_reserve_is_checked_against_the_real_file_system(tmp_path: Path) -> None:
    free = Spool(tmp_path).free_bytes()
    assert Spool(tmp_path, min_free_bytes=0).has_room()
    assert not Spool(tmp_path, min_free_bytes=free * 2 + 2**40).has_room()


def test_enospc_is_reported_as_out_of_space_and_leaves_nothing(tiny_fs: Path) -> None:
    spool = Spool(tiny_fs)
    with pytest.raises(SpoolError) as e:
        spool.write("1.2", "1.2.7", os.urandom(4 * 2**20))
    assert e.value.out_of_space
    assert list(spool.files()) == [] and list(spool.tmp.iterdir()) == []


def test_a_received_file_on_the_spools_file_system_is_linked_not_copied(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    received = tmp_path / "received.dcm"
    received.write_bytes(b"DICM" + bytes(range(256)) * 64)
    entry = spool.adopt("1.2.3", "1.2.3.4", received)
    assert not entry.existed and entry.sha256 == hashlib.sha256(received.read_bytes()).hexdigest()
    assert entry.path.stat().st_ino == received.stat().st_ino  # the same file: no copy
    received.unlink()  # what the listener does after the handler
    assert entry.path.read_bytes() == b"DICM" + bytes(range(256)) * 64
    again = tmp_path / "again.dcm"
    again.write_bytes(entry.path.read_bytes())
    assert spool.adopt("1.2.3", "1.2.3.4", again).existed
    assert list(spool.files()) == [entry.path] and list(spool.tmp.iterdir()) == []


def test_adopting_over_a_damaged_durable_file_replaces_it(tmp_path: Path) -> None:
    """A torn file at the content's name (a power cut with fsync off) is replaced, not kept."""
    spool = Spool(tmp_path / "spool")
    data = b"DICM" + b"y" * 4096
    received = tmp_path / "received.dcm"
    received.write_bytes(data)
    final = spool.path_for("1.2.3", "1.2.3.6", hashlib.sha256(data).hexdigest())
    final.parent.mkdir(parents=True)
    final.write_bytes(data[:100])  # torn
    entry = spool.adopt("1.2.3", "1.2.3.6", received)
    assert entry.path == final and not entry.existed and final.read_bytes() == data
    assert list(spool.tmp.iterdir()) == []


def test_a_received_file_on_another_file_system_is_copied(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no /dev/shm on another file system than the test's temp directory")
    spool = Spool(tmp_path / "spool")
    received = Path(tempfile.mkstemp(dir=shm, suffix=".dcm")[1])
    try:
        received.write_bytes(b"DICM" + b"x" * 5000)
        entry = spool.adopt("1.2.3", "1.2.3.5", received)
        assert entry.path.stat().st_ino != received.stat().st_ino
        assert entry.path.read_bytes() == received.read_bytes()
    finally:
        received.unlink()


def test_a_received_file_the_kernel_will_not_link_is_copied(tmp_path: Path) -> None:
    """Linking can fail on the spool's own file system (a security policy, an attribute): the
    file is then copied, not refused. An append-only file is one the kernel refuses to link,
    even for root (EPERM)."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr (e2fsprogs) is not installed")
    spool = Spool(tmp_path / "spool")
    received = tmp_path / "received.dcm"
    received.write_bytes(b"DICM" + b"z" * 3000)
    if subprocess.run(["chattr", "+a", str(received)], capture_output=True).returncode != 0:
        pytest.skip("this file system or user cannot set the append-only attribute")
    try:
        with pytest.raises(PermissionError):
            os.link(received, tmp_path / "probe")  # the premise: the kernel refuses
        entry = spool.adopt("1.2.3", "1.2.3.7", received)
        assert not entry.existed and entry.path.stat().st_ino != received.stat().st_ino
        assert entry.path.read_bytes() == received.read_bytes()
        assert list(spool.tmp.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-a", str(received)], capture_output=True)
