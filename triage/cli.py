"""The ``triage`` command line.

Each subcommand is declared here and implemented in its own module, imported
only when the subcommand runs, so ``triage --help`` stays fast. Errors from the
core (:class:`TriageError`) become one line on stderr and exit status 2;
anything unexpected becomes one line and exit status 1, never a traceback
(set ``TRIAGE_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from triage import __version__
from triage.errors import TriageError

Handler = Callable[[argparse.Namespace], int]


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="config file (default: the shipped config.toml)")
    p.add_argument("--data-dir", metavar="DIR", help="override storage.data_dir")


def load_config(args: argparse.Namespace, **extra: Any) -> Any:
    """Load the config named by ``--config`` and apply the common CLI overrides.

    Returns the frozen Config. Raises ConfigError.
    """
    from triage import config

    cfg = config.load(args.config)
    return config.override(cfg, **{"storage.data_dir": getattr(args, "data_dir", None)}, **extra)


def _serve(args: argparse.Namespace) -> int:
    from triage.daemon import serve

    cfg = load_config(args, **{"dicom.port": args.dicom_port, "web.port": args.web_port})
    _setup_logging(cfg.logging.level)
    return serve(cfg)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the daemon: DICOM listener, scoring worker, worklist",
                       description="Run the triage daemon until SIGTERM or Ctrl-C.")
    _config_args(p)
    p.add_argument("--dicom-port", type=int, metavar="N", help="override dicom.port")
    p.add_argument("--web-port", type=int, metavar="N", help="override web.port")
    p.set_defaults(func=_serve)


def _status(args: argparse.Namespace) -> int:
    import json

    from triage.status import gather, render

    st = gather(load_config(args))
    print(json.dumps(st, indent=2) if args.json else render(st))
    return 0


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="counts by state, backlog, last drift check, model version",
                       description="Print what the daemon's database holds.")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_status)


# Subcommands are registered in this order; each adder lives next to its handler.
_ADDERS: list[Callable[[argparse._SubParsersAction], None]] = [_add_serve, _add_status]


def register(adder: Callable[[argparse._SubParsersAction], None]) -> None:
    """Add a subcommand adder (used by modules that define more subcommands)."""
    _ADDERS.append(adder)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="triage",
        description="DICOM-aware triage of chest radiographs. A triage aid, not for diagnostic use.",
    )
    parser.add_argument("--version", action="version", version=f"triage {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from triage import cli as registry  # the same module under `python -m triage.cli` too
    from triage import (
        cli_bench,  # noqa: F401  (registers benchmark)
        cli_model,  # noqa: F401  (registers model subcommands)
        cli_replay,  # noqa: F401  (registers replay and archive)
    )

    for adder in registry._ADDERS:
        adder(sub)
    return parser


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # pynetdicom narrates every message at INFO; our own handlers log what matters.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Alembic narrates its plugins and context; triage logs the migration itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # APScheduler narrates each job it adds, and warns when a busy sweep skips a
    # turn (the next turn does the work); a job that fails is still logged.
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        _setup_logging(os.environ.get("TRIAGE_LOG_LEVEL", "INFO"))
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
