"""Settings that must take effect or be refused: logging.level, worker.tier_overrides."""

from __future__ import annotations

import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import free_port, make_config, port_open, serve_config, wait_for
from triage.core.errors import ConfigError
from triage.profile import applied_thresholds
from triage.service.daemon import build_daemon

CARD = {"urgent": 0.8, "abnormal": 0.5, "never": None}


def test_misspelt_override_is_refused_with_did_you_mean() -> None:
    with pytest.raises(ConfigError, match=r"tier_overrides\.urgnet.*did you mean 'urgent'\?"):
        applied_thresholds(CARD, None, {"urgnet": 0.9})


def test_override_that_inverts_the_tiers_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"urgent \(0\.4\) must stay above abnormal \(0\.5\)"):
        applied_thresholds(CARD, None, {"urgent": 0.4})
    with pytest.raises(ConfigError, match="must stay above"):
        applied_thresholds(CARD, None, {"abnormal": 0.85})


def test_overrides_in_order_apply() -> None:
    assert applied_thresholds(CARD, None, {"urgent": 0.9, "abnormal": 0.3}) == {
        "urgent": 0.9, "abnormal": 0.3, "never": None}


def test_daemon_with_a_misspelt_override_refuses_to_start_before_creating_anything(
        tmp_path: Path) -> None:
    data = tmp_path / "var"
    with pytest.raises(ConfigError, match="did you mean"):
        build_daemon(make_config(data, **{"worker.tier_overrides": {"abnormall": 0.4}}))
    assert not data.exists()


def test_logging_level_from_the_config_takes_effect(tmp_path: Path) -> None:
    cfg = serve_config(tmp_path / "c.toml", tmp_path / "var", free_port(),
                       '[logging]\nlevel = "WARNING"\n')
    web_port = tomllib.loads(cfg.read_text())["web"]["port"]
    proc = subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: port_open(web_port) or proc.poll() is not None, timeout=90)
        started = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert started, err
    assert proc.returncode == 0, err
    assert " INFO " not in err, err
