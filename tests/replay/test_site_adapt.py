"""``triage site moments`` / ``site adapt``: a site variant of the model named by a profile,
used by replay and by the daemon, refused when it is not the file the profile names, and kept
by ``site calibrate`` on a replay made with it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from tests import synth
from tests.conftest import send, wait_for
from tests.model_fixtures import tiny_model, write_dataset
from tests.replay.test_replay import archive  # noqa: F401
from tests.replay.test_site import _fake_replay
from triage.cli import main
from triage.core.errors import ConfigError, InputError
from triage.inference.model import OnnxModel, load_adapted
from triage.profile import read_profile
from triage.service.daemon import Daemon
from triage.store.schema import Result


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a copy of the tiny model with its training statistics, a site profile adapting it)."""
    root = tmp_path_factory.mktemp("site-adapt")
    tiny = tiny_model()
    model = root / "models" / "tiny.onnx"
    model.parent.mkdir()
    shutil.copy(tiny.onnx, model)
    shutil.copy(tiny.card, model.with_suffix(".json"))
    assert main(["site", "moments", "--model", str(model), "--manifest", str(tiny.manifest)]) == 0
    _site_images(root / "site", 40)
    profile = root / "profile" / "site.toml"
    profile.parent.mkdir()
    assert main(["site", "adapt", "--no-guard", "--model", str(model), "--images",
                 str(root / "site"), "--out", str(profile), "--site", "Ward 9"]) == 0
    return model, profile


def _site_images(root: Path, n: int) -> None:
    """The test images as another site renders them: a strong gamma and some noise (a linear
    change would be undone by the chain's percentile window)."""
    import numpy as np
    from PIL import Image

    write_dataset(root, n_train=0, n_val=n)
    rng = np.random.default_rng(9)
    for f in root.rglob("*.png"):
        a = np.asarray(Image.open(f).convert("L"), dtype=np.float64) / 255.0
        a = np.clip(a ** 0.35 + rng.normal(0, 0.06, a.shape), 0, 1)
        Image.fromarray((a * 255).astype(np.uint8)).save(f)


def test_adapt_writes_a_variant_named_by_sha256_and_leaves_the_card_model_alone(
        adapted: tuple[Path, Path]) -> None:
    model, profile = adapted
    card = json.loads(model.with_suffix(".json").read_text())
    assert card["channel_moments"]["file"] == "tiny.moments.npz"
    assert (model.parent / "tiny.moments.npz").is_file()
    assert card["sha256"] == json.loads(tiny_model().card.read_text())["sha256"]
    p = read_profile(profile, card["sha256"])
    assert p.adaptation is not None and p.thresholds == {}
    assert p.adaptation.base_sha256 == card["sha256"] != p.adaptation.sha256 == p.model_sha256
    assert p.adaptation.model_path == profile.with_name("site.model.onnx").resolve()
    v = load_adapted(p.adaptation, 1)
    assert v.sha256 == p.adaptation.sha256 and v.card["site_adaptation"]["images"] == 40
    assert v.card["site_adaptation"]["base_model_sha256"] == card["sha256"]
    assert v.card["site_adaptation"]["mean_shift_max_sd"] > 0.2  # the site differed
    assert (profile.stat().st_mode & 0o077) == 0
    with pytest.raises(ConfigError, match="adapts model"):
        read_profile(profile, "ab" * 32)


def test_a_variant_changed_after_adaptation_is_refused(adapted: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    _, profile = adapted
    copy = tmp_path / "p"
    shutil.copytree(profile.parent, copy)
    onnx_file = copy / "site.model.onnx"
    onnx_file.chmod(0o600)
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    p = read_profile(copy / "site.toml")
    assert p.adaptation is not None
    with pytest.raises(InputError, match="not the .* its profile names"):
        load_adapted(p.adaptation, 1)


def test_too_few_site_images_write_nothing(adapted: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = adapted
    write_dataset(tmp_path / "few", n_train=0, n_val=8)
    out = tmp_path / "few.toml"
    assert main(["site", "adapt", "--no-guard", "--model", str(model), "--images",
                 str(tmp_path / "few"), "--out", str(out)]) == 2
    assert not out.exists()


def test_replay_scores_with_the_variant_and_calibrate_keeps_it(
        adapted: tuple[Path, Path], archive: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    model, profile = adapted
    arch, labels = archive
    out = tmp_path / "replay"
    assert main(["replay", str(arch), "--labels", str(labels), "--out", str(out), "--model",
                 str(model), "--site-profile", str(profile), "--no-progress"]) == 0
    p = read_profile(profile)
    assert p.adaptation is not None
    shas = {json.loads(line)["model_sha256"] for line in
            (out / "results.jsonl").read_text().splitlines()}
    assert shas == {p.adaptation.sha256}
    assert json.loads((out / "report.json").read_text())["meta"]["site_profile"] == \
        str(profile.resolve())
    # calibrate on a (larger, synthetic) replay of the variant that names this profile
    fake = _fake_replay(tmp_path / "fake", 300, 400, sha=p.adaptation.sha256)
    report = json.loads((fake / "report.json").read_text())
    report["meta"]["site_profile"] = str(profile)
    (fake / "report.json").write_text(json.dumps(report))
    both = tmp_path / "elsewhere" / "both.toml"
    both.parent.mkdir()
    assert main(["site", "calibrate", str(fake), "--out", str(both),
                 "--card", str(model.with_suffix(".json"))]) == 0
    q = read_profile(both, json.loads(model.with_suffix(".json").read_text())["sha256"])
    assert q.adaptation == p.adaptation and set(q.thresholds) == {"abnormal", "urgent"}


def test_the_daemon_scores_with_the_profile_variant(
        adapted: tuple[Path, Path], daemon_factory: Callable[..., Daemon]) -> None:
    model, profile = adapted
    d = daemon_factory(**{"model.path": str(model), "model.site_profile": str(profile)})
    assert send(d.dicom_port, [synth.make_dataset(synth.SynthSpec(rows=128, columns=128))]) == [0]
    wait_for(lambda: len(_results(d)) == 1, timeout=60)
    p = read_profile(profile)
    assert p.adaptation is not None and _results(d)[0].model_sha256 == p.adaptation.sha256
    assert OnnxModel.load_files(model).sha256 != p.adaptation.sha256


def _results(d: Daemon) -> list[Result]:
    with d.store.read() as s:
        return list(s.scalars(select(Result)))
