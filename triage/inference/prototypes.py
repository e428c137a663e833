"""Few-shot prototypes: the mean embedding of a few labelled images per class, and the nearest one.

``triage adapt`` embeds a support set (one folder per class) with the model's
``embedding`` output, after the model card's own preprocessing chain, and
writes each class's prototype: the mean of its L2-normalised embeddings,
normalised again (Snell et al., 2017, with the cosine geometry). An image's
finding is then its nearest prototype and the Euclidean distance to it between
unit vectors (0 = same direction, sqrt(2) = orthogonal, 2 = opposite).

This is an extra finding shown beside the score, never a diagnosis: it does
not enter the study's probability or tier (:mod:`triage.core.tiers` never sees
it). A prototype file names the model (sha256) whose embedding made it and is
refused for any other, since another model's embedding space is another space.

The maths (:func:`build`, :func:`nearest`, :func:`annotate`) is pure; only
:func:`write` and :func:`read` touch the disk.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.core.errors import ConfigError, InputError
from triage.files import write_atomic

FORMAT = "triage-prototypes"
VERSION = 1
EMBEDDING_SOURCE = ("the model's ONNX output 'embedding': its last feature map, global-average "
                    "pooled (the input of its linear head), after the model card's preprocessing")
DISTANCE = "Euclidean distance between L2-normalised vectors (0 to 2; sqrt(2) is orthogonal)"
MAX_CLASS_CHARS = 64


@dataclass(frozen=True)
class Prototypes:
    """Class prototypes in one model's embedding space."""

    classes: tuple[str, ...]
    vectors: np.ndarray  # (classes, dim) float32, each row of unit length
    shots: tuple[int, ...]
    model_name: str
    model_sha256: str
    created: str = ""
    support_sha256: tuple[tuple[str, ...], ...] = ()  # per class: each support file's sha256

    @property
    def dim(self) -> int:
        """The embedding's width."""
        return int(self.vectors.shape[1])


def check_class_name(name: str) -> str:
    """Return ``name`` if it can name a class (1-64 printable characters, not starting
    with a dot); raise InputError otherwise."""
    if not name or len(name) > MAX_CLASS_CHARS or name.startswith(".") or \
            not name.isprintable() or name != name.strip():
        raise InputError(f"class name {name!r} must be 1-{MAX_CLASS_CHARS} printable characters "
                         "without leading dot or surrounding spaces")
    return name


def normalise(v: np.ndarray) -> np.ndarray:
    """Return the rows of ``v`` scaled to unit length (an all-zero row stays zero)."""
    a = np.asarray(v, dtype=np.float64)
    norm = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.where(norm > 0, norm, 1.0)


def prototype_of(embeddings: np.ndarray) -> np.ndarray:
    """Return one class's prototype: the unit-length mean of its unit-length embeddings."""
    e = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    return normalise(normalise(e).mean(axis=0))


def build(embeddings: Mapping[str, np.ndarray], model_name: str, model_sha256: str,
          support_sha256: Mapping[str, Sequence[str]] | None = None,
          created: str = "") -> Prototypes:
    """Return the prototypes of ``{class: (shots, dim) embeddings}``, classes in sorted order.

    Raises InputError with fewer than two classes, a class without images, a bad class
    name, or embeddings of different widths.
    """
    if len(embeddings) < 2:
        raise InputError(f"a support set needs at least two classes, got {len(embeddings)}")
    classes = tuple(sorted(embeddings))
    vecs, shots = [], []
    for c in classes:
        check_class_name(c)
        e = np.atleast_2d(np.asarray(embeddings[c], dtype=np.float64))
        if e.shape[0] == 0 or e.size == 0:
            raise InputError(f"class {c!r} has no usable image")
        vecs.append(prototype_of(e))
        shots.append(int(e.shape[0]))
    if len({v.shape[-1] for v in vecs}) != 1:
        raise InputError("embeddings of different widths")
    sha = tuple(tuple(support_sha256.get(c, ())) for c in classes) if support_sha256 else ()
    return Prototypes(classes, np.stack(vecs).astype(np.float32), tuple(shots), model_name,
                      model_sha256, created, sha)


def distances(protos: Prototypes, embeddings: np.ndarray) -> np.ndarray:
    """Return the (images, classes) distances of ``embeddings`` to each prototype (pure)."""
    q = normalise(np.atleast_2d(np.asarray(embeddings, dtype=np.float64)))
    d2 = ((q[:, None, :] - protos.vectors[None, :, :].astype(np.float64)) ** 2).sum(-1)
    return np.sqrt(np.maximum(d2, 0.0))


def nearest(protos: Prototypes, embedding: np.ndarray) -> tuple[str, float]:
    """Return (nearest class, its distance) for one embedding (pure).

    Ties go to the class that sorts first.
    """
    d = distances(protos, embedding)[0]
    i = int(np.argmin(d))
    return protos.classes[i], float(d[i])


def annotate(protos: Prototypes | None, scores: Mapping[int, Any]) -> dict[int, Any]:
    """Return ``scores`` (key -> :class:`~triage.inference.scoring.ImageScore`) with each
    embedded score's ``prototype`` set to (nearest class, distance); unchanged without
    prototypes. Only this field changes: the probability, and so the tier, stay as scored."""
    if protos is None:
        return dict(scores)
    return {k: (dataclasses.replace(s, prototype=nearest(protos, s.embedding))
                if s.embedding is not None else s) for k, s in scores.items()}


def columns(score: Any) -> dict[str, Any]:
    """Return the image-result columns of a score's prototype finding (None values without one)."""
    found = getattr(score, "prototype", None)
    if found is None:
        return {"prototype_class": None, "prototype_distance": None}
    return {"prototype_class": found[0], "prototype_distance": round(float(found[1]), 6)}


def as_finding(cls: str | None, distance: float | None) -> dict[str, Any] | None:
    """Return the JSON form of a finding ({"class", "distance"}), or None without one."""
    if cls is None or distance is None:
        return None
    return {"class": cls, "distance": round(float(distance), 4)}


# --- the file --------------------------------------------------------------------------------


def to_dict(protos: Prototypes) -> dict[str, Any]:
    """Return the file's JSON document."""
    return {
        "format": FORMAT, "version": VERSION,
        "created": protos.created or _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "model": {"name": protos.model_name, "sha256": protos.model_sha256},
        "embedding": {"source": EMBEDDING_SOURCE, "dim": protos.dim,
                      "normalisation": "L2 per image; the mean is L2-normalised again"},
        "distance": DISTANCE,
        "note": "An extra finding beside the score, not a diagnosis; it never changes a tier.",
        "classes": [{"name": c, "shots": n, "prototype": [round(float(x), 7) for x in v],
                     **({"support_sha256": list(protos.support_sha256[i])}
                        if protos.support_sha256 else {})}
                    for i, (c, n, v) in enumerate(zip(protos.classes, protos.shots,
                                                      protos.vectors, strict=True))],
    }


def write(protos: Prototypes, path: str | Path) -> Path:
    """Write the prototypes as JSON at ``path`` (atomically, owner-readable); return the path."""
    return write_atomic(path, json.dumps(to_dict(protos), indent=1) + "\n")


def from_dict(doc: Mapping[str, Any], where: str) -> Prototypes:
    """Return the prototypes of a file's JSON document. Raises ConfigError naming ``where``."""
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
        raise ConfigError(f"prototype file {where} is not a triage prototype file "
                          f"(no \"format\": \"{FORMAT}\"; make one with `triage adapt`)")
    if doc.get("version") != VERSION:
        raise ConfigError(f"prototype file {where} has version {doc.get('version')!r}; "
                          f"this triage reads version {VERSION}")
    try:
        classes = [c for c in doc["classes"]]
        names = tuple(check_class_name(str(c["name"])) for c in classes)
        vecs = np.asarray([c["prototype"] for c in classes], dtype=np.float32)
        shots = tuple(int(c["shots"]) for c in classes)
        model = doc["model"]
        sha = tuple(tuple(str(h) for h in c.get("support_sha256", ())) for c in classes)
    except (KeyError, TypeError, ValueError, InputError) as e:
        raise ConfigError(f"prototype file {where} is damaged: {type(e).__name__}: {e}") from e
    if len(names) < 2 or len(set(names)) != len(names) or vecs.ndim != 2 or \
            not np.all(np.isfinite(vecs)):
        raise ConfigError(f"prototype file {where} is damaged: it needs two or more distinct "
                          "classes with finite prototypes of one width")
    return Prototypes(names, normalise(vecs).astype(np.float32), shots, str(model.get("name", "")),
                      str(model.get("sha256", "")), str(doc.get("created", "")),
                      sha if any(sha) else ())


def read(path: str | Path, model_sha256: str | None = None,
         dim: int | None = None) -> Prototypes:
    """Read a prototype file; with ``model_sha256`` refuse one made for another model, and
    with ``dim`` one whose width differs from the model's embedding.

    Raises ConfigError with a one-line reason that names the path.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"prototype file {p}: cannot read it ({e.strerror or e})") from e
    except ValueError as e:
        raise ConfigError(f"prototype file {p} is not valid JSON: {e}") from e
    protos = from_dict(doc, str(p))
    if model_sha256 is not None and protos.model_sha256 != model_sha256:
        raise ConfigError(f"prototype file {p} was made with model sha256 "
                          f"{protos.model_sha256[:12] or '(none)'}, not the loaded model's "
                          f"{model_sha256[:12]}: build it again with `triage adapt`")
    if dim is not None and protos.dim != dim:
        raise ConfigError(f"prototype file {p} holds {protos.dim}-wide prototypes; the model's "
                          f"embedding is {dim} wide")
    return protos


def summary(protos: Prototypes) -> str:
    """Return one line naming the classes and their shots, e.g. ``a (5), b (4)``."""
    return ", ".join(f"{c} ({n})" for c, n in zip(protos.classes, protos.shots, strict=True))


def load_for(path: str | Path, model: Any) -> Prototypes:
    """Read the prototype file at ``path`` for ``model`` (an :class:`OnnxModel`): refused when
    the model gives no embedding, or the file was made for another model or width.

    Raises ConfigError naming the path.
    """
    if not getattr(model, "has_embedding", False):
        raise ConfigError(f"prototype file {path}: model {getattr(model, 'path', '')} has no "
                          "'embedding' output to compare with prototypes")
    return read(path, str(model.card.get("sha256", "")), model.embedding_dim)
