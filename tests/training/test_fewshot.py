"""`triage benchmark --few-shot`: episodes never share a patient between support and query, the
statistics are right, and a seconds-long run on synthetic patients writes its section and JSON."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.conftest import shared_path
from tests.model_fixtures import synthetic_image, tiny_model
from triage.cli import main
from triage.core.errors import InputError
from triage.training import fewshot
from triage.training.splits import write_split
from triage.training.train import file_sha256


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(1, 3), min_size=1, max_size=30), min_size=2, max_size=3),
       st.integers(1, 3), st.integers(1, 4), st.integers(0, 2**31))
def test_an_episode_takes_one_image_per_patient_and_no_patient_twice(
        patients_per_class: list[list[int]], k: int, q: int, seed: int) -> None:
    # Class c's patient j has n images; patients are named per class but may collide across
    # classes ("p0" in two classes), which an episode must still keep apart.
    items, classes = [], [f"c{i}" for i in range(len(patients_per_class))]
    for c, counts in zip(classes, patients_per_class, strict=True):
        for j, n in enumerate(counts):
            items += [fewshot.Item(Path(f"{c}-{j}-{m}"), c, f"p{j % 7}", "holdout")
                      for m in range(n)]
    pool = fewshot.by_class_and_patient(items, "holdout", classes)
    rng = np.random.default_rng(seed)
    try:
        ep = fewshot.sample_episode(rng, pool, classes, k, q)
    except InputError:
        return  # too few distinct patients for this episode: refused, never short-changed
    seen = []
    for c, s, qq in zip(ep.classes, ep.support, ep.query, strict=True):
        assert len(s) == k and len(qq) == q
        assert all(items[i].cls == c for i in (*s, *qq))
        seen += [items[i].patient for i in (*s, *qq)]
    assert len(seen) == len(set(seen))  # one image per patient, none twice in the episode


def test_too_few_patients_is_refused() -> None:
    items = [fewshot.Item(Path(f"{c}{i}"), c, f"{c}{i // 3}", "x") for c in "ab" for i in range(9)]
    pool = fewshot.by_class_and_patient(items, None, ["a", "b"])  # 3 patients per class
    with pytest.raises(InputError, match="has 3 patients; an episode needs 4"):
        fewshot.sample_episode(np.random.default_rng(0), pool, ["a", "b"], 2, 2)


def test_episode_accuracy_and_the_t_interval_by_hand() -> None:
    emb = np.array([[1, 0], [1, 0.1], [0, 1], [0.1, 1], [1, 0.2], [0.2, 1], [0.9, 1]], float)
    ep = fewshot.Episode(("a", "b"), ((0, 1), (2, 3)), ((4, 6), (5,)))
    # Query 4 -> a (right), 6 -> nearer b's (0.7, 0.7)-ish prototype (wrong), 5 -> b (right).
    assert fewshot.episode_accuracy(emb, ep) == pytest.approx(2 / 3)
    m, lo, hi = fewshot.t_interval([0.5, 0.7, 0.9])
    # mean 0.7, sd 0.2, t(0.975, 2) = 4.302653
    assert m == pytest.approx(0.7) and hi - m == pytest.approx(4.302653 * 0.2 / 3 ** 0.5, rel=1e-5)
    assert m - lo == pytest.approx(hi - m)


def _write_patients(root: Path, per_class: int) -> Path:
    rows = []
    kinds = {"normal": 0, "bacteria": 1, "virus": 2}
    for kind, code in kinds.items():
        for p in range(per_class):
            for m in range(1 + p % 2):
                name = (f"IM-{p:04d}-{m + 1:04d}.png" if kind == "normal"
                        else f"person{p + 1000 * code}_{kind}_{m}.png")
                rel = f"{'NORMAL' if kind == 'normal' else 'PNEUMONIA'}/{name}"
                img = synthetic_image(int(code > 0), 1000 * code + 10 * p + m, 128)
                if code == 2:  # a diffuse pattern for viral, a focal one for bacterial
                    img = np.clip(img.astype(int) + 40 * (np.indices(img.shape).sum(0) % 8 < 2), 0, 255)
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img.astype(np.uint8)).save(root / rel)
                rows.append({"path": rel, "label": int(code > 0), "split": "train", "sha256": ""})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "split", "sha256"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def _write_adult(root: Path, n: int) -> Path:
    rows = []
    for kind in ("normal", "covid"):
        for i in range(n):
            rel = f"{kind}/{kind}-{i}.jpeg"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_image(int(kind == "covid"), 5000 + i, 128)).save(root / rel)
            finding = "COVID-19 pneumonia" if kind == "covid" else "no finding"
            rows.append({"path": rel, "finding": finding, "population": "adult", "split": "val"})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "finding", "population", "split"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def _model_with_split(tmp_path: Path, manifest: Path, seed: int, sha_seed: int) -> Path:
    """The tiny model, its card recording a patient split (its sha from ``sha_seed``)."""
    m = tiny_model()
    onnx = tmp_path / "model" / "m.onnx"
    onnx.parent.mkdir()
    shutil.copy(m.onnx, onnx)
    write_split(manifest, tmp_path / "split.csv", sha_seed)
    card = json.loads(m.card.read_text())
    card["split"] = {"seed": seed, "fractions": {"val": 0.15, "holdout": 0.15},
                     "split_manifest_sha256": file_sha256(tmp_path / "split.csv")}
    onnx.with_suffix(".json").write_text(json.dumps(card))
    return onnx


def test_load_data_keeps_train_and_holdout_patients_apart(tmp_path: Path) -> None:
    manifest = _write_patients(tmp_path / "data", 30)
    card = json.loads(_model_with_split(tmp_path, manifest, 7, 7).with_suffix(".json").read_text())
    data = fewshot.load_data(card, manifest, None, None, fewshot.Budget())
    assert {it.part for it in data.train} == {"train"} and {it.part for it in data.holdout} == {"holdout"}
    assert not {it.patient for it in data.train} & {it.patient for it in data.holdout}
    assert {it.cls for it in data.holdout} == set(fewshot.PAEDIATRIC)
    # The split the card records is checked: another seed is refused.
    card["split"]["seed"] = 8
    with pytest.raises(InputError, match="not the data the model was trained on"):
        fewshot.load_data(card, manifest, None, None, fewshot.Budget())


@pytest.mark.slow
def test_few_shot_cli_writes_its_section_and_json(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = _write_patients(tmp_path / "data", 60)
    adult = _write_adult(tmp_path / "adult", 12)
    onnx = _model_with_split(tmp_path, manifest, 11, 11)
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Architectures\n\nsomeone else's table\n\n## Later\n\nkept\n")
    out = tmp_path / "fewshot.json"
    argv = ["benchmark", "--few-shot", "--manifest", str(manifest), "--adult-manifest", str(adult),
            "--model", str(onnx), "--encoders", "shipped,untrained_mobilenet_v2,squeezenet1_1",
            "--size", "32", "--train-episodes", "2", "--episodes", "6", "--queries", "2",
            "--docs", str(docs), "--json", str(out)]
    monkeypatch.setattr("sys.argv", ["triage", *argv])  # the command the section records
    rc = main(argv)
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [r["encoder"] for r in doc["results"]] == ["shipped", "untrained_mobilenet_v2",
                                                      "squeezenet1_1"]
    for r in doc["results"]:
        assert set(r["tasks"]) == {t.key for t in fewshot.TASKS}
        for t in r["tasks"].values():
            lo, hi = t["ci95"]
            assert 0 <= t["mean"] <= 1 and lo <= t["mean"] <= hi and t["episodes"] == 6
    assert doc["results"][2]["train_seconds"] > 0 and doc["results"][2]["params"] > 0
    text = docs.read_text()
    assert "someone else's table" in text and "## Later\n\nkept" in text
    section = text[text.index("## Few-shot"):]  # appended after the others
    assert "SqueezeNet 1.1, prototypical network" in section and "different hospitals" in section
    assert "--few-shot" in section and "holdout" in section
    # A second run replaces the section in place instead of adding another.
    assert main(["benchmark", "--few-shot", "--manifest", str(manifest), "--model", str(onnx),
                 "--encoders", "shipped", "--episodes", "3", "--queries", "2",
                 "--docs", str(docs), "--json", str(out)]) == 0
    text = docs.read_text()
    assert text.count("## Few-shot") == 1 and "SqueezeNet" not in text and "## Later\n\nkept" in text


@pytest.mark.shared
def test_the_shipped_cards_split_is_made_again_exactly() -> None:
    from triage import resources

    manifest = shared_path("data", "cxr-pediatric-224", "manifest.csv")
    card = json.loads((resources.data_root() / "models" / "cxr-pneumonia-mnv2.json").read_text())
    data = fewshot.load_data(card, manifest, None, None, fewshot.Budget())
    assert data.split_sha256 == card["split"]["split_manifest_sha256"]
    assert len(data.train) == card["split"]["images"]["train"]
    assert len(data.holdout) == card["split"]["images"]["holdout"]
