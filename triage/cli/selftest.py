"""``triage selftest``: does this CPU score the model's reference inputs as the card says?

The daemon runs the same check at start (:func:`triage.service.daemon.check_model_on_this_cpu`);
this command lets a site check a machine before it installs the daemon there.
"""

from __future__ import annotations

import argparse
import json

from triage.cli.common import SubParsers, config_args, scoring_setup


def _selftest(args: argparse.Namespace) -> int:
    from triage.inference import selftest

    cfg, model = scoring_setup(args)
    result = selftest.check(model.session, model.card, model.path, cfg.model.threads)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.message)
    return 0 if result.ok else 1


def add(sub: SubParsers) -> None:
    """Add the ``selftest`` subcommand."""
    p = sub.add_parser("selftest", help="check that this CPU scores the model as its card says",
                       description="Score the model card's synthetic reference inputs with the "
                                   "daemon's own onnxruntime session and compare with the values "
                                   "the export recorded. Exit status 0: agrees within the card's "
                                   "tolerance; 1: does not (triage serve would refuse to start "
                                   "unless model.allow_cpu_mismatch = true).")
    config_args(p)
    p.add_argument("--model", metavar="ONNX", help="model file (default: model.path)")
    p.add_argument("--card", metavar="JSON", help="its card (default: the model's .json)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_selftest)
