"""Where triage's own data files are: the default config, migrations, templates and models.

In a source checkout (and an editable install) they are the top-level
``config.toml``, ``migrations/``, ``reports/templates/`` and ``models/``. A
built wheel carries copies of them inside the package, under ``triage/_data``
(``setup.py`` puts them there), so ``pip install .`` followed by
``triage serve`` works from any directory.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
PACKAGED = PACKAGE / "_data"
SOURCE = PACKAGE.parent

# name -> path relative to the data root (the same in the wheel and in the checkout)
LAYOUT = {
    "config": "config.toml",
    "migrations": "migrations",
    "templates": "reports/templates",
    "models": "models",
}


def data_root() -> Path:
    """Return the folder holding ``config.toml``, ``models/`` and the rest.

    The packaged copy wins when it exists (an installed wheel); otherwise the
    source checkout.
    """
    return PACKAGED if (PACKAGED / LAYOUT["config"]).is_file() else SOURCE


def path(name: str) -> Path:
    """Return the path of one of triage's data files or folders (a key of ``LAYOUT``).

    Raises KeyError for an unknown name.
    """
    return data_root() / LAYOUT[name]
