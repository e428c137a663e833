"""``triage benchmark``: a seconds-long sweep over two tiny architectures, and every architecture
built, exported to ONNX and run in onnxruntime once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.model_fixtures import write_dataset
from triage.config import CalibrationConfig, PreprocessConfig, TrainConfig
from triage.core.errors import InputError
from triage.training import benchmark

SIZE = 32


def _sweep(tmp_path: Path, keys: list[str], force: bool = False) -> list[dict]:
    from triage.training import train

    manifest = tmp_path / "data" / "manifest.csv"
    if not manifest.exists():
        write_dataset(tmp_path / "data", n_train=32, n_val=16, n_holdout=12)
    budget = benchmark.Budget(input_size=SIZE, epochs=1, max_steps=2, timing_seconds=0.05,
                              calib_images=8)
    tcfg = TrainConfig(batch_size=16, ema_decay=0.0, warmup_epochs=0.0)
    settings = benchmark.settings_of(budget, tcfg, str(manifest), "sha", "triage benchmark ...")
    rows = benchmark.run(train.read_manifest(manifest), keys, tmp_path / "runs", tcfg,
                         PreprocessConfig(min_size_px=16), CalibrationConfig(), budget, settings,
                         force=force)
    benchmark.write_reports(rows, settings, tmp_path / "docs" / "benchmarks.md",
                            tmp_path / "docs" / "benchmarks.json",
                            tmp_path / "docs" / "chart.png")
    return rows


@pytest.mark.slow
def test_smoke_sweep_writes_table_json_chart_and_resumes(tmp_path: Path) -> None:
    keys = ["squeezenet1_1", "mobilenet_v2"]
    rows = _sweep(tmp_path, keys)
    doc = json.loads((tmp_path / "docs" / "benchmarks.json").read_text())
    assert [r["arch"] for r in doc["results"]] == keys
    assert doc["settings"]["budget"]["input_size"] == SIZE
    for r in doc["results"]:
        assert 0 <= r["val"]["auc"] <= 1 and 0 <= r["val"]["accuracy"] <= 1
        ab = r["val"]["operating_points"]["abnormal"]
        assert 0 <= ab["sensitivity"] <= 1 and 0 <= ab["specificity"] <= 1
        assert r["params"] > 0 and r["onnx"]["fp32"]["bytes"] > 0
        assert r["onnx"]["fp32"]["images_per_s_b1"] > 0
        assert r["onnx"]["fp32"]["images_per_s_b16"] > 0
        assert r["train_seconds"] > 0 and r["device"]
        assert "scores" not in r  # the per-image scores stay in the run's result.json
    # The holdout figures, recomputed from the kept per-image scores by an independent route
    # (scikit-learn's AUC, counting at the val threshold) and against the val figures.
    from sklearn.metrics import roc_auc_score

    for r in rows:
        ho, sc = r["holdout"], r["scores"]["holdout"]
        y, p = np.asarray(sc["labels"]), np.asarray(sc["probability"])
        assert ho["n"] == len(y) == 12 and ho["n_pos"] == int(y.sum()) == 6
        assert ho["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
        lo, hi = ho["auc_ci"]
        assert lo is not None and lo <= ho["auc"] <= hi
        thr = r["val"]["operating_points"]["abnormal"]["threshold"]
        op = ho["operating_points"]["abnormal"]
        assert op["threshold"] == thr
        assert op["sensitivity_k_n"] == [int(((p >= thr) & (y == 1)).sum()), 6]
        assert op["specificity_k_n"] == [int(((p < thr) & (y == 0)).sum()), 6]
        assert op["sensitivity_ci"][0] <= op["sensitivity"] <= op["sensitivity_ci"][1]
        v = r["scores"]["val"]
        assert r["val"]["auc"] == pytest.approx(
            roc_auc_score(v["labels"], v["probability"]), abs=1e-6)
    d = doc["holdout_auc_differences"]["squeezenet1_1"]
    a, b = rows[0]["scores"]["holdout"], rows[1]["scores"]["holdout"]
    assert d["difference"] == pytest.approx(roc_auc_score(a["labels"], a["probability"])
                                            - roc_auc_score(b["labels"], b["probability"]))
    assert "mobilenet_v2" not in doc["holdout_auc_differences"]
    md = (tmp_path / "docs" / "benchmarks.md").read_text()
    assert md.startswith("# Benchmarks") and "## Architectures" in md
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + len(keys)
    assert {ln.count("|") for ln in table} == {len(benchmark.HEADER) + 1}
    assert "triage benchmark ..." in md and "32 px" in md
    assert (tmp_path / "docs" / "chart.png").read_bytes()[:4] == b"\x89PNG"

    result = tmp_path / "runs" / "squeezenet1_1" / "result.json"
    before = result.stat().st_mtime_ns
    again = _sweep(tmp_path, keys)  # resumes: nothing is retrained
    assert result.stat().st_mtime_ns == before
    assert [r["train_seconds"] for r in again] == [r["train_seconds"] for r in rows]


@pytest.mark.parametrize("key", list(benchmark.ARCHS))
def test_every_architecture_exports_and_runs_in_onnxruntime(tmp_path: Path, key: str) -> None:
    from triage.inference.model import onnx_session

    model = benchmark.build_arch(key, SIZE).eval()
    path = benchmark.export_onnx(benchmark.Calibrated(model, 1.5, 0.2), SIZE, tmp_path / "m.onnx")
    prob, logit = onnx_session(path, 1).run(None, {"image": np.zeros((2, 1, SIZE, SIZE),
                                                                      np.float32)})
    assert prob.shape == (2,) and logit.shape == (2,)
    assert np.all((prob >= 0) & (prob <= 1)) and np.all(np.isfinite(logit))


def test_unknown_architecture_is_an_input_error() -> None:
    with pytest.raises(InputError, match="did not exist|unknown architecture"):
        benchmark.parse_archs("mobilenet_v2,alexnet")
    assert benchmark.parse_archs("all") == list(benchmark.ARCHS)


def test_merge_section_keeps_the_rest_of_the_file() -> None:
    lead = "# Benchmarks\n\n## Ingest\n\nfigures\n\n## Architectures\n\nold\n\n## E2E\n\nmore\n"
    out = benchmark.merge_section(lead, "## Architectures\n\nnew\n")
    assert "old" not in out and "new" in out
    assert out.index("## Ingest") < out.index("## Architectures") < out.index("## E2E")
    assert "figures" in out and "more" in out
    assert benchmark.merge_section(None, "## Architectures\n\nx\n").startswith("# Benchmarks\n")
    appended = benchmark.merge_section("# Benchmarks\n\n## Ingest\n\ny\n", "## Architectures\n")
    assert appended.index("## Ingest") < appended.index("## Architectures")


def test_subsample_keeps_val_and_is_fixed() -> None:
    from triage.training.train import Sample

    samples = [Sample(Path(f"{i}.png"), i % 2, "train") for i in range(20)]
    samples += [Sample(Path(f"v{i}.png"), i % 2, "val") for i in range(5)]
    a = benchmark.subsample(samples, 8, seed=3)
    assert a == benchmark.subsample(samples, 8, seed=3)
    assert sum(s.split == "train" for s in a) == 8 and sum(s.split == "val" for s in a) == 5
    assert benchmark.subsample(samples, None, seed=3) == samples


def test_benchmark_subcommand_is_registered() -> None:
    from triage.cli import build_parser

    args = build_parser().parse_args(["benchmark", "--manifest", "m.csv", "--archs", "resnet18"])
    assert args.size == 64 and args.archs == "resnet18" and not args.force
