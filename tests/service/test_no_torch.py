"""The daemon's own process never loads torch: decoding and MONAI run in its decoder processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from tests import synth
from tests.conftest import free_port, model_for_tests, port_open, send, serve_config, wait_for
from tests.service.test_worker import _descendants


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_serving_process_scores_a_study_without_loading_torch(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "var"
    cfg = serve_config(tmp_path / "c.toml", data, port, guard=True)  # the shipped guard too
    proc = subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ds = synth.make_dataset(synth.SynthSpec(rows=256, columns=256))
        wait_for(lambda: port_open(port), timeout=90)
        assert send(port, [ds]) == [0]
        status = tmp_path / "s.toml"
        status.write_text(f'[storage]\ndata_dir = "{data}"\n[model]\npath = "{model_for_tests()}"\n')
        wait_for(lambda: _scored(status) == 1, timeout=120, interval=0.5)
        decoders = _descendants(proc.pid)
        assert decoders and any("libtorch" in _maps(p) for p in decoders), \
            "the decoder processes run the MONAI chain (and so torch)"
        assert "libtorch" not in _maps(proc.pid)
        assert "libonnxruntime" in _maps(proc.pid) or "onnxruntime" in _maps(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def _scored(cfg: Path) -> int:
    r = subprocess.run([sys.executable, "-m", "triage", "status", "--config", str(cfg), "--json"],
                       capture_output=True, text=True, timeout=60)
    # The shipped input guard runs too (the serving config keeps it) and may refuse the phantom:
    # a result either way, reached without torch in the serving process.
    if r.returncode != 0:
        return 0
    studies = json.loads(r.stdout)["studies"]
    return int(studies["scored"]) + int(studies["unscored"])
