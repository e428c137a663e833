"""``triage export``: ONNX (fp32 and static int8) plus the JSON model card.

The exported graph takes ``image`` (N, 1, S, S) float32, already through
:func:`triage.imaging.transforms.build_transforms`, and returns:

- ``probability`` (N,): calibrated P(abnormal) = sigmoid((logit - prior_shift) / T);
- ``logit`` (N,): the calibrated logit (logit - prior_shift) / T;
- ``cam`` (N, h, w): the Grad-CAM map of the raw logit at the last feature map.
  With a GAP -> dropout -> linear head the gradient of the logit with respect to
  feature map k is w_k / (h w) everywhere, so Grad-CAM is exactly
  ReLU(sum_k w_k F_k) / (h w). Upsampling and min-max normalisation are left to
  :func:`triage.imaging.heatmap.upsample` (what ``monai.visualize.GradCAM`` does).

Int8 quantisation (QDQ, per-channel weights) covers the convolutions only; the
head stays fp32 so probabilities keep their resolution near the thresholds.
Every recipe of :mod:`triage.training.quantize` is built and measured against
its own reference meaning (graph optimisations off) and against fp32; the first
one that holds ships, and the card records all of them with the CPU they were
measured on, plus the self-test values :mod:`triage.inference.selftest` checks
at daemon start. Calibration data are training images, never validation ones.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import platform
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import triage.training.compat  # noqa: F401  (must precede torchvision)
from triage.files import write_atomic
from triage.inference import selftest
from triage.inference.model import (
    ALL_OUTPUTS as OUTPUT_NAMES,
)
from triage.inference.model import (
    INPUT_NAME,
    onnx_session,
    run_session,
)
from triage.training import quantize

log = logging.getLogger(__name__)

OPSET = 17


class ExportNet(nn.Module):
    """MobileNetV2 with the calibration baked in and the CAM as a second output."""

    def __init__(self, model: Any, temperature: float = 1.0, prior_shift: float = 0.0,
                 tta: str = "none") -> None:
        super().__init__()
        self.body: nn.Module = model.features
        self.head: nn.Linear = model.classifier[-1]
        self.tta = tta
        self.temperature: torch.Tensor
        self.prior_shift: torch.Tensor
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("prior_shift", torch.tensor(float(prior_shift)))

    def _outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.body(x)
        pooled = f.mean(dim=(2, 3))
        logit = self.head(pooled)[:, 0]
        w = self.head.weight[0].view(1, -1, 1, 1)
        cam = torch.relu((f * w).sum(dim=1)) / float(f.shape[2] * f.shape[3])
        return logit, cam, pooled

    def forward(self, x: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (probability, calibrated logit, Grad-CAM map, embedding) for a batch.

        The embedding is the pooled last feature map (what the out-of-distribution
        check measures). With ``tta="flip"`` logit, map and embedding are the mean
        over the image and its mirror (the mirror's map flipped back).
        """
        logit, cam, emb = self._outputs(x)
        if self.tta == "flip":
            logit_m, cam_m, emb_m = self._outputs(torch.flip(x, dims=(3,)))
            logit = (logit + logit_m) / 2
            cam = (cam + torch.flip(cam_m, dims=(2,))) / 2
            emb = (emb + emb_m) / 2
        z = (logit - self.prior_shift) / self.temperature
        return torch.sigmoid(z), z, cam, emb


def export_fp32(net: ExportNet, size: int, path: str | Path) -> Path:
    """Write ``net`` as an ONNX file with a dynamic batch axis; return the path."""
    net.eval()
    dummy = torch.zeros(1, 1, size, size)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}}
    with warnings.catch_warnings():
        # The feature-map size is fixed by the input spec, so tracing it as a constant is right.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(net, (dummy,), str(out), dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_axes=axes, do_constant_folding=True)
    return out


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calib_images: np.ndarray,
                  recipe: str = "int8-weights") -> Path:
    """Write an int8 copy of an fp32 ONNX model with ``recipe`` (the shipped kind by
    default); return its path. ``calib_images`` are preprocessed training images."""
    from triage.training.quantize import quantize

    return quantize(fp32_path, int8_path, calib_images, recipe)


def software_versions() -> dict[str, str]:
    """Return the versions of the libraries that produced the model."""
    import monai
    import onnx
    import onnxruntime
    import pydicom
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "monai": monai.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "pydicom": pydicom.__version__, "numpy": np.__version__}


# What the model was validated with through the DICOM path (`triage archive build` writes
# these; the training images themselves were 8-bit JPEGs): values outside these sets are
# reported by the drift watch as acquisition values the model never saw.
TRAINING_METADATA = {
    "photometric": ["MONOCHROME1", "MONOCHROME2"],
    "view_position": ["PA", "AP"],
    "bits_stored": [str(b) for b in range(8, 17)],
}

# Whom the Kermany et al. radiographs show; the input guard refuses ages outside it.
POPULATION = {"label": "children", "age_years": [0.0, 17.0],
              "trained_on": "patients aged about 1 to 5"}

INTENDED_USE = (
    "A triage aid that reorders a reading worklist of frontal (PA/AP) chest radiographs by the "
    "estimated probability of an abnormal study. It is not a diagnostic device: every study is "
    "still read by a clinician, and a 'routine' tier never means 'normal'."
)
LIMITATIONS = [
    ("Trained only on pediatric chest radiographs (Kermany et al. 2018, patients aged 1-5, one "
     "centre in Guangzhou), labelled NORMAL vs PNEUMONIA. Performance on adults, other "
     "populations, other centres and other findings is unvalidated."),
    ("Training images were 8-bit JPEGs squashed to 224x224; full-bit-depth DICOM is windowed and "
     "squashed the same way, but domain shift from the source DICOM pipeline is likely."),
    ("Validation figures come from the val split used for early stopping and calibration, so they "
     "are optimistic; independent test performance is expected to be lower. With a patient-level "
     "split (the card's 'split'), no patient of val is in train; its hold-out part was never used "
     "to choose anything and gives the fairer figure (docs/model.md)."),
    ("Lateral and other non-frontal views, For Processing images, colour images, modalities "
     "other than CR/DX/SC, body parts other than the chest and images smaller than the gating "
     "minimum are not scored."),
    "The class-activation map is a coarse visual aid, not a localisation of findings.",
]


# The release's size and speed budgets (bench/inference.py: 2 threads, batch 32).
# Weight-only int8 keeps the file small and runs fp32 arithmetic, which on this
# network is faster than the fused integer kernels it replaced (docs/model.md).
BUDGETS = {"bytes": 3_000_000, "images_per_s": 250,
           "note": "unchanged by the move from U8S8 activations (which saturate on CPUs "
                   "without VNNI) to int8 weights with float activations; see docs/model.md"}


def build_card(meta: dict[str, Any], cal: dict[str, Any], shipped: dict[str, Any],
               variants: dict[str, Any], feature_shape: Sequence[int]) -> dict[str, Any]:
    """Return the model card (pure: values in, dict out)."""
    return {
        "name": shipped["name"],
        "format": "onnx",
        "file": shipped["file"],
        "sha256": shipped["sha256"],
        "precision": shipped["precision"],
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "architecture": {**meta["arch"], "head": "global average pooling -> dropout -> linear",
                         "weights_init": meta.get("init") or "random (weights=None)"},
        "input": meta["input"],
        "outputs": {
            "probability": "calibrated P(abnormal) = sigmoid((logit - prior_shift) / temperature)",
            "logit": "calibrated logit (logit - prior_shift) / temperature",
            "cam": "Grad-CAM of the raw logit at the last feature map: "
                   "ReLU(sum_k w_k F_k) / (h w); upsample bilinearly and min-max normalise",
        },
        "gradcam": {"target_layer": "features", "feature_shape": list(feature_shape)},
        "test_time_augmentation": cal.get("tta", "none"),
        "preprocess": meta["preprocess"],
        "split": meta.get("split"),
        "training": {"manifest_sha256": meta.get("manifest_sha256", ""),
                     "counts": meta.get("counts", {}), "config": meta.get("train_config", {}),
                     "best_epoch": meta.get("epoch"), "pos_weight": meta.get("pos_weight"),
                     "history": meta.get("history", [])},
        "temperature": cal["temperature"],
        "prior_shift": cal["prior_shift"],
        "validation": shipped["validation"],
        "operating_points": shipped["operating_points"],
        "ece": shipped["validation"]["ece"],
        "reference_scores": shipped["score_distribution"],
        "reference_scores_pos": shipped.get("score_distribution_pos"),
        "reference_scores_neg": shipped.get("score_distribution_neg"),
        "reference_prevalence": shipped["validation"]["n_pos"] / max(1, shipped["validation"]["n"]),
        "training_metadata": TRAINING_METADATA,
        "population": POPULATION,
        "variants": variants,
        "variant_rule": ("the first of " + ", ".join(quantize.PREFERENCE) + " whose optimised "
                         f"sessions agree with its reference (graph optimisations off) within "
                         f"{quantize.MAX_ABS_DIFF} on every val image, with no tier change, and "
                         f"whose AUC is within {quantize.AUC_TOLERANCE} of fp32"),
        "budgets": BUDGETS,
        "cpu": selftest.cpu_features(),
        "software": software_versions(),
        "intended_use": INTENDED_USE,
        "limitations": LIMITATIONS,
        "data_citation": "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography "
                         "(OCT) and Chest X-Ray Images for Classification. Mendeley Data, v2, "
                         "2018. doi:10.17632/rscbjbr9sj.2 (CC BY 4.0)",
    }


def write_json(path: str | Path, obj: dict[str, Any]) -> Path:
    """Write ``obj`` as indented JSON atomically (readable by all: models ship); return the path."""
    return write_atomic(path, json.dumps(obj, indent=2, allow_nan=False), fsync=True, mode=0o644)


def _prepared(samples: Sequence[Any], meta: dict[str, Any], desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (network-ready images (N, 1, S, S), labels) through the model's own chain."""
    from triage.imaging.transforms import InputSpec, build_transforms, preprocess_of, split_cached
    from triage.training.train import cache_images

    pre = preprocess_of(meta)
    prefix, rest = split_cached(build_transforms(pre, InputSpec.from_dict(meta["input"])))
    cached, labels = cache_images(samples, prefix, pre, desc)
    return np.stack([np.asarray(rest(x), dtype=np.float32) for x in cached]), labels


def _evaluate(probs: np.ndarray, labels: np.ndarray, cal_cfg: Any) -> dict[str, Any]:
    """Return AUC, ECE, operating points and the score distribution of one variant."""
    from triage.core import metrics
    from triage.training.calibrate import operating_points

    points = operating_points(labels, probs, cal_cfg.operating_points, cal_cfg.conservative,
                              cal_cfg.confidence)
    return {
        "validation": {"split": "val", "n": len(labels), "n_pos": int(labels.sum()),
                       "auc": metrics.auc(labels, probs),
                       "ece": metrics.ece(labels, probs, cal_cfg.ece_bins),
                       "ece_bins": cal_cfg.ece_bins},
        "operating_points": [p.to_dict() for p in points],
        "score_distribution": metrics.score_distribution(probs),
        "score_distribution_pos": metrics.score_distribution(probs[labels == 1]),
        "score_distribution_neg": metrics.score_distribution(probs[labels == 0]),
    }


def run(checkpoint: str | Path, calibration_json: str | Path, samples: Sequence[Any],
        out_dir: str | Path, name: str, cal_cfg: Any, work_dir: str | Path,
        n_calib: int = 256, int8: bool = True, threads: int = 2,
        recipes: Sequence[str] | None = None) -> dict[str, Any]:
    """Export fp32 and the int8 ``recipes``, measure each on val, ship the chosen one.

    Writes ``<out_dir>/<name>.onnx`` and ``<out_dir>/<name>.json``; every variant
    stays under ``work_dir``. Returns the card. Raises InputError on bad inputs.
    """
    import shutil

    from triage.core.errors import InputError
    from triage.training.train import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    try:
        cal = json.loads(Path(calibration_json).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read calibration {calibration_json}: {e}") from e
    net = ExportNet(model, cal["temperature"], cal["prior_shift"], cal.get("tta", "none")).eval()
    work = Path(work_dir)
    size = int(meta["input"]["size"])
    paths = {"fp32": export_fp32(net, size, work / f"{name}.fp32.onnx")}
    val = [s for s in samples if s.split == "val"]
    x_val, y_val = _prepared(val, meta, "prepare val")
    if int8:
        rng = np.random.default_rng(0)
        tr = [s for s in samples if s.split == "train"]
        pick = [tr[i] for i in sorted(rng.choice(len(tr), min(n_calib, len(tr)), replace=False))]
        x_cal, _ = _prepared(pick, meta, "prepare int8 calibration")
        for recipe in recipes if recipes is not None else quantize.RECIPES:
            paths[recipe] = quantize.quantize(paths["fp32"], work / f"{name}.{recipe}.onnx",
                                              x_cal, recipe)
    results = {k: run_session(onnx_session(p, threads), x_val, outputs=OUTPUT_NAMES)
               for k, p in paths.items()}
    with torch.inference_mode():
        torch_prob = net(torch.as_tensor(x_val[:32]))[0].numpy()
    evals = {k: _evaluate(r["probability"], y_val, cal_cfg) for k, r in results.items()}
    variants = measure_variants(paths, results, evals, x_val, threads)
    variants["fp32"]["max_abs_diff_vs_torch"] = float(
        np.abs(results["fp32"]["probability"][:32] - torch_prob).max())
    chosen = quantize.choose(variants)
    log.info("variants: %s -> shipping %s", ", ".join(
        f"{k} AUC {v['auc']:.4f} max|dp| {v['agreement']['max_abs_diff']:.4f}"
        for k, v in variants.items()), chosen)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(paths[chosen], out / f"{name}.onnx")
    shipped = {"name": name, "file": f"{name}.onnx", "precision": chosen,
               "sha256": variants[chosen]["sha256"], **evals[chosen]}
    feature_shape = list(results[chosen]["cam"].shape[1:])
    channels = int(model.last_channel)  # type: ignore[arg-type]
    card = build_card(meta, cal, shipped, variants, [channels, *feature_shape])
    card["selftest"] = selftest.card_entry(onnx_session(paths[chosen], threads, optimize=False),
                                           size, card["cpu"])
    card["out_of_distribution"] = _fit_ood(paths[chosen], samples, meta, results[chosen],
                                           out / f"{name}.ood.onnx", threads)
    write_json(out / f"{name}.json", card)
    return card


def measure_variants(paths: dict[str, Path], results: dict[str, dict[str, np.ndarray]],
                     evals: dict[str, dict[str, Any]], x_val: np.ndarray,
                     threads: int) -> dict[str, dict[str, Any]]:
    """Return, per variant, AUC, size, sha256, speed and agreement with its reference.

    Tier changes count at each variant's own operating points; throughput is one
    image a run in the daemon's session (and onnxruntime's default, where they
    differ). The figures are only as good as the machine: the card's ``cpu`` says
    which one measured them.
    """
    from triage.inference.model import card_thresholds
    from triage.training.train import file_sha256

    fp32_probs = results["fp32"]["probability"]
    out: dict[str, dict[str, Any]] = {}
    for k, p in paths.items():
        thr = card_thresholds(evals[k])
        entry: dict[str, Any] = {
            "auc": evals[k]["validation"]["auc"], "bytes": p.stat().st_size,
            "sha256": file_sha256(p), "saturation_free": quantize.saturation_free(k),
            "agreement": quantize.agreement(p, x_val, thr, fp32_probs, threads),
            "images_per_s_b1": quantize.throughput(p, x_val, threads)}
        if entry["agreement"]["integer_kernels_possible"]:
            entry["images_per_s_b1_fused"] = quantize.throughput(p, x_val, threads,
                                                                 fuse_int8=True)
        out[k] = entry
    return out


def _fit_ood(model_path: Path, samples: Sequence[Any], meta: dict[str, Any],
             val_outputs: dict[str, np.ndarray], path: Path, threads: int,
             n_train: int = 2000) -> dict[str, Any]:
    """Fit the out-of-distribution distance on training embeddings (of the shipped variant),
    choose its threshold on validation, write its ONNX graph; return its card entry."""
    from triage.training import ood
    from triage.training.train import file_sha256

    rng = np.random.default_rng(1)
    tr = [s for s in samples if s.split == "train"]
    pick = [tr[i] for i in sorted(rng.choice(len(tr), min(n_train, len(tr)), replace=False))]
    x_tr, _ = _prepared(pick, meta, "prepare embeddings")
    emb_tr = run_session(onnx_session(model_path, threads), x_tr, outputs=("embedding",))
    net = ood.fit(emb_tr["embedding"])
    val_d = ood.distances(net, val_outputs["embedding"])
    thr = ood.threshold(val_d)
    ood.export(net, path, int(emb_tr["embedding"].shape[1]))
    return ood.card_entry(path, thr, val_d, len(pick), int(net.components.shape[0]),
                          file_sha256(path))
