"""``triage site calibrate``: operating points re-fitted on a site's own labelled replay."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from triage.cli.common import SubParsers, config_args, load_config, setup_logging

log = logging.getLogger(__name__)


def _calibrate(args: argparse.Namespace) -> int:
    import json

    from triage.core.errors import InputError
    from triage.profile import write_profile
    from triage.replay import site

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    if not 0.5 <= args.sensitivity < 1 or not 0.5 < args.confidence < 1:
        raise InputError("--sensitivity must be in [0.5, 1) and --confidence in (0.5, 1)")
    data = site.labelled_scores(args.replay, args.labels)
    card_path = Path(args.card) if args.card else cfg.model.card_path
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    targets = site.targets_of(cfg.calibration.operating_points, args.sensitivity)
    doc, points = site.fit(data, targets, args.confidence, args.site, card)  # raises CannotGuarantee
    if card and card.get("sha256") and card["sha256"] != doc["profile"]["model_sha256"]:
        log.warning("the replay was scored by model %s, not by the card's %s: the profile is for "
                    "the replay's model", doc["profile"]["model_sha256"][:12], card["sha256"][:12])
    out = Path(args.out)
    write_profile(out, doc)
    png = site.roc_png(data, {op["name"]: op["threshold"] for op in (card or {}).get(
        "operating_points", [])}, points, out.with_suffix(".png"))
    s = doc["site"]
    log.info("%d labelled studies (%d abnormal, prevalence %.2f), %s to %s", s["labelled_scored"],
             s["positives"], s["prevalence"], s["first_study_date"], s["last_study_date"])
    for p in points:
        log.info("%s: threshold %.4f sensitivity %.3f [%.3f, %.3f] specificity %.3f [%.3f, %.3f]",
                 p.name, p.threshold, p.sensitivity.value, p.sensitivity.lower, p.sensitivity.upper,
                 p.specificity.value, p.specificity.lower, p.specificity.upper)
    log.info("wrote %s and %s; review them, then set model.site_profile", out, png)
    return 0


def add(sub: SubParsers) -> None:
    """Add ``site calibrate``."""
    p = sub.add_parser("site", help="per-site calibration of the operating points",
                       description="Tools for fitting triage to one site.")
    ssub = p.add_subparsers(dest="site_command", metavar="ACTION")
    ssub.required = True
    c = ssub.add_parser(
        "calibrate", help="fit the operating points on a labelled replay (conservatively)",
        description="Read a labelled replay's per-study results and place each operating point so "
                    "that its target holds at the lower Clopper-Pearson bound. Writes the profile "
                    "(TOML) and an ROC plot beside it; writes nothing when the labelled studies "
                    "are too few to guarantee a target.")
    config_args(c)
    c.add_argument("replay", metavar="REPLAY_DIR", help="the --out folder of `triage replay`")
    c.add_argument("--out", metavar="PROFILE.toml", required=True, help="the profile to write")
    c.add_argument("--sensitivity", type=float, default=0.95,
                   help="sensitivity the abnormal point must reach (default 0.95)")
    c.add_argument("--confidence", type=float, default=0.95,
                   help="confidence of the guarantee (default 0.95)")
    c.add_argument("--labels", metavar="CSV", help="labels CSV (default: the one the replay used)")
    c.add_argument("--card", metavar="JSON", help="model card (default: the configured model's)")
    c.add_argument("--site", default="", help="a name for the site, recorded in the profile")
    c.set_defaults(func=_calibrate)
