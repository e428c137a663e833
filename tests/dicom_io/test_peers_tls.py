"""Who may call the listener, from where, and over what: peers, plaintext refusal, TLS.

Real daemons; real pynetdicom peers over loopback, over the machine's own
non-loopback address, and over TLS with throw-away certificates (openssl).
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from http.cookies import SimpleCookie
from pathlib import Path

import pytest

from dicom_io.scp import ScpSettings, admit
from tests import synth
from tests.certs import make_certs
from tests.conftest import make_config, replace_cfg, scu
from triage.core.errors import ConfigError
from triage.service.daemon import build_daemon


def test_admit_is_default_deny_by_title_and_host() -> None:
    s = ScpSettings(allowed_calling_aes=("STORESCU",),
                    peers={"MODALITY1": ("10.0.0.5",), "CR_ROOM": ("10.1.0.0/16",)})
    assert admit(s, "MODALITY1", "10.0.0.5") is None
    assert admit(s, "CR_ROOM", "10.1.22.3") is None
    assert "allowed only from 10.0.0.5" in (admit(s, "MODALITY1", "10.0.0.6") or "")
    assert "dicom.peers" in (admit(s, "MODALITY1", "127.0.0.1") or "")
    assert admit(s, "STORESCU", "127.0.0.1") is None
    assert "only from loopback" in (admit(s, "STORESCU", "192.168.1.9") or "")
    assert "neither" in (admit(s, "INTRUDER", "127.0.0.1") or "")


def _own_address() -> str | None:
    """This machine's non-loopback address (the one a route out would use), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: nothing is sent
            addr = str(s.getsockname()[0])
        except OSError:
            return None
    return None if addr.startswith("127.") else addr


def test_title_is_accepted_only_from_its_hosts_and_refusals_name_the_rule(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    own = _own_address()
    if own is None:
        pytest.skip("this machine has no non-loopback address to call from")
    cfg = replace_cfg(make_config(tmp_path / "var"), "dicom", host="0.0.0.0",
                      allow_plaintext_remote=True, peers={"MODALITY9": [own]})
    d = build_daemon(cfg)
    d.start()
    caplog.set_level(logging.INFO, logger="dicom_io.scp")
    try:
        def assoc(calling: str, host: str):  # type: ignore[no-untyped-def]
            return scu(calling).associate(host, d.dicom_port, ae_title="TRIAGE")

        a = assoc("MODALITY9", own)  # its configured host
        assert a.is_established
        assert a.send_c_store(synth.make_dataset(synth.SynthSpec(rows=32, columns=32))).Status == 0
        a.release()
        assert assoc("MODALITY9", "127.0.0.1").is_rejected  # the right title from another host
        assert assoc("STORESCU", own).is_rejected  # a loopback-only title from the network
        assert assoc("STORESCU", "127.0.0.1").is_established
    finally:
        d.stop(drain_timeout_s=5)
    refusals = [r.getMessage() for r in caplog.records if "rejected:" in r.getMessage()]
    assert any("MODALITY9" in m and "127.0.0.1" in m and f"allowed only from {own}" in m
               for m in refusals), refusals
    assert any("STORESCU" in m and own in m and "only from loopback" in m for m in refusals)
    contexts = [r.getMessage() for r in caplog.records if "presentation context" in r.getMessage()]
    assert contexts == [] or all("refused" in m for m in contexts)


def test_non_loopback_listener_without_tls_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dicom.host.*TLS is off"):
        replace_cfg(make_config(tmp_path / "var"), "dicom", host="0.0.0.0")
    assert not (tmp_path / "var").exists()


def _tls_ctx(certs: dict[str, Path], client: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["ca.pem"]))
    if client:
        ctx.load_cert_chain(str(certs["client.pem"]), str(certs["client.key"]))
    return ctx


def test_tls_listener_speaks_tls_only_and_verifies_client_certificates(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki", client=True)
    cfg = replace_cfg(make_config(tmp_path / "var"), "dicom", tls_cert=str(certs["server.pem"]),
                      tls_key=str(certs["server.key"]), tls_ca=str(certs["ca.pem"]))
    d = build_daemon(cfg)
    d.start()
    try:
        ds = synth.make_dataset(synth.SynthSpec(rows=32, columns=32))
        good = scu().associate("127.0.0.1", d.dicom_port, ae_title="TRIAGE",
                               tls_args=(_tls_ctx(certs, client=True), "localhost"))
        assert good.is_established
        assert good.send_c_store(ds).Status == 0
        good.release()
        # No client certificate: the handshake fails, nothing is negotiated.
        nocert = scu().associate("127.0.0.1", d.dicom_port, ae_title="TRIAGE",
                                 tls_args=(_tls_ctx(certs, client=False), "localhost"))
        assert not nocert.is_established
        # Plain DICOM on the TLS port gets nowhere.
        plain = scu().associate("127.0.0.1", d.dicom_port, ae_title="TRIAGE")
        assert not plain.is_established
    finally:
        d.stop(drain_timeout_s=5)


def test_web_over_https_with_a_secure_session_cookie(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "pki")
    token = "a-long-enough-test-token-0123456789"
    cfg = replace_cfg(make_config(tmp_path / "var"), "web", tls_cert=str(certs["server.pem"]),
                      tls_key=str(certs["server.key"]), token=token)
    d = build_daemon(cfg)
    d.start()
    try:
        conn = http.client.HTTPSConnection("localhost", d.web_port, timeout=30,
                                           context=_tls_ctx(certs, client=False))
        conn.request("GET", f"/?token={token}")
        r = conn.getresponse()
        r.read()
        assert r.status == 303
        cookie = SimpleCookie()
        cookie.load(r.getheader("set-cookie") or "")
        assert cookie["triage_session"]["secure"]
        conn.request("GET", "/", headers={"Cookie": f"triage_session={cookie['triage_session'].value}"})
        r = conn.getresponse()
        assert r.status == 200 and b"<html" in r.read()
        conn.close()
        # Plain HTTP on the HTTPS port is not served.
        plain = http.client.HTTPConnection("127.0.0.1", d.web_port, timeout=10)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/")
            plain.getresponse().read()
    finally:
        d.stop(drain_timeout_s=5)
