"""`triage replay --engine dask`: a real Dask LocalCluster gives the in-process records, resumably."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import synth
from tests.conftest import model_for_tests
from tests.model_fixtures import write_dataset
from tests.replay.test_replay import replay_cfg
from triage.cli import main
from triage.inference.model import OnnxModel
from triage.replay.records import RESULTS_NAME, ResultsFile
from triage.replay.run import Options, run
from triage.replay.synthetic import BuildOptions, build

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """14 built studies (mixed encodings and photometrics) plus a lateral-only one."""
    root = tmp_path_factory.mktemp("dask")
    write_dataset(root / "images", n_train=0, n_val=14)
    arch = root / "archive"
    labels = build(BuildOptions(root / "images", root / "images" / "manifest.csv", arch,
                                split="val", matrix=160, seed=3, per_day=14))
    synth.write_study(arch / "extra", spec=synth.SynthSpec(rows=160, columns=160,
                                                           view_position="LL"))
    return arch, labels


def test_dask_gives_the_in_process_records_and_resumes(small_archive: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    arch, labels = small_archive
    model = OnnxModel.load_files(model_for_tests())
    cfg = replay_cfg()
    here = run(Options(arch, labels, tmp_path / "here", workers=2, progress=False), cfg, model)
    mine = ResultsFile.read_only(tmp_path / "here")
    assert len(mine) == here["studies"] == 15

    # A dask run that was interrupted after 5 studies: it scores only the other 10.
    out = tmp_path / "dask"
    out.mkdir()
    lines = (tmp_path / "here" / RESULTS_NAME).read_text().splitlines(keepends=True)
    (out / RESULTS_NAME).write_text("".join(lines[:5]))
    report = run(Options(arch, labels, out, workers=2, progress=False, engine="dask"), cfg, model)
    assert len((out / RESULTS_NAME).read_text().splitlines()) == 15
    theirs = ResultsFile.read_only(out)
    assert {u: r.to_json() for u, r in theirs.items()} == {u: r.to_json() for u, r in mine.items()}
    assert report["meta"]["mode"] == "dask" and report["auc"] == here["auc"]

    # From scratch, nothing reused: the same records again.
    run(Options(arch, labels, out, workers=2, progress=False, engine="dask", force=True), cfg,
        model)
    again = ResultsFile.read_only(out)
    assert {u: r.to_json() for u, r in again.items()} == {u: r.to_json() for u, r in mine.items()}


def test_scheduler_without_the_dask_engine_is_a_one_line_error(
        small_archive: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    arch, labels = small_archive
    code = main(["replay", str(arch), "--labels", str(labels), "--out", str(tmp_path / "o"),
                 "--scheduler", "tcp://127.0.0.1:1", "--model", str(model_for_tests())])
    assert code != 0
    assert "--scheduler needs --engine dask" in capsys.readouterr().err
