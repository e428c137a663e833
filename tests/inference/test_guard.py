"""The input guard: header population, image population and view, in warn and refuse modes,
through ``triage score``'s path, the daemon and replay.

The guard networks here are real ONNX files run by onnxruntime whose outputs are constants
chosen by the test (P(adult), P(frontal)), so every expected verdict is known in advance.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from sqlalchemy import select

from tests import synth
from tests.conftest import model_for_tests, storescu, wait_for
from triage.cli.score import score_file
from triage.config import GuardConfig
from triage.core.errors import TriageError
from triage.core.gating import format_age, gate_population
from triage.imaging import prepare
from triage.inference.guard import Guard, Population
from triage.inference.model import OnnxModel
from triage.service.daemon import Daemon
from triage.store.schema import ImageResult, Result

SIZE = 32
CHILDREN = Population(0.0, 17.0, "children")


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def write_const_guard(folder: Path, adult: float, frontal: float,
                      thresholds: tuple[float, float] = (0.5, 0.5),
                      ood: tuple[float, float] | None = None,
                      child_header: float | None = None) -> Path:
    """Write an ONNX guard whose outputs are ``adult`` and ``frontal`` for every image, and a
    4-wide embedding of ``ood[0]`` / 4 each; with ``ood`` also an out-of-distribution graph
    (distance = the embedding's sum, so ``ood[0]``) and the card's threshold ``ood[1]``."""
    folder.mkdir(parents=True, exist_ok=True)
    e = 0.0 if ood is None else ood[0] / 4
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], keepdims=0, axes=[1, 2, 3]),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Add", ["z", "a"], ["adult"]),
             helper.make_node("Add", ["z", "f"], ["frontal"]),
             helper.make_node("Unsqueeze", ["z", "ax1"], ["z1"]),
             helper.make_node("Add", ["z1", "e"], ["embedding"])]
    inits = [helper.make_tensor(n, TensorProto.FLOAT, [], [v])
             for n, v in (("zero", 0.0), ("a", adult), ("f", frontal))]
    inits += [helper.make_tensor("ax1", TensorProto.INT64, [1], [1]),
              helper.make_tensor("e", TensorProto.FLOAT, [4], [e] * 4)]
    graph = helper.make_graph(
        nodes, "const-guard",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, SIZE, SIZE])],
        [*(helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch"]) for n in ("adult", "frontal")),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
        inits)
    path = folder / "guard.onnx"
    _save(graph, path)
    card = {"name": "const-guard", "file": path.name, "sha256": "0" * 64,
            "input": {"size": SIZE, "channels": 1},
            "preprocess": json.loads(model_for_tests().with_suffix(".json").read_text())["preprocess"],
            "thresholds": {"adult": thresholds[0], "frontal": thresholds[1]}}
    if child_header is not None:
        card["thresholds"]["adult_child_header"] = child_header
    if ood is not None:
        dist = helper.make_graph(
            [helper.make_node("ReduceSum", ["embedding", "ax1"], ["distance"], keepdims=0)],
            "const-ood",
            [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("distance", TensorProto.FLOAT, ["batch"])],
            [helper.make_tensor("ax1", TensorProto.INT64, [1], [1])])
        _save(dist, folder / "guard.ood.onnx")
        card["out_of_distribution"] = {"file": "guard.ood.onnx", "threshold": ood[1]}
    path.with_suffix(".json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    p = model_for_tests()
    return OnnxModel.load_files(p, p.with_suffix(".json"))


def _guard(cfg: GuardConfig, model: OnnxModel) -> Guard:
    g = Guard.load(cfg, model.card)
    prepare.init(model.card, g.input_card)
    return g


def _file(tmp: Path, name: str, **spec: object) -> Path:
    return synth.write(synth.make_dataset(synth.SynthSpec(**spec)), tmp / f"{name}.dcm")  # type: ignore[arg-type]


# --- pure rules ---------------------------------------------------------------------------------

def test_population_rule_and_ages_in_words() -> None:
    assert gate_population(45.0, 0, 17, "children") == \
        "outside the model's population: 45 y (model: children)"
    assert gate_population(17.9, 0, 17, "children") is None  # 17 years and some months
    assert gate_population(None, 0, 17, "children") is None
    assert gate_population(0.5, 1, 5, "children aged 1 to 5") is not None
    assert (format_age(45.2), format_age(1.5), format_age(0.02)) == ("45 y", "18 mo", "7 d")


def test_population_comes_from_the_card_with_the_shipped_default() -> None:
    assert Population.of({}) == CHILDREN
    assert Population.of({"population": {"label": "adults", "age_years": [18, 120]}}) == \
        Population(18.0, 120.0, "adults")


# --- the header check -------------------------------------------------------------------------

def test_an_adult_age_in_the_header_is_refused_in_words(tmp_path: Path, model: OnnxModel) -> None:
    g = _guard(GuardConfig(path=""), model)
    r = score_file(_file(tmp_path, "a", patient_age="045Y"), model, guard=g)
    assert (r.probability, r.tier) == (None, "unscored")
    assert r.reason == "outside the model's population: 45 y (model: children)"
    child = score_file(_file(tmp_path, "c", patient_age="004Y"), model, guard=g)
    assert child.probability is not None and child.reason is None


def test_birth_date_and_study_date_give_the_age(tmp_path: Path, model: OnnxModel) -> None:
    g = _guard(GuardConfig(path=""), model)
    ds = synth.make_dataset(synth.SynthSpec())
    ds.PatientBirthDate, ds.StudyDate = "19700301", "20260302"
    r = score_file(synth.write(ds, tmp_path / "b.dcm"), model, guard=g)
    assert r.reason == "outside the model's population: 56 y (model: children)"


def test_warn_scores_and_says_so_and_off_says_nothing(tmp_path: Path, model: OnnxModel) -> None:
    f = _file(tmp_path, "a", patient_age="045Y")
    warned = score_file(f, model, guard=_guard(GuardConfig(path="", population_header="warn"), model))
    assert warned.probability is not None
    assert warned.reason == "scored although outside the model's population: 45 y (model: children)"
    off = score_file(f, model, guard=_guard(GuardConfig(path="", population_header="off"), model))
    assert off.probability is not None and off.reason is None


# --- the image checks ---------------------------------------------------------------------------

def test_an_adult_looking_image_is_refused_with_or_against_the_header(tmp_path: Path,
                                                                      model: OnnxModel) -> None:
    path = write_const_guard(tmp_path / "g", adult=0.9, frontal=0.99)
    g = _guard(GuardConfig(path=str(path)), model)
    no_age = score_file(_file(tmp_path, "n"), model, guard=g)
    assert no_age.probability is None
    assert no_age.reason == ("looks like an adult's radiograph (no age in the header; "
                             "model: children; input guard, P(adult) 0.90)")
    said_child = score_file(_file(tmp_path, "c", patient_age="004Y"), model, guard=g)
    assert said_child.reason is not None and "header says 4 y" in said_child.reason
    off = _guard(GuardConfig(path=str(path), population_from_image="off"), model)
    assert score_file(_file(tmp_path, "o"), model, guard=off).probability is not None


@pytest.mark.parametrize("age, header, ood, refused", [
    ("004Y", "refuse", True, False),   # a child's age: overruled only above adult_child_header
    (None, "refuse", True, True),      # no age: the plain threshold
    ("004Y", "refuse", False, True),   # no out-of-distribution check: its guarantee is gone
    ("004Y", "off", True, True),       # the header is not trusted: the plain threshold
    ("045Y", "warn", True, True),      # an adult's age: refused as an adult's by the image
])
def test_a_header_that_gives_a_child_age_needs_stronger_evidence(
        tmp_path: Path, model: OnnxModel, age: str | None, header: str, ood: bool,
        refused: bool) -> None:
    path = write_const_guard(tmp_path / "g", adult=0.8, frontal=0.99, ood=(1.0, 5.0),
                             child_header=0.9)
    g = _guard(GuardConfig(path=str(path), population_header=header,
                           out_of_distribution="refuse" if ood else "off"), model)
    assert (g.adult_t, g.adult_child_t) == (0.5, 0.9)
    r = score_file(_file(tmp_path, "a", patient_age=age), model, guard=g)
    assert (r.probability is None) == refused
    if refused:
        assert r.reason is not None and "looks like an adult's radiograph" in r.reason
        assert "P(adult) 0.80" in r.reason
    else:
        assert r.reason is None
    # the threshold never falls below the plain one, whatever the card says
    low = write_const_guard(tmp_path / "low", adult=0.8, frontal=0.99, ood=(1.0, 5.0),
                            child_header=0.2)
    assert _guard(GuardConfig(path=str(low)), model).adult_child_t == 0.5


def test_a_child_looking_image_passes(tmp_path: Path, model: OnnxModel) -> None:
    path = write_const_guard(tmp_path / "g", adult=0.1, frontal=0.99)
    g = _guard(GuardConfig(path=str(path)), model)
    r = score_file(_file(tmp_path, "n", view_position=None), model, guard=g)
    assert r.probability is not None and r.reason is None


@pytest.mark.parametrize("view, mode, refused", [
    (None, "when_absent", True), ("PA", "when_absent", False), ("AP", "always", True),
    (None, "off", False)])
def test_view_from_the_image(tmp_path: Path, model: OnnxModel, view: str | None, mode: str,
                             refused: bool) -> None:
    path = write_const_guard(tmp_path / "g", adult=0.1, frontal=0.2)
    g = _guard(GuardConfig(path=str(path), view_from_image=mode), model)
    r = score_file(_file(tmp_path, "v", view_position=view), model, guard=g)
    assert (r.probability is None) == refused
    if refused:
        assert r.reason == "does not look like a frontal chest radiograph (input guard, P(frontal) 0.20)"


@pytest.mark.parametrize("distance, limit, mode, refused", [
    (4.0, 3.0, "refuse", True), (4.0, 5.0, "refuse", False), (4.0, 3.0, "off", False),
    (4.0, 3.0, "warn", False)])
def test_out_of_distribution(tmp_path: Path, model: OnnxModel, distance: float, limit: float,
                             mode: str, refused: bool) -> None:
    path = write_const_guard(tmp_path / "g", adult=0.1, frontal=0.99, ood=(distance, limit))
    g = _guard(GuardConfig(path=str(path), out_of_distribution=mode), model)
    assert (g.ood_session is None) == (mode == "off")
    r = score_file(_file(tmp_path, "o"), model, guard=g)
    assert (r.probability is None) == refused
    expected = "unlike the radiographs the model learned from (input guard, distance 4.0, limit 3.0)"
    if refused:
        assert r.reason == expected
    elif mode == "warn":
        assert r.reason == f"scored although {expected}"
    else:
        assert r.reason is None


def test_a_missing_guard_file_is_a_clear_error(tmp_path: Path, model: OnnxModel) -> None:
    with pytest.raises(TriageError, match="guard.path") as e:
        Guard.load(GuardConfig(path=str(tmp_path / "nope.onnx")), model.card)
    assert "\n" not in str(e.value)


def test_guard_scores_are_batched_like_one_by_one(tmp_path: Path, model: OnnxModel) -> None:
    g = Guard.load(GuardConfig(path=str(write_const_guard(tmp_path / "g", 0.3, 0.7))), model.card)
    g.batch_size = 3
    pa, pf, d = g.scores(np.zeros((7, 1, SIZE, SIZE), np.float32))
    assert pa.shape == pf.shape == d.shape == (7,) and np.allclose(pa, 0.3) and np.allclose(pf, 0.7)


# --- the daemon: refused studies are recorded, shown and keep their place ------------------------

def test_the_daemon_records_refusals_per_image_and_keeps_the_study_in_routine(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    path = write_const_guard(tmp_path / "g", adult=0.1, frontal=0.99)
    d = daemon_factory(**{"guard.path": str(path)})
    adult = synth.write_study(tmp_path / "adult", n_images=1,
                              spec=synth.SynthSpec(patient_age="045Y", accession_number="ACC-ADULT"))
    child = synth.write_study(tmp_path / "child", n_images=1,
                              spec=synth.SynthSpec(patient_age="004Y", accession_number="ACC-CHILD"))
    assert storescu(d.dicom_port, *adult).returncode == 0
    assert storescu(d.dicom_port, *child).returncode == 0

    def results() -> list[Result]:
        with d.store.read() as s:
            return list(s.scalars(select(Result)))
    wait_for(lambda: len(results()) == 2, timeout=120)
    with d.store.read() as s:
        rows = {r.reason: r.probability for r in s.scalars(select(ImageResult))}
    assert rows.get("outside the model's population: 45 y (model: children)", 1.0) is None
    assert None in rows and rows[None] is not None  # the child's image was scored
    d.pages.render_worklist()
    doc = json.loads(d.pages.worklist_json.read_text())
    by_acc = {r["accession_number"]: r for r in doc["studies"]}
    assert by_acc["ACC-ADULT"]["tier"] == "unscored" and by_acc["ACC-ADULT"]["band"] == "routine"
    html = d.pages.worklist_html.read_text()
    assert "outside the model&#39;s population: 45 y (model: children)" in html


def test_replay_applies_the_same_guard(tmp_path: Path, model: OnnxModel) -> None:
    from triage.replay.archive import scan_archive
    from triage.replay.scorers import InProcessScorer

    arch = tmp_path / "archive"
    synth.write_study(arch / "adult", spec=synth.SynthSpec(patient_age="045Y"))
    synth.write_study(arch / "noview", spec=synth.SynthSpec(view_position=None))
    synth.write_study(arch / "child", spec=synth.SynthSpec(patient_age="003Y"))
    studies, _ = scan_archive(arch)
    g = Guard.load(GuardConfig(path=str(write_const_guard(tmp_path / "g", 0.1, 0.2))), model.card)
    with InProcessScorer(model, dict(model.thresholds), 1, 4, g) as scorer:
        records = scorer.score(studies)
    reasons = sorted(r.images[0]["reason"] or "scored" for r in records)
    assert reasons == ["does not look like a frontal chest radiograph (input guard, P(frontal) 0.20)",
                       "outside the model's population: 45 y (model: children)", "scored"]
    assert sorted(r.state for r in records) == ["scored", "unscored", "unscored"]
