"""A built wheel runs the daemon from any directory: migrations, templates, config and model inside.

The wheel is built from a copy of the source tree without build isolation and
installed into a fresh virtual environment without its dependencies; the
dependencies come from the test environment through a path file, so nothing
is downloaded. The daemon then runs from an empty directory, far from the
source tree.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests import synth
from tests.conftest import free_port, port_open, send, wait_for

REPO = Path(__file__).resolve().parents[1]
KEEP_OUT = shutil.ignore_patterns(".git", ".venv", "var", "runs", "test-artifacts", "build",
                                  "*.egg-info", "__pycache__", ".*_cache", ".hypothesis")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Return the bin/ folder of a fresh venv holding only the built triage wheel."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=KEEP_OUT)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(work / "dist"), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    [wheel] = (work / "dist").glob("triage-*.whl")
    env = work / "env"
    venv.create(env, with_pip=False)
    site = next(env.glob("lib/python*/site-packages"))
    # The test environment's packages (torch, onnxruntime, ...), but not its editable triage.
    (site / "test_env_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"),
                        "install", "--no-deps", "--no-index", "-q", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return env / "bin"


@pytest.mark.slow
def test_wheel_carries_its_data_and_serves_from_an_empty_directory(installed: Path,
                                                                  tmp_path: Path) -> None:
    where = subprocess.run([str(installed / "python"), "-c",
                            "import triage, triage.resources as r; print(triage.__file__); "
                            "print(r.path('config')); print(r.path('models'))"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=60)
    pkg, config, models = where.stdout.split()
    assert str(installed.parent) in pkg and str(REPO) not in pkg
    assert Path(config).is_file() and str(installed.parent) in config
    assert (Path(models) / "cxr-pneumonia-mnv2.onnx").is_file()

    port = free_port()
    proc = subprocess.Popen([str(installed / "triage"), "serve", "--data-dir", "var",
                             "--dicom-port", str(port), "--web-port", str(free_port())],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        assert send(port, [synth.make_dataset(synth.SynthSpec(rows=256, columns=256))]) == [0]
        assert (tmp_path / "var" / "triage.sqlite").is_file()  # migrated from the packaged revisions
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
