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
from triage.inference import selftest
from triage.training import export, quantize, train

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
    out = export.run_session(sess, x, outputs=export.OUTPUT_NAMES)
    with torch.no_grad():
        prob, z, cam, emb = (t.numpy() for t in net(torch.as_tensor(x)))
    np.testing.assert_allclose(out["probability"], prob, atol=PROB_ATOL)
    np.testing.assert_allclose(out["logit"], z, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out["cam"], cam, rtol=CAM_RTOL, atol=CAM_ATOL)
    np.testing.assert_allclose(out["embedding"], emb, rtol=1e-4, atol=1e-4)


def test_the_ood_distance_is_near_one_in_distribution_and_far_for_other_inputs() -> None:
    from triage.training import ood

    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (40, 8)) @ rng.normal(0, 1, (8, 32))  # a low-rank cloud in 32-d
    train, val = base[:600 // 20], base[30:]
    net = ood.fit(np.vstack([train, rng.normal(0, 0.01, (400, 32)) + train.mean(0)]), k=8)
    near = ood.distances(net, val)
    far = ood.distances(net, rng.normal(0, 5, (20, 32)))  # off the cloud's subspace
    assert np.median(far) > 10 * np.median(near)
    thr = ood.threshold(near, 0.2)
    assert (near >= thr).mean() <= 0.2


def test_the_exported_model_ships_its_ood_graph_and_threshold() -> None:
    m = tiny_model()
    card = json.loads(m.card.read_text())
    entry = card["out_of_distribution"]
    path = m.onnx.with_name(entry["file"])
    assert path.is_file() and entry["threshold"] > 0
    assert entry["validation"]["refused"] <= max(1, round(entry["validation"]["n"] * 0.01))
    sess = export.onnx_session(path)
    emb = export.run_session(export.onnx_session(m.onnx), _inputs(2),
                             outputs=("embedding",))["embedding"]
    (d,) = sess.run(["distance"], {"embedding": emb.astype(np.float32)})
    assert d.shape == (2,) and np.all(d >= 0)


def test_calibration_is_baked_in() -> None:
    sess, _, cal = _fp32_session()
    x = _inputs(2)
    out = export.run_session(sess, x)
    model, _ = train.load_checkpoint(tiny_model().checkpoint)
    with torch.no_grad():
        raw = model(torch.as_tensor(x)).reshape(-1).numpy()
    expected = 1 / (1 + np.exp(-(raw - cal["prior_shift"]) / cal["temperature"]))
    np.testing.assert_allclose(out["probability"], expected, atol=PROB_ATOL)


def test_calibration_report_carries_each_images_calibrated_probability() -> None:
    """The per-image scores that recipe ablations compare reproduce the report's AUC and labels."""
    from sklearn.metrics import roc_auc_score

    m = tiny_model()
    cal = json.loads(m.calibration.read_text())
    scores = cal["scores"]
    assert len(scores) == cal["n"] and sum(s["label"] for s in scores) == cal["n_pos"]
    y = [s["label"] for s in scores]
    p = [s["probability"] for s in scores]
    assert roc_auc_score(y, p) == pytest.approx(cal["auc"], abs=1e-9)
    assert all(0.0 <= v <= 1.0 for v in p) and len({s["path"] for s in scores}) == len(scores)


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


def test_every_int8_recipe_is_measured_against_its_reference_and_the_card_says_so() -> None:
    m = tiny_model()
    card = json.loads(m.card.read_text())
    variants = card["variants"]
    assert set(variants) == {"fp32", *quantize.RECIPES}
    for name in quantize.RECIPES:
        v = variants[name]
        assert v["bytes"] < variants["fp32"]["bytes"] / 2  # int8 weights, whatever the recipe
        a = v["agreement"]
        assert a["n"] == card["validation"]["n"] and 0 <= a["p95_abs_diff"] <= a["max_abs_diff"]
        assert a["integer_kernels_possible"] is (name != "int8-weights")
        sess = export.onnx_session(m.checkpoint.parent / "export" / f"tiny.{name}.onnx")
        out = export.run_session(sess, _inputs(3))
        assert out["probability"].shape == (3,)
        assert np.all((out["probability"] >= 0) & (out["probability"] <= 1))
    # Weight-only int8 runs float arithmetic: it agrees with its reference to float rounding.
    assert variants["int8-weights"]["agreement"]["max_abs_diff"] <= 1e-4
    assert card["precision"] == quantize.choose(variants)
    assert card["sha256"] == variants[card["precision"]]["sha256"]
    assert set(card["cpu"]["flags"]) <= set(selftest.FEATURE_FLAGS)
    assert card["selftest"]["cpu"] == card["cpu"] and len(card["selftest"]["probability"]) == 8


def _measured(auc: float, max_diff: float = 0.0, tiers: int = 0) -> dict[str, object]:
    return {"auc": auc, "agreement": {"max_abs_diff": max_diff, "tier_changes": tiers,
                                      "daemon_max_abs_diff": max_diff}}


def test_choose_ships_the_first_cpu_independent_variant_that_holds() -> None:
    fp32 = _measured(0.990)
    assert quantize.choose({"fp32": fp32, "int8-weights": _measured(0.988)}) == "int8-weights"
    # Too costly in AUC, or moving a score past the tolerance or across a tier: not shipped.
    assert quantize.choose({"fp32": fp32, "int8-weights": _measured(0.980)}) == "fp32"
    assert quantize.choose({"fp32": fp32, "int8-u8s8-rr": _measured(0.99, 0.013)}) == "fp32"
    assert quantize.choose({"fp32": fp32, "int8-u8u8": _measured(0.99, 0.002, 1)}) == "fp32"
    assert quantize.choose({"fp32": fp32, "int8-u8u8": _measured(0.99, 0.002)}) == "int8-u8u8"
    # U8S8 and S8S8 can saturate on CPUs without VNNI: never shipped, however well they did here.
    assert quantize.choose({"fp32": fp32, "int8-u8s8": _measured(0.99),
                            "int8-s8s8": _measured(0.99)}) == "fp32"
    assert quantize.choose({"fp32": fp32, "int8-u8s8-rr": _measured(0.99),
                            "int8-weights": _measured(0.99)}) == "int8-weights"


def test_weights_only_keeps_int8_weights_and_drops_every_activation_quantizer(
        tmp_path: Path) -> None:
    import onnx

    m = tiny_model()
    qdq = m.checkpoint.parent / "export" / "tiny.int8-u8s8.onnx"
    out = quantize.weights_only(qdq, tmp_path / "wo.onnx")
    graph = onnx.load(str(out)).graph
    consts = {i.name: i for i in graph.initializer}
    assert quantize.integer_ops(qdq) and not quantize.integer_ops(out)
    assert all(n.input[0] in consts for n in graph.node if n.op_type == "DequantizeLinear")
    assert any(consts[n.input[0]].data_type == onnx.TensorProto.INT8
               for n in graph.node if n.op_type == "DequantizeLinear")
    x = _inputs(4)
    ref = export.run_session(export.onnx_session(out, optimize=False), x)["probability"]
    fast = export.run_session(export.onnx_session(out, fuse_int8=True), x)["probability"]
    np.testing.assert_allclose(fast, ref, atol=1e-5)


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
