"""Few-shot prototypes: the maths (with hypothesis), the file, and what the loader refuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from tests.model_fixtures import tiny_model
from triage.core.errors import ConfigError, InputError
from triage.inference import prototypes as pr
from triage.inference.model import OnnxModel
from triage.inference.scoring import ImageScore


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_prototype_is_the_unit_mean_of_unit_embeddings() -> None:
    # Hand-computed: [3, 4] -> [.6, .8]; [0, 2] -> [0, 1]; mean [.3, .9] -> / sqrt(.9).
    p = pr.build({"a": np.array([[3.0, 4.0], [0.0, 2.0]]), "b": np.array([[1.0, 0.0]])},
                 "m", "ab" * 32)
    assert p.classes == ("a", "b") and p.shots == (2, 1)
    np.testing.assert_allclose(p.vectors[0], np.array([0.3, 0.9]) / np.sqrt(0.9), rtol=1e-6)
    np.testing.assert_allclose(p.vectors[1], [1.0, 0.0])
    cls, d = pr.nearest(p, np.array([10.0, 0.1]))
    assert cls == "b" and d == pytest.approx(np.linalg.norm(_unit(np.array([10.0, 0.1]))
                                                            - np.array([1.0, 0.0])), rel=1e-6)


finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float64, (3, 8), elements=finite), arrays(np.float64, (8,), elements=finite))
def test_nearest_is_the_smallest_distance_and_distances_lie_in_0_2(protos: np.ndarray,
                                                                   q: np.ndarray) -> None:
    if np.any(np.linalg.norm(protos, axis=1) < 1e-3) or np.linalg.norm(q) < 1e-3:
        return
    p = pr.build({f"c{i}": protos[i:i + 1] for i in range(3)}, "m", "x")
    cls, d = pr.nearest(p, q)
    brute = [np.linalg.norm(_unit(q) - _unit(protos[i])) for i in range(3)]
    assert d == pytest.approx(min(brute), abs=1e-5)
    assert brute[int(cls[1:])] == pytest.approx(min(brute), abs=1e-5)
    assert -1e-6 <= d <= 2 + 1e-6
    # A prototype's own direction is at distance 0 from it (and so it is a nearest one).
    assert pr.distances(p, protos[1] * 3.0)[0, 1] == pytest.approx(0.0, abs=1e-5)
    assert pr.nearest(p, protos[1] * 3.0)[1] == pytest.approx(0.0, abs=1e-5)


def test_annotate_sets_only_the_finding() -> None:
    p = pr.build({"a": np.array([[1.0, 0.0]]), "b": np.array([[0.0, 1.0]])}, "m", "x")
    scores = {1: ImageScore(0.93, None, np.array([0.1, 2.0])), 2: ImageScore(0.2)}
    out = pr.annotate(p, scores)
    assert out[1].probability == 0.93 and out[1].prototype == ("b", pytest.approx(
        np.linalg.norm(_unit(np.array([0.1, 2.0])) - [0.0, 1.0])))
    assert out[2] == scores[2]  # no embedding (unscored): no finding
    assert pr.annotate(None, scores) == scores
    assert pr.columns(out[2]) == {"prototype_class": None, "prototype_distance": None}
    assert pr.columns(out[1])["prototype_class"] == "b"


@pytest.mark.parametrize("bad", [{"a": np.ones((1, 2))}, {"a": np.ones((1, 2)), "": np.ones((1, 2))},
                                 {"a": np.ones((1, 2)), ".b": np.ones((1, 2))},
                                 {"a": np.ones((1, 2)), "b": np.zeros((0, 2))}])
def test_build_refuses_unusable_support_sets(bad: dict[str, np.ndarray]) -> None:
    with pytest.raises(InputError):
        pr.build(bad, "m", "x")


def test_file_round_trip_and_refusals(tmp_path: Path) -> None:
    p = pr.build({"normal": np.array([[1.0, 2.0, 0.0]]), "virus": np.array([[0.0, 1.0, 5.0]] * 2)},
                 "m", "f" * 64, {"normal": ["aa"], "virus": ["bb", "cc"]})
    path = pr.write(p, tmp_path / "p.json")
    assert path.stat().st_mode & 0o077 == 0  # owner only, like every file triage writes
    back = pr.read(path, "f" * 64, 3)
    assert back.classes == p.classes and back.shots == (1, 2)
    np.testing.assert_allclose(back.vectors, p.vectors, atol=1e-6)
    doc = json.loads(path.read_text())
    assert doc["model"]["sha256"] == "f" * 64 and doc["embedding"]["dim"] == 3
    assert [c["support_sha256"] for c in doc["classes"]] == [["aa"], ["bb", "cc"]]
    with pytest.raises(ConfigError, match=f"{path}.*model sha256 ffffffffffff.*0123456789ab"):
        pr.read(path, "0123456789ab" + "0" * 52)
    with pytest.raises(ConfigError, match="3-wide.*1280"):
        pr.read(path, None, 1280)
    with pytest.raises(ConfigError, match=f"{tmp_path / 'none.json'}: cannot read"):
        pr.read(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        pr.read(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="other.json is not a triage prototype file"):
        pr.read(tmp_path / "other.json")
    doc["classes"][1]["prototype"] = ["x", 1, 2]
    (tmp_path / "damaged.json").write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="damaged.json is damaged"):
        pr.read(tmp_path / "damaged.json")


def test_load_for_checks_the_real_model(tmp_path: Path) -> None:
    m = OnnxModel.load_files(tiny_model().onnx)
    assert m.has_embedding and m.embedding_dim is not None
    good = pr.build({"a": np.eye(m.embedding_dim)[:1], "b": np.eye(m.embedding_dim)[1:2]},
                    m.name, m.sha256)
    assert pr.load_for(pr.write(good, tmp_path / "g.json"), m).classes == ("a", "b")
    other = pr.build({"a": np.eye(m.embedding_dim)[:1], "b": np.eye(m.embedding_dim)[1:2]},
                     m.name, "0" * 64)
    with pytest.raises(ConfigError, match="o.json was made with model sha256 000000000000"):
        pr.load_for(pr.write(other, tmp_path / "o.json"), m)
