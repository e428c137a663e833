"""Web sessions against a real daemon over real HTTP: a cookie per login with an expiry, a
logout that ends it, and who marked a study reported."""

from __future__ import annotations

import base64
import http.client
import time
from http.cookies import SimpleCookie

from pydicom.uid import generate_uid
from sqlalchemy import select

from tests import synth
from tests.conftest import make_config, replace_cfg, send
from triage.service.daemon import build_daemon
from triage.store.schema import Study

TOKEN = "a-long-enough-test-token-0123456789"


def _req(port: int, path: str, method: str = "GET",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, headers=headers or {})
    r = conn.getresponse()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    conn.close()
    return out


def _login(port: int) -> SimpleCookie:
    code, headers, _ = _req(port, f"/?token={TOKEN}")
    assert code == 303
    cookie = SimpleCookie()
    cookie.load(headers["set-cookie"])
    return cookie


def test_each_login_gets_its_own_expiring_cookie_and_logout_ends_it(daemon_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tmp_path / "var", **{"web.token": TOKEN, "web.session_minutes": 60})
    first, second = _login(d.web_port), _login(d.web_port)
    a, b = first["triage_session"], second["triage_session"]
    assert a.value != b.value and TOKEN not in a.value
    assert a["max-age"] == "3600" and a["httponly"] and a["samesite"].lower() == "strict"
    assert not a["secure"]  # plain HTTP on loopback: a Secure cookie would never come back
    as_a = {"Cookie": f"triage_session={a.value}"}
    as_b = {"Cookie": f"triage_session={b.value}"}
    assert _req(d.web_port, "/", headers=as_a)[0] == 200
    code, headers, _ = _req(d.web_port, "/logout", "POST", headers=as_a)
    assert code == 200 and "triage_session=" in headers["set-cookie"]
    assert _req(d.web_port, "/", headers=as_a)[0] == 401
    assert _req(d.web_port, "/", headers=as_b)[0] == 200  # the other login is untouched


def test_a_session_expires(daemon_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = daemon_factory(tmp_path / "var", **{"web.token": TOKEN, "web.session_minutes": 0.02})
    c = _login(d.web_port)["triage_session"]
    assert c["max-age"] == "1"
    as_c = {"Cookie": f"triage_session={c.value}"}
    time.sleep(1.5)  # past the 1.2 s lifetime: the server must refuse the cookie
    assert _req(d.web_port, "/", headers=as_c)[0] == 401


def test_who_marked_a_study_reported_is_recorded_and_shown(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = replace_cfg(make_config(tmp_path / "var"), "web", basic_user="dr.alice",
                      basic_password="correct horse battery")
    d = build_daemon(cfg)
    d.start()
    try:
        _report_as_alice(d)
    finally:
        d.stop(drain_timeout_s=5)


def _report_as_alice(d) -> None:  # type: ignore[no-untyped-def]
    uid = generate_uid()
    spec = synth.SynthSpec(rows=96, columns=96, accession_number="ACC-WHO")
    assert send(d.dicom_port, [synth.make_dataset(spec, study_uid=uid)]) == [0]
    with d.store.read() as s:
        sid = s.scalar(select(Study.id).where(Study.study_uid == uid))
    auth = {"Authorization": "Basic " + base64.b64encode(b"dr.alice:correct horse battery").decode(),
            "Accept": "application/json"}
    assert _req(d.web_port, f"/study/{sid}/report", "POST", headers=auth)[0] == 200
    with d.store.read() as s:
        assert s.scalar(select(Study.reported_by).where(Study.id == sid)) == "dr.alice"
    code, _, body = _req(d.web_port, "/history", headers=auth)
    assert code == 200 and b"dr.alice" in body
    code, _, body = _req(d.web_port, f"/study/{sid}", headers=auth)
    assert b"by <span class=\"by\">dr.alice</span>" in body
