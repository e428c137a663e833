"""ONNX export: agreement with torch, Grad-CAM from ONNX outputs vs monai's GradCAM, int8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.visualize import GradCAM

from tests.model_fixtures import SIZE, tiny_model
from triage.imaging.heatmap import upsample as heatmap
from triage.training import export, train

# fp32 ONNX vs torch eager, on calibrated probabilities and raw CAM values.
PROB_ATOL = 1e-5
CAM_RTOL, CAM_ATOL = 1e-4, 1e-5
# Normalised heatmaps ([0, 1]) from ONNX outputs vs monai.visualize.GradCAM.
HEATMAP_ATOL = 1e-4


def _inputs(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).normal(0, 1, (n, 1, SIZE, SIZE)).astype(np.float32)


def _fp32_session() -> tuple[object, torch.nn.Module, dict]:
    m = tiny_model()
    model, _ = train.load_checkpoint(m.checkpoint)
    cal = json.loads(m.calibration.read_text())
    net = export.ExportNet(model, cal["temperature"], cal["prior_shift"]).eval()
    fp32 = m.checkpoint.parent / "export" / "tiny.fp32.onnx"
    return export.onnx_session(fp32), net, cal


def test_onnx_matches_torch_within_tolerance() -> None:
    sess, net, _ = _fp32_session()
    x = _inputs()
    out = export.run_session(sess, x)
    with torch.no_grad():
        prob, z, cam = (t.numpy() for t in net(torch.as_tensor(x)))
    np.testing.assert_allclose(out["probability"], prob, atol=PROB_ATOL)
    np.testing.assert_allclose(out["logit"], z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["cam"], cam, rtol=CAM_RTOL, atol=CAM_ATOL)


def test_calibration_is_baked_in() -> None:
    sess, _, cal = _fp32_session()
    x = _inputs(2)
    out = export.run_session(sess, x)
    model, _ = train.load_checkpoint(tiny_model().checkpoint)
    with torch.no_grad():
        raw = model(torch.as_tensor(x)).reshape(-1).numpy()
    expected = 1 / (1 + np.exp(-(raw - cal["prior_shift"]) / cal["temperature"]))
    np.testing.assert_allclose(out["probability"], expected, atol=PROB_ATOL)


def test_gradcam_from_onnx_outputs_matches_monai() -> None:
    sess, _, _ = _fp32_session()
    model, _ = train.load_checkpoint(tiny_model().checkpoint)
    # Non-degenerate input: the phantom-like pattern in the synthetic set.
    x = _inputs(2)
    out = export.run_session(sess, x)
    cam_monai = GradCAM(nn_module=model, target_layers="features")(torch.as_tensor(x), class_idx=0)
    for i in range(len(x)):
        ours = heatmap(out["cam"][i], (SIZE, SIZE))
        # monai's default normaliser maps (min, max) to (1, 0); undo that flip.
        theirs = 1.0 - cam_monai[i, 0].numpy()
        if float(out["cam"][i].max()) == 0.0:
            pytest.skip("all-zero CAM for this input: nothing to compare")
        np.testing.assert_allclose(ours, theirs, atol=HEATMAP_ATOL)


def test_int8_variant_runs_and_is_smaller() -> None:
    m = tiny_model()
    card = json.loads(m.card.read_text())
    variants = card["variants"]
    assert variants["int8"]["bytes"] < variants["fp32"]["bytes"]
    sess = export.onnx_session(m.checkpoint.parent / "export" / "tiny.int8.onnx")
    out = export.run_session(sess, _inputs(3))
    assert out["probability"].shape == (3,)
    assert np.all((out["probability"] >= 0) & (out["probability"] <= 1))


def test_choose_variant() -> None:
    assert export.choose_variant(0.990, 0.987) == "int8"
    assert export.choose_variant(0.990, 0.980) == "fp32"
    assert export.choose_variant(0.990, None) == "fp32"


def test_flip_averaging_is_baked_into_the_graph(tmp_path: Path) -> None:
    m = tiny_model()
    model, _ = train.load_checkpoint(m.checkpoint)
    net = export.ExportNet(model, 1.5, 0.2, tta="flip").eval()
    path = export.export_fp32(net, SIZE, tmp_path / "tta.onnx")
    x = _inputs(3)
    out = export.run_session(export.onnx_session(path), x)
    with torch.no_grad():
        t = torch.as_tensor(x)
        z = (model(t)[:, 0] + model(torch.flip(t, dims=(3,)))[:, 0]) / 2
    np.testing.assert_allclose(out["logit"], ((z - 0.2) / 1.5).numpy(), rtol=1e-4, atol=1e-4)
