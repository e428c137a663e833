"""Scoring: image in, calibrated probability and tier out.

The pure core is :func:`priority` (probability and thresholds to a tier) and
:func:`score` (a decoded grey image and a :class:`Model` to a :class:`Score`).
A :class:`Model` is anything with ``prepare`` and ``predict``; the shipped one
is :class:`OnnxModel` (an onnxruntime session plus its card), and tests can hand
in a fixed scorer. :func:`score_path` is the file edge: it turns every failure
into an "unscored" result with a reason.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from triage.errors import InputError, UnscorableError

log = logging.getLogger(__name__)

ROUTINE = "routine"
UNSCORED = "unscored"


class Model(Protocol):
    """What scoring needs from a model."""

    @property
    def thresholds(self) -> Mapping[str, float | None]:
        """Operating-point name -> probability threshold (None: never reached)."""
        ...

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Return the network input (C, S, S) float32 for a decoded grey image."""
        ...

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (probabilities (N,), class-activation maps (N, h, w) or None)."""
        ...

    def load(self, path: str | Path) -> np.ndarray:
        """Return the gated, decoded grey image of a file. Raises UnscorableError."""
        ...


@dataclass(frozen=True)
class Score:
    """A scored image: calibrated probability, tier, and the raw CAM when available."""

    probability: float
    tier: str
    cam: np.ndarray | None = None


@dataclass(frozen=True)
class Result:
    """The outcome for one input file (what ``triage score --json`` prints)."""

    path: str
    probability: float | None
    tier: str
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready form with keys path, probability, tier, reason."""
        return {"path": self.path, "probability": self.probability, "tier": self.tier,
                "reason": self.reason}


def priority(probability: float | None, thresholds: Mapping[str, float | None]) -> str:
    """Return the tier of ``probability``: the name of the highest threshold it reaches.

    A point whose threshold is None is never reached. Returns "routine" when no
    threshold is reached and "unscored" for a None or NaN probability.
    """
    if probability is None or not np.isfinite(probability):
        return UNSCORED
    reached = [(t, name) for name, t in thresholds.items() if t is not None and probability >= t]
    return max(reached)[1] if reached else ROUTINE


def score(image: np.ndarray, model: Model) -> Score:
    """Return the :class:`Score` of one decoded grey image. Raises what ``model`` raises."""
    x = model.prepare(image)[None]
    probs, cams = model.predict(x)
    p = float(probs[0])
    return Score(p, priority(p, model.thresholds), None if cams is None else cams[0])


def score_path(path: str | Path, model: Model) -> Result:
    """Score one file; every expected failure becomes an "unscored" :class:`Result`.

    Raises nothing for unreadable, gated or undecodable inputs.
    """
    try:
        s = score(model.load(path), model)
    except UnscorableError as e:
        log.info("unscored %s: %s", Path(path).name, e.reason)
        return Result(str(path), None, UNSCORED, e.reason)
    return Result(str(path), s.probability, s.tier, None)


def iter_inputs(paths: Iterable[str | Path]) -> Iterator[Path]:
    """Yield files named directly, and every file under named directories, in sorted order."""
    for p in map(Path, paths):
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            yield p


def heatmap(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Return the CAM upsampled bilinearly to ``size`` and min-max normalised to [0, 1].

    Matches ``monai.visualize.GradCAM``'s post-processing (bilinear, no corner
    alignment, then min-max). A constant map becomes zeros.
    """
    import torch

    t = torch.as_tensor(np.asarray(cam, dtype=np.float32))[None, None]
    up = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)
    a = up[0, 0].numpy()
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


class OnnxModel:
    """The shipped model: an onnxruntime session, its card and its preprocessing chain."""

    def __init__(self, onnx_path: str | Path, card: dict[str, Any], threads: int = 2) -> None:
        from triage.export import onnx_session
        from triage.preprocess import InputSpec, build_transforms, preprocess_of

        self.path = Path(onnx_path)
        self.card = card
        self.spec = InputSpec.from_dict(card["input"])
        self.preprocess = preprocess_of(card)
        self.transforms = build_transforms(self.preprocess, self.spec, train=False)
        self.thresholds: dict[str, float | None] = {
            op["name"]: op["threshold"] for op in card.get("operating_points", [])}
        self.session = onnx_session(self.path, threads)

    @classmethod
    def load_files(cls, onnx_path: str | Path, card_path: str | Path | None = None,
                   threads: int = 2) -> OnnxModel:
        """Return the model at ``onnx_path`` with its card (default: same name, ``.json``).

        Raises InputError when either file is missing or invalid.
        """
        onnx_path = Path(onnx_path)
        card_path = Path(card_path) if card_path else onnx_path.with_suffix(".json")
        try:
            card = json.loads(card_path.read_text())
            return cls(onnx_path, card, threads)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot load model {onnx_path} with card {card_path}: {e}") from e
        except Exception as e:  # onnxruntime raises its own types for a bad graph
            raise InputError(f"cannot load model {onnx_path}: {type(e).__name__}: {e}") from e

    def load(self, path: str | Path) -> np.ndarray:
        """Return the gated, decoded grey image of a file. Raises UnscorableError."""
        from triage.preprocess import load_any

        return load_any(path, self.preprocess)

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """Return the network input for a decoded grey image."""
        return np.asarray(self.transforms(image), dtype=np.float32)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (probabilities, CAMs) for a prepared batch."""
        prob, _, cam = self.session.run(["probability", "logit", "cam"],
                                        {"image": batch.astype(np.float32)})
        return prob, cam
