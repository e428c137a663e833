"""``triage score``: score files with the shipped model, in this process, as the daemon would.

Each file goes through the daemon's own steps: :func:`triage.imaging.prepare.prepare`
(gating, decoding, the card's MONAI chain), :func:`triage.inference.scoring.infer`
and :func:`triage.core.tiers.priority`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from triage.cli.common import SubParsers, config_args, scoring_setup


@dataclass(frozen=True)
class FileScore:
    """The outcome for one input file (one line of ``triage score --json``)."""

    path: str
    probability: float | None
    tier: str
    reason: str | None
    # (nearest class, distance) with --prototypes: beside the tier, never part of it.
    prototype: tuple[str, float] | None = None

    def to_dict(self, prototypes: bool = False) -> dict[str, Any]:
        """Return the JSON-ready form with keys path, probability, tier, reason (and, with
        ``prototypes``, prototype: {"class", "distance"} or None when unscored)."""
        out: dict[str, Any] = {"path": self.path, "probability": self.probability,
                               "tier": self.tier, "reason": self.reason}
        if prototypes:
            from triage.inference.prototypes import as_finding

            out["prototype"] = as_finding(*(self.prototype or (None, None)))
        return out


def iter_inputs(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Yield files named directly, and every file under named directories, in sorted order."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            yield p


def score_file(path: str | Path, model: Any, batch_size: int = 1, guard: Any = None,
               prototypes: Any = None) -> FileScore:
    """Score one file; every expected failure becomes an "unscored" :class:`FileScore`.

    Call :func:`triage.imaging.prepare.init` with the model's card (and the
    guard's) first. ``guard`` judges the image as the daemon's does; with
    ``prototypes`` the nearest one is looked up as the daemon does. Raises
    nothing for unreadable, gated, refused or undecodable inputs.
    """
    from triage.core.tiers import UNSCORED, priority
    from triage.imaging.prepare import prepare
    from triage.inference.prototypes import annotate
    from triage.inference.scoring import infer

    prepared = prepare(0, str(path))
    if guard is not None and prepared.x is not None:
        guard.judge([prepared])
    if prepared.x is None:
        return FileScore(str(path), None, UNSCORED, prepared.reason)
    s = annotate(prototypes, infer(model, [prepared], batch_size,
                                   embeddings=prototypes is not None))[0]
    return FileScore(str(path), s.probability, priority(s.probability, model.thresholds),
                     prepared.reason, s.prototype)


def _score(args: argparse.Namespace) -> int:
    from triage.imaging.prepare import init
    from triage.inference.guard import load_guard

    cfg, model = scoring_setup(args)
    guard = None if args.no_guard else load_guard(cfg.guard, model.card)
    protos = None
    if args.prototypes:
        from triage.inference.prototypes import load_for

        protos = load_for(args.prototypes, model)
    init(model.card, guard.input_card if guard is not None else None)
    missing = 0
    for path in iter_inputs(args.paths):
        if not path.exists():
            missing += 1
            print(f"triage score: {path}: no such file or directory", file=sys.stderr)
            continue
        r = score_file(path, model, guard=guard, prototypes=protos)
        if args.json:
            print(json.dumps(r.to_dict(protos is not None)), flush=True)
        elif r.probability is None:
            print(f"{r.path}\tunscored: {r.reason}", flush=True)
        else:
            note = f"\t{r.reason}" if r.reason else ""
            near = f"\tnearest {r.prototype[0]} ({r.prototype[1]:.3f})" if r.prototype else ""
            print(f"{r.path}\t{r.probability:.4f}\t{r.tier}{near}{note}", flush=True)
    return 1 if missing else 0


def add(sub: SubParsers) -> None:
    """Add ``score``."""
    p = sub.add_parser("score", help="score DICOM or image files with the shipped model",
                       description="Score files (directories are walked). Exit status 0 when every "
                                   "input was processed, even if some were unscored.")
    config_args(p)
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM/PNG/JPEG files or directories")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per input: path, probability, tier, reason")
    p.add_argument("--model", metavar="ONNX", help="model file (default: model.path)")
    p.add_argument("--card", metavar="JSON", help="model card (default: the model's .json)")
    p.add_argument("--prototypes", metavar="FILE",
                   help="few-shot prototypes (`triage adapt`): add each image's nearest class "
                        "and distance, an extra finding that never changes the tier")
    p.add_argument("--no-guard", action="store_true",
                   help="skip the input guard (docs/guard.md): score images the daemon would refuse")
    p.add_argument("--session", choices=("daemon", "onnxruntime-default", "reference"),
                   default="daemon",
                   help="onnxruntime session: the daemon's (default); onnxruntime's own default, "
                        "integer kernels fused as another program would run the file; or the "
                        "reference meaning, every graph optimisation off (slow; compare the "
                        "first with it to check a CPU)")
    p.set_defaults(func=_score)
