"""Inference throughput on CPU: ONNX Runtime (fp32 and int8) vs torch eager, same inputs.

Run: .venv/bin/python bench/inference.py [--threads 2] [--batch 32] [--images 512] [--size PX]

Speed does not depend on weight values, so the script needs only the shipped
model and its card: torch eager is the card's architecture (random weights,
channels_last, inference mode); the fp32 ONNX is the shipped file when it is
fp32, else an export of that torch model; the weight-only int8 ONNX (what ships,
docs/model.md) is the shipped file when it is that, else a quantisation of the
fp32 export; and, for the speed that CPU-independence cost, the U8S8 QDQ
recipe earlier releases shipped, run as onnxruntime's default session runs it
(fused integer kernels, which saturate on CPUs without VNNI).
Every ONNX row but that last one uses the daemon's own session.
Prints images/s for each and the ratio to torch eager, then the cost per image
of the card's preprocessing (decode, window, resize, normalise: the daemon's
``prepare`` step, in one process) on synthetic 2048 x 2048 12-bit DICOM files,
uncompressed and JPEG 2000, so that the model's share of a study's time is
plain. ``--size`` measures another input size than the card's (speed does not
depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import triage.training.compat  # noqa: F401  (must precede torchvision)
from triage.config import load
from triage.inference.model import INPUT_NAME, onnx_session
from triage.training import export, train
from triage.training.quantize import quantize

TARGET = export.BUDGETS["images_per_s"]  # images/s on 2 threads (the card's budgets)


def throughput(run: Callable[[np.ndarray], object], images: np.ndarray, batch: int,
               min_seconds: float = 3.0) -> float:
    """Return images/s of ``run`` over ``images`` in batches, after one warm-up pass."""
    for i in range(0, min(len(images), 2 * batch), batch):
        run(images[i:i + batch])
    done, t0 = 0, time.perf_counter()
    while True:
        for i in range(0, len(images), batch):
            run(images[i:i + batch])
            done += len(images[i:i + batch])
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return done / elapsed


def _ort_runner(sess: Any) -> Callable[[np.ndarray], object]:
    """Return a function that runs ``sess`` on one batch."""
    def run(x: np.ndarray) -> object:
        return sess.run(None, {INPUT_NAME: x})

    return run


def main() -> int:
    """Print the throughput table; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", help="ONNX model (default: model.path from config.toml)")
    ap.add_argument("--size", type=int, help="input size in px (default: the card's)")
    ap.add_argument("--prep-images", type=int, default=8,
                    help="DICOM files per kind for the preprocessing cost (0: skip)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    onnx_path = Path(args.model) if args.model else load().model.onnx_path
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    arch, size = card["architecture"], int(args.size or card["input"]["size"])
    net = train.build_model(arch["width_mult"], arch["dropout"], arch["in_channels"]).eval()
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    images = np.random.default_rng(0).normal(0, 1, (args.images, 1, size, size)).astype(np.float32)
    work = Path(tempfile.mkdtemp(prefix="triage-bench-"))
    paths = {card["precision"]: onnx_path} if size == int(card["input"]["size"]) else {}
    if "fp32" not in paths:
        paths["fp32"] = export.export_fp32(export.ExportNet(net).eval(), size, work / "fp32.onnx")
    for recipe in ("int8-weights", "int8-u8s8"):
        if recipe not in paths:
            paths[recipe] = quantize(paths["fp32"], work / f"{recipe}.onnx", images[:64], recipe)

    def eager(x: np.ndarray) -> object:
        with torch.inference_mode():
            return net(torch.as_tensor(x).contiguous(memory_format=torch.channels_last))

    rates = {"torch eager (fp32, channels_last)": throughput(eager, images, args.batch)}
    for kind in paths:
        fused = kind == "int8-u8s8"
        sess = onnx_session(paths[kind], args.threads, fuse_int8=fused)
        label = f"onnxruntime {kind}" + (" (fused, ort default)" if fused else "")
        rates[label] = throughput(_ort_runner(sess), images, args.batch)
    base = rates["torch eager (fp32, channels_last)"]
    print(f"model {onnx_path.name} (shipped: {card['precision']}), input 1x{size}x{size}, "
          f"batch {args.batch}, {args.threads} threads, {torch.get_num_threads()} torch threads")
    for name, r in rates.items():
        print(f"{name:36s} {r:8.1f} images/s   x{r / base:5.2f} vs torch eager")
    shipped = rates[f"onnxruntime {card['precision']}"]
    print(f"shipped precision ({card['precision']}) at {size} px: {shipped:.1f} images/s "
          f"(target >= {TARGET}): {'met' if shipped >= TARGET else 'NOT met'}")
    if args.prep_images > 0:
        for kind, seconds in preprocessing_cost(card, args.prep_images, work).items():
            print(f"preprocessing, {kind:32s} {1000 * seconds:7.1f} ms/image "
                  f"(one process; the model: {1000 / shipped:.1f} ms/image)")
    return 0


def preprocessing_cost(card: dict[str, Any], n: int, work: Path) -> dict[str, float]:
    """Return the median seconds of the daemon's per-image ``prepare`` for each file kind.

    Synthetic 2048 x 2048 12-bit phantoms, written once per kind; each file is
    prepared once after one warm-up file.
    """
    import statistics

    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    from tests import synth
    from triage.imaging import prepare
    from triage.imaging.transforms import one_thread

    one_thread()
    prepare.init(card)
    out = {}
    for name, ts in (("2048 px 12-bit, uncompressed", ExplicitVRLittleEndian),
                     ("2048 px 12-bit, JPEG 2000 lossless", JPEG2000Lossless)):
        files = []
        for i in range(n + 1):
            f = work / f"{ts.name.split()[0]}-{i}.dcm"
            px = synth.phantom(2048, 2048, bits_stored=12, seed=i)
            ds = synth.make_dataset(synth.SynthSpec(rows=2048, columns=2048, bits_stored=12),
                                    pixels=px)
            if ts != ExplicitVRLittleEndian:
                ds.compress(ts)
            synth.write(ds, f)
            files.append(str(f))
        times = []
        for i, f in enumerate(files):
            t0 = time.perf_counter()
            r = prepare.prepare(i, f)
            if r.reason:
                raise SystemExit(f"{f}: {r.reason}")
            if i:
                times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


if __name__ == "__main__":
    sys.exit(main())
