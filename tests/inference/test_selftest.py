"""The same image gets the same score on every CPU: the shipped model's sessions, the model
self-test, and what the daemon does when a CPU disagrees (real onnxruntime, a real daemon,
the banner in headless Chromium)."""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import REPO, free_port, model_for_tests
from tests.model_fixtures import synthetic_image
from triage.cli import main
from triage.core.errors import TriageError
from triage.inference import selftest
from triage.inference.model import OnnxModel, onnx_session
from triage.service.daemon import Daemon, build_daemon

SHIPPED = REPO / "models" / "cxr-pneumonia-mnv2.onnx"
# The card's self-test values hold only for these exact inputs (version 1).
PHANTOM_SHA256 = {64: "6567c0f8e104306959daabe528ae2cbf00cb404b6d2eae21ec813762bc6b0eca",
                  144: "2708886ccd5474bdd007526d51e24a69e2ab74857de59a3e5e42c0d92a66bb92"}


def _ort(path: Path, level: Any) -> Any:
    """An onnxruntime session built here, independently of triage's own helper."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.graph_optimization_level = level
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _synthetic_inputs(size: int) -> np.ndarray:
    """The reference inputs, phantom radiographs normalised as the card says, and smooth noise."""
    from PIL import Image

    rads = []
    for seed in range(12):
        img = Image.fromarray(synthetic_image(seed % 2, seed)).resize((size, size))
        rads.append((np.asarray(img, np.float32) / 255.0 - 0.5) / 0.25)
    rng = np.random.default_rng(7)
    noise = [np.clip(np.cumsum(rng.normal(0, 0.2, (size, size)), axis=1) / 4, -2, 2)
             for _ in range(4)]
    extra = np.stack(rads + noise)[:, None].astype(np.float32)
    return np.concatenate([selftest.phantoms(size), extra])


def _tiers(p: np.ndarray, thresholds: dict[str, float | None]) -> np.ndarray:
    return np.sum([p >= t for t in thresholds.values() if t is not None], axis=0)


def test_reference_inputs_are_bit_exact_and_span_the_network_input_range() -> None:
    for size, digest in PHANTOM_SHA256.items():
        x = selftest.phantoms(size)
        assert x.shape == (8, 1, size, size) and x.dtype == np.float32
        assert hashlib.sha256(x.tobytes()).hexdigest() == digest
        assert x.min() == -2.0 and x.max() == 2.0
        assert not x[0].any() and set(np.unique(x[5])) == {-2.0, 2.0}
        assert np.all(np.diff(x[1, 0], axis=1) > 0)  # the horizontal ramp rises
    assert len(selftest.NAMES) == 8


def test_cpu_features_names_the_flags_that_choose_onnxruntime_kernels() -> None:
    text = ("processor\t: 0\nmodel name\t: Example CPU 9000\n"
            "flags\t\t: fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni\n\n"
            "processor\t: 1\nmodel name\t: Example CPU 9000\nflags\t\t: fpu\n")
    f = selftest.cpu_features(text)
    assert f["model"] == "Example CPU 9000"
    assert f["flags"] == ["avx2", "avx512f", "avx512bw", "avx512_vnni"]
    line = selftest.describe(f)
    assert "avx512_vnni" in line and "no avx_vnni" in line and "no amx_int8" in line
    assert "no avx512_vnni" in selftest.describe(selftest.cpu_features("flags : avx2\n"))
    assert selftest.cpu_features("")["flags"] == []


@pytest.mark.skipif(not SHIPPED.exists(), reason="the shipped model is not in this checkout")
def test_the_shipped_model_runs_no_integer_kernel_and_every_session_agrees() -> None:
    graph = onnx.load(str(SHIPPED)).graph
    consts = {i.name for i in graph.initializer}
    # Only weights are int8: no activation is quantized, so onnxruntime has nothing to fuse
    # into an integer kernel on any CPU.
    assert not [n for n in graph.node if n.op_type == "QuantizeLinear"
                and n.input[0] not in consts]
    assert any(n.op_type == "DequantizeLinear" for n in graph.node)
    card = json.loads(SHIPPED.with_suffix(".json").read_text())
    x = _synthetic_inputs(int(card["input"]["size"]))
    ref = _ort(SHIPPED, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(["probability"],
                                                                       {"image": x})[0]
    default = _ort(SHIPPED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(["probability"],
                                                                          {"image": x})[0]
    model = OnnxModel.load_files(SHIPPED)
    daemon, _ = model.predict(x)
    thr = model.thresholds
    for p in (default, daemon):
        assert np.abs(p - ref).max() <= 0.01
        assert np.array_equal(_tiers(p, thr), _tiers(ref, thr))
    assert card["precision"] == "int8-weights" and card["variants"][card["precision"]][
        "agreement"]["tier_changes"] == 0
    assert set(card["cpu"]) >= {"model", "flags"}


def _saturating_model(path: Path) -> Path:
    """A QDQ convolution whose uint8 x int8 products overflow 16-bit pair sums (2*255*127)."""
    w = np.full((16, 32, 3, 3), 0.5, np.float32)
    conv = helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1])
    graph = helper.make_graph([conv], "sat", [helper.make_tensor_value_info(
        "image", TensorProto.FLOAT, [None, 32, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [None, 16, 8, 8])], [numpy_helper.from_array(w, "w")])
    fp32 = path.with_suffix(".fp32.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(fp32))
    from triage.training.quantize import quantize

    calib = np.random.default_rng(0).uniform(0, 1, (16, 32, 8, 8)).astype(np.float32)
    calib[0] = 1.0  # so the calibrated output range reaches the all-ones input's
    return quantize(fp32, path, calib, "int8-u8s8")


def test_the_daemon_session_scores_a_saturating_int8_model_as_its_reference(
        tmp_path: Path) -> None:
    """On CPUs without VNNI onnxruntime's fused U8S8 kernel clips these sums (docs/model.md
    measured 0.66 on the old shipped model); the daemon's session must not fuse at all."""
    path = _saturating_model(tmp_path / "sat.onnx")
    x = np.ones((1, 32, 8, 8), np.float32)  # every activation quantizes to 255
    ref = _ort(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(["y"], {"image": x})[0]
    daemon = onnx_session(path, 2).run(["y"], {"image": x})[0]
    # An independent float oracle: the centre pixel sums 32 channels x 9 taps of 0.5 * 1.0.
    assert ref[0, :, 4, 4] == pytest.approx(144.0, rel=0.02)
    assert np.abs(daemon - ref).max() <= 1e-3 * np.abs(ref).max()


def test_selftest_passes_on_the_shipped_model_and_the_cli_reports_the_cpu(
        capsys: pytest.CaptureFixture[str]) -> None:
    if not SHIPPED.exists():
        pytest.skip("the shipped model is not in this checkout")
    assert main(["selftest", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["reference"] == "model card" and out["n"] == 8
    assert out["max_probability_diff"] <= 0.01 and isinstance(out["cpu"]["flags"], list)


def _copy_model(tmp: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    src = model_for_tests()
    dst = tmp / "model" / src.name
    dst.parent.mkdir(parents=True)
    shutil.copyfile(src, dst)
    card = json.loads(src.with_suffix(".json").read_text())
    change(card)
    dst.with_suffix(".json").write_text(json.dumps(card))
    return dst


def _tamper(card: dict[str, Any]) -> None:
    """What a CPU that scores differently looks like from the daemon's side."""
    card["selftest"]["probability"] = [min(1.0, p + 0.2) if p < 0.5 else p - 0.2
                                       for p in card["selftest"]["probability"]]


def test_selftest_compares_with_the_card_or_without_one_with_the_unoptimised_session(
        tmp_path: Path) -> None:
    tiny = OnnxModel.load_files(model_for_tests())
    assert "selftest" in tiny.card and tiny.card["selftest"]["session"] == "ORT_DISABLE_ALL"
    r = selftest.check(tiny.session, tiny.card, tiny.path)
    assert r.ok and r.reference == "model card" and r.max_probability_diff <= 1e-4
    bare = _copy_model(tmp_path / "a", lambda c: c.pop("selftest"))
    m = OnnxModel.load_files(bare)
    r = selftest.check(m.session, m.card, m.path)
    assert r.ok and r.reference == "unoptimised session"
    bad = OnnxModel.load_files(_copy_model(tmp_path / "b", _tamper))
    r = selftest.check(bad.session, bad.card, bad.path)
    assert not r.ok and r.max_probability_diff == pytest.approx(0.2, abs=1e-3)
    assert "does NOT agree" in r.message and "avx2" in r.message
    with pytest.raises(TriageError, match="version"):
        old = OnnxModel.load_files(_copy_model(tmp_path / "c", lambda c: c["selftest"].update(
            version=99)))
        selftest.check(old.session, old.card, old.path)


def test_a_cpu_mismatch_stops_serve_with_one_line_naming_the_cpu(tmp_path: Path) -> None:
    model = _copy_model(tmp_path, _tamper)
    data = tmp_path / "var"
    cfg = tmp_path / "site.toml"
    cfg.write_text(f'[dicom]\nport = {free_port()}\n[web]\nport = {free_port()}\n'
                   f'[storage]\ndata_dir = "{data}"\n[model]\npath = "{model}"\n'
                   '[guard]\npath = ""\n')
    proc = subprocess.run([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.startswith("triage serve:")]
    assert len(err) == 1, proc.stderr
    assert "does NOT agree" in err[0] and "avx2" in err[0] and "allow_cpu_mismatch" in err[0]
    assert not data.exists()  # refused before anything was created
    assert main(["selftest", "--model", str(model)]) == 1


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    out = (r.status, r.read())
    conn.close()
    return out


def test_allow_cpu_mismatch_runs_and_warns_on_the_banner_and_in_healthz(
        tmp_path: Path, daemon_factory: Callable[..., Daemon]) -> None:
    model = _copy_model(tmp_path, _tamper)
    from tests.conftest import make_config

    with pytest.raises(TriageError, match="refusing to start"):
        build_daemon(make_config(tmp_path / "refused", **{"model.path": str(model)}))
    d = daemon_factory(**{"model.path": str(model), "model.allow_cpu_mismatch": True})
    code, body = _get(d.web_port, "/healthz")
    detail = json.loads(body)
    assert code == 200 and detail["status"] == "ok"
    assert len(detail["warnings"]) == 1 and "does NOT agree" in detail["warnings"][0]
    d.pages.render_worklist()
    from playwright.sync_api import sync_playwright

    from tests.web.test_web import CHROMIUM_ARGS

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                              args=CHROMIUM_ARGS)
        pg = b.new_page()
        pg.goto(f"http://127.0.0.1:{d.web_port}/")
        banner = pg.locator("[data-testid=model-warning]")
        assert banner.count() == 1 and banner.is_visible()
        text = banner.inner_text()
        assert "does NOT agree" in text and "allow_cpu_mismatch" in text
        b.close()
    healthy = daemon_factory(tmp_path / "ok")
    assert "warnings" not in json.loads(_get(healthy.web_port, "/healthz")[1])


# --- shared-data tier -------------------------------------------------------------------------

@pytest.mark.shared
def test_every_validation_image_scores_alike_in_every_session(tmp_path: Path) -> None:
    """The card's val split, made again from its seed, through the model's own chain: the
    daemon's session and onnxruntime's default agree with the reference meaning."""
    from tests.conftest import shared_path
    from triage.training.export import _prepared
    from triage.training.splits import write_split
    from triage.training.train import file_sha256, read_manifest

    data = shared_path("data", "cxr-pediatric-224")
    if not SHIPPED.exists():
        pytest.skip("the shipped model is not in this checkout")
    card = json.loads(SHIPPED.with_suffix(".json").read_text())
    rec = card["split"]
    manifest = tmp_path / "patient-split.csv"
    write_split(data / "manifest.csv", manifest, rec["seed"], rec["fractions"]["val"],
                rec["fractions"]["holdout"])
    assert file_sha256(manifest) == rec["split_manifest_sha256"]
    val = [s for s in read_manifest(manifest, data) if s.split == "val"]
    x, _ = _prepared(val, card, "val")
    assert len(x) == card["validation"]["n"]
    ref = _ort(SHIPPED, ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(["probability"],
                                                                       {"image": x})[0]
    default = _ort(SHIPPED, ort.GraphOptimizationLevel.ORT_ENABLE_ALL).run(["probability"],
                                                                          {"image": x})[0]
    model = OnnxModel.load_files(SHIPPED)
    daemon = np.concatenate([model.predict(x[i:i + 64])[0] for i in range(0, len(x), 64)])
    for p in (default, daemon):
        assert np.abs(p - ref).max() <= 0.01
        assert np.array_equal(_tiers(p, model.thresholds), _tiers(ref, model.thresholds))
