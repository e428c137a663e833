"""``triage serve`` (the daemon) and ``triage status`` (what its database holds)."""

from __future__ import annotations

import argparse
import os

from triage.cli.common import SubParsers, config_args, load_config, setup_logging


def _serve(args: argparse.Namespace) -> int:
    from triage.service.daemon import serve

    cfg = load_config(args, **{"dicom.port": args.dicom_port, "web.port": args.web_port})
    # The configured level from here on (TRIAGE_LOG_LEVEL, when set, wins for debugging).
    setup_logging(os.environ.get("TRIAGE_LOG_LEVEL") or cfg.logging.level)
    return serve(cfg)


def _status(args: argparse.Namespace) -> int:
    import json

    from triage.service.overview import gather, render

    st = gather(load_config(args))
    print(json.dumps(st, indent=2) if args.json else render(st))
    return 0


def add(sub: SubParsers) -> None:
    """Add ``serve`` and ``status``."""
    p = sub.add_parser("serve", help="run the daemon: DICOM listener, scoring worker, worklist",
                       description="Run the triage daemon until SIGTERM or Ctrl-C.")
    config_args(p)
    p.add_argument("--dicom-port", type=int, metavar="N", help="override dicom.port")
    p.add_argument("--web-port", type=int, metavar="N", help="override web.port")
    p.set_defaults(func=_serve)

    p = sub.add_parser("status", help="counts by state, backlog, last drift check, model version",
                       description="Print what the daemon's database holds.")
    config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_status)
