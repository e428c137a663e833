"""A seconds-long training run on synthetic images that writes a working ONNX model and card."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.model_fixtures import SIZE, tiny_model, write_dataset
from triage.config import PreprocessConfig, TrainConfig
from triage.core.errors import InputError
from triage.training import train


def test_tiny_training_writes_checkpoints_history_model_and_card() -> None:
    m = tiny_model()
    run = m.checkpoint.parent
    assert (run / "best.pt").exists() and (run / "last.pt").exists()
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert rows and {"train_loss", "val_loss", "val_auc", "val_accuracy"} <= set(rows[0])
    assert m.onnx.stat().st_size > 0
    card = json.loads(m.card.read_text())
    for key in ("architecture", "input", "preprocess", "training", "validation",
                "temperature", "operating_points", "ece", "reference_scores", "software",
                "intended_use", "limitations"):
        assert key in card, key
    assert card["input"]["size"] == SIZE
    assert card["training"]["manifest_sha256"] == train.file_sha256(m.manifest)
    assert {p["name"] for p in card["operating_points"]} == {"abnormal", "urgent"}
    for p in card["operating_points"]:
        assert 0 <= p["sensitivity"]["ci_lower"] <= p["sensitivity"]["value"] <= 1


def test_checkpoint_reloads_with_its_preprocessing() -> None:
    model, meta = train.load_checkpoint(tiny_model().checkpoint)
    assert meta["input"]["size"] == SIZE and meta["arch"]["name"] == "mobilenet_v2"
    with torch.no_grad():
        assert model(torch.zeros(2, 1, SIZE, SIZE)).shape == (2, 1)


def test_fine_tuning_from_a_checkpoint(tmp_path: Path) -> None:
    m = tiny_model()
    samples = train.read_manifest(m.manifest)
    cfg = TrainConfig(input_size=SIZE, width_mult=0.35, epochs=1, batch_size=16, ema_decay=0.0)
    res = train.train(samples, tmp_path / "ft", cfg, PreprocessConfig(min_size_px=32),
                      init=m.checkpoint, max_steps=1)
    ckpt = torch.load(res.best_checkpoint, weights_only=False)
    assert ckpt["init"] == str(m.checkpoint)


def test_init_from_an_rgb_state_dict_adapts_the_stem(tmp_path: Path) -> None:
    rgb = train.build_model(width_mult=0.35, in_channels=3)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    grey = train.build_model(width_mult=0.35, in_channels=1)
    missing = train.init_from(grey, tmp_path / "rgb.pt")
    assert missing == []
    torch.testing.assert_close(grey.features[0][0].weight,
                               rgb.features[0][0].weight.sum(1, keepdim=True) / 1)


def test_manifest_errors_and_hash_split(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na.png,2\n")
    with pytest.raises(InputError, match="not 0 or 1"):
        train.read_manifest(bad)
    nosplit = tmp_path / "labels.csv"
    nosplit.write_text("path,label\n" + "".join(f"x{i}.dcm,{i % 2}\n" for i in range(200)))
    splits = {s.split for s in train.read_manifest(nosplit)}
    assert splits == {"train", "val"}
    with pytest.raises(InputError, match="both classes"):
        train.pos_weight([1, 1], "balanced")


def test_schedule_and_ema_warmup() -> None:
    assert train.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert train.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert train.lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert train.ema_decay_at(0.995, 0) == pytest.approx(0.1)
    assert train.ema_decay_at(0.995, 10_000) == 0.995


def test_dicom_archive_with_labels_csv(tmp_path: Path) -> None:
    from tests import synth
    from tests.model_fixtures import synthetic_image

    rows = ["path,label,split"]
    for i in range(8):
        label, split = i % 2, "train" if i < 6 else "val"
        px = synthetic_image(label, i, size=64).astype(np.uint16) * 16
        ds = synth.make_dataset(synth.SynthSpec(rows=64, columns=64), pixels=px)
        synth.write(ds, tmp_path / f"im{i}.dcm")
        rows.append(f"im{i}.dcm,{label},{split}")
    lateral = synth.make_dataset(synth.SynthSpec(rows=64, columns=64, view_position="LL"))
    synth.write(lateral, tmp_path / "lat.dcm")
    rows.append("lat.dcm,1,train")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    samples = train.read_manifest(tmp_path / "labels.csv")
    cfg = TrainConfig(input_size=32, width_mult=0.35, epochs=1, batch_size=4, ema_decay=0.0)
    res = train.train(samples, tmp_path / "run", cfg, PreprocessConfig(min_size_px=32))
    meta = torch.load(res.best_checkpoint, weights_only=False)
    assert meta["counts"]["train"] == 6  # the lateral view was gated out
    assert math.isfinite(res.history[0]["train_loss"])


def test_write_dataset_is_balanced(tmp_path: Path) -> None:
    samples = train.read_manifest(write_dataset(tmp_path, 8, 4))
    assert sum(s.label for s in samples) == 6 and len(samples) == 12


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["state_dict"]


def test_resume_continues_a_run_cut_mid_plan_exactly(tmp_path: Path) -> None:
    m = tiny_model()
    samples = train.read_manifest(m.manifest)
    pre = PreprocessConfig(min_size_px=32, aug_crop_scale=(0.3, 1.0), train_cache_px=SIZE + 16)
    cfg = TrainConfig(input_size=SIZE, width_mult=0.35, epochs=3, batch_size=16, patience=9,
                      loader_workers=0, seed=5)
    straight = train.train(samples, tmp_path / "straight", cfg, pre, max_steps=2)

    class Stop(Exception):
        pass

    cut = tmp_path / "cut"
    original = train._run_epoch
    calls = {"n": 0}

    def run_two_then_die(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise Stop  # the process dies during epoch 3
        return original(*args, **kwargs)

    train._run_epoch = run_two_then_die
    try:
        with pytest.raises(Stop):
            train.train(samples, cut, cfg, pre, max_steps=2)
    finally:
        train._run_epoch = original
    resumed = train.train(samples, cut, cfg, pre, max_steps=2, resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    for k, v in _weights(straight.last_checkpoint).items():
        torch.testing.assert_close(_weights(resumed.last_checkpoint)[k], v, msg=k)


def test_resume_without_a_state_is_a_clear_error(tmp_path: Path) -> None:
    m = tiny_model()
    cfg = TrainConfig(input_size=SIZE, width_mult=0.35, epochs=1, batch_size=16, loader_workers=0)
    with pytest.raises(InputError, match="nothing to resume"):
        train.train(train.read_manifest(m.manifest), tmp_path / "none", cfg,
                    PreprocessConfig(min_size_px=32), max_steps=1, resume=True)


def test_smoothed_loss_reduces_to_weighted_bce_and_pulls_targets_in() -> None:
    z, y = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 1.0])
    plain = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(3.0))(z, y)
    torch.testing.assert_close(train.SmoothedBCE(3.0, 0.0)(z, y), plain)
    smooth = train.SmoothedBCE(1.0, 0.2)(z, y)
    targets = torch.tensor([0.9, 0.1, 0.9])
    torch.testing.assert_close(smooth, torch.nn.functional.binary_cross_entropy_with_logits(z, targets))
