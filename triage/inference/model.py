"""The model: an onnxruntime session plus its card, behind a small protocol.

The exported graph takes ``image`` (N, C, S, S) float32, already through the
card's preprocessing chain, and returns ``probability`` (calibrated), ``logit``
and ``cam`` (the Grad-CAM map at the last feature map). Anything with
``thresholds``, ``card`` and ``predict`` is a :class:`Model`, so a test can
hand in a fixed scorer. Only onnxruntime and numpy are needed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from triage.core.errors import InputError

INPUT_NAME = "image"
OUTPUT_NAMES = ("probability", "logit", "cam")
# Models exported since the input guard also give their pooled features.
ALL_OUTPUTS = (*OUTPUT_NAMES, "embedding")


class Model(Protocol):
    """What scoring needs from a model."""

    @property
    def card(self) -> Mapping[str, Any]:
        """The model card (JSON): input spec, preprocessing, operating points, reference."""
        ...

    @property
    def thresholds(self) -> Mapping[str, float | None]:
        """Operating-point name -> probability threshold (None: never reached)."""
        ...

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (probabilities (N,), class-activation maps (N, h, w) or None)."""
        ...


def onnx_session(path: str | Path, threads: int = 2, optimize: bool = True,
                 fuse_int8: bool = False) -> Any:
    """Return an onnxruntime CPU InferenceSession limited to ``threads`` threads.

    By default every graph optimisation runs except the fusion of
    QuantizeLinear/DequantizeLinear pairs into integer kernels
    (``session.disable_quant_qdq``): those kernels are chosen by instruction set
    and can saturate on CPUs without VNNI, so the same file would score
    differently on two servers. A model with int8 weights and float activations
    (what ships) then has its weights dequantized once, at load, by constant
    folding, and runs at fp32 speed. ``fuse_int8=True`` gives onnxruntime's own
    default (what any other program loading the file gets); ``optimize=False``
    turns every optimisation off (``ORT_DISABLE_ALL``): each node runs as
    written, the model's reference meaning.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif not fuse_int8:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


# Which onnxruntime session a command scores with (``triage score --session``):
# the daemon's; onnxruntime's own default (integer QDQ fusion on, what another
# program loading the file gets); the reference meaning (every optimisation off).
SESSION_KINDS: dict[str, dict[str, bool]] = {
    "daemon": {}, "onnxruntime-default": {"fuse_int8": True}, "reference": {"optimize": False}}


def run_session(sess: Any, images: np.ndarray, batch: int = 64,
                outputs: tuple[str, ...] = OUTPUT_NAMES) -> dict[str, np.ndarray]:
    """Return the named outputs of ``sess`` over ``images``, concatenated along the batch."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in outputs}
    for i in range(0, len(images), batch):
        outs = sess.run(list(outputs), {INPUT_NAME: images[i:i + batch].astype(np.float32)})
        for n, o in zip(outputs, outs, strict=True):
            parts[n].append(o)
    return {n: np.concatenate(v) for n, v in parts.items()}


def card_thresholds(card: Mapping[str, Any]) -> dict[str, float | None]:
    """Return the card's operating points as {name: threshold}."""
    return {op["name"]: op["threshold"] for op in card.get("operating_points", [])}


class OnnxModel:
    """The shipped model: an onnxruntime session and its card."""

    def __init__(self, onnx_path: str | Path, card: dict[str, Any], threads: int = 2,
                 session: str = "daemon") -> None:
        self.path = Path(onnx_path)
        self.card = card
        if "input" not in card or "size" not in card["input"]:
            raise KeyError("input")
        self.thresholds: dict[str, float | None] = card_thresholds(card)
        self.session_kind = session
        self.session = onnx_session(self.path, threads, **SESSION_KINDS[session])

    @property
    def name(self) -> str:
        """The model's name (the card's, else the file's stem)."""
        return str(self.card.get("name", self.path.stem))

    @property
    def sha256(self) -> str:
        """The sha256 the card records for the model file."""
        return str(self.card.get("sha256", ""))

    @classmethod
    def load_files(cls, onnx_path: str | Path, card_path: str | Path | None = None,
                   threads: int = 2, session: str = "daemon") -> OnnxModel:
        """Return the model at ``onnx_path`` with its card (default: same name, ``.json``),
        scored with the ``session`` kind of :data:`SESSION_KINDS`.

        Raises InputError when either file is missing or invalid.
        """
        onnx_path = Path(onnx_path)
        card_path = Path(card_path) if card_path else onnx_path.with_suffix(".json")
        try:
            card = json.loads(card_path.read_text())
            return cls(onnx_path, card, threads, session)
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"cannot load model {onnx_path} with card {card_path}: {e}") from e
        except Exception as e:  # onnxruntime raises its own types for a bad graph
            raise InputError(f"cannot load model {onnx_path}: {type(e).__name__}: {e}") from e

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (probabilities, CAMs) for a prepared batch."""
        prob, _, cam = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch.astype(np.float32)})
        return prob, cam

    @property
    def has_embedding(self) -> bool:
        """Whether the graph gives its pooled features (an ``embedding`` output)."""
        return "embedding" in {o.name for o in self.session.get_outputs()}

    @property
    def embedding_dim(self) -> int | None:
        """The embedding's width (1,280 for the shipped model), or None without one."""
        for o in self.session.get_outputs():
            if o.name == "embedding" and isinstance(o.shape[-1], int):
                return int(o.shape[-1])
        return None

    def predict_embedded(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None,
                                                           np.ndarray]:
        """Return (probabilities, CAMs, embeddings) for a prepared batch, from one run.

        Raises InputError when the model has no ``embedding`` output.
        """
        if not self.has_embedding:
            raise InputError(f"model {self.path} has no 'embedding' output")
        prob, _, cam, emb = self.session.run(list(ALL_OUTPUTS),
                                             {INPUT_NAME: batch.astype(np.float32)})
        return prob, cam, emb


def load_adapted(adaptation: Any, threads: int = 2, session: str = "daemon") -> OnnxModel:
    """Return a site profile's adapted model (:class:`triage.profile.Adaptation`).

    Its file must have the sha256 the profile and its card name: a variant
    changed after adaptation is refused. Raises InputError.
    """
    import hashlib

    path = Path(adaptation.model_path)
    try:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise InputError(f"site profile's adapted model {path}: {e.strerror or e}") from e
    if digest != adaptation.sha256:
        raise InputError(f"site profile's adapted model {path} has sha256 {digest[:12]}, not the "
                         f"{adaptation.sha256[:12]} its profile names: run `triage site adapt` again")
    model = OnnxModel.load_files(path, adaptation.card_path, threads, session)
    if model.sha256 != digest:
        raise InputError(f"site profile's adapted model card {adaptation.card_path} names sha256 "
                         f"{model.sha256[:12]}, not its model's {digest[:12]}")
    return model
