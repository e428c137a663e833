"""``triage train``: MobileNetV2 (torchvision, ``weights=None``) on labelled radiographs.

Inputs are a data root plus a CSV with columns ``path,label[,split]``: the
``cxr-pediatric-224`` manifest (image files) or a labels CSV for a DICOM
archive (any path that is not PNG/JPEG is read as DICOM). Rows without a
``split`` go to ``train`` or ``val`` by a stable hash of the path.

The network is the stock MobileNetV2 with one input channel and one logit; its
head is global average pooling, dropout, linear, so the class-activation map
(exact Grad-CAM for this head) follows from the last feature map and the linear
weights. The pure parts (manifest parsing, class weights, schedules) are small
functions; :func:`train` is the I/O edge that writes checkpoints and logs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import triage.training.compat  # noqa: F401  (must precede torchvision)
from triage.config import PreprocessConfig, TrainConfig
from triage.core.errors import InputError, UnscorableError
from triage.core.metrics import auc as roc_auc
from triage.imaging.loading import load_any
from triage.imaging.transforms import InputSpec, build_transforms, split_cached
from triage.manifest import read_labelled_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One labelled input: an absolute path, 0/1 label and split name."""

    path: Path
    label: int
    split: str


def file_sha256(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes. Raises OSError if unreadable."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _hash_split(path: str, val_fraction: float) -> str:
    """Return a stable train/val assignment from the path's hash."""
    bucket = int(hashlib.sha256(path.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def read_manifest(csv_path: str | Path, root: str | Path | None = None,
                  val_fraction: float = 0.1) -> list[Sample]:
    """Return the samples listed in a ``path,label[,split]`` CSV, paths resolved under ``root``.

    ``root`` defaults to the CSV's folder. Raises InputError on a missing file,
    missing columns or a label other than 0/1.
    """
    csv_path = Path(csv_path)
    base = Path(root) if root is not None else csv_path.parent
    out = []
    for r in read_labelled_rows(csv_path):
        split = (r.get("split") or "").strip() or _hash_split(r["path"], val_fraction)
        out.append(Sample(base / r["path"], int(r["label"]), split))
    return out


def pos_weight(labels: Sequence[int], mode: str) -> float:
    """Return the positive-class loss weight: n_neg/n_pos for ``balanced``, else 1.

    Raises InputError when ``balanced`` is asked for and a class is missing.
    """
    if mode != "balanced":
        return 1.0
    n_pos = sum(1 for y in labels if y == 1)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"training data needs both classes (got {n_neg} negative, {n_pos} positive)")
    return n_neg / n_pos


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Return the learning-rate multiplier: linear warm-up, then cosine annealing to 0."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_model(width_mult: float = 1.0, dropout: float = 0.2, in_channels: int = 1) -> nn.Module:
    """Return an untrained MobileNetV2 with ``in_channels`` inputs and one logit.

    Its classifier is torchvision's: global average pooling, dropout, linear.
    """
    from torchvision.models import mobilenet_v2

    model = mobilenet_v2(weights=None, num_classes=1, width_mult=width_mult, dropout=dropout)
    first = model.features[0][0]
    if in_channels != first.in_channels:
        model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, first.kernel_size,
                                         first.stride, first.padding, bias=False)
        nn.init.kaiming_normal_(model.features[0][0].weight, mode="fan_out")
    return model


def _adapt_state(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Fit a foreign state dict to ``model``: sum RGB stem weights to grey, drop misfit heads."""
    own = model.state_dict()
    out = {}
    for k, v in state.items():
        if k not in own:
            continue
        if v.shape != own[k].shape and v.ndim == 4 and v.shape[1] != own[k].shape[1]:
            v = v.sum(dim=1, keepdim=True).repeat(1, own[k].shape[1], 1, 1) / own[k].shape[1]
        if v.shape == own[k].shape:
            out[k] = v
    return out


def init_from(model: nn.Module, checkpoint: str | Path) -> list[str]:
    """Load weights for fine-tuning from a local checkpoint (ours or a bare state dict).

    Returns the parameter names left at their fresh initialisation. Raises
    InputError when the file cannot be loaded or nothing matches.
    """
    try:
        obj = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"cannot load checkpoint {checkpoint}: {e}") from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    usable = _adapt_state(state, model)
    if not usable:
        raise InputError(f"checkpoint {checkpoint} has no weights that fit this model")
    result = model.load_state_dict(usable, strict=False)
    log.info("initialised %d tensors from %s; %d left fresh", len(usable), checkpoint,
             len(result.missing_keys))
    return list(result.missing_keys)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def cache_images(samples: Sequence[Sample], prefix: Callable[[Any], Any],
                 cfg: PreprocessConfig, desc: str, kept: list[Sample] | None = None,
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """Decode and run the deterministic chain once per sample, keeping usable ones.

    Returns (images (N, C, S, S) float32, labels (N,)). Gated or undecodable
    samples are skipped with a warning; ``kept``, when given, receives the
    samples kept, in order. Raises InputError if none are usable.
    """
    from tqdm import tqdm

    xs, ys, skipped = [], [], 0
    threads = torch.get_num_threads()
    # One image at a time gains nothing from intra-op threads, and their
    # spin-waiting collapses throughput when another process shares the cores.
    torch.set_num_threads(1)
    try:
        for s in tqdm(samples, desc=desc, unit="img", leave=False):
            try:
                xs.append(torch.as_tensor(np.asarray(prefix(load_any(s.path, cfg)))))
                ys.append(s.label)
                if kept is not None:
                    kept.append(s)
            except UnscorableError as e:
                skipped += 1
                log.warning("skipping %s: %s", s.path.name, e.reason)
    finally:
        torch.set_num_threads(threads)
    if not xs:
        raise InputError(f"no usable {desc} images")
    if skipped:
        log.warning("%s: skipped %d of %d inputs", desc, skipped, len(samples))
    return torch.stack(xs).float(), np.asarray(ys, dtype=np.int64)


class CachedDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Cached deterministic outputs plus the random rest of the chain, per item."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, rest: Callable[[Any], Any]) -> None:
        self.images, self.labels, self.rest = images, labels, rest

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(self.rest(self.images[i])).float()
        return x, torch.tensor(float(self.labels[i]))


TTA_MODES = ("none", "flip")


def predict_logits(model: nn.Module, images: torch.Tensor, rest: Callable[[Any], Any],
                   batch_size: int = 64, channels_last: bool = True,
                   tta: str = "none") -> np.ndarray:
    """Return the model's logits for cached images passed through ``rest`` (no augmentation).

    ``tta="flip"`` averages the logits of each image and its left-right mirror
    (what an export with the same setting computes inside its graph).
    """
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.stack([torch.as_tensor(rest(im)).float() for im in images[i:i + batch_size]])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            z = model(x).reshape(-1).float()
            if tta == "flip":
                z = (z + model(torch.flip(x, dims=(3,))).reshape(-1).float()) / 2
            out.append(z.numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def _bce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Return the unweighted mean binary cross-entropy of logits."""
    t = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    return float(nn.functional.binary_cross_entropy_with_logits(t, y))


def evaluate(logits: np.ndarray, labels: np.ndarray, prior_shift: float) -> dict[str, float]:
    """Return loss, AUC and accuracy at 0.5 after removing the class-weighting prior shift."""
    z = logits - prior_shift
    return {
        "loss": _bce(z, labels),
        "auc": roc_auc(labels, z),
        "accuracy": float(np.mean((z > 0).astype(int) == labels)),
    }


@dataclass
class TrainResult:
    """What a training run produced."""

    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    history: list[dict[str, float]]


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Return Adam or AdamW over the model's parameters."""
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _checkpoint(model: nn.Module, meta: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return the checkpoint payload: weights plus everything needed to rebuild and preprocess."""
    return {"state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            **meta, **extra}


def ema_decay_at(decay: float, n_averaged: int) -> float:
    """Return the EMA decay after ``n_averaged`` updates, warmed up as (1 + n) / (10 + n).

    Without the warm-up the random initial weights keep a large share of the
    average for thousands of steps, and an average of weights from far-apart
    points of training (with averaged BatchNorm statistics) can collapse.
    """
    return min(decay, (1.0 + n_averaged) / (10.0 + n_averaged))


def _ema_model(model: nn.Module, decay: float) -> Any:
    """Return an exponential moving average of ``model`` (weights and BN buffers), or None."""
    if decay <= 0:
        return None
    from torch.optim.swa_utils import AveragedModel

    def avg(avg_p: torch.Tensor, p: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        if not avg_p.is_floating_point():
            return p.detach().clone()
        d = ema_decay_at(decay, int(n))
        return avg_p + (p.detach() - avg_p) * (1.0 - d)

    return AveragedModel(model, avg_fn=avg, use_buffers=True)


def _run_epoch(model: nn.Module, ema: Any, loader: Any, opt: torch.optim.Optimizer,
               sched: Any, loss_fn: nn.Module, cfg: TrainConfig, desc: str) -> float:
    """Train one epoch; return the mean training loss."""
    from tqdm import tqdm

    model.train()
    total, n = 0.0, 0
    bar = tqdm(loader, desc=desc, unit="batch", leave=False)
    for x, y in bar:
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x).reshape(-1), y)
        loss.backward()
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        total += float(loss.detach()) * len(y)
        n += len(y)
        bar.set_postfix(loss=f"{total / n:.4f}")
    return total / max(n, 1)


def train(samples: Sequence[Sample], out_dir: str | Path, cfg: TrainConfig,
          pre_cfg: PreprocessConfig, init: str | Path | None = None,
          manifest_sha256: str = "", max_steps: int | None = None,
          model_factory: Callable[[int], nn.Module] | None = None,
          arch: dict[str, Any] | None = None, resume: bool = False,
          extra_meta: dict[str, Any] | None = None) -> TrainResult:
    """Train, validate every epoch, early-stop on validation loss; write checkpoints.

    Writes ``last.pt`` (every epoch), ``best.pt`` (lowest validation loss, the
    EMA weights when enabled) and ``history.jsonl`` under ``out_dir``.
    ``max_steps`` caps optimiser steps per epoch (for smoke tests).
    ``model_factory(in_channels)`` replaces the shipped MobileNetV2 (used by
    ``triage benchmark``; such checkpoints are not loadable by
    :func:`load_checkpoint`) and ``arch`` is then recorded as the checkpoint's
    ``arch``. With ``resume`` a run continues after the last finished epoch
    recorded in ``state.pt`` (weights, average, optimiser, schedule, early-stopping
    state and random states). ``extra_meta`` is recorded in the checkpoints (and
    so in the model card). Returns a :class:`TrainResult`. Raises InputError on
    unusable data.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    gen = seed_everything(cfg.seed)
    spec = InputSpec(cfg.input_size)
    train_chain = build_transforms(pre_cfg, spec, train=True)
    train_chain.set_random_state(seed=cfg.seed)
    prefix, train_rest = split_cached(train_chain)
    eval_prefix, eval_rest = split_cached(build_transforms(pre_cfg, spec, train=False))
    tr = [s for s in samples if s.split == "train"]
    va = [s for s in samples if s.split == "val"]
    if not tr or not va:
        raise InputError(f"need train and val samples (got {len(tr)} train, {len(va)} val)")
    x_tr, y_tr = cache_images(tr, prefix, pre_cfg, "cache train")
    x_va, y_va = cache_images(va, eval_prefix, pre_cfg, "cache val")
    w = pos_weight(list(y_tr), cfg.class_weighting)
    prior_shift = math.log(w)
    log.info("train %d (%d positive), val %d (%d positive); pos_weight %.3f",
             len(y_tr), int(y_tr.sum()), len(y_va), int(y_va.sum()), w)

    model = (build_model(cfg.width_mult, cfg.dropout, spec.channels) if model_factory is None
             else model_factory(spec.channels))
    if init is not None:
        init_from(model, init)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    ema = _ema_model(model, cfg.ema_decay)
    loader = _loader(CachedDataset(x_tr, y_tr, train_rest), cfg, gen, len(y_tr))
    steps = len(loader) if max_steps is None else min(len(loader), max_steps)
    opt = _make_optimizer(model, cfg)
    total = steps * cfg.epochs
    warm = int(cfg.warmup_epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm))
    loss_fn = SmoothedBCE(w, cfg.label_smoothing)
    meta = {
        "arch": arch or {"name": "mobilenet_v2", "width_mult": cfg.width_mult,
                         "dropout": cfg.dropout, "in_channels": spec.channels, "outputs": 1},
        "input": spec.to_dict(),
        "preprocess": dataclasses.asdict(pre_cfg),
        "train_config": dataclasses.asdict(cfg),
        "pos_weight": w,
        "prior_shift": prior_shift,
        "manifest_sha256": manifest_sha256,
        "init": str(init) if init else None,
        "counts": {"train": len(y_tr), "train_pos": int(y_tr.sum()),
                   "val": len(y_va), "val_pos": int(y_va.sum())},
        **(extra_meta or {}),
    }
    loader_iter: Any = loader if max_steps is None else _Capped(loader, steps)
    run = _Run(model, ema, opt, sched, gen, train_rest)
    if resume:
        run.restore(out / STATE_NAME)
    return _fit(run, loader_iter, loss_fn, cfg, out, meta, x_va, y_va, eval_rest, prior_shift)


def _loader(dataset: CachedDataset, cfg: TrainConfig, gen: torch.Generator,
            n: int) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
    """Return the shuffled training loader; augmentation runs in ``loader_workers`` processes.

    Persistent workers keep their random state from epoch to epoch (a fresh
    worker each epoch would replay the same augmentations); MONAI's
    ``worker_init_fn`` seeds each worker's transforms from the loader's seed.
    """
    from monai.data.utils import worker_init_fn

    workers = cfg.loader_workers
    return torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, generator=gen,
        drop_last=n > cfg.batch_size, num_workers=workers, persistent_workers=workers > 0,
        worker_init_fn=worker_init_fn if workers > 0 else None)


class SmoothedBCE(nn.Module):
    """Class-weighted binary cross-entropy on logits, with optional label smoothing.

    Smoothing pulls the targets to ``y (1 - e) + e / 2``, which keeps the
    logits from growing without bound on an easy training set.
    """

    def __init__(self, pos_weight: float, smoothing: float = 0.0) -> None:
        super().__init__()
        self.pos_weight: torch.Tensor
        self.register_buffer("pos_weight", torch.tensor(float(pos_weight)))
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return the mean loss of ``logits`` against 0/1 targets ``y``."""
        t = y * (1 - self.smoothing) + 0.5 * self.smoothing
        return nn.functional.binary_cross_entropy_with_logits(
            logits, t, pos_weight=self.pos_weight)


class _Capped:
    """An iterable that yields at most ``n`` batches of ``loader``."""

    def __init__(self, loader: Any, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self) -> Any:
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        return self.n


STATE_NAME = "state.pt"


@dataclass
class _Run:
    """Everything a training run carries from epoch to epoch, and can save and restore."""

    model: nn.Module
    ema: Any
    opt: torch.optim.Optimizer
    sched: Any
    gen: torch.Generator
    augment: Any = None  # the random part of the chain, when it runs in this process
    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    stale: int = 0
    history: list[dict[str, float]] | None = None

    def _random_states(self) -> list[np.random.RandomState]:
        """Every random state of the augmentation chain, in a fixed order.

        MONAI transforms keep their own states, some nested (RandAffine's grid);
        a resumed run must continue from all of them. With loader workers the
        augmentation runs in their processes, whose state cannot be saved: a
        resumed run is then equivalent, not identical.
        """
        found: list[np.random.RandomState] = []
        seen: set[int] = set()

        def walk(obj: Any, depth: int) -> None:
            if id(obj) in seen or depth > 4:
                return
            seen.add(id(obj))
            if isinstance(obj, np.random.RandomState):
                found.append(obj)
            elif isinstance(obj, (list, tuple)):
                for item in obj:
                    walk(item, depth + 1)
            elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("monai", "triage")):
                for key in sorted(vars(obj)):
                    walk(vars(obj)[key], depth + 1)

        walk(self.augment, 0)
        return found

    def save(self, path: Path) -> None:
        """Write the resumable state (atomically: a crash mid-write keeps the previous one)."""
        state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                 "sched": self.sched.state_dict(),
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "epoch": self.epoch, "best_loss": self.best_loss, "best_epoch": self.best_epoch,
                 "stale": self.stale, "history": self.history or [],
                 "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                         "python": random.getstate(), "loader": self.gen.get_state(),
                         "augment": [r.get_state() for r in self._random_states()]}}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)

    def restore(self, path: Path) -> None:
        """Load a saved state. Raises InputError when there is none to resume."""
        if not path.exists():
            raise InputError(f"nothing to resume: {path} does not exist")
        st = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.sched.load_state_dict(st["sched"])
        if self.ema is not None and st["ema"] is not None:
            self.ema.load_state_dict(st["ema"])
        self.epoch, self.best_loss = int(st["epoch"]), float(st["best_loss"])
        self.best_epoch, self.stale = int(st["best_epoch"]), int(st["stale"])
        self.history = list(st["history"])
        torch.set_rng_state(st["rng"]["torch"])
        np.random.set_state(st["rng"]["numpy"])
        random.setstate(st["rng"]["python"])
        self.gen.set_state(st["rng"]["loader"])
        for r, state in zip(self._random_states(), st["rng"].get("augment", []), strict=False):
            r.set_state(state)
        log.info("resuming after epoch %d (best so far: epoch %d)", self.epoch, self.best_epoch)


def _fit(run: _Run, loader: Any, loss_fn: nn.Module, cfg: TrainConfig, out: Path,
         meta: dict[str, Any], x_va: torch.Tensor, y_va: np.ndarray,
         eval_rest: Callable[[Any], Any], prior_shift: float) -> TrainResult:
    """The epoch loop: train, validate (the EMA model when enabled), checkpoint, early-stop."""
    run.history = run.history or []
    hist_path = out / "history.jsonl"
    hist_path.write_text("".join(json.dumps(r) + "\n" for r in run.history))
    if run.stale >= cfg.patience:
        log.info("this run had already stopped early after epoch %d", run.epoch)
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        if run.stale >= cfg.patience:
            break
        t0 = time.monotonic()
        train_loss = _run_epoch(run.model, run.ema, loader, run.opt, run.sched, loss_fn, cfg,
                                f"epoch {epoch}/{cfg.epochs}")
        judged: nn.Module = run.ema.module if run.ema is not None else run.model
        val = evaluate(predict_logits(judged, x_va, eval_rest, channels_last=cfg.channels_last),
                       y_va, prior_shift)
        row = {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()},
               "lr": run.opt.param_groups[0]["lr"], "seconds": time.monotonic() - t0}
        run.history.append(row)
        with hist_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        log.info("epoch %d: train loss %.4f | val loss %.4f AUC %.4f acc %.4f | %.0f s",
                 epoch, train_loss, val["loss"], val["auc"], val["accuracy"], row["seconds"])
        extra = {"epoch": epoch, "val": val, "history": run.history}
        torch.save(_checkpoint(judged, meta, extra), out / "last.pt")
        run.epoch = epoch
        if val["loss"] < run.best_loss:
            run.best_loss, run.best_epoch, run.stale = val["loss"], epoch, 0
            torch.save(_checkpoint(judged, meta, extra), out / "best.pt")
        else:
            run.stale += 1
            if run.stale >= cfg.patience:
                log.info("early stopping after epoch %d (best %d)", epoch, run.best_epoch)
        run.save(out / STATE_NAME)
    return TrainResult(out / "best.pt", out / "last.pt", run.best_epoch, run.history)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Return (model in eval mode, checkpoint metadata) from a ``best.pt``/``last.pt``.

    Raises InputError when the file is missing or not a triage checkpoint.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        arch = ckpt["arch"]
    except (OSError, KeyError, TypeError, RuntimeError) as e:
        raise InputError(f"{path} is not a readable triage checkpoint: {e}") from e
    model = build_model(arch["width_mult"], arch["dropout"], arch["in_channels"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
