"""The frozen config: defaults, strict loading, overrides, and the CLI's one-line errors."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from triage import config
from triage.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_shipped_config_loads_with_documented_defaults() -> None:
    cfg = config.load()
    assert (cfg.dicom.host, cfg.dicom.port, cfg.dicom.ae_title) == ("127.0.0.1", 11112, "TRIAGE")
    assert (cfg.web.host, cfg.web.port) == ("127.0.0.1", 8080)
    assert cfg.storage.data_dir == "./var"
    assert cfg.dicom.accept_any_calling_ae is False
    assert "STORESCU" in cfg.dicom.allowed_calling_aes
    assert (cfg.web.token, cfg.web.basic_user, cfg.web.auth_required) == ("", "", False)
    assert cfg.worklist.retention_days == 0  # retention is off unless asked for


def test_every_shipped_key_is_documented_by_a_comment() -> None:
    lines = (REPO / "config.toml").read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            above = [ln for ln in lines[max(0, i - 12):i] if ln.strip()]
            assert any(ln.lstrip().startswith("#") for ln in above[-6:]), f"undocumented: {line}"


def test_config_is_frozen() -> None:
    cfg = config.load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dicom.port = 1  # type: ignore[misc]


@pytest.mark.parametrize("data, expected", [
    ({"dicom": {"prot": 1}}, "unknown config key 'dicom.prot' (did you mean 'dicom.port'?)"),
    ({"dicm": {}}, "unknown config key 'dicm' (did you mean 'dicom'?)"),
    ({"dicom": {"port": 70000}}, "'dicom.port'"),
    ({"dicom": {"port": "11112"}}, "'dicom.port': expected an integer"),
    ({"dicom": {"ae_title": "A" * 17}}, "'dicom.ae_title'"),
    ({"dicom": {"host": "not a host"}}, "'dicom.host'"),
    ({"dicom": {"allowed_calling_aes": []}}, "'dicom.allowed_calling_aes'"),
    ({"storage": {"min_free_mb": -1}}, "'storage.min_free_mb'"),
    ({"studies": {"quiet_period_s": -2}}, "'studies.quiet_period_s'"),
    ({"web": {"token": "too-short"}}, "'web.token'"),
    ({"web": {"basic_user": "reader"}}, "'web.basic_user'"),
    ({"worklist": {"render_interval_s": 0}}, "'worklist.render_interval_s'"),
    ({"worklist": {"retention_days": -1}}, "'worklist.retention_days'"),
    ({"worklist": {"routine_max_wait": 5}}, "did you mean 'worklist.routine_max_wait_min'"),
    # SQLite only in the data directory, under its one-daemon lock
    ({"database": {"url": "sqlite:////srv/elsewhere/triage.sqlite"}}, "'database.url'"),
    ({"database": {"url": "mysql://db/triage"}}, "'database.url'"),
])
def test_bad_config_is_rejected_naming_the_key(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_accept_any_caller_is_an_explicit_opt_in() -> None:
    cfg = config.from_dict({"dicom": {"allowed_calling_aes": [], "accept_any_calling_ae": True}})
    assert cfg.dicom.accept_any_calling_ae


def test_override_replaces_fields_and_ignores_missing_flags() -> None:
    cfg = config.override(config.load(), **{"dicom.port": 4242, "web.port": None})
    assert cfg.dicom.port == 4242 and cfg.web.port == 8080
    with pytest.raises(ConfigError, match="dicom.nope"):
        config.override(cfg, **{"dicom.nope": 1})
    with pytest.raises(ConfigError, match="dicom.port"):
        config.override(cfg, **{"dicom.port": 99999})


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "triage", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom]\nprot = 1\n")
    r = _cli("serve", "--config", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "dicom.prot" in r.stderr and "Traceback" not in r.stderr


def test_cli_missing_config_file_is_one_line(tmp_path: Path) -> None:
    r = _cli("serve", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_cli_help_lists_subcommands(tmp_path: Path) -> None:
    r = _cli("--help", cwd=tmp_path)
    assert r.returncode == 0 and "serve" in r.stdout
    r = _cli("serve", "--help", cwd=tmp_path)
    assert r.returncode == 0
    for flag in ("--config", "--data-dir", "--dicom-port", "--web-port"):
        assert flag in r.stdout


def _dest(**kw: object) -> dict:
    return {"results": {"destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": 4242,
                                           **kw}]}}


def test_no_destination_by_default_means_nothing_is_sent() -> None:
    cfg = config.load()
    assert cfg.results.destinations == ()
    assert cfg.results.wants("sr") == [] and cfg.results.wants("overlay") == []


def test_destinations_are_an_array_of_tables() -> None:
    cfg = config.from_dict({"results": {"destinations": [
        {"ae_title": "PACS", "host": "127.0.0.1", "port": 4242, "send": ["sr", "overlay"]},
        {"ae_title": "ARCHIVE", "host": "pacs.example.org", "send": ["sr"], "tls": True,
         "tls_ca_file": "/etc/ssl/ca.pem", "name": "archive"}]}})
    pacs, archive = cfg.results.destinations
    assert (pacs.label, pacs.send, pacs.tls) == ("PACS@127.0.0.1:4242", ("sr", "overlay"), False)
    assert (archive.label, archive.port, archive.tls_check_hostname) == ("archive", 104, True)
    assert [d.label for d in cfg.results.wants("overlay")] == ["PACS@127.0.0.1:4242"]


@pytest.mark.parametrize("data, expected", [
    (_dest(ae_tilte="X"), "unknown config key 'results.destinations.ae_tilte' "
                          "(did you mean 'results.destinations.ae_title'?)"),
    ({"results": {"destinatons": []}}, "did you mean 'results.destinations'?"),
    ({"results": {"max_attemps": 3}}, "did you mean 'results.max_attempts'?"),
    (_dest(send=["sr", "overlays"]), "'overlays' is not one of sr, overlay (did you mean 'overlay'?)"),
    (_dest(send=[]), "'results.destinations.send'"),
    (_dest(port=0), "'results.destinations.port'"),
    (_dest(ae_title="A" * 17), "'results.destinations.ae_title'"),
    (_dest(host="not a host"), "'results.destinations.host'"),
    ({"results": {"destinations": [{"host": "127.0.0.1"}]}}, "'results.destinations.ae_title': is required"),
    (_dest(tls=True, tls_cert_file="/c.pem"), "tls_cert_file and tls_key_file must be set together"),
    (_dest(tls_ca_file="/ca.pem"), "set tls = true"),
    ({"results": {"destinations": [{"ae_title": "P", "host": "h"}, {"ae_title": "P", "host": "h"}]}},
     "same name"),
    ({"results": {"retry_initial_s": 10, "retry_max_s": 5}}, "'results.retry_max_s'"),
    ({"results": {"max_attempts": 0}}, "'results.max_attempts'"),
    ({"results": {"destinations": {"ae_title": "PACS"}}}, "'results.destinations': must be a list"),
])
def test_bad_destination_is_rejected_naming_the_key(data: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_dict(data)
    assert expected in str(e.value)


def test_hl7_and_fhir_destinations_take_their_defaults_and_are_checked() -> None:
    cfg = config.from_dict({"results": {"destinations": [
        {"kind": "hl7", "host": "ris.example.org"},
        {"kind": "hl7", "host": "127.0.0.1", "port": 6661, "message": "oru+orm"},
        {"kind": "fhir", "url": "http://127.0.0.1:8080/fhir"}]}})
    a, b, c = cfg.results.destinations
    assert (a.port, a.label, b.label, c.label) == (2575, "hl7:ris.example.org:2575",
                                                   "hl7:127.0.0.1:6661", "http://127.0.0.1:8080/fhir")
    assert [d.label for d in cfg.results.wants("orm")] == [b.label]
    assert config.from_dict({"results": {"destinations": [
        {"ae_title": "PACS", "host": "h"}]}}).results.destinations[0].port == 104


@pytest.mark.parametrize(("dest", "expected"), [
    ({"kind": "hl7"}, "'results.destinations.host': is required"),
    ({"kind": "hl7", "host": "h", "message": "orm"}, "'results.destinations.message'"),
    ({"kind": "hl7", "host": "h", "sending_facility": "A|B"},
     "'results.destinations.sending_facility'"),
    ({"kind": "fhir"}, "'results.destinations.url': is required"),
    ({"kind": "fhir", "url": "ftp://x"}, "'results.destinations.url'"),
    ({"kind": "fhir", "url": "https://u:p@x/fhir"}, "must not carry credentials"),
    ({"kind": "fhir", "url": "http://x", "bearer_token": "t", "basic_user": "u",
      "basic_password": "p"}, "'results.destinations.bearer_token'"),
    ({"kind": "fhir", "url": "http://x", "basic_user": "u"}, "'results.destinations.basic_user'"),
    ({"kind": "hl8", "host": "h"}, "did you mean 'hl7'?"),
])
def test_bad_message_destinations_are_refused(dest: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_dict({"results": {"destinations": [dest]}})
    assert expected in str(e.value)


def test_destinations_and_pull_sources_in_toml_as_the_shipped_comments_show_them(
        tmp_path: Path) -> None:
    example = [ln[2:] for ln in (REPO / "config.toml").read_text().splitlines()
               if ln.startswith("# ") and ("[[results.destinations]]" in ln or " = " in ln
                                           or "[[pull.sources]]" in ln)
               and not ln.startswith("# #")]
    start = example.index("[[results.destinations]]")
    path = tmp_path / "c.toml"
    path.write_text("\n".join(example[start:]) + "\n")
    cfg = config.load(path)
    dest, ris, ehr, web = cfg.results.destinations
    assert (dest.ae_title, dest.host, dest.port, dest.send) == ("PACS", "127.0.0.1", 4242,
                                                                ("sr", "overlay"))
    assert dest.tls is False and dest.label == "PACS@127.0.0.1:4242"
    assert (ris.kind, ris.port, ris.message, ris.label, ris.objects) == (
        "hl7", 2575, "oru", "ris", ("oru",))
    assert (ehr.kind, ehr.url, ehr.objects) == ("fhir", "https://ehr.example.org/fhir", ("fhir",))
    assert (web.kind, web.label, web.objects) == ("dicomweb", "pacs-web", ("sr", "overlay"))
    [src] = cfg.pull.sources
    assert (src.name, src.ae_title, src.port, src.retrieve, src.modalities) == (
        "pacs", "PACS", 104, "c-move", ("CR", "DX"))


@pytest.mark.parametrize(("source", "expected"), [
    ({"ae_title": "PACS", "host": "10.0.0.5"}, "pull.sources.name"),
    ({"name": "p", "host": "10.0.0.5"}, "pull.sources.ae_title"),
    ({"name": "p", "ae_title": "PACS", "host": "10.0.0.5", "retrieve": "c-mov"},
     "did you mean 'c-move'"),
    ({"name": "p", "ae_title": "PACS", "host": "10.0.0.5", "modalities": ["dx"]},
     "pull.sources.modalities"),
    ({"name": "p", "ae_title": "PACS", "host": "10.0.0.5", "match": {"PatientName": "X"}},
     "pull.sources.match.PatientName"),
    ({"name": "p", "ae_title": "PACS", "host": "10.0.0.5", "every_s": 0}, "every_s"),
    ({"name": "p", "ae_title": "PACS", "host": "not a host"}, "pull.sources.host"),
])
def test_bad_pull_sources_are_refused(source: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.from_dict({"pull": {"sources": [source]}})
    assert expected in str(e.value)


def test_two_pull_sources_with_one_name_are_refused() -> None:
    src = {"name": "p", "ae_title": "PACS", "host": "10.0.0.5"}
    with pytest.raises(ConfigError, match="same name"):
        config.from_dict({"pull": {"sources": [src, src]}})
