"""One daemon per data directory, and nothing created before the daemon can run.

:func:`check_ports` tries the configured ports before anything is created on
disk; :class:`DataDirLock` holds an exclusive ``flock`` on ``triage.lock`` in
the data directory for the daemon's lifetime. The kernel drops the lock when
the process ends, however it ends (``kill -9`` included), so a stale lock file
never blocks a restart; the PID written into it only names the holder in the
second daemon's error.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from triage.core.errors import TriageError

LOCK_NAME = "triage.lock"


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


class DataDirLock:
    """An exclusive lock on a data directory, held until :meth:`release` or process exit."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self._fd: int | None = None

    def check(self) -> None:
        """Raise TriageError naming the holder when another process holds the lock.

        Creates nothing: a data directory without a lock file is free.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as e:
            raise TriageError(f"data directory {self.root}: cannot open {LOCK_NAME}: "
                              f"{e.strerror or e}") from e
        try:
            self._try(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> int | None:
        """Return the PID of the process holding the lock (0 when it names none), or None
        when the directory is free. Creates nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def acquire(self) -> None:
        """Take the lock (creating the lock file, 0600) and write our PID into it.

        Raises TriageError naming the holder when another daemon has it.
        """
        if self._fd is not None:
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise TriageError(f"data directory {self.root}: cannot create {LOCK_NAME}: "
                              f"{e.strerror or e}") from e
        try:
            self._try(fd)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def _try(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise TriageError(f"data directory {self.root} is in use by another triage daemon "
                              f"({_holder(fd)}); stop it first or use another "
                              "storage.data_dir") from None

    def release(self) -> None:
        """Drop the lock (the file stays; it is harmless)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None


def check_ports(*addresses: tuple[str, int, str]) -> None:
    """Raise TriageError when one of ``(host, port, config key)`` cannot be bound now.

    Port 0 (any free port) is always fine. The probe socket is closed at once.
    """
    for host, port, key in addresses:
        if port == 0:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise TriageError(f"cannot listen on {host}:{port} ({key}): "
                                  f"{e.strerror or e}; nothing was created") from e
