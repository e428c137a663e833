"""``triage adapt``: class prototypes from a few labelled images (docs/few-shot.md).

Every support image goes through the daemon's own steps
(:func:`triage.imaging.prepare.prepare`: gating, decoding, the model card's
MONAI chain), then through the model for its ``embedding`` output;
:mod:`triage.inference.prototypes` turns them into one prototype per class.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from triage.cli.common import SubParsers, config_args, scoring_setup
from triage.core.errors import InputError

log = logging.getLogger(__name__)


def support_files(root: Path) -> dict[str, list[Path]]:
    """Return {class: its files} for a support folder with one subfolder per class.

    Hidden files and folders are skipped. Raises InputError when ``root`` is not a
    folder or holds fewer than two class folders.
    """
    if not root.is_dir():
        raise InputError(f"support set {root} is not a folder")
    out = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[d.name] = sorted(f for f in d.rglob("*") if f.is_file() and
                             not any(part.startswith(".") for part in f.relative_to(d).parts))
    if len(out) < 2:
        raise InputError(f"support set {root} needs one subfolder per class, two or more; "
                         f"found {len(out)}")
    return out


def embed_files(files: list[Path], model: Any) -> tuple[np.ndarray, list[str], list[str]]:
    """Return (embeddings of the usable files, their sha256, "file: reason" for the others).

    Call :func:`triage.imaging.prepare.init` with the model's card first.
    """
    from triage.imaging.prepare import prepare

    xs, sha, skipped = [], [], []
    for f in files:
        p = prepare(0, str(f))
        if p.x is None:
            skipped.append(f"{f}: {p.reason}")
            continue
        xs.append(p.x)
        sha.append(hashlib.sha256(f.read_bytes()).hexdigest())
    if not xs:
        return np.zeros((0, 0), np.float32), sha, skipped
    _, _, emb = model.predict_embedded(np.stack(xs))
    return np.asarray(emb), sha, skipped


def _adapt(args: argparse.Namespace) -> int:
    from triage.imaging.prepare import init
    from triage.inference import prototypes

    cfg, model = scoring_setup(args)
    if not model.has_embedding:
        raise InputError(f"model {model.path} has no 'embedding' output")
    init(model.card)
    by_class: dict[str, np.ndarray] = {}
    hashes: dict[str, list[str]] = {}
    for cls, files in support_files(Path(args.support)).items():
        prototypes.check_class_name(cls)
        emb, sha, skipped = embed_files(files, model)
        for s in skipped:
            log.warning("support image skipped: %s", s)
        if len(emb) == 0:
            raise InputError(f"class {cls!r} has no usable image in {args.support}")
        by_class[cls], hashes[cls] = emb, sha
    protos = prototypes.build(by_class, model.name, model.sha256, hashes)
    prototypes.write(protos, args.out)
    log.info("wrote %s: %s", args.out, prototypes.summary(protos))
    return 0


def add(sub: SubParsers) -> None:
    """Add ``adapt``."""
    p = sub.add_parser("adapt", help="build few-shot class prototypes from a support set",
                       description="Embed a few labelled images per class (DIR/CLASS/files, "
                                   "DICOM or PNG/JPEG) with the model's embedding, after its "
                                   "card's preprocessing, and write one prototype per class. "
                                   "Set model.prototypes (or `triage score --prototypes`) to "
                                   "use them. See docs/few-shot.md.")
    config_args(p)
    p.add_argument("--support", metavar="DIR", required=True,
                   help="folder with one subfolder per class")
    p.add_argument("--out", metavar="FILE", required=True, help="prototype file to write (JSON)")
    p.add_argument("--model", metavar="ONNX", help="model file (default: model.path)")
    p.add_argument("--card", metavar="JSON", help="model card (default: the model's .json)")
    p.set_defaults(func=_adapt)
