"""The daemon with a site profile (``model.site_profile``): refused for another model, applied,
named on every result and on the worklist, and used as the drift reference."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from tests import synth
from tests.conftest import make_config, storescu, wait_for
from triage.core.drift import assess
from triage.core.errors import ConfigError
from triage.core.metrics import score_distribution
from triage.inference.model import OnnxModel
from triage.profile import drift_reference, read_profile, write_profile
from triage.service.daemon import Daemon, build_daemon
from triage.store.schema import Result

# Thresholds no phantom's probability can fall outside: every scored study must be "abnormal"
# under this profile whatever the card's own points would have said.
LOW, HIGH = 1e-9, 1.0 - 1e-12


def _profile(path: Path, sha: str, reference: dict[str, Any] | None = None, **extra: Any) -> Path:
    doc: dict[str, Any] = {
        "profile": {"format": 1, "model_sha256": sha, "created": "2026-11-01T08:00:00+00:00",
                    "site": "Ward 7"},
        "site": {"prevalence": 0.2, "labelled_scored": 500},
        "operating_points": [{"name": "abnormal", "threshold": LOW},
                             {"name": "urgent", "threshold": HIGH}],
        **extra,
    }
    if reference is not None:
        doc["reference_scores"] = reference
    write_profile(path, doc)
    return path


def _card_sha(cfg_model_path: str) -> str:
    return str(json.loads(Path(cfg_model_path).with_suffix(".json").read_text())["sha256"])


def test_a_profile_for_another_model_stops_the_daemon_before_anything_is_created(
        tmp_path: Path) -> None:
    prof = _profile(tmp_path / "site.toml", "cd" * 32)
    cfg = make_config(tmp_path / "var", **{"model.site_profile": str(prof)})
    with pytest.raises(ConfigError) as e:
        build_daemon(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "fitted for model cdcdcdcdcdcd" in msg and "re-fit" in msg
    assert not (tmp_path / "var").exists()


def test_a_missing_profile_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "var", **{"model.site_profile": str(tmp_path / "nope.toml")})
    with pytest.raises(ConfigError, match="cannot read it"):
        build_daemon(cfg)


def test_the_daemon_scores_with_the_profile_and_says_so(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    base = make_config(tmp_path / "probe")
    prof = _profile(tmp_path / "site.toml", _card_sha(str(base.model.onnx_path)))
    d = daemon_factory(**{"model.site_profile": str(prof)})
    paths = synth.write_study(tmp_path / "study", n_images=1)
    assert storescu(d.dicom_port, *paths).returncode == 0
    wait_for(lambda: _result(d) is not None, timeout=120)
    res = _result(d)
    assert res is not None and res.probability is not None
    assert res.tier == "abnormal"  # LOW <= p < HIGH under the profile
    assert res.thresholds_source == "site profile Ward 7 of 2026-11-01 (site.toml)"
    d.pages.render_worklist()
    page = (d.pages.out_dir / "worklist.html").read_text()
    assert "from the site profile Ward 7 of 2026-11-01 (site.toml)" in page
    assert json.loads(d.pages.worklist_json.read_text())["thresholds_source"] == res.thresholds_source


def test_without_a_profile_results_name_the_card(daemon_factory: Callable[..., Daemon],
                                                 tmp_path: Path) -> None:
    d = daemon_factory()
    assert d.worker.thresholds == d.worker.model.thresholds
    assert d.worker.thresholds_source.startswith("model card ")
    assert "from the model card" in (d.pages.out_dir / "worklist.html").read_text()


def _result(d: Daemon) -> Result | None:
    with d.store.read() as s:
        return s.scalar(select(Result))


def test_drift_compares_the_site_with_itself(tmp_path: Path, model: OnnxModel) -> None:
    # A site whose scores sit far from the card's validation distribution: against the card
    # the watch alarms; against the site's own profile reference it does not.
    rng = np.random.default_rng(7)
    site = rng.beta(2.0, 6.0, 4000)
    prof = read_profile(_profile(tmp_path / "s.toml", "ab" * 32, score_distribution(site)))
    recent = rng.beta(2.0, 6.0, 300)
    cfg = make_config(tmp_path / "var").drift
    against_card = assess(model.card, list(recent), [], cfg)
    against_site = assess(drift_reference(model.card, prof), list(recent), [], cfg)
    assert against_card.kind != "none" and against_card.p_value is not None
    assert against_card.p_value < cfg.alpha
    assert against_site.kind == "none" and not against_site.alert
    assert drift_reference(model.card, None) is model.card


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    from tests.conftest import model_for_tests

    p = model_for_tests()
    return OnnxModel.load_files(p, p.with_suffix(".json"))


def test_status_names_the_thresholds_in_use(daemon_factory: Callable[..., Daemon],
                                            tmp_path: Path) -> None:
    from triage.service.overview import gather, render

    base = make_config(tmp_path / "probe")
    prof = _profile(tmp_path / "site.toml", _card_sha(str(base.model.onnx_path)))
    d = daemon_factory(**{"model.site_profile": str(prof)})
    assert storescu(d.dicom_port, *synth.write_study(tmp_path / "s", n_images=1)).returncode == 0
    wait_for(lambda: _result(d) is not None, timeout=120)
    text = render(gather(d.cfg))
    assert f"thresholds: site profile {prof}" in text
    assert "last result scored with the site profile Ward 7 of 2026-11-01" in text
