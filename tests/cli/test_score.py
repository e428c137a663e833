"""`triage score`: files and directories, JSON lines, unscored reasons, exit status."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from tests import synth
from tests.model_fixtures import synthetic_image, tiny_model
from triage.cli import main
from triage.cli.score import FileScore, score_file
from triage.imaging import prepare


class FixedModel:
    """A scorer that returns a fixed probability, for testing the file path without ONNX."""

    thresholds: ClassVar[dict[str, float]] = {"abnormal": 0.3, "urgent": 0.8}

    def __init__(self, p: float) -> None:
        self.p = p
        self.card = json.loads(tiny_model().card.read_text())

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, None]:
        return np.full(len(batch), self.p), None


@pytest.mark.parametrize(("p", "tier"), [(0.1, "routine"), (0.5, "abnormal"), (0.9, "urgent")])
def test_score_file_with_a_fixed_model(tmp_path: Path, p: float, tier: str) -> None:
    model = FixedModel(p)
    prepare.init(model.card)
    path = synth.write(synth.make_dataset(synth.SynthSpec()), tmp_path / "f.dcm")
    assert score_file(path, model) == FileScore(str(path), p, tier, None)


def test_score_file_turns_failures_into_reasons(tmp_path: Path) -> None:
    model = FixedModel(0.5)
    prepare.init(model.card)
    (tmp_path / "broken.dcm").write_bytes(b"DICM" * 10)
    r = score_file(tmp_path / "broken.dcm", model)
    assert r.probability is None and r.tier == "unscored" and r.reason


def _inputs(root: Path) -> dict[str, str | None]:
    """Write one input of each kind; return name -> expected reason prefix (None = scored)."""
    synth.write(synth.make_dataset(synth.SynthSpec()), root / "dir" / "frontal.dcm")
    synth.write(synth.make_dataset(synth.SynthSpec(view_position="LL")), root / "dir" / "lateral.dcm")
    synth.write(synth.make_dataset(synth.SynthSpec(modality="CT")), root / "dir" / "ct.dcm")
    synth.write(synth.make_dataset(synth.SynthSpec(rows=16, columns=16)), root / "dir" / "tiny.dcm")
    (root / "dir" / "garbage.dcm").write_bytes(b"\x00\x01" * 50)
    Image.fromarray(synthetic_image(1, 3, 200)).save(root / "cxr.png")
    return {"frontal.dcm": None, "lateral.dcm": "lateral view", "ct.dcm": "modality CT",
            "tiny.dcm": "image too small", "garbage.dcm": "not a readable DICOM file",
            "cxr.png": None}


def test_score_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny_model()
    expected = _inputs(tmp_path)
    # The tiny test model with the guard off: these are the CLI's mechanics (tests/inference/
    # test_guard.py tests the guard through the same score_file).
    rc = main(["score", "--json", "--no-guard", "--model", str(m.onnx), str(tmp_path / "dir"),
               str(tmp_path / "cxr.png")])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(expected)
    for row in rows:
        assert set(row) >= {"path", "probability", "tier", "reason"}
        want = expected[Path(row["path"]).name]
        if want is None:
            assert 0 <= row["probability"] <= 1 and row["reason"] is None
            assert row["tier"] in {"routine", "abnormal", "urgent"}
        else:
            assert row["probability"] is None and row["tier"] == "unscored"
            assert row["reason"].startswith(want), row


def test_score_cli_text_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = tiny_model()
    _inputs(tmp_path)
    rc = main(["score", "--no-guard", "--model", str(m.onnx), str(tmp_path / "cxr.png"),
               str(tmp_path / "nope.dcm")])
    out = capsys.readouterr()
    assert rc == 1 and "cxr.png" in out.out and "nope.dcm" in out.err


def test_score_cli_bad_model_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.onnx").write_bytes(b"nope")
    rc = main(["score", "--model", str(tmp_path / "m.onnx"), str(tmp_path)])
    assert rc == 2 and "cannot load model" in capsys.readouterr().err
