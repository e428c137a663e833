"""Real validators for the objects triage writes: dicom3tools' dciodvfy and DCMTK's dsrdump."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def _tool(name: str, package: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed (Debian package {package}; "
                    "scripts/system-deps.sh installs it)")
    return exe


def dciodvfy(path: Path) -> tuple[list[str], str]:
    """Run dciodvfy on ``path``; return (its "Error" lines, its whole output)."""
    r = subprocess.run([_tool("dciodvfy", "dicom3tools"), str(path)], capture_output=True,
                       text=True, timeout=120)
    out = r.stdout + r.stderr
    return [ln for ln in out.splitlines() if ln.startswith("Error")], out


def dsrdump(path: Path, *flags: str) -> str:
    """Return DCMTK dsrdump's rendering of an SR document (fails the test if it cannot read it)."""
    r = subprocess.run([_tool("dsrdump", "dcmtk"), *flags, str(path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout
