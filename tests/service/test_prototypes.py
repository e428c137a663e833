"""The daemon with few-shot prototypes: each scored image gets its nearest class and distance,
stored, shown and served, and the tier is exactly what it is without them. Real daemon, real
DICOM association, real onnxruntime, real SQLite migrated by Alembic."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import select

from tests import synth
from tests.conftest import make_config, model_for_tests, send, wait_for
from tests.model_fixtures import synthetic_image, tiny_model
from triage.core.errors import ConfigError
from triage.imaging import prepare
from triage.inference import prototypes as pr
from triage.service.daemon import Daemon, build_daemon
from triage.store.schema import ImageResult, Result, Study

EVIL_CLASS = "opacity <i>&amp;</i>"


def _embedding(dicom: Path) -> np.ndarray:
    """The oracle: the file through the card's chain, embedded by a session of our own."""
    prepare.init(json.loads(tiny_model().card.read_text()))
    x = prepare.prepare(0, str(dicom)).x
    return ort.InferenceSession(str(model_for_tests())).run(["embedding"], {"image": x[None]})[0][0]


def _protos(tmp_path: Path, sha: str | None = None,
            near: np.ndarray | None = None) -> tuple[Path, pr.Prototypes]:
    """Two classes; with ``near``, EVIL_CLASS's prototype is a blend of it and noise."""
    card = json.loads(tiny_model().card.read_text())
    rng = np.random.default_rng(3)
    dim = ort.InferenceSession(str(model_for_tests())).get_outputs()[3].shape[-1]
    evil = rng.random((2, dim)) if near is None else near + 0.05 * rng.random((1, dim)) * near.max()
    p = pr.build({"clear": rng.random((2, dim)), EVIL_CLASS: evil},
                 card["name"], sha if sha is not None else card["sha256"])
    return pr.write(p, tmp_path / "protos.json"), p


def _score_one(d: Daemon, ds: object) -> tuple[Result, list[ImageResult]]:
    assert send(d.dicom_port, [ds]) == [0]
    uid = ds.StudyInstanceUID  # type: ignore[attr-defined]

    def result() -> tuple[Result, list[ImageResult]] | None:
        with d.store.read() as s:
            sid = s.scalar(select(Study.id).where(Study.study_uid == uid))
            res = s.scalar(select(Result).where(Result.study_id == sid))
            if res is None:
                return None
            return res, list(s.scalars(select(ImageResult).where(ImageResult.result_id == res.id)))

    return wait_for(result, timeout=90)


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def test_prototype_finding_is_stored_shown_and_never_changes_the_tier(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    px = synthetic_image(1, 41)
    ds = synth.make_dataset(synth.SynthSpec(rows=160, columns=160, bits_stored=8), pixels=px)
    dicom = synth.write(ds, tmp_path / "x.dcm")
    e = _embedding(dicom)
    path, protos = _protos(tmp_path, near=e[None])
    # Thresholds either side of nothing in particular: the same image must land in the same
    # tier with and without prototypes, whatever its score.
    plain = daemon_factory(tmp_path / "plain")
    res0, [im0] = _score_one(plain, ds)
    with_p = daemon_factory(tmp_path / "with", **{"model.prototypes": str(path)})
    res1, [im1] = _score_one(with_p, ds)
    assert (res1.probability, res1.tier, res1.state) == (res0.probability, res0.tier, res0.state)
    assert im1.probability == im0.probability
    assert (im0.prototype_class, im0.prototype_distance) == (None, None)
    e = e / np.linalg.norm(e)
    dist = {c: float(np.linalg.norm(e - v)) for c, v in zip(protos.classes, protos.vectors, strict=True)}
    assert im1.prototype_class == EVIL_CLASS == min(dist, key=dist.__getitem__)
    assert im1.prototype_distance == pytest.approx(dist[EVIL_CLASS], abs=1e-4)
    # Shown on the study page (escaped) and in the JSON API.
    status, body = _get(with_p.web_port, f"/api/study/{res1.study_id}")
    assert status == 200
    doc = json.loads(body)
    assert doc["tier"] == res1.tier
    assert doc["images"][0]["prototype"] == {"class": im1.prototype_class,
                                             "distance": round(im1.prototype_distance, 4)}
    status, html = _get(with_p.web_port, f"/study/{res1.study_id}")
    text = html.decode()
    assert status == 200 and 'data-testid="prototype"' in text and "never changes the tier" in text
    assert "<i>" not in text and "opacity &lt;i&gt;&amp;amp;&lt;/i&gt;" in text
    status, plain_html = _get(plain.web_port, f"/study/{res0.study_id}")
    assert 'data-testid="prototype"' not in plain_html.decode()
    assert _get(with_p.web_port, "/api/study/999")[0] == 404


def test_a_bad_or_foreign_prototype_file_stops_the_start_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"prototype file {missing}: cannot read"):
        build_daemon(make_config(tmp_path / "a", **{"model.prototypes": str(missing)}))
    foreign, _ = _protos(tmp_path, sha="1" * 64)
    with pytest.raises(ConfigError, match=f"prototype file {foreign} was made with model sha256 "
                                          "111111111111"):
        build_daemon(make_config(tmp_path / "b", **{"model.prototypes": str(foreign)}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing created
