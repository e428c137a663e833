"""Re-estimating the network's normalisation statistics on a site's own images (AdaBN).

Batch normalisation standardises every convolution's output with the mean and
variance seen in training; a scanner that renders radiographs differently moves
those statistics, and AdaBN (Li et al., "Revisiting batch normalization for
practical domain adaptation", 2016) re-estimates them on the new domain's
unlabelled images. The exported graph has each BatchNorm folded into the
convolution before it, so the same thing is done on the ONNX file: for every
convolution, in graph order, its per-channel output mean and standard deviation
on the site's images (with every earlier convolution already adapted) are
mapped onto the ones the training images gave (``<model>.moments.npz``,
written beside the model), and the per-channel affine map is folded into that
convolution's weights and bias. No torch and no labels are needed.

The int8 weights are requantised symmetric per output channel, as the shipped
``int8-weights`` recipe stores them (:mod:`triage.training.quantize`); biases are
stored in float. Every activation stays float, so the adapted file keeps the
shipped file's property that every CPU runs the same float kernels.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.core.errors import InputError
from triage.inference.model import INPUT_NAME

EPS = 1e-5
# At most this factor per channel: a channel that is (nearly) constant on the site's
# images would otherwise be blown up by dividing by its tiny spread.
MAX_GAIN = 10.0
# Fewer site images than this give statistics too noisy to re-estimate a network with.
MIN_IMAGES = 32


@dataclass(frozen=True)
class ConvSite:
    """A convolution of the graph, where its weight and bias come from."""

    node: Any
    output: str
    weight: str  # the Conv's weight input (an initializer or a DequantizeLinear's output)
    bias: str | None


def _convs(model: Any) -> list[ConvSite]:
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            out.append(ConvSite(n, n.output[0], n.input[1], n.input[2] if len(n.input) > 2 else None))
    return out


def _with_outputs(model: Any, names: list[str]) -> bytes:
    """Return ``model`` serialised with ``names`` added as graph outputs."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for name in names:
        if name not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return bytes(m.SerializeToString())


def _session(model_bytes: bytes, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # The unoptimised graph: every named intermediate exists, and nothing is fused.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


def _moments(sess: Any, names: list[str], images: np.ndarray, batch: int = 32
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Return {output: (per-channel mean, per-channel std)} over images and positions."""
    s1: dict[str, np.ndarray] = {}
    s2: dict[str, np.ndarray] = {}
    count: dict[str, int] = {}
    for i in range(0, len(images), batch):
        outs = sess.run(names, {INPUT_NAME: images[i:i + batch].astype(np.float32)})
        for name, o in zip(names, outs, strict=True):
            a = np.asarray(o, dtype=np.float64)
            s1[name] = s1.get(name, 0) + a.sum(axis=(0, 2, 3))
            s2[name] = s2.get(name, 0) + (a * a).sum(axis=(0, 2, 3))
            count[name] = count.get(name, 0) + a.shape[0] * a.shape[2] * a.shape[3]
    out = {}
    for name in names:
        mean = s1[name] / count[name]
        var = np.maximum(s2[name] / count[name] - mean * mean, 0.0)
        out[name] = (mean, np.sqrt(var + EPS))
    return out


def channel_moments(model_path: str | Path, images: np.ndarray, threads: int = 2
                    ) -> dict[str, np.ndarray]:
    """Return every convolution's per-channel output mean and std on ``images``.

    Keys ``<conv output>/mean`` and ``<conv output>/std``; what
    :func:`save_moments` writes beside an exported model from its training images.
    """
    import onnx

    model = onnx.load(str(model_path))
    names = [c.output for c in _convs(model)]
    got = _moments(_session(_with_outputs(model, names), threads), names, images)
    return {f"{k}/{part}": v[i] for k, v in got.items() for i, part in enumerate(("mean", "std"))}


def save_moments(path: str | Path, moments: dict[str, np.ndarray]) -> str:
    """Write the moments as ``.npz`` (float32); return the file's sha256."""
    p = Path(path)
    arrays: dict[str, Any] = {k: v.astype(np.float32) for k, v in moments.items()}
    with p.open("wb") as fh:
        np.savez(fh, **arrays)
    return hashlib.sha256(p.read_bytes()).hexdigest()


def load_moments(path: str | Path) -> dict[str, np.ndarray]:
    """Read a moments file. Raises InputError when it is missing or unreadable."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            return {k: np.asarray(z[k], dtype=np.float64) for k in z.files}
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the training statistics {path}: {e}") from e


def _initializers(model: Any) -> dict[str, Any]:
    return {i.name: i for i in model.graph.initializer}


def _producer(model: Any, name: str) -> Any:
    return next((n for n in model.graph.node if name in n.output), None)


def _float_value(model: Any, name: str) -> np.ndarray:
    """Return the float value of a weight or bias input: an initializer, or a
    DequantizeLinear of initializers (per-tensor or per-axis)."""
    from onnx import numpy_helper

    inits = _initializers(model)
    if name in inits:
        return numpy_helper.to_array(inits[name]).astype(np.float64)
    dq = _producer(model, name)
    if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits:
        raise InputError(f"cannot adapt: convolution input {name} is neither an initializer nor "
                         "a DequantizeLinear of one")
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
    zero = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
            if len(dq.input) > 2 and dq.input[2] else np.zeros_like(scale))
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zero = scale.reshape(shape), zero.reshape(shape)
    return (q - zero) * scale


def _set_weight(model: Any, name: str, w: np.ndarray) -> None:
    """Store a convolution weight: int8 symmetric per output channel when it was
    dequantized before, float otherwise."""
    from onnx import numpy_helper

    inits = _initializers(model)
    if name in inits:
        inits[name].CopyFrom(numpy_helper.from_array(w.astype(np.float32), name))
        return
    dq = _producer(model, name)
    scale = np.maximum(np.abs(w).reshape(w.shape[0], -1).max(axis=1), 1e-12) / 127.0
    q = np.clip(np.round(w / scale.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q, dq.input[0]))
    inits[dq.input[1]].CopyFrom(numpy_helper.from_array(scale.astype(np.float32), dq.input[1]))
    if len(dq.input) > 2 and dq.input[2]:
        inits[dq.input[2]].CopyFrom(numpy_helper.from_array(np.zeros(w.shape[0], np.int8),
                                                            dq.input[2]))
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 0
            break
    else:
        from onnx import helper

        dq.attribute.append(helper.make_attribute("axis", 0))


def _set_bias(model: Any, conv: ConvSite, b: np.ndarray) -> None:
    """Store a convolution bias in float (a new initializer when the Conv had none,
    replacing a DequantizeLinear when it had an int32 one)."""
    from onnx import numpy_helper

    name = conv.bias or f"{conv.output}_adapted_bias"
    inits = _initializers(model)
    if name in inits:
        inits[name].CopyFrom(numpy_helper.from_array(b.astype(np.float32), name))
    else:
        dq = _producer(model, name)
        if dq is not None:
            model.graph.node.remove(dq)
        model.graph.initializer.append(numpy_helper.from_array(b.astype(np.float32), name))
    if conv.bias is None:
        conv.node.input.append(name)


def adapt(model_path: str | Path, reference: dict[str, np.ndarray], images: np.ndarray,
          out_path: str | Path, threads: int = 2,
          progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write ``model_path`` adapted to ``images`` (preprocessed, (N, C, S, S)) to ``out_path``.

    Convolution by convolution, in graph order, the output's per-channel mean
    and std on ``images`` are mapped onto ``reference`` (the training images'),
    so every later convolution sees statistics as in training. Returns a summary:
    images used, convolutions adapted, and how far the site was from training
    before adaptation: the median and largest shift of a channel's mean (in
    training standard deviations) and the 5th-95th percentile of the ratio of
    a channel's standard deviation to training's.
    Raises InputError when there are too few images or the moments do not fit
    the graph.
    """
    import onnx

    if len(images) < MIN_IMAGES:
        raise InputError(f"{len(images)} usable images are too few to re-estimate the "
                         f"network's statistics (at least {MIN_IMAGES})")
    model = onnx.load(str(model_path))
    convs = _convs(model)
    missing = [c.output for c in convs if f"{c.output}/mean" not in reference]
    if missing:
        raise InputError(f"the training statistics do not fit this model ({len(missing)} of "
                         f"{len(convs)} convolutions missing, e.g. {missing[0]})")
    # How far the site is from training before anything changes, for the profile to say.
    before = _moments(_session(_with_outputs(model, [c.output for c in convs]), threads),
                      [c.output for c in convs], images)
    shifts = np.concatenate([np.abs(before[c.output][0] - reference[f"{c.output}/mean"])
                             / reference[f"{c.output}/std"] for c in convs])
    ratios = np.concatenate([before[c.output][1] / reference[f"{c.output}/std"] for c in convs])
    for k, conv in enumerate(convs):
        sess = _session(_with_outputs(model, [conv.output]), threads)
        mean_t, std_t = _moments(sess, [conv.output], images)[conv.output]
        mean_s, std_s = reference[f"{conv.output}/mean"], reference[f"{conv.output}/std"]
        if mean_s.shape != mean_t.shape:
            raise InputError(f"the training statistics of {conv.output} have {mean_s.size} "
                             f"channels, the graph {mean_t.size}")
        gain = np.clip(std_s / std_t, 1.0 / MAX_GAIN, MAX_GAIN)
        w = _float_value(model, conv.weight)
        b = _float_value(model, conv.bias) if conv.bias else np.zeros(w.shape[0])
        _set_weight(model, conv.weight, w * gain.reshape(-1, 1, 1, 1))
        _set_bias(model, conv, (b - mean_t) * gain + mean_s)
        if progress is not None:
            progress(k + 1, len(convs))
    used = {name for n in model.graph.node for name in n.input}
    live = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(live)
    onnx.checker.check_model(model)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return {"images": int(len(images)), "convolutions": len(convs),
            "mean_shift_median_sd": float(np.median(shifts)),
            "mean_shift_max_sd": float(np.max(shifts)),
            "std_ratio_p5_p95": [float(np.quantile(ratios, 0.05)), float(np.quantile(ratios, 0.95))]}
