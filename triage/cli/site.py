"""``triage site calibrate``: operating points re-fitted on a site's own labelled replay."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

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
    adaptation = _replayed_adaptation(Path(args.replay), doc["profile"]["model_sha256"])
    if adaptation is not None:
        doc["adaptation"] = adaptation.to_table(out.parent)
        log.info("the replay scored with the model adapted by %s: the profile keeps it",
                 adaptation.model_path.name)
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


SKIP_SUFFIXES = {".csv", ".txt", ".json", ".toml", ".html", ".md", ".log"}


def _site_files(root: Path) -> list[Path]:
    """Return the files under ``root`` worth preparing (hidden and text files skipped)."""
    from triage.core.errors import InputError

    if root.is_file():
        return [root]
    if not root.is_dir():
        raise InputError(f"{root} is neither a folder nor a file")
    return sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() not in SKIP_SUFFIXES
                  and not any(part.startswith(".") for part in f.relative_to(root).parts))


def _adapt(args: argparse.Namespace) -> int:
    import hashlib
    import json
    from collections import Counter

    import numpy as np

    from triage import __version__
    from triage.cli.common import scoring_setup
    from triage.core.errors import InputError
    from triage.files import write_atomic
    from triage.imaging.prepare import init, prepare
    from triage.inference import adaptation, selftest
    from triage.inference.guard import load_guard
    from triage.inference.model import onnx_session
    from triage.profile import FORMAT, Adaptation, now_iso, write_profile

    cfg, model = scoring_setup(args)
    entry = model.card.get("channel_moments")
    if not entry:
        raise InputError(f"model card of {model.path} has no training statistics "
                         "(channel_moments); run `triage site moments` where the training "
                         "images are")
    reference = adaptation.load_moments(model.path.with_name(str(entry["file"])))
    guard = None if args.no_guard else load_guard(cfg.guard, model.card)
    init(model.card, guard.input_card if guard is not None else None)
    files = _site_files(Path(args.images))
    rng = np.random.default_rng(args.seed)
    if len(files) > args.limit:
        files = [files[i] for i in sorted(rng.choice(len(files), args.limit, replace=False))]
    xs: list[Any] = []
    refused: Counter[str] = Counter()
    for i in range(0, len(files), 32):
        batch = [prepare(k, str(f)) for k, f in enumerate(files[i:i + 32])]
        if guard is not None:
            guard.judge(batch)
        for p in batch:
            if p.x is None:
                refused[(p.reason or "not scorable").split(" (")[0]] += 1
            else:
                xs.append(p.x)
        log.info("prepared %d of %d files", min(i + 32, len(files)), len(files))
    out = Path(args.out)
    stem = out.with_suffix("")
    onnx_out = stem.with_name(stem.name + ".model.onnx")
    summary = adaptation.adapt(model.path, reference, np.stack(xs) if xs else np.zeros((0,)),
                               onnx_out, cfg.model.threads,
                               progress=lambda k, n: log.debug("adapted %d of %d", k, n))
    onnx_out.chmod(0o600)
    os_sha = hashlib.sha256(onnx_out.read_bytes()).hexdigest()
    size = int(model.card["input"]["size"])
    card = {**model.card, "file": onnx_out.name, "sha256": os_sha,
            "selftest": selftest.card_entry(onnx_session(onnx_out, 1, optimize=False), size),
            "site_adaptation": {"base_model": model.name, "base_model_sha256": model.sha256,
                                "method": "AdaBN: every convolution's per-channel output mean "
                                          "and std mapped onto the training images'",
                                "site": args.site, "created": now_iso(),
                                "refused": dict(refused), **summary}}
    card_out = stem.with_name(stem.name + ".model.json")
    write_atomic(card_out, json.dumps(card, indent=2, allow_nan=False), fsync=True)
    ad = Adaptation(onnx_out.resolve(), card_out.resolve(), os_sha, model.sha256)
    doc = {"profile": {"format": FORMAT, "created": now_iso(), "site": args.site,
                       "model_sha256": os_sha, "model_name": model.name,
                       "triage_version": __version__,
                       "method": "the model adapted to the site's unlabelled images (AdaBN); "
                                 "operating points: the model card's until `triage site "
                                 "calibrate` re-fits them on a replay made with this profile"},
           "adaptation": ad.to_table(out.parent),
           "site": {**summary, "source": str(Path(args.images).resolve()), "files": len(files),
                    "used": len(xs), "refused": dict(refused)}}
    write_profile(out, doc)
    log.info("adapted %s to %d images of %d (refused: %s); mean shift median %.3f SD, max %.2f SD;"
             " wrote %s, %s, %s", model.name, len(xs), len(files), dict(refused) or "none",
             summary["mean_shift_median_sd"], summary["mean_shift_max_sd"], out, onnx_out, card_out)
    return 0


def _moments(args: argparse.Namespace) -> int:
    import json

    import numpy as np

    from triage.cli.common import scoring_setup
    from triage.core.errors import InputError
    from triage.files import write_atomic
    from triage.imaging.transforms import InputSpec, build_transforms, preprocess_of, split_cached
    from triage.inference import adaptation
    from triage.training import train
    from triage.training.train import file_sha256

    cfg, model = scoring_setup(args)
    samples = [s for s in train.read_manifest(args.manifest, args.data) if s.split == args.split]
    if not samples:
        raise InputError(f"no {args.split!r} rows in {args.manifest}")
    rng = np.random.default_rng(args.seed)
    if len(samples) > args.limit:
        samples = [samples[i] for i in sorted(rng.choice(len(samples), args.limit, replace=False))]
    pre = preprocess_of(model.card)
    prefix, rest = split_cached(build_transforms(pre, InputSpec.from_dict(model.card["input"])))
    cached, _ = train.cache_images(samples, prefix, pre, f"cache {args.split}")
    x = np.stack([np.asarray(rest(im), dtype=np.float32) for im in cached])
    path = model.path.with_name(model.path.stem + ".moments.npz")
    sha = adaptation.save_moments(path, adaptation.channel_moments(model.path, x, cfg.model.threads))
    card_path = Path(args.card) if args.card else model.path.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card["channel_moments"] = {"file": path.name, "sha256": sha, "images": int(len(x)),
                               "split": args.split, "manifest_sha256": file_sha256(args.manifest),
                               "seed": args.seed, "session": "ORT_DISABLE_ALL"}
    write_atomic(card_path, json.dumps(card, indent=2, allow_nan=False), fsync=True, mode=0o644)
    log.info("wrote %s (%d images of %s) and its entry in %s", path, len(x), args.split, card_path)
    return 0


def _replayed_adaptation(replay: Path, model_sha: str) -> Any:
    """Return the adapted model the replay scored with (from its report's site profile), if
    it is the model the results came from; else None."""
    import json

    from triage.core.errors import ConfigError
    from triage.profile import read_profile

    try:
        used = json.loads((replay / "report.json").read_text())["meta"].get("site_profile")
    except (OSError, ValueError, KeyError):
        return None
    if not used:
        return None
    try:
        adaptation = read_profile(used).adaptation
    except ConfigError as e:
        log.warning("the replay's site profile cannot be read any more (%s): the new profile "
                    "has no adapted model", e)
        return None
    return adaptation if adaptation is not None and adaptation.sha256 == model_sha else None


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
    a = ssub.add_parser(
        "adapt", help="adapt the model to a site's unlabelled images (AdaBN)",
        description="Prepare every image under --images (a folder of DICOM or PNG/JPEG files, "
                    "e.g. an archive or the daemon's spool) as the daemon does, leave out what the "
                    "input guard refuses, and re-estimate the network's normalisation statistics "
                    "on the rest: every convolution's per-channel output mean and std mapped onto "
                    "the training images' (the card's channel_moments). Writes PROFILE.toml, "
                    "PROFILE.model.onnx (with its own sha256) and PROFILE.model.json; the card's "
                    "model is left untouched. Set model.site_profile (or replay --site-profile) "
                    "to score with it; then `site calibrate` on a replay made with it.")
    config_args(a)
    a.add_argument("--images", metavar="DIR", required=True, help="the site's images (no labels)")
    a.add_argument("--out", metavar="PROFILE.toml", required=True, help="the profile to write")
    a.add_argument("--site", default="", help="a name for the site, recorded in the profile")
    a.add_argument("--limit", type=int, default=2000, metavar="N",
                   help="at most N files, chosen with --seed (default 2000)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--no-guard", action="store_true",
                   help="use every decodable image, also those the input guard would refuse")
    a.add_argument("--model", metavar="ONNX", help="model file (default: model.path)")
    a.add_argument("--card", metavar="JSON", help="model card (default: the model's .json)")
    a.set_defaults(func=_adapt)
    m = ssub.add_parser(
        "moments", help="record the training images' statistics that `site adapt` needs",
        description="Run the model (unoptimised session) on training images through its card's "
                    "chain and write every convolution's per-channel output mean and std beside "
                    "it (MODEL.moments.npz), with an entry in its card.")
    config_args(m)
    m.add_argument("--manifest", metavar="CSV", required=True, help="path,label,split manifest")
    m.add_argument("--data", metavar="DIR", help="folder the paths are under (default: its folder)")
    m.add_argument("--split", default="train", help="which split (default train)")
    m.add_argument("--limit", type=int, default=512, metavar="N", help="at most N images")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--model", metavar="ONNX", help="model file (default: model.path)")
    m.add_argument("--card", metavar="JSON", help="model card (default: the model's .json)")
    m.set_defaults(func=_moments)
