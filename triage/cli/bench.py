"""The ``triage benchmark`` subcommand: architectures compared on equal terms.

torch, timm and onnxruntime are imported only when the subcommand runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys

from triage.cli.common import SubParsers, config_args, load_config, setup_logging

log = logging.getLogger(__name__)


def _command_line(args: argparse.Namespace) -> str:
    """Return the command that regenerates this sweep (without --force)."""
    argv = [a for a in sys.argv[1:] if a != "--force"]
    if not argv or argv[0] != "benchmark":
        argv = ["benchmark", *argv]
    return "python -m triage " + " ".join(shlex.quote(a) for a in argv)


def _benchmark(args: argparse.Namespace) -> int:
    from triage.training import benchmark, train

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    keys = benchmark.parse_archs(args.archs)
    budget = benchmark.Budget(input_size=args.size, epochs=args.epochs,
                              train_limit=args.train_limit, max_steps=args.max_steps,
                              seed=args.seed if args.seed is not None else cfg.train.seed,
                              ort_threads=args.threads, timing_seconds=args.timing_seconds,
                              calib_images=args.calib_images)
    tcfg = cfg.train if args.batch_size is None else dataclasses.replace(
        cfg.train, batch_size=args.batch_size)
    pre = dataclasses.replace(cfg.preprocess, min_size_px=min(cfg.preprocess.min_size_px, args.size))
    settings = benchmark.settings_of(
        budget, dataclasses.replace(tcfg, input_size=budget.input_size, epochs=budget.epochs,
                                    seed=budget.seed),
        args.manifest, train.file_sha256(args.manifest), _command_line(args))
    samples = train.read_manifest(args.manifest, args.data)
    rows = benchmark.run(samples, keys, args.out, tcfg, pre, cfg.calibration, budget, settings,
                         force=args.force)
    benchmark.write_reports(rows, settings, args.docs, args.json,
                            None if args.no_chart else args.chart)
    log.info("wrote %s, %s", args.docs, args.json)
    return 0


def add(sub: SubParsers) -> None:
    """Add ``benchmark``."""
    p = sub.add_parser("benchmark", help="train and measure several architectures on equal terms",
                       description="Train each architecture with the shipped recipe on the same "
                                   "data and budget, calibrate on val, export fp32/int8 ONNX, "
                                   "time onnxruntime, and write a Markdown table, JSON and chart. "
                                   "Finished architectures are skipped unless --force.")
    config_args(p)
    p.add_argument("--data", metavar="DIR", help="data root (default: the CSV's folder)")
    p.add_argument("--manifest", metavar="CSV", required=True, help="path,label[,split] CSV")
    p.add_argument("--out", metavar="DIR", default="runs/benchmark",
                   help="per-architecture runs and result.json files")
    p.add_argument("--archs", metavar="LIST", default="all",
                   help="comma-separated keys (default: all): mobilenet_v2, resnet18, "
                        "densenet121, xception, squeezenet1_1, efficientnet_lite0, vit_tiny")
    p.add_argument("--size", type=int, default=64, metavar="PX", help="input size (default 64)")
    p.add_argument("--epochs", type=int, default=3, metavar="N", help="epoch budget (default 3)")
    p.add_argument("--train-limit", type=int, metavar="N",
                   help="train on a fixed random subsample of N train images")
    p.add_argument("--max-steps", type=int, metavar="N", help="cap optimiser steps per epoch")
    p.add_argument("--batch-size", type=int, metavar="N", help="override train.batch_size")
    p.add_argument("--seed", type=int, metavar="N", help="override train.seed")
    p.add_argument("--threads", type=int, default=2, metavar="N", help="onnxruntime threads")
    p.add_argument("--timing-seconds", type=float, default=2.0, metavar="S",
                   help="least time per throughput figure")
    p.add_argument("--calib-images", type=int, default=32, metavar="N",
                   help="training images for int8 calibration")
    p.add_argument("--docs", metavar="MD", default="docs/benchmarks.md")
    p.add_argument("--json", metavar="JSON", default="docs/benchmarks.json")
    p.add_argument("--chart", metavar="PNG", default="docs/benchmarks-architectures.png")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--force", action="store_true", help="re-run finished architectures")
    p.set_defaults(func=_benchmark)

