"""Subcommands of the model pipeline: train, calibrate, export.

Heavy imports (torch, onnxruntime, monai) happen inside the handlers so
``triage --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any

from triage.cli.common import SubParsers, config_args, load_config, setup_logging

log = logging.getLogger(__name__)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR",
                   help="data root the CSV's paths are relative to (default: the CSV's folder)")
    p.add_argument("--manifest", metavar="CSV", required=True,
                   help="path,label[,split] CSV: an image manifest or a DICOM archive's labels")


def _train_cfg(cfg: Any, args: argparse.Namespace) -> Any:
    """Return cfg.train with the CLI flags that were given applied."""
    changes = {k: v for k, v in {
        "input_size": args.size, "epochs": args.epochs, "batch_size": args.batch_size,
        "lr": args.lr, "seed": args.seed, "width_mult": args.width_mult,
        "threads": args.threads}.items() if v is not None}
    return dataclasses.replace(cfg.train, **changes)


def _train(args: argparse.Namespace) -> int:
    from triage.training import train

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    tcfg = _train_cfg(cfg, args)
    samples = train.read_manifest(args.manifest, args.data)
    split = _split_record(args.manifest)
    result = train.train(samples, args.out, tcfg, cfg.preprocess, init=args.init,
                         manifest_sha256=train.file_sha256(args.manifest),
                         max_steps=args.max_steps, resume=args.resume,
                         extra_meta={"split": split} if split else None)
    log.info("best epoch %d -> %s", result.best_epoch, result.best_checkpoint)
    return 0


def _split_record(manifest: str) -> dict[str, Any] | None:
    """Return the record ``triage split`` wrote beside a split manifest, if there is one."""
    import json
    from pathlib import Path

    sidecar = Path(manifest).with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        return dict(json.loads(sidecar.read_text()))
    except (OSError, ValueError):
        return None


def _split(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from triage.files import write_atomic
    from triage.training import splits
    from triage.training.train import file_sha256

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    out = Path(args.out)
    summary = splits.write_split(Path(args.manifest), out, args.seed, args.val, args.holdout)
    record = splits.split_record(summary, args.seed, file_sha256(args.manifest),
                                 {"val": args.val, "holdout": args.holdout})
    record["split_manifest_sha256"] = file_sha256(out)
    write_atomic(out.with_suffix(".json"), json.dumps(record, indent=2), mode=0o644)
    for part in splits.SPLITS:
        log.info("%s: %d images (%d positive) from %d patients", part, summary.images[part],
                 summary.positives[part], summary.patients[part])
    log.info("wrote %s and %s", out, out.with_suffix(".json"))
    return 0


def _add_split(sub: SubParsers) -> None:
    p = sub.add_parser("split", help="split a labelled manifest by patient: train, val, holdout",
                       description="Pool every row of a path,label[,split,sha256,patient] CSV and "
                                   "split it again so that no patient crosses parts, stratified "
                                   "by label, with a fixed seed. Writes the new CSV and a JSON "
                                   "record beside it that `triage train` copies into the card.")
    config_args(p)
    p.add_argument("--manifest", metavar="CSV", required=True, help="the labelled manifest")
    p.add_argument("--out", metavar="CSV", required=True, help="the split manifest to write")
    p.add_argument("--seed", type=int, default=20261123, help="split seed (default 20261123)")
    p.add_argument("--val", type=float, default=0.15, help="validation fraction (default 0.15)")
    p.add_argument("--holdout", type=float, default=0.15,
                   help="hold-out fraction for the final report (default 0.15)")
    p.set_defaults(func=_split)


def _add_train(sub: SubParsers) -> None:
    p = sub.add_parser("train", help="train MobileNetV2 on labelled radiographs (writes checkpoints)",
                       description="Train from scratch, or fine-tune with --init, early-stopping "
                                   "on the val split. Defaults come from [train] in the config.")
    config_args(p)
    _data_args(p)
    p.add_argument("--out", metavar="DIR", required=True, help="run folder for checkpoints and logs")
    p.add_argument("--init", metavar="CKPT", help="initialise from a local checkpoint (fine-tuning)")
    p.add_argument("--size", type=int, metavar="PX", help="override train.input_size")
    p.add_argument("--epochs", type=int, metavar="N", help="override train.epochs")
    p.add_argument("--batch-size", type=int, metavar="N", help="override train.batch_size")
    p.add_argument("--lr", type=float, metavar="X", help="override train.lr")
    p.add_argument("--seed", type=int, metavar="N", help="override train.seed")
    p.add_argument("--width-mult", type=float, metavar="X", help="override train.width_mult")
    p.add_argument("--threads", type=int, metavar="N", help="override train.threads")
    p.add_argument("--max-steps", type=int, metavar="N", help="cap optimiser steps per epoch")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out after its last finished epoch")
    p.set_defaults(func=_train)



def _calibrate(args: argparse.Namespace) -> int:
    from triage.training import calibrate, train

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    ccfg = cfg.calibration
    if args.conservative:  # every point, whatever the config says for it
        ccfg = dataclasses.replace(ccfg, conservative=True, operating_points=tuple(
            dataclasses.replace(op, conservative=True) for op in ccfg.operating_points))
    out = args.out or str(_run_dir(args.checkpoint) / "calibration.json")
    png = args.png or str(_run_dir(args.checkpoint) / "reliability.png")
    cal = calibrate.run(args.checkpoint, train.read_manifest(args.manifest, args.data),
                        args.split, ccfg, out, png, tta=args.tta,
                        check_robustness=args.robustness)
    log.info("temperature %.3f; %s AUC %.4f; ECE %.4f -> %.4f", cal.temperature, args.split,
             cal.auc, cal.ece_before, cal.ece)
    for p in cal.points:
        log.info("%s: threshold %s sensitivity %.3f [%.3f, %.3f] specificity %.3f [%.3f, %.3f]",
                 p.name, p.threshold, p.sensitivity.value, p.sensitivity.lower,
                 p.sensitivity.upper, p.specificity.value, p.specificity.lower,
                 p.specificity.upper)
    log.info("wrote %s and %s", out, png)
    return 0


def _run_dir(checkpoint: str) -> Any:
    from pathlib import Path

    return Path(checkpoint).resolve().parent


def _add_calibrate(sub: SubParsers) -> None:
    p = sub.add_parser("calibrate", help="temperature scaling and operating points on a split",
                       description="Fit the temperature, place the operating points from "
                                   "[calibration], report sensitivity/specificity with "
                                   "Clopper-Pearson intervals, ECE and a reliability diagram.")
    config_args(p)
    _data_args(p)
    p.add_argument("--checkpoint", metavar="PT", required=True, help="checkpoint from `triage train`")
    p.add_argument("--split", default="val", help="calibration split (default: val)")
    p.add_argument("--conservative", action="store_true",
                   help="thresholds whose interval lower bound meets each target")
    p.add_argument("--out", metavar="JSON", help="report (default: calibration.json beside the checkpoint)")
    p.add_argument("--png", metavar="PNG", help="reliability diagram (default: reliability.png beside it)")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="test-time averaging over left-right mirrors (export bakes it in)")
    p.add_argument("--robustness", action="store_true",
                   help="also report the AUC under fixed exposure, framing and resolution changes")
    p.set_defaults(func=_calibrate)


def _export(args: argparse.Namespace) -> int:
    from triage.training import export, train

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    work = args.work or str(_run_dir(args.checkpoint) / "export")
    card = export.run(args.checkpoint, args.calibration, train.read_manifest(args.manifest, args.data),
                      args.out, args.name, cfg.calibration, work, n_calib=args.calib_images,
                      int8=not args.no_int8, threads=cfg.model.threads)
    log.info("shipped %s (%s): val AUC %.4f, ECE %.4f", card["file"], card["precision"],
             card["validation"]["auc"], card["ece"])
    return 0


def _add_export(sub: SubParsers) -> None:
    p = sub.add_parser("export", help="export ONNX (fp32 and int8) and write the model card",
                       description="Export the checkpoint with its calibration baked in, quantise "
                                   "to static int8 on training images, evaluate both on val and "
                                   "ship int8 unless it costs more than 0.005 AUC.")
    config_args(p)
    _data_args(p)
    p.add_argument("--checkpoint", metavar="PT", required=True)
    p.add_argument("--calibration", metavar="JSON", required=True, help="from `triage calibrate`")
    p.add_argument("--out", metavar="DIR", default="models", help="where the shipped model goes")
    p.add_argument("--name", default="cxr-pneumonia-mnv2", help="file stem of the model and card")
    p.add_argument("--work", metavar="DIR", help="both variants (default: export/ beside the checkpoint)")
    p.add_argument("--calib-images", type=int, default=256, metavar="N",
                   help="training images for int8 calibration")
    p.add_argument("--no-int8", action="store_true", help="export fp32 only")
    p.set_defaults(func=_export)


def _guard_train(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from triage.training import guard
    from triage.training.train import file_sha256

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    split, adults = Path(args.paediatric_split), Path(args.adult_manifest)
    samples = guard.read_sources(split, Path(args.paediatric_root), adults,
                                 Path(args.adult_root) if args.adult_root else adults.parent)
    run, held = guard.train_guard(samples, epochs=args.epochs, seed=args.seed,
                                  threads=cfg.train.threads)
    measured = guard.rates(guard.torch_scorer(run.net), held)
    card = guard.export(run, measured, Path(args.out), args.name, {
        "paediatric_split": str(split), "paediatric_split_sha256": file_sha256(split),
        "adult_manifest": str(adults), "adult_manifest_sha256": file_sha256(adults),
        "epochs": str(args.epochs), "seed": str(args.seed)})
    log.info("thresholds %s; held out: %s", card["thresholds"], json.dumps(card["held_out"]))
    return 0


def _guard_samples(args: argparse.Namespace) -> tuple[Any, list[Any]]:
    """Return (config, the guard's samples) for ``guard calibrate`` and ``guard ood``."""
    from pathlib import Path

    from triage.training import guard

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    adults = Path(args.adult_manifest)
    return cfg, guard.read_sources(Path(args.paediatric_split), Path(args.paediatric_root), adults,
                                   Path(args.adult_root) if args.adult_root else adults.parent)


def _guard_calibrate(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from triage.training import guard

    _, samples = _guard_samples(args)
    card = guard.recalibrate(Path(args.card), samples)
    log.info("thresholds %s; held out: %s", card["thresholds"], json.dumps(card["held_out"]))
    return 0


def _guard_child_header(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from triage.training import guard

    cfg, samples = _guard_samples(args)
    card = guard.child_header_threshold(Path(args.card), samples, threads=cfg.train.threads)
    log.info("adult_child_header threshold %.4g; held out: %s",
             card["thresholds"]["adult_child_header"], json.dumps(card["child_header"]["test"]))
    return 0


def _guard_ood(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from triage.training import guard

    cfg, samples = _guard_samples(args)
    card = guard.fit_ood(Path(args.card), samples, threads=cfg.train.threads)
    ood = card["out_of_distribution"]
    log.info("out-of-distribution threshold %.4g; refused: %s", ood["threshold"],
             json.dumps({k: round(v["value"], 4) for k, v in ood["refused"].items()}))
    return 0


def _exported_guard_args(p: argparse.ArgumentParser) -> None:
    """The flags of the steps that work on an exported guard: its card and its sources."""
    p.add_argument("--card", metavar="JSON", required=True, help="the guard's card")
    p.add_argument("--paediatric-split", metavar="CSV", required=True)
    p.add_argument("--paediatric-root", metavar="DIR", required=True)
    p.add_argument("--adult-manifest", metavar="CSV", required=True)
    p.add_argument("--adult-root", metavar="DIR")


def _add_guard(sub: SubParsers) -> None:
    p = sub.add_parser("guard", help="the input guard's network (adult or child, frontal or not)",
                       description="Tools for the input guard.")
    gsub = p.add_subparsers(dest="guard_command", metavar="ACTION")
    gsub.required = True
    t = gsub.add_parser("train", help="train, threshold and export the guard network",
                        description="Train the guard on the paediatric patient split (children) "
                                    "and the adult set, choose its thresholds on validation, "
                                    "measure them on held-out images, and write ONNX + card.")
    config_args(t)
    t.add_argument("--paediatric-split", metavar="CSV", required=True,
                   help="the patient-level split from `triage split`")
    t.add_argument("--paediatric-root", metavar="DIR", required=True,
                   help="folder the split's paths are under")
    t.add_argument("--adult-manifest", metavar="CSV", required=True,
                   help="cxr-adult-224/manifest.csv")
    t.add_argument("--adult-root", metavar="DIR", help="folder its paths are under (default: its folder)")
    t.add_argument("--out", metavar="DIR", default="models")
    t.add_argument("--name", default="cxr-guard")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--seed", type=int, default=42)
    t.set_defaults(func=_guard_train)
    c = gsub.add_parser("calibrate", help="choose an exported guard's thresholds again",
                        description="Score the validation and held-out images with the exported "
                                    "guard, choose its thresholds on validation and rewrite its "
                                    "card's thresholds and measured rates.")
    config_args(c)
    _exported_guard_args(c)
    c.set_defaults(func=_guard_calibrate)
    o = gsub.add_parser("ood", help="fit the out-of-distribution check on the guard's embedding",
                        description="Fit a PCA Mahalanobis-plus-residual distance on the exported "
                                    "guard's embedding of the children's training radiographs, "
                                    "choose its threshold on validation children, measure it on "
                                    "held-out children and adults and synthetic non-radiographs, "
                                    "and write <name>.ood.onnx and the card's entry.")
    config_args(o)
    _exported_guard_args(o)
    o.set_defaults(func=_guard_ood)
    h = gsub.add_parser("child-header", help="choose the threshold for images whose header "
                                             "gives a child's age",
                        description="Choose the card's adult_child_header threshold: the "
                                    "largest P(adult) at which validation adults presented "
                                    "with a child's age are still refused (by this check or "
                                    "the out-of-distribution one) at least 97.5%% of the time; "
                                    "measure it on the held-out part. Run after `ood`.")
    config_args(h)
    _exported_guard_args(h)
    h.set_defaults(func=_guard_child_header)


def add(sub: SubParsers) -> None:
    """Add ``split``, ``train``, ``calibrate``, ``export`` and ``guard``."""
    _add_guard(sub)
    _add_split(sub)
    _add_train(sub)
    _add_calibrate(sub)
    _add_export(sub)
