"""``triage benchmark``: the literature's architectures trained and measured on equal terms.

Every architecture gets the same data, splits, preprocessing chain
(:func:`triage.preprocess.build_transforms`), augmentation, epoch budget,
early-stopping rule, class weighting, EMA and calibration: the shipped recipe
of :func:`triage.train.train`, with only the network swapped through its
``model_factory`` hook. Each network takes one grey channel (a freshly
initialised single-channel stem; no pretrained weights anywhere) and ends in
one logit.

The pure core (:func:`build_arch`, :func:`summarise`, :func:`render_section`,
:func:`merge_section`) takes values and returns values; :func:`run_arch` and
:func:`run` are the edges that train, export, time and write files. Results
are kept per architecture (``<out>/<arch>/result.json``) so an interrupted
sweep resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import triage.training.compat  # noqa: F401  (must precede torchvision and timm)
from triage.config import CalibrationConfig, PreprocessConfig, TrainConfig
from triage.core.errors import InputError

log = logging.getLogger(__name__)

INPUT_NAME = "image"
OUTPUT_NAMES = ("probability", "logit")
VIT_PATCH = 8
SECTION = "## Architectures"
DATA_CITATION = ("Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography (OCT) and "
                 "Chest X-Ray Images for Classification. Mendeley Data, v2, 2018. "
                 "doi:10.17632/rscbjbr9sj.2 (CC BY 4.0)")


def _grey_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Return a freshly initialised copy of stem ``conv`` taking ``in_channels`` inputs."""
    c: Any = conv  # torchvision stores kernel_size etc. as tuple[int, ...]
    new = nn.Conv2d(in_channels, c.out_channels, c.kernel_size, c.stride, c.padding,
                    c.dilation, c.groups, c.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def _mobilenet_v2(size: int, ch: int) -> nn.Module:
    from triage.training.train import build_model

    return build_model(1.0, 0.2, ch)


def _resnet18(size: int, ch: int) -> nn.Module:
    from torchvision.models import resnet18

    m = resnet18(weights=None, num_classes=1)
    m.conv1 = _grey_conv(m.conv1, ch)
    return m


def _densenet121(size: int, ch: int) -> nn.Module:
    from torchvision.models import densenet121

    m = densenet121(weights=None, num_classes=1)
    m.features.conv0 = _grey_conv(m.features.conv0, ch)
    return m


def _squeezenet1_1(size: int, ch: int) -> nn.Module:
    from torchvision.models import squeezenet1_1

    m = squeezenet1_1(weights=None, num_classes=1)
    m.features[0] = _grey_conv(m.features[0], ch)
    # torchvision's head ends in ReLU, which would clip a binary logit at 0.
    m.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, 1, 1), nn.AdaptiveAvgPool2d(1))
    return m


def _timm(name: str, **kw: Any) -> Callable[[int, int], nn.Module]:
    def make(size: int, ch: int) -> nn.Module:
        import timm

        extra = {k: (v(size) if callable(v) else v) for k, v in kw.items()}
        return timm.create_model(name, pretrained=False, num_classes=1, in_chans=ch, **extra)

    return make


@dataclass(frozen=True)
class Arch:
    """One benchmarked architecture: its key, where it comes from, and its builder."""

    key: str
    source: str
    note: str
    build: Callable[[int, int], nn.Module]


ARCHS: dict[str, Arch] = {a.key: a for a in (
    Arch("mobilenet_v2", "torchvision mobilenet_v2", "the shipped recipe", _mobilenet_v2),
    Arch("resnet18", "torchvision resnet18", "", _resnet18),
    Arch("densenet121", "torchvision densenet121", "CheXNet's backbone", _densenet121),
    Arch("xception", "timm legacy_xception", "the original Xception", _timm("legacy_xception")),
    Arch("squeezenet1_1", "torchvision squeezenet1_1", "head without the final ReLU",
         _squeezenet1_1),
    Arch("efficientnet_lite0", "timm efficientnet_lite0", "", _timm("efficientnet_lite0")),
    Arch("vit_tiny", "timm vit_tiny_patch16_224", f"patch {VIT_PATCH}, img_size = input size",
         _timm("vit_tiny_patch16_224", img_size=lambda s: s, patch_size=VIT_PATCH)),
)}


def build_arch(key: str, size: int, in_channels: int = 1) -> nn.Module:
    """Return an untrained ``key`` network for (in_channels, size, size) input, one logit.

    Raises InputError for an unknown key.
    """
    check_arch(key)
    return ARCHS[key].build(size, in_channels)


def parse_archs(text: str | None) -> list[str]:
    """Return the architecture keys in a comma-separated list (None or "all": every one).

    Raises InputError for an unknown key.
    """
    if not text or text == "all":
        return list(ARCHS)
    keys = [k.strip() for k in text.split(",") if k.strip()]
    for k in keys:
        check_arch(k)
    return keys


def check_arch(key: str) -> None:
    """Raise InputError unless ``key`` names a known architecture."""
    if key not in ARCHS:
        raise InputError(f"unknown architecture {key!r}; choose from {', '.join(ARCHS)}")


def n_params(model: nn.Module) -> int:
    """Return the number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


class Calibrated(nn.Module):
    """A network with the prior shift and temperature baked in: (probability, logit)."""

    def __init__(self, model: nn.Module, temperature: float = 1.0, prior_shift: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("prior_shift", torch.tensor(float(prior_shift)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (calibrated probability, calibrated logit), each (N,)."""
        z = (self.model(x).reshape(x.shape[0]) - self.prior_shift) / self.temperature
        return torch.sigmoid(z), z


def export_onnx(net: nn.Module, size: int, path: str | Path, channels: int = 1) -> Path:
    """Write ``net`` as ONNX (opset 17, dynamic batch); return the path."""
    from triage.training.export import OPSET

    net.eval()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    axes = {INPUT_NAME: {0: "batch"}, **{n: {0: "batch"} for n in OUTPUT_NAMES}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings on shapes fixed by the input spec
        torch.onnx.export(net, (torch.zeros(1, channels, size, size),), str(out), dynamo=False,
                          opset_version=OPSET, input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), dynamic_axes=axes,
                          do_constant_folding=True)
    return out


def images_per_second(sess: Any, size: int, batch: int, min_seconds: float = 1.0,
                      min_runs: int = 3, channels: int = 1) -> float:
    """Return onnxruntime throughput on random input: images / s over >= ``min_seconds``."""
    x = np.random.default_rng(0).standard_normal((batch, channels, size, size)).astype(np.float32)
    sess.run(None, {INPUT_NAME: x})  # warm-up
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < min_seconds:
        sess.run(None, {INPUT_NAME: x})
        runs += 1
    return runs * batch / (time.perf_counter() - t0)


def device_name() -> str:
    """Return a short description of the CPU this process runs on."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({name}), {torch.get_num_threads()} torch threads"


@dataclass(frozen=True)
class Budget:
    """The settings shared by every architecture in one sweep."""

    input_size: int = 64
    epochs: int = 3
    train_limit: int | None = None
    max_steps: int | None = None
    seed: int = 42
    ort_threads: int = 2
    timing_seconds: float = 2.0
    calib_images: int = 32


def subsample(samples: Sequence[Any], limit: int | None, seed: int) -> list[Any]:
    """Return all val samples plus a fixed random ``limit`` of the train ones (None: all)."""
    tr = [s for s in samples if s.split == "train"]
    rest = [s for s in samples if s.split != "train"]
    if limit is None or limit >= len(tr):
        return list(samples)
    pick = np.random.default_rng(seed).choice(len(tr), limit, replace=False)
    return [tr[i] for i in sorted(pick)] + rest


def _rate_fields(name: str, r: Any) -> dict[str, Any]:
    return {name: r.value, f"{name}_ci": [r.lower, r.upper], f"{name}_k_n": [r.k, r.n]}


def summarise(logits: np.ndarray, labels: np.ndarray, prior_shift: float,
              ccfg: CalibrationConfig) -> dict[str, Any]:
    """Return val AUC (DeLong interval), accuracy, temperature and each operating point's
    threshold and sens/spec with exact intervals (pure)."""
    from triage.core import metrics
    from triage.training.calibrate import calibrate_logits

    cal = calibrate_logits(logits, labels, prior_shift, ccfg)
    z = (np.asarray(logits, dtype=np.float64) - prior_shift) / cal.temperature
    _, ci = metrics.delong(labels, z)
    return {"auc": cal.auc, "auc_ci": list(ci),
            "accuracy": float(np.mean((z > 0).astype(int) == labels)),
            "temperature": cal.temperature, "prior_shift": prior_shift, "ece": cal.ece,
            "n": cal.n, "n_pos": cal.n_pos,
            "operating_points": {p.name: {"threshold": p.threshold,
                                          **_rate_fields("sensitivity", p.sensitivity),
                                          **_rate_fields("specificity", p.specificity)}
                                 for p in cal.points}}


def evaluate_fixed(logits: np.ndarray, labels: np.ndarray, temperature: float,
                   prior_shift: float, thresholds: dict[str, float]) -> dict[str, Any]:
    """Return AUC (DeLong interval) and sens/spec (exact intervals) on a split that chose
    nothing: the temperature and thresholds come from ``val`` and are applied as they are
    (pure). ``{"n": 0}`` for an empty split."""
    from triage.core import metrics

    y = np.asarray(labels).astype(int)
    if len(y) == 0:
        return {"n": 0}
    probs = metrics.sigmoid((np.asarray(logits, dtype=np.float64) - prior_shift) / temperature)
    auc, ci = metrics.delong(y, probs)
    points = {}
    for name, thr in thresholds.items():
        sens, spec = metrics.sens_spec(y, probs, thr)
        points[name] = {"threshold": thr, **_rate_fields("sensitivity", sens),
                        **_rate_fields("specificity", spec)}
    return {"n": len(y), "n_pos": int(y.sum()), "auc": auc, "auc_ci": list(ci),
            "operating_points": points}


def auc_differences(rows: Sequence[dict[str, Any]], reference: str = "mobilenet_v2",
                    split: str = "holdout", iterations: int = 2000,
                    seed: int = 0) -> dict[str, dict[str, Any]]:
    """Return, per architecture, its AUC minus ``reference``'s on the same ``split`` images
    with a paired bootstrap interval, from the per-image scores the rows keep (pure). Empty
    when the reference or the scores are missing."""
    from triage.core import metrics

    by = {r["arch"]: r.get("scores", {}).get(split) for r in rows}
    ref = by.get(reference)
    if not ref:
        return {}
    out = {}
    for arch, sc in by.items():
        if not sc or arch == reference or sc["labels"] != ref["labels"]:
            continue
        d, (lo, hi) = metrics.bootstrap_auc_difference(
            np.asarray(sc["labels"]), np.asarray(sc["probability"]),
            np.asarray(ref["probability"]), iterations, seed)
        out[arch] = {"reference": reference, "split": split, "difference": d, "ci": [lo, hi],
                     "iterations": iterations}
    return out


@dataclass(frozen=True)
class EvalSet:
    """Network-ready images: val (early stopping, temperature, thresholds), holdout (touched
    by nothing but the final figures; may be empty) and int8 calibration images from train."""

    x_val: np.ndarray
    y_val: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray
    x_calib: np.ndarray


def _eval_set(samples: Sequence[Any], size: int, pre: PreprocessConfig, n_calib: int,
              seed: int) -> EvalSet:
    """Decode and prepare the val, holdout and int8 calibration images once for every arch."""
    from triage.imaging.transforms import InputSpec, build_transforms, split_cached
    from triage.training.train import cache_images

    prefix, rest = split_cached(build_transforms(pre, InputSpec(size)))
    tr = [s for s in samples if s.split == "train"]
    pick = np.random.default_rng(seed).choice(len(tr), min(n_calib, len(tr)), replace=False)

    def ready(part: Sequence[Any], what: str) -> tuple[np.ndarray, np.ndarray]:
        if not part:
            return np.zeros((0, 1, size, size), np.float32), np.zeros(0, int)
        x, y = cache_images(part, prefix, pre, what)
        return np.stack([np.asarray(rest(im), dtype=np.float32) for im in x]), np.asarray(y)

    x_va, y_va = ready([s for s in samples if s.split == "val"], "bench val")
    x_ho, y_ho = ready([s for s in samples if s.split == "holdout"], "bench holdout")
    x_ca, _ = ready([tr[i] for i in sorted(pick)], "bench int8 calib")
    return EvalSet(x_va, y_va, x_ho, y_ho, x_ca)


def _logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([model(torch.as_tensor(x[i:i + 64])).reshape(-1).numpy()
                               for i in range(0, len(x), 64)] or [np.zeros(0, np.float32)])


def _scores(labels: np.ndarray, logits: np.ndarray, temperature: float,
            prior_shift: float) -> dict[str, list[Any]]:
    from triage.core.metrics import sigmoid

    p = sigmoid((np.asarray(logits, dtype=np.float64) - prior_shift) / temperature)
    return {"labels": [int(v) for v in labels], "probability": [float(v) for v in p]}


def _onnx_figures(net: Calibrated, size: int, work: Path, x_cal: np.ndarray,
                  budget: Budget) -> dict[str, Any]:
    """Export fp32 and int8, return their sizes and onnxruntime throughput."""
    from triage.inference.model import onnx_session
    from triage.training.export import quantize_int8

    fp32 = export_onnx(net, size, work / "model.fp32.onnx")
    out: dict[str, Any] = {"fp32": {"bytes": fp32.stat().st_size}}
    paths = {"fp32": fp32}
    try:
        paths["int8"] = quantize_int8(fp32, work / "model.int8.onnx", x_cal)
        out["int8"] = {"bytes": paths["int8"].stat().st_size}
    except Exception as e:  # a quantiser failure is a result to report, not a crash
        log.warning("int8 quantisation failed: %s", e)
        out["int8"] = {"bytes": None, "error": f"{type(e).__name__}: {e}"}
    for k, p in paths.items():
        sess = onnx_session(p, budget.ort_threads)
        for b in (1, 16):
            out[k][f"images_per_s_b{b}"] = images_per_second(sess, size, b, budget.timing_seconds)
    return out


def run_arch(key: str, samples: Sequence[Any], out_dir: Path, tcfg: TrainConfig,
             pre: PreprocessConfig, ccfg: CalibrationConfig, budget: Budget,
             evalset: EvalSet) -> dict[str, Any]:
    """Train, calibrate, export and time one architecture; return its result row.

    Writes checkpoints and ONNX files under ``out_dir``. Raises InputError.
    """
    from triage.training.train import train

    size = budget.input_size
    arch = {"name": key, "source": ARCHS[key].source, "in_channels": 1, "outputs": 1,
            "weights_init": "random (pretrained=False)"}
    t0 = time.monotonic()
    res = train(samples, out_dir / "run", tcfg, pre, max_steps=budget.max_steps,
                model_factory=lambda ch: build_arch(key, size, ch), arch=arch)
    train_s = time.monotonic() - t0
    ckpt = torch.load(res.best_checkpoint, map_location="cpu", weights_only=False)
    model = build_arch(key, size)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    e = evalset
    z_va, z_ho = _logits(model, e.x_val), _logits(model, e.x_holdout)
    val = summarise(z_va, e.y_val, float(ckpt["prior_shift"]), ccfg)
    t, shift = val["temperature"], val["prior_shift"]
    holdout = evaluate_fixed(z_ho, e.y_holdout, t, shift,
                             {k: v["threshold"] for k, v in val["operating_points"].items()})
    net = Calibrated(model, t, shift).eval()
    return {"arch": key, "source": ARCHS[key].source, "note": ARCHS[key].note,
            "params": n_params(model), "val": val, "holdout": holdout,
            "scores": {"val": _scores(e.y_val, z_va, t, shift),
                       "holdout": _scores(e.y_holdout, z_ho, t, shift)},
            "onnx": _onnx_figures(net, size, out_dir, e.x_calib, budget),
            "train_seconds": train_s, "device": device_name(), "best_epoch": res.best_epoch,
            "epochs_run": len(res.history), "history": res.history,
            "counts": ckpt.get("counts", {})}


def load_result(path: Path) -> dict[str, Any] | None:
    """Return a finished per-arch result, or None when absent or unreadable."""
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def settings_of(budget: Budget, tcfg: TrainConfig, manifest: str, manifest_sha256: str,
                command: str) -> dict[str, Any]:
    """Return the record of what produced a sweep (pure)."""
    return {"budget": dataclasses.asdict(budget), "train_config": dataclasses.asdict(tcfg),
            "manifest": manifest, "manifest_sha256": manifest_sha256, "command": command,
            "data_citation": DATA_CITATION}


def run(samples: Sequence[Any], keys: Sequence[str], out_dir: str | Path, tcfg: TrainConfig,
        pre: PreprocessConfig, ccfg: CalibrationConfig, budget: Budget,
        settings: dict[str, Any], force: bool = False) -> list[dict[str, Any]]:
    """Benchmark ``keys`` in turn, skipping those with a matching ``result.json`` unless ``force``.

    Returns the result rows in ``keys`` order. Raises InputError on unusable data.
    """
    from tqdm import tqdm

    from triage.training.export import write_json

    out = Path(out_dir)
    chosen = subsample(samples, budget.train_limit, budget.seed)
    tcfg = dataclasses.replace(tcfg, input_size=budget.input_size, epochs=budget.epochs,
                               seed=budget.seed)
    evalset: EvalSet | None = None
    rows = []
    for key in tqdm(keys, desc="benchmark", unit="arch"):
        path = out / key / "result.json"
        done = load_result(path)
        if done is not None and not force and done.get("settings", {}).get("budget") == \
                settings["budget"]:
            log.info("%s: already done (%s); skipping", key, path)
            rows.append(done)
            continue
        if evalset is None:
            evalset = _eval_set(chosen, budget.input_size, pre, budget.calib_images,
                                budget.seed)
        log.info("%s: training at %d px for %d epochs", key, budget.input_size, budget.epochs)
        row = {**run_arch(key, chosen, out / key, tcfg, pre, ccfg, budget, evalset),
               "settings": settings}
        write_json(path, row)
        log.info("%s: val AUC %.4f, %.0f s", key, row["val"]["auc"], row["train_seconds"])
        rows.append(row)
    return rows


def _fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def epoch_seconds(row: dict[str, Any]) -> float:
    """Return the seconds spent in the epochs (training plus validation), without caching."""
    return float(sum(h.get("seconds", 0.0) for h in row.get("history", [])))


def _with_ci(value: Any, ci: Any, spec: str = ".3f") -> str:
    """``0.951 [0.935, 0.967]``; the bare value when the interval is missing."""
    if not ci or None in ci:
        return _fmt(value, spec)
    return f"{_fmt(value, spec)} [{_fmt(ci[0], spec)}, {_fmt(ci[1], spec)}]"


def _rate_cell(op: dict[str, Any], name: str) -> str:
    k_n = op.get(f"{name}_k_n")
    return _with_ci(op.get(name), op.get(f"{name}_ci")) + (f" ({k_n[0]}/{k_n[1]})" if k_n else "")


def table_rows(rows: Sequence[dict[str, Any]], point: str = "abnormal",
               differences: dict[str, dict[str, Any]] | None = None) -> list[list[str]]:
    """Return the Markdown table's cells, one list per architecture (pure)."""
    out = []
    for r in rows:
        ho = r.get("holdout") or {}
        op = (ho.get("operating_points") or {}).get(point, {})
        d = (differences or {}).get(r["arch"])
        o = r["onnx"]
        out.append([
            f"{r['arch']} ({r['source']}{'; ' + r['note'] if r.get('note') else ''})",
            _with_ci(r["val"]["auc"], r["val"].get("auc_ci")),
            _with_ci(ho.get("auc"), ho.get("auc_ci")),
            _with_ci(d["difference"], d["ci"], "+.3f") if d else "",
            _rate_cell(op, "sensitivity"), _rate_cell(op, "specificity"),
            f"{r['params'] / 1e6:.2f} M",
            _fmt(o["fp32"]["bytes"] / 1e6, ".1f"),
            _fmt(None if o["int8"].get("bytes") is None else o["int8"]["bytes"] / 1e6, ".1f"),
            _fmt(o["fp32"].get("images_per_s_b1"), ".0f"), _fmt(o["fp32"].get("images_per_s_b16"), ".0f"),
            _fmt(o["int8"].get("images_per_s_b1"), ".0f"), _fmt(o["int8"].get("images_per_s_b16"), ".0f"),
            f"{epoch_seconds(r) / 60:.1f} min", f"{r['epochs_run']} (best {r['best_epoch']})",
        ])
    return out


def _median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if values else None


HEADER = ["architecture", "val AUC [95% CI]", "holdout AUC [95% CI]",
          "holdout ΔAUC vs MobileNetV2 [95% CI]", "holdout sens @abnormal [95% CI]",
          "holdout spec @abnormal [95% CI]", "params",
          "fp32 MB", "int8 MB", "fp32 img/s b1", "fp32 img/s b16", "int8 img/s b1",
          "int8 img/s b16", "train time", "epochs"]


def render_section(rows: Sequence[dict[str, Any]], settings: dict[str, Any],
                   chart_name: str | None,
                   differences: dict[str, dict[str, Any]] | None = None) -> str:
    """Return the ``## Architectures`` section of docs/benchmarks.md (pure)."""
    b, t = settings["budget"], settings["train_config"]
    counts = rows[0].get("counts", {}) if rows else {}
    ho = next((r["holdout"] for r in rows if (r.get("holdout") or {}).get("n")), None)
    iters = next(iter((differences or {}).values()), {}).get("iterations")
    devices = sorted({r["device"] for r in rows})
    lines = [SECTION, "",
             "Each architecture trained from scratch (`pretrained=False`, one grey input channel, "
             "one logit) with the shipped recipe of `triage train`, only the network swapped: the "
             "same data, splits, preprocessing chain, augmentation, epoch budget, early-stopping "
             "rule, class weighting, EMA and temperature scaling. `val` chose the epoch, the "
             "temperature and the thresholds, so its AUC is optimistic; "
             + (f"the `holdout` split ({ho['n']} images, {ho['n_pos']} pneumonia, patients in "
                "neither `train` nor `val`) chose nothing: its figures apply val's temperature "
                "and `abnormal` threshold as they are. AUC intervals: DeLong; sensitivity and "
                "specificity: exact (Clopper-Pearson), with the counts"
                + ("; ΔAUC: the row's holdout AUC minus MobileNetV2's on the same images, with a "
                   f"paired percentile bootstrap ({iters} draws of images)" if iters else "")
                if ho else "no `holdout` split was given") +
             ". Data: " + DATA_CITATION + ".", "",
             f"**Budget** (the shipped model: 144 px, 10 epochs, the whole `train` split): "
             f"input {b['input_size']} px, "
             f"at most {b['epochs']} epochs (early-stopping patience {t['patience']}), batch "
             f"{t['batch_size']}, AdamW lr {t['lr']}, seed {b['seed']}; training images: "
             + (f"a fixed random subsample of {b['train_limit']} of the `train` split"
                if b["train_limit"] else "the whole `train` split")
             + f" ({counts.get('train', '?')} used, {counts.get('train_pos', '?')} pneumonia); "
             f"val {counts.get('val', '?')} ({counts.get('val_pos', '?')} pneumonia)"
             + (f"; at most {b['max_steps']} steps per epoch" if b["max_steps"] else "") + ". "
             f"Device: {'; '.join(devices)}. Throughput: onnxruntime, {b['ort_threads']} threads, "
             f"random input, at least {b['timing_seconds']} s per figure, on cores shared with "
             "other jobs (treat ratios between rows as more reliable than absolute figures). "
             "Train time: the epochs' wall time (training and the per-epoch validation pass); "
             "decoding and caching the images once per architecture adds about "
             + _fmt(_median([r["train_seconds"] - epoch_seconds(r) for r in rows]), ".0f")
             + " s (`train_seconds` in the JSON includes it). "
             "The `abnormal` operating point's threshold is placed on val for the configured "
             "sensitivity target. int8: int8 weights of Conv and Add with float activations "
             "(the shipped recipe, docs/model.md; ViT's MatMuls stay fp32), run in the "
             "daemon's session.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c) + " |" for c in table_rows(rows, differences=differences)]
    lines += ["", "These rows compare the architectures with each other under one budget. "
              "They are not comparable with published figures (e.g. MobileNetV2 at 91.2 % "
              "accuracy, AUC 0.947), which come from full-resolution, full-length training "
              "evaluated on a held-out test split.", "",
              "Regenerate (writes this section, the JSON and the chart; finished architectures "
              "are skipped unless `--force`):", "", "```sh",
              settings["command"], "```", ""]
    if chart_name:
        lines += [f"![holdout AUC (val where there is no holdout) with its 95 % interval "
                  f"against fp32 onnxruntime images/s at batch 16]({chart_name})", ""]
    return "\n".join(lines)


def merge_section(existing: str | None, section: str, heading: str = SECTION) -> str:
    """Return ``existing`` with its ``heading`` section (default ``## Architectures``) replaced
    by ``section`` (pure).

    A missing file gets a ``# Benchmarks`` title; a missing section is appended.
    Other sections are left as they are.
    """
    text = existing if existing and existing.strip() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == heading), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")
                or lines[i].startswith("# ")), len(lines))
    head = "\n".join(lines[:start]).rstrip("\n")
    tail = "\n".join(lines[end:])
    return head + "\n\n" + section.rstrip("\n") + "\n" + ("\n" + tail + "\n" if tail else "")


def chart_png(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write a scatter of holdout AUC (val AUC for rows without a holdout) with its interval
    against fp32 images/s (batch 16, log scale); return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    split = "holdout" if all((r.get("holdout") or {}).get("n") for r in rows) else "val"
    # Labels alternate above and below in order of speed: neighbours would otherwise overlap.
    rank = {id(r): k for k, r in enumerate(sorted(rows, key=lambda r: r["onnx"]["fp32"]
                                                  ["images_per_s_b16"]))}
    for i, r in enumerate(rows):
        x, y = r["onnx"]["fp32"]["images_per_s_b16"], r[split]["auc"]
        colour = f"C{i % 10}"
        ax.scatter([x], [y], s=20 + 8 * math.sqrt(r["params"] / 1e5), color=colour)
        ci = r[split].get("auc_ci")
        if ci and None not in ci:
            ax.errorbar([x], [y], yerr=[[y - ci[0]], [ci[1] - y]], fmt="none", ecolor=colour,
                        capsize=3)
        ax.annotate(r["arch"], (x, y), textcoords="offset points",
                    xytext=(4, 5 if rank[id(r)] % 2 == 0 else -11), fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decades only
    ax.margins(x=0.2)  # room for the fastest row's label
    ax.set_xlabel("onnxruntime fp32 images/s, batch 16, 2 threads (log)")
    ax.set_ylabel(f"{split} AUC (95 % DeLong interval)")
    ax.set_title("Accuracy against speed (marker area ~ parameters)")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_reports(rows: Sequence[dict[str, Any]], settings: dict[str, Any], md_path: str | Path,
                  json_path: str | Path, png_path: str | Path | None) -> None:
    """Write the JSON results, the chart and the ``## Architectures`` section of the Markdown."""
    from triage.training.export import write_json

    md = Path(md_path)
    differences = auc_differences(rows)
    # The per-image scores stay in each run's result.json; the document keeps the figures.
    write_json(json_path, {"settings": settings, "holdout_auc_differences": differences,
                           "results": [{k: v for k, v in r.items()
                                        if k not in ("settings", "scores")} for r in rows]})
    chart_name = None
    if png_path is not None:
        chart_png(rows, png_path)
        chart_name = Path(png_path).name if Path(png_path).parent.resolve() == md.parent.resolve() \
            else str(png_path)
    existing = md.read_text() if md.exists() else None
    md.parent.mkdir(parents=True, exist_ok=True)
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(merge_section(existing, render_section(rows, settings, chart_name,
                                                          differences)))
    tmp.replace(md)
