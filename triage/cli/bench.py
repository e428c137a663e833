"""The ``triage benchmark`` subcommand: architectures compared on equal terms.

torch, timm and onnxruntime are imported only when the subcommand runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from typing import Any

from triage.cli.common import SubParsers, config_args, load_config, setup_logging
from triage.core.errors import InputError

log = logging.getLogger(__name__)


def _command_line(args: argparse.Namespace) -> str:
    """Return the command that regenerates this sweep (without --force)."""
    argv = [a for a in sys.argv[1:] if a != "--force"]
    if not argv or argv[0] != "benchmark":
        argv = ["benchmark", *argv]
    return "python -m triage " + " ".join(shlex.quote(a) for a in argv)


def _few_shot(args: argparse.Namespace, cfg: Any) -> int:
    """``benchmark --few-shot``: episodes on the shipped split's holdout (docs/few-shot.md)."""
    import json
    import time
    from pathlib import Path

    from triage.imaging.transforms import preprocess_of
    from triage.training import fewshot
    from triage.training.benchmark import device_name

    t0 = time.monotonic()
    model_path = Path(args.model) if args.model else cfg.model.onnx_path
    card = json.loads((model_path.with_suffix(".json") if args.model else cfg.model.card_path)
                      .read_text())
    budget = fewshot.Budget(input_size=args.size, train_episodes=args.train_episodes,
                            eval_episodes=args.episodes, threads=args.threads,
                            adult_per_class=args.adult_per_class,
                            **({"seed": args.seed} if args.seed is not None else {}))
    encoders = fewshot.ENCODERS if args.encoders == "all" else tuple(
        e.strip() for e in args.encoders.split(",") if e.strip())
    unknown = [e for e in encoders if e not in fewshot.ENCODERS]
    if unknown:
        raise InputError(f"unknown encoder {unknown[0]!r}; choose from {', '.join(fewshot.ENCODERS)}")
    data = fewshot.load_data(card, Path(args.manifest), Path(args.data) if args.data else None,
                             Path(args.adult_manifest) if args.adult_manifest else None, budget)
    tasks = tuple(dataclasses.replace(t, n_query=args.queries) for t in fewshot.TASKS)
    rows = fewshot.run(card, model_path, data, preprocess_of(card), budget, encoders, tasks)
    device = f"{device_name().rsplit(',', 1)[0]}, {budget.threads} torch threads"
    settings = fewshot.settings_of(budget, data, _command_line(args), device,
                                   (time.monotonic() - t0) / 60, tasks)
    out_json = args.json or "docs/benchmarks-fewshot.json"
    fewshot.write_reports(rows, settings, args.docs, out_json)
    log.info("wrote %s, %s", args.docs, out_json)
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from triage.training import benchmark, train

    cfg = load_config(args)
    setup_logging(cfg.logging.level)
    if args.few_shot:
        return _few_shot(args, cfg)
    args.json = args.json or "docs/benchmarks.json"
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
    p.add_argument("--json", metavar="JSON",
                   help="results (default docs/benchmarks.json; docs/benchmarks-fewshot.json "
                        "with --few-shot)")
    p.add_argument("--chart", metavar="PNG", default="docs/benchmarks-architectures.png")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument("--force", action="store_true", help="re-run finished architectures")
    f = p.add_argument_group("few-shot (docs/few-shot.md)")
    f.add_argument("--few-shot", action="store_true",
                   help="instead: N-way K-shot prototype episodes on the shipped model's holdout "
                        "patients (normal / bacterial / viral; adult COVID-19 / normal with "
                        "--adult-manifest), for the shipped embedding and encoders trained as "
                        "prototypical networks on the train patients; writes the 'Few-shot' "
                        "section of --docs")
    f.add_argument("--adult-manifest", metavar="CSV",
                   help="cxr-adult-224's manifest.csv (its val split; optional)")
    f.add_argument("--encoders", metavar="LIST", default="all",
                   help="comma-separated: shipped, untrained_mobilenet_v2, mobilenet_v2, "
                        "squeezenet1_1, efficientnet_lite0 (default all)")
    f.add_argument("--model", metavar="ONNX", help="the model whose embedding and split to use "
                   "(default: model.path; its card beside it)")
    f.add_argument("--train-episodes", type=int, default=300, metavar="N",
                   help="training episodes per trained encoder (default 300)")
    f.add_argument("--episodes", type=int, default=600, metavar="N",
                   help="evaluation episodes per task (default 600)")
    f.add_argument("--queries", type=int, default=15, metavar="N",
                   help="query images per class in each evaluation episode (default 15)")
    f.add_argument("--adult-per-class", type=int, default=300, metavar="N",
                   help="adult val images per class (default 300)")
    p.set_defaults(func=_benchmark)

