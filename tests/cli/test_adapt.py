"""`triage adapt` builds prototypes from a support folder; `triage score --prototypes` adds the
nearest one. Real onnxruntime on the tiny model; the oracle embeds with its own session."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests import synth
from tests.model_fixtures import synthetic_image, tiny_model
from triage.cli import main
from triage.imaging import prepare


def _support(root: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {"clear": [], "opacity": []}
    for i in range(3):
        for cls, label in (("clear", 0), ("opacity", 1)):
            p = root / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_image(label, 500 + i)).save(p)
            files[cls].append(p)
    dcm = synth.write(synth.make_dataset(synth.SynthSpec(rows=160, columns=160), pixels=synthetic_image(1, 77)),
                      root / "opacity" / "series" / "x.dcm")
    files["opacity"].append(dcm)
    (root / "opacity" / "notes.dcm").write_bytes(b"not an image")  # skipped with a warning
    (root / ".hidden").mkdir()
    return files


def _embed(paths: list[Path]) -> np.ndarray:
    """The oracle: the card's chain, then the model's embedding from a session of its own."""
    m = tiny_model()
    prepare.init(json.loads(m.card.read_text()))
    xs = np.stack([prepare.prepare(0, str(p)).x for p in paths])
    sess = ort.InferenceSession(str(m.onnx), providers=["CPUExecutionProvider"])
    return sess.run(["embedding"], {"image": xs})[0].astype(np.float64)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def test_adapt_then_score_with_prototypes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny_model()
    files = _support(tmp_path / "support")
    out = tmp_path / "protos.json"
    assert main(["adapt", "--model", str(m.onnx), "--support", str(tmp_path / "support"),
                 "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    card = json.loads(m.card.read_text())
    assert doc["model"]["sha256"] == card["sha256"] and "embedding" in doc["embedding"]["source"]
    assert [(c["name"], c["shots"]) for c in doc["classes"]] == [("clear", 3), ("opacity", 4)]
    protos = {}
    for c in doc["classes"]:
        want = _unit(_unit(_embed(files[c["name"]])).mean(axis=0))
        np.testing.assert_allclose(c["prototype"], want, atol=1e-5)
        assert c["support_sha256"] == [hashlib.sha256(p.read_bytes()).hexdigest()
                                       for p in files[c["name"]]]
        protos[c["name"]] = np.asarray(c["prototype"])
    queries = []
    for i, label in enumerate((0, 1, 1)):
        q = tmp_path / "q" / f"q{i}.png"
        q.parent.mkdir(exist_ok=True)
        Image.fromarray(synthetic_image(label, 900 + i)).save(q)
        queries.append(q)
    capsys.readouterr()
    assert main(["score", "--json", "--no-guard", "--model", str(m.onnx), str(tmp_path / "q")]) == 0
    plain = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert main(["score", "--json", "--no-guard", "--model", str(m.onnx), "--prototypes", str(out),
                 str(tmp_path / "q")]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    emb = _unit(_embed(queries))
    for row, before, e in zip(rows, plain, emb, strict=True):
        d = {c: float(np.linalg.norm(e - v)) for c, v in protos.items()}
        assert row["prototype"]["class"] == min(d, key=d.__getitem__)
        assert row["prototype"]["distance"] == pytest.approx(min(d.values()), abs=1e-3)
        # The finding sits beside the score: probability and tier are as without it.
        assert (row["probability"], row["tier"]) == (before["probability"], before["tier"])
        assert "prototype" not in before


def test_adapt_and_score_refuse_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny_model()
    (tmp_path / "one" / "only").mkdir(parents=True)
    assert main(["adapt", "--model", str(m.onnx), "--support", str(tmp_path / "one"),
                 "--out", str(tmp_path / "p.json")]) == 2
    assert "two or more" in capsys.readouterr().err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "triage-prototypes", "version": 1,
                                 "model": {"name": "x", "sha256": "0" * 64},
                                 "classes": [{"name": "a", "shots": 1, "prototype": [1.0, 0.0]},
                                             {"name": "b", "shots": 1, "prototype": [0.0, 1.0]}]}))
    png = tmp_path / "x.png"
    Image.fromarray(synthetic_image(0, 1)).save(png)
    assert main(["score", "--no-guard", "--model", str(m.onnx), "--prototypes", str(other),
                 str(png)]) == 2
    err = capsys.readouterr().err
    assert f"prototype file {other} was made with model sha256 000000000000" in err
