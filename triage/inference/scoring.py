"""Batched inference over prepared images: the one path the daemon, replay and ``triage score`` share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from triage.inference.model import Model


class Ready(Protocol):
    """A prepared image: its key and its network input (None when it cannot be scored)."""

    @property
    def key(self) -> int: ...
    @property
    def x(self) -> np.ndarray | None: ...


@dataclass(frozen=True)
class ImageScore:
    """One image's calibrated probability and its class-activation map (if the model gives one)."""

    probability: float
    cam: np.ndarray | None = None
    # The pooled features, only when asked for (prototype lookups need them).
    embedding: np.ndarray | None = None
    # (nearest prototype's class, distance): an extra finding that never enters the tier.
    prototype: tuple[str, float] | None = None


def infer(model: Model, images: Sequence[Ready], batch_size: int,
          embeddings: bool = False) -> dict[int, ImageScore]:
    """Return {key: score} for every image with an input, in batches of ``batch_size``.

    With ``embeddings`` each score carries the image's embedding too (from the same
    run; the model must have ``predict_embedded``, as :class:`OnnxModel` has).
    """
    ready = [im for im in images if im.x is not None]
    out: dict[int, ImageScore] = {}
    for i in range(0, len(ready), batch_size):
        chunk = ready[i:i + batch_size]
        batch = np.stack([np.asarray(im.x) for im in chunk])
        emb: np.ndarray | None = None
        if embeddings:
            p, cam, emb = model.predict_embedded(batch)  # type: ignore[attr-defined]
        else:
            p, cam = model.predict(batch)
        for j, im in enumerate(chunk):
            out[im.key] = ImageScore(float(p[j]), None if cam is None else np.asarray(cam[j]),
                                     None if emb is None else np.asarray(emb[j]))
    return out
