"""Int8 variants of an exported fp32 model, and how far each depends on the CPU.

onnxruntime runs a static QDQ model in one of two ways. With graph optimisations
off (``ORT_DISABLE_ALL``) every QuantizeLinear/DequantizeLinear runs as written
and the convolutions run in float: the model's *reference meaning*. With them on
(the default) the optimiser fuses DQ -> Conv -> Q into integer kernels chosen by
the instruction set. On x86-64 without VNNI the uint8 x int8 (U8S8) kernels
multiply with ``vpmaddubsw``, which adds two u8*s8 products into a saturating
int16: 2 * 255 * 127 = 64770 does not fit in 32767, so large activations meet
large weights and the sum clips. onnxruntime's quantization documentation says
as much (U8S8 "may have saturation issues" on such CPUs; it suggests
``reduce_range``, 7-bit weights, or U8U8). VNNI (``vpdpbusd``) accumulates in
int32 and does not clip: the same file scores differently on the two machines.

The recipes here:

- ``int8-u8s8``: what earlier releases shipped (uint8 activations, int8 weights);
- ``int8-u8s8-rr``: the same with ``reduce_range`` (|w| <= 64: 2*255*64 = 32640 <= 32767);
- ``int8-u8u8``: uint8 weights, which the AVX2 kernels widen to int16 first;
- ``int8-s8s8``: int8 activations and weights;
- ``int8-weights``: int8 weights with float activations. Only DequantizeLinear
  nodes on the weight initialisers remain, so no integer kernel can be chosen
  and every CPU computes the same float convolutions (up to float rounding).

:func:`agreement` measures a file against its own reference meaning and against
fp32; :func:`choose` picks what ships. Even without saturation, a fused integer
kernel rounds differently from its reference (it requantizes in integers, the
reference in float): on the shipped network that alone moved probabilities by
up to 0.013-0.016 (docs/model.md), more than the 0.01 a variant may differ.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triage.inference.model import INPUT_NAME, onnx_session, run_session

RECIPES = ("int8-weights", "int8-u8s8-rr", "int8-u8u8", "int8-u8s8", "int8-s8s8")
# The first of these that holds ships (fp32 always does). int8-weights comes first:
# no CPU can run it differently, it is a third of fp32's size, and in the daemon's
# session (QDQ fusion off, weights folded at load) it runs at fp32 speed, where
# the integer recipes run their slow reference path.
PREFERENCE = ("int8-weights", "int8-u8s8-rr", "int8-u8u8", "fp32")
# What "holds" means: the optimised session agrees with the reference within this
# (probability), no validation image changes tier, and AUC within this of fp32.
MAX_ABS_DIFF = 0.01
AUC_TOLERANCE = 0.005


class _Reader:
    """onnxruntime CalibrationDataReader over preprocessed training images."""

    def __init__(self, images: np.ndarray, batch: int = 16) -> None:
        self._it: Iterator[dict[str, np.ndarray]] = (
            {INPUT_NAME: images[i:i + batch]} for i in range(0, len(images), batch))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize(fp32_path: str | Path, out_path: str | Path, calib_images: np.ndarray,
             recipe: str = "int8-u8s8") -> Path:
    """Write a static int8 QDQ (per-channel weights) copy of an fp32 model; return its path.

    ``calib_images`` are preprocessed (N, 1, S, S) float32 training images.
    Raises ValueError for an unknown recipe.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if recipe not in RECIPES:
        raise ValueError(f"unknown int8 recipe {recipe!r}; known: {', '.join(RECIPES)}")
    act = QuantType.QInt8 if recipe == "int8-s8s8" else QuantType.QUInt8
    weight = QuantType.QUInt8 if recipe == "int8-u8u8" else QuantType.QInt8
    out = Path(out_path)
    qdq = out.with_suffix(".qdq.onnx") if recipe == "int8-weights" else out
    prepped = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
    reader: Any = _Reader(calib_images.astype(np.float32))
    quantize_static(str(prepped), str(qdq), reader, quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=recipe == "int8-u8s8-rr",
                    activation_type=act, weight_type=weight,
                    op_types_to_quantize=["Conv", "Add"],
                    calibrate_method=CalibrationMethod.MinMax)
    prepped.unlink(missing_ok=True)
    if recipe == "int8-weights":
        weights_only(qdq, out)
        qdq.unlink(missing_ok=True)
    return out


def weights_only(qdq_path: str | Path, out_path: str | Path) -> Path:
    """Drop every QuantizeLinear -> DequantizeLinear pair on an activation; return ``out_path``.

    What is left dequantizes the int8 weight (and int32 bias) initialisers, so the
    file stays small while every convolution and addition runs in float.
    """
    import onnx

    model = onnx.load(str(qdq_path))
    graph = model.graph
    consts = {i.name for i in graph.initializer}
    q_in = {n.output[0]: n.input[0] for n in graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    rename: dict[str, str] = {}
    keep = []
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in q_in:
            rename[n.output[0]] = q_in[n.input[0]]
        elif not (n.op_type == "QuantizeLinear" and n.output[0] in q_in):
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = rename.get(name, name)
    for o in graph.output:
        if o.name in rename:
            raise ValueError(f"graph output {o.name} is a dequantized activation")
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for n in keep for name in n.input}
    live = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(live)
    del graph.value_info[:]
    onnx.checker.check_model(model)
    out = Path(out_path)
    onnx.save(model, str(out))
    return out


def integer_ops(path: str | Path) -> list[str]:
    """Return the names of activation QuantizeLinear nodes: where integer kernels can run.

    An empty list means onnxruntime has nothing to fuse into an integer
    convolution, whatever the CPU.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    consts = {i.name for i in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "QuantizeLinear"
            and n.input[0] not in consts]


def tiers(probs: np.ndarray, thresholds: Mapping[str, float | None]) -> np.ndarray:
    """Return, per image, how many of the operating points its probability reaches."""
    t = [v for v in thresholds.values() if v is not None]
    return np.sum([probs >= v for v in t], axis=0) if t else np.zeros(len(probs), int)


def agreement(path: str | Path, images: np.ndarray, thresholds: Mapping[str, float | None],
              fp32_probs: np.ndarray | None = None, threads: int = 2) -> dict[str, Any]:
    """Return how the optimised session of ``path`` compares with its reference meaning.

    ``max_abs_diff``/``p95_abs_diff`` are |probability| differences between
    onnxruntime's default session (integer fusion allowed) and the
    ``ORT_DISABLE_ALL`` one over ``images``; ``daemon_max_abs_diff`` the same for
    the session the daemon runs (:func:`triage.inference.model.onnx_session`);
    ``max_logit_diff`` the same for the logit; ``tier_changes`` how many images
    fall in a different tier at ``thresholds``; with ``fp32_probs``, the same
    probability figures against fp32 (``vs_fp32``).
    """
    opt = run_session(onnx_session(path, threads, fuse_int8=True), images,
                      outputs=("probability", "logit"))
    ref = run_session(onnx_session(path, threads, optimize=False), images,
                      outputs=("probability", "logit"))
    daemon = run_session(onnx_session(path, threads), images, outputs=("probability",))
    d = np.abs(opt["probability"] - ref["probability"])
    out: dict[str, Any] = {
        "n": len(images), "max_abs_diff": float(d.max()),
        "p95_abs_diff": float(np.percentile(d, 95)), "median_abs_diff": float(np.median(d)),
        "max_logit_diff": float(np.abs(opt["logit"] - ref["logit"]).max()),
        "tier_changes": int(np.sum(tiers(opt["probability"], thresholds)
                                   != tiers(ref["probability"], thresholds))),
        "integer_kernels_possible": bool(integer_ops(path)),
        "daemon_max_abs_diff": float(np.abs(daemon["probability"] - ref["probability"]).max()),
    }
    if fp32_probs is not None:
        f = np.abs(opt["probability"] - fp32_probs)
        out["vs_fp32"] = {"max_abs_diff": float(f.max()), "p95_abs_diff": float(np.percentile(f, 95)),
                          "tier_changes": int(np.sum(tiers(opt["probability"], thresholds)
                                                     != tiers(fp32_probs, thresholds)))}
    return out


def throughput(path: str | Path, images: np.ndarray, threads: int = 2, n: int = 64,
               batch: int = 1, fuse_int8: bool = False) -> float:
    """Return images per second of the daemon's session (or onnxruntime's default, with
    ``fuse_int8``), ``batch`` images a run after a warm-up."""
    sess = onnx_session(path, threads, fuse_int8=fuse_int8)
    x = images[:batch].astype(np.float32)
    sess.run(["probability"], {INPUT_NAME: x})
    t0 = time.perf_counter()
    for _ in range(n):
        sess.run(["probability"], {INPUT_NAME: x})
    return n * batch / (time.perf_counter() - t0)


def holds(entry: Mapping[str, Any], auc_fp32: float) -> bool:
    """Return whether a measured variant may ship: CPU-independent and as good as fp32."""
    a = entry.get("agreement", {})
    return (a.get("max_abs_diff", 1.0) <= MAX_ABS_DIFF and a.get("tier_changes", 1) == 0
            and a.get("daemon_max_abs_diff", 1.0) <= MAX_ABS_DIFF
            and np.isfinite(entry.get("auc", np.nan))
            and auc_fp32 - entry["auc"] <= AUC_TOLERANCE)


def saturation_free(recipe: str) -> bool:
    """Return whether a recipe cannot saturate 16-bit sums on any x86-64 CPU, by construction.

    ``int8-u8s8-rr`` keeps |w| <= 64 so a pair of u8*s8 products fits in int16;
    ``int8-u8u8`` is widened to int16 before multiplying on AVX2; ``int8-weights``
    and ``fp32`` run no integer kernel at all. U8S8 and S8S8 can saturate.
    """
    return recipe in ("int8-u8s8-rr", "int8-u8u8", "int8-weights", "fp32")


def choose(variants: Mapping[str, Mapping[str, Any]],
           preference: Sequence[str] = PREFERENCE) -> str:
    """Return the first variant in ``preference`` that is saturation-free and holds."""
    auc_fp32 = variants["fp32"]["auc"]
    for name in preference:
        if name in variants and saturation_free(name) and holds(variants[name], auc_fp32):
            return name
    return "fp32"
