"""Does this CPU score like the machine that made the model card?

onnxruntime picks kernels by instruction set, and an int8 model whose fused
kernels saturate on one CPU scores the same image differently on another. The
export therefore records, on the card, what the model's *reference meaning*
(every graph optimisation off) gives for a few synthetic inputs, and the CPU
that computed it. :func:`check` scores the same inputs with the session the
daemon will use and compares: ``triage selftest`` prints the result and
``triage serve`` refuses to start on a mismatch unless
``model.allow_cpu_mismatch`` is set.

The inputs are built from integer arithmetic, divisions and square roots only
(IEEE-exact operations), so every machine constructs them bit for bit alike.
They span the network's input range, mean 0.5 and std 0.25 after windowing, so
-2 to 2: flat fields, ramps, two dark "lungs" in a bright body with and without
a bright blob, hard checkerboards at the extremes and pseudo-random texture.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from triage.core.errors import InputError

VERSION = 1
PROBABILITY_TOLERANCE = 0.01
LOGIT_TOLERANCE = 0.1
# /proc/cpuinfo flags that change which onnxruntime kernels run.
FEATURE_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                 "amx_tile", "amx_int8", "amx_bf16")
NAMES = ("zero", "ramp-x", "ramp-y", "lungs", "lungs-blob", "checker-4", "checker-16",
         "texture")


def cpu_features(cpuinfo: str | None = None) -> dict[str, Any]:
    """Return the CPU's model name, machine type and the kernel-relevant flags it has.

    ``cpuinfo`` is the text of /proc/cpuinfo (read when None; missing on non-Linux
    systems, where the flags list is empty).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    model = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "model name" and not model:
            model = value.strip()
    return {"model": model or platform.processor(), "machine": platform.machine(),
            "flags": [f for f in FEATURE_FLAGS if f in flags]}


def describe(features: Mapping[str, Any]) -> str:
    """Return a short human line: which of the flags that matter a CPU has and lacks."""
    have = set(features.get("flags", []))
    shown = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
    parts = [f if f in have else f"no {f}" for f in shown]
    return f"{features.get('model') or 'unknown CPU'} ({', '.join(parts)})"


def phantoms(size: int) -> np.ndarray:
    """Return the reference inputs, (8, 1, size, size) float32 in [-2, 2], identical everywhere."""
    n = np.arange(size, dtype=np.int64)
    yy, xx = np.meshgrid(n, n, indexing="ij")
    c = (size - 1) / 2.0
    u, v = (xx - c) / c, (yy - c) / c  # -1..1
    ramp_x, ramp_y = u * 2.0, v * 2.0
    body = 1.2 - 0.8 * np.minimum(1.0, (u * u) / 0.9 + (v * v) / 1.1)

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2

    lungs = np.where((ellipse(-0.42, 0.0, 0.3, 0.62) < 1) | (ellipse(0.42, 0.0, 0.3, 0.62) < 1),
                     -1.5, body)
    blob = 2.5 / (1.0 + ellipse(0.4, 0.25, 0.18, 0.18) * 4.0)
    checker4 = np.where(((xx // 4) + (yy // 4)) % 2 == 0, 2.0, -2.0)
    checker16 = np.where(((xx // 16) + (yy // 16)) % 2 == 0, 2.0, -2.0)
    # A 31-bit linear congruential hash of the pixel index: exact integer arithmetic.
    h = (yy * size + xx) * 1103515245 + 12345
    h = ((h ^ (h >> 13)) & 0x7FFFFFFF) * 1103515245 % 2147483648
    texture = h.astype(np.float64) / 2147483648.0 * 3.0 - 1.5
    planes = [np.zeros_like(u), ramp_x, ramp_y, lungs, np.minimum(lungs + blob, 2.0),
              checker4, checker16, texture]
    out = np.stack([np.clip(p, -2.0, 2.0) for p in planes])[:, None]
    return out.astype(np.float32)


def score(session: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (probabilities, logits) of ``session`` on the reference inputs."""
    from triage.inference.model import INPUT_NAME

    prob, logit = session.run(["probability", "logit"], {INPUT_NAME: phantoms(size)})
    return np.asarray(prob, dtype=np.float64), np.asarray(logit, dtype=np.float64)


def card_entry(reference_session: Any, size: int,
               features: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return the card's ``selftest`` block from the model's unoptimised session."""
    prob, logit = score(reference_session, size)
    return {"version": VERSION, "inputs": list(NAMES), "session": "ORT_DISABLE_ALL",
            "probability": [float(p) for p in prob], "logit": [float(z) for z in logit],
            "tolerance": {"probability": PROBABILITY_TOLERANCE, "logit": LOGIT_TOLERANCE},
            "cpu": dict(features or cpu_features())}


@dataclass(frozen=True)
class Result:
    """How the daemon's session compared with the card on this CPU."""

    ok: bool
    max_probability_diff: float
    max_logit_diff: float
    n: int
    features: dict[str, Any]
    reference: str  # "card" or "unoptimised session" (a card without a selftest block)

    @property
    def message(self) -> str:
        """One line for the log, the CLI and the worklist banner."""
        verdict = "agrees with" if self.ok else "does NOT agree with"
        return (f"model self-test: this CPU, {describe(self.features)}, {verdict} the "
                f"{self.reference} on {self.n} reference inputs (max |dp| "
                f"{self.max_probability_diff:.4f}, max |dlogit| {self.max_logit_diff:.4f}; "
                f"tolerance {PROBABILITY_TOLERANCE} / {LOGIT_TOLERANCE})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``triage selftest --json`` and ``/healthz``)."""
        return {"ok": self.ok, "max_probability_diff": self.max_probability_diff,
                "max_logit_diff": self.max_logit_diff, "n": self.n, "reference": self.reference,
                "cpu": self.features, "message": self.message}


def check(session: Any, card: Mapping[str, Any], model_path: str | Path | None = None,
          threads: int = 1) -> Result:
    """Score the reference inputs with ``session`` and compare with the card's values.

    A card without a ``selftest`` block (models exported before it existed) is
    compared with the model's own unoptimised session instead, built from
    ``model_path``. Raises InputError when neither is possible or the block is
    malformed.
    """
    size = int(card["input"]["size"])
    prob, logit = score(session, size)
    block = card.get("selftest")
    if block is not None:
        try:
            want_p = np.asarray(block["probability"], dtype=np.float64)
            want_z = np.asarray(block["logit"], dtype=np.float64)
            tol = block.get("tolerance", {})
            tol_p = float(tol.get("probability", PROBABILITY_TOLERANCE))
            tol_z = float(tol.get("logit", LOGIT_TOLERANCE))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"the model card's selftest block is malformed: {e}") from e
        if int(block.get("version", 0)) != VERSION or want_p.shape != prob.shape:
            raise InputError(f"the model card's selftest block is version "
                             f"{block.get('version')} with {want_p.size} inputs; this triage "
                             f"builds version {VERSION} with {prob.size}: re-export the model")
        reference = "model card"
    else:
        if model_path is None:
            raise InputError("the model card has no selftest block and no model file was given")
        from triage.inference.model import onnx_session

        want_p, want_z = score(onnx_session(model_path, threads, optimize=False), size)
        tol_p, tol_z = PROBABILITY_TOLERANCE, LOGIT_TOLERANCE
        reference = "unoptimised session"
    dp = float(np.max(np.abs(prob - want_p)))
    dz = float(np.max(np.abs(logit - want_z)))
    ok = bool(np.isfinite(dp) and np.isfinite(dz) and dp <= tol_p and dz <= tol_z)
    return Result(ok, dp, dz, int(prob.size), cpu_features(), reference)
