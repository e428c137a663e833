"""Build hook: the wheel carries triage's data files inside the package.

The default ``config.toml``, ``migrations/``, ``reports/templates/`` and
``models/`` stay at the top of the source tree (the design fixes that layout);
this copies them to ``triage/_data/`` in the built package, where
:mod:`triage.resources` finds them, so an installed triage runs from any
directory. Everything else is in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
DATA = ("config.toml", "migrations", "reports/templates", "models")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.tmp", ".*")


class BuildPyWithData(build_py):
    """build_py, then copy the data files into ``<build>/triage/_data``."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "triage" / "_data"
        for rel in DATA:
            src, dst = ROOT / rel, target / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=SKIP, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildPyWithData})
