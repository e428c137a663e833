"""The ``triage`` command line.

Each subcommand lives in a module of this package that adds its parser and
handler; heavy imports happen inside the handlers, so ``triage --help`` stays
fast. Errors from the core (:class:`TriageError`) become one line on stderr
and exit status 2; anything unexpected becomes one line and exit status 1,
never a traceback (set ``TRIAGE_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from triage import __version__
from triage.cli import (
    adapt,
    backup,
    bench,
    model,
    outbox,
    pull,
    replay,
    score,
    selftest,
    serve,
    site,
)
from triage.cli.common import setup_logging
from triage.core.errors import TriageError

# Subcommands, in the order --help lists them.
MODULES = (serve, outbox, pull, backup, score, selftest, adapt, replay, site, model, bench)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="triage",
        description="DICOM-aware triage of chest radiographs. A triage aid, not for diagnostic use.",
    )
    parser.add_argument("--version", action="version", version=f"triage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in MODULES:
        module.add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging(os.environ.get("TRIAGE_LOG_LEVEL", "INFO"))
    try:
        return int(args.func(args) or 0)
    except TriageError as e:
        print(f"triage {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"triage {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the last edge: one line, never a traceback
        if os.environ.get("TRIAGE_DEBUG"):
            raise
        print(f"triage {args.command}: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
