"""The worklist in a real browser: real daemon, studies sent with storescu, headless Chromium.

The tiny test model's scores are arbitrary, so the module first scores its
synthetic images with that model and sets ``worker.tier_overrides`` between
them: the studies then land in known tiers.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests import synth
from tests.conftest import REPO, make_config, replace_cfg, storescu, wait_for
from tests.model_fixtures import synthetic_image
from triage.core.errors import TriageError
from triage.service.daemon import Daemon, build_daemon
from triage.store.schema import Alert

TOKEN = "test-token-0123456789abcdef"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EVIL_PN = "O'Brien^\"<script>alert('pn')</script>"
EVIL_DESC = "CHEST \"PA\" <script>alert('desc')</script>"
EVIL_ACC = 'ACC"5<b>'


@dataclass
class Site:
    """The running daemon, the studies sent to it and their expected tiers."""

    daemon: Daemon
    expected: list[tuple[str, str]]  # (accession, tier) in worklist order
    files: dict[str, Path]  # accession -> the DICOM file sent
    pixels: dict[str, Any]
    root: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.daemon.web_port}"


def request(port: int, path: str, method: str = "GET", headers: dict[str, str] | None = None,
            token: str | None = TOKEN) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP request (http.client sends the path exactly as given)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    hdrs = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request(method, path, headers={**hdrs, **(headers or {})})
    r = conn.getresponse()
    out = (r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    conn.close()
    return out


def worklist_json(d: Daemon) -> list[dict[str, Any]]:
    status, _, body = request(d.web_port, "/api/worklist")
    assert status == 200
    return list(json.loads(body)["studies"])


def _write_studies(root: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    files, pixels = {}, {}
    for i, (acc, label) in enumerate([("ACC-1001", 1), ("ACC-1002", 1), ("ACC-1003", 0),
                                      (EVIL_ACC, 0)]):
        px = synthetic_image(label, seed=100 + i)
        pn, desc = (EVIL_PN, EVIL_DESC) if acc == EVIL_ACC else (f"SYNTHETIC^PATIENT{i}", "CHEST PA")
        spec = synth.SynthSpec(rows=160, columns=160, bits_stored=8, accession_number=acc,
                               patient_name=pn, study_description=desc, patient_id=f"SYN{i}")
        files[acc] = synth.write(synth.make_dataset(spec, pixels=px), root / f"{i}.dcm")
        pixels[acc] = px
    lateral = synth.SynthSpec(rows=160, columns=160, view_position="LL", accession_number="ACC-LAT",
                              patient_name="SYNTHETIC^LATERAL", study_description="CHEST LAT")
    files["ACC-LAT"] = synth.write(synth.make_dataset(lateral), root / "lat.dcm")
    return files, pixels


# The tiny model scores every image about the same, so each phase runs the daemon
# with thresholds that put whatever it scores in one known tier (p is never 1.0),
# on the same data directory. The last phase's thresholds keep urgent above abnormal.
PHASES = [
    ({"urgent": 0.0, "abnormal": 0.0}, ["ACC-1001"]),
    ({"urgent": 1.0, "abnormal": 0.0}, ["ACC-1002"]),
    ({"urgent": 1.0, "abnormal": 0.9999}, ["ACC-1003", EVIL_ACC, "ACC-LAT"]),
]
EXPECTED = [("ACC-1001", "urgent"), ("ACC-1002", "abnormal"), ("ACC-1003", "routine"),
            (EVIL_ACC, "routine"), ("ACC-LAT", "unscored")]


def _start(root: Path, thresholds: dict[str, float]) -> Daemon:
    cfg = make_config(root / "var", **{
        "worker.tier_overrides": thresholds, "web.token": TOKEN,
        # No scheduled render during the test: the page must follow results by itself.
        "worklist.render_interval_s": 3600.0, "worklist.render_debounce_s": 0.2,
        "worklist.refresh_s": 600})
    d = build_daemon(cfg)
    d.start()
    return d


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web")
    files, pixels = _write_studies(root / "dicom")
    sent = 0
    for i, (thresholds, accessions) in enumerate(PHASES):
        d = _start(root, thresholds)
        r = storescu(d.dicom_port, *(files[a] for a in accessions))
        assert r.returncode == 0, r.stderr
        sent += len(accessions)
        wait_for(lambda d=d, n=sent: len(rows := worklist_json(d)) == n
                 and all(x["band"] != "pending" for x in rows), timeout=90)
        if i < len(PHASES) - 1:
            d.stop(drain_timeout_s=5)
    try:
        with d.store.write() as s:
            s.add(Alert(at=d.store.clock(), kind="drift", active=True,
                        message="PSI 0.31 (alert at 0.25): score distribution has shifted"))
        d.pages.render_worklist()
        yield Site(d, EXPECTED, files, pixels, root)
    finally:
        d.stop(drain_timeout_s=5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any, site: Site) -> Iterator[Any]:
    """A logged-in page that fails the test on any dialog (an executed script) or console error."""
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("dialog", lambda dlg: (problems.append(f"dialog: {dlg.message}"), dlg.dismiss()))
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.goto(f"{site.base}/?token={TOKEN}")
    assert pg.url == f"{site.base}/"  # the token was traded for a cookie and dropped from the URL
    yield pg
    ctx.close()
    assert problems == []


def _rows(pg: Any) -> list[tuple[str, str]]:
    out = []
    for tr in pg.locator("#worklist tr.study").all():
        out.append((tr.locator("td.acc").inner_text().strip(), tr.get_attribute("data-tier")))
    return out


def test_worklist_orders_by_tier_and_wait_and_escapes_headers(page: Any, site: Site) -> None:
    assert _rows(page) == site.expected
    for tr in page.locator("#worklist tr.study").all():
        assert tr.locator(".tier").inner_text() == tr.get_attribute("data-tier")
    assert [b.get_attribute("data-band") for b in page.locator("#worklist tbody").all()] == [
        "urgent", "abnormal", "routine", "pending"]
    assert "lateral" in page.locator("tr[data-tier=unscored] td.note").inner_text()
    # The hostile header values are shown as text, never run or parsed as markup.
    evil = page.locator("#worklist tr.study", has=page.locator("td.acc", has_text=EVIL_ACC))
    assert EVIL_PN.replace("^", " ") in evil.locator("td.patient").inner_text()
    assert evil.locator("td.desc").inner_text() == EVIL_DESC
    assert page.locator("main script, main img, main b").count() == 0
    raw = request(site.daemon.web_port, "/")[2].decode()
    assert "<script>alert" not in raw and "&lt;script&gt;alert(&#39;pn&#39;)" in raw
    # Banner: drift alert, model version, the disclaimer.
    assert "score distribution has shifted" in page.locator("[data-testid=alert]").inner_text()
    assert page.locator("[data-testid=model-version]").inner_text() == site.daemon.pages.model.version
    assert "Not for diagnostic use: triage aid" in page.locator(".banner").inner_text()
    assert page.locator("body").get_attribute("data-refresh") == "600"
    assert [s["accession_number"] for s in worklist_json(site.daemon)] == [a for a, _ in site.expected]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "worklist.png"), full_page=True)


def test_keyboard_opens_a_study_page_with_overlays_scores_and_thresholds(page: Any, site: Site) -> None:
    page.keyboard.press("j")
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.textContent") == site.expected[1][0]
    page.keyboard.press("Enter")
    page.wait_for_url(f"{site.base}/study/*")
    assert page.locator("h1 .acc").inner_text() == site.expected[1][0]
    assert page.locator(".summary .tier").inner_text() == "abnormal"
    img = page.locator("figure.image img")
    assert img.count() == 1
    img.first.wait_for()
    assert page.evaluate("document.querySelector('figure.image img').complete && "
                         "document.querySelector('figure.image img').naturalWidth") > 0
    assert "abnormal" in page.locator("figure.image figcaption").inner_text()
    text = page.locator(".summary").inner_text()
    assert "urgent ≥" in text and "abnormal ≥" in text and site.daemon.pages.model.sha256[:12] in text
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "study.png"), full_page=True)


def test_study_page_escapes_headers(page: Any, site: Site) -> None:
    page.locator("td.acc a", has_text=EVIL_ACC).click()
    page.wait_for_url(f"{site.base}/study/*")
    assert page.locator("h1 .acc").inner_text() == EVIL_ACC
    assert page.locator(".meta .desc").first.inner_text() == EVIL_DESC
    assert page.locator("main script, main b").count() == 0


def test_mark_reported_moves_a_study_to_history_and_new_images_bring_it_back_with_a_fall(
        page: Any, site: Site) -> None:
    d = site.daemon
    top = site.expected[0][0]
    page.locator("#worklist tr.study", has=page.locator("td.acc", has_text=top)) \
        .get_by_role("button").click()
    page.wait_for_url(f"{site.base}/")
    assert _rows(page) == site.expected[1:]
    page.get_by_role("link", name="History").click()
    assert [r[0] for r in _rows_of(page, "#history")] == [top]
    page.fill("#q", top[-3:])
    page.keyboard.press("Enter")
    page.wait_for_url("**/history?q=*")
    assert [r[0] for r in _rows_of(page, "#history")] == [top]
    page.fill("#q", "NO-SUCH")
    page.keyboard.press("Enter")
    page.wait_for_url("**/history?q=NO-SUCH")
    assert _rows_of(page, "#history") == []
    # A corrected image (same SOP Instance UID, a routine study's pixels) reopens the
    # reported study: it is back on the worklist, rescored, and shows its fall.
    ds = dcmread(site.files[top])
    corrected = synth.make_dataset(
        synth.SynthSpec(rows=160, columns=160, bits_stored=8, accession_number=top,
                        patient_name=str(ds.PatientName)),
        pixels=site.pixels[site.expected[2][0]], study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID, sop_uid=ds.SOPInstanceUID)
    path = synth.write(corrected, site.root / "corrected.dcm")
    assert storescu(d.dicom_port, path).returncode == 0
    row = wait_for(lambda: next((r for r in worklist_json(d)
                                 if r["accession_number"] == top and r["version"] == 2
                                 and not r["rescoring"]), None), timeout=90)
    assert (row["tier"], row["tier_change"], row["previous_tier"]) == ("routine", "fall", "urgent")
    page.goto(f"{site.base}/")
    back = page.locator("#worklist tr.study", has=page.locator("td.acc", has_text=top))
    assert back.get_attribute("data-tier") == "routine"
    assert back.locator("[data-testid=fall]").inner_text() == "↓ fell from urgent"
    back.locator("td.acc a").click()
    page.wait_for_url(f"{site.base}/study/*")
    assert page.locator("table.history tbody tr").count() == 2
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "study-rescored.png"), full_page=True)


def _rows_of(pg: Any, table: str) -> list[tuple[str, str]]:
    return [(tr.locator("td.acc").inner_text().strip(), tr.get_attribute("data-tier"))
            for tr in pg.locator(f"{table} tr.study").all()]


# --- HTTP edges -----------------------------------------------------------------------


def _a_heatmap(site: Site) -> str:
    from triage.store.schema import ImageResult

    with site.daemon.store.read() as s:
        from sqlalchemy import select

        return str(s.scalar(select(ImageResult.heatmap_path).where(ImageResult.heatmap_path.is_not(None))
                            .limit(1)))


@pytest.mark.parametrize("path", [
    "/files/heatmaps/../triage.sqlite",
    "/files/heatmaps/../../../../etc/passwd",
    "/files/heatmaps/..%2f..%2fsecret.png",
    "/files/heatmaps/%2e%2e/secret.png",
    "/files/heatmaps/%2e%2e%2fsecret.png",
    "/files/heatmaps/..%252fsecret.png",
    "/files/heatmaps/..\\secret.png",
    "/files/heatmaps//etc/passwd",
    "/files/%2e%2e/secret.png",
    "/files/../secret.png",
    "/files/spool",
    "/../secret.png",
])
def test_file_routes_cannot_leave_the_overlay_folder(site: Site, path: str) -> None:
    secret = site.daemon.cfg.storage.root / "secret.png"
    secret.write_bytes(b"\x89PNG secret")
    status, _, body = request(site.daemon.web_port, path)
    assert status in (400, 404) and b"secret" not in body and b"SQLite" not in body and b"root:" not in body


def test_overlays_are_served(site: Site) -> None:
    status, headers, body = request(site.daemon.web_port, "/files/" + _a_heatmap(site))
    assert status == 200 and headers["content-type"] == "image/png" and body[:4] == b"\x89PNG"


@pytest.mark.parametrize("path, method", [("/", "GET"), ("/api/worklist", "GET"), ("/history", "GET"),
                                          ("/study/1", "GET"), ("/study/1/report", "POST")])
def test_every_route_needs_the_token(site: Site, path: str, method: str) -> None:
    assert request(site.daemon.web_port, path, method, token=None)[0] == 401
    assert request(site.daemon.web_port, path, method, token="x" * 30)[0] == 401
    assert request(site.daemon.web_port, path, method, token=None,
                   headers={"Cookie": "triage_session=forged"})[0] == 401


def test_pages_carry_a_strict_csp_and_cross_site_posts_are_refused(site: Site) -> None:
    _, headers, _ = request(site.daemon.web_port, "/")
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
    status, _, _ = request(site.daemon.web_port, "/study/1/report", "POST",
                           headers={"Origin": "http://evil.example", "Accept": "application/json"})
    assert status == 403


def test_scheduled_work_is_all_in_the_scheduler(site: Site) -> None:
    names = site.daemon.jobs.job_names()
    assert {"complete-studies", "render-worklist", "drift-watch"} <= set(names)
    assert "purge-reported" not in names  # retention is off by default


def test_basic_auth_and_the_bound_port(tmp_path: Path) -> None:
    cfg = replace_cfg(make_config(tmp_path / "var"), "web", basic_user="reader",
                      basic_password="correct horse")
    d = build_daemon(cfg)
    d.start()
    try:
        assert d.web_port > 0
        status, headers, _ = request(d.web_port, "/", token=None)
        assert status == 401 and headers["www-authenticate"].startswith("Basic")
        good = base64.b64encode(b"reader:correct horse").decode()
        bad = base64.b64encode(b"reader:wrong").decode()
        assert request(d.web_port, "/", token=None, headers={"Authorization": f"Basic {good}"})[0] == 200
        assert request(d.web_port, "/", token=None, headers={"Authorization": f"Basic {bad}"})[0] == 401
        assert request(d.web_port, "/", token=None, headers={"Authorization": "Basic !!"})[0] == 401
    finally:
        d.stop(drain_timeout_s=5)


def test_loopback_without_auth_refuses_foreign_host_headers(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    assert request(d.web_port, "/", token=None)[0] == 200
    assert request(d.web_port, "/", token=None, headers={"Host": "evil.example"})[0] == 400


def test_non_loopback_bind_without_auth_refuses_to_start(tmp_path: Path) -> None:
    cfg = make_config(tmp_path / "var", **{"web.host": "0.0.0.0"})
    with pytest.raises(TriageError, match="web.token") as e:
        build_daemon(cfg)
    assert "\n" not in str(e.value) and not (tmp_path / "var").exists()
    toml = tmp_path / "c.toml"
    toml.write_text(f'[web]\nhost = "0.0.0.0"\n[storage]\ndata_dir = "{tmp_path / "var"}"\n')
    r = subprocess.run([sys.executable, "-m", "triage", "serve", "--config", str(toml)],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "web.host 0.0.0.0" in r.stderr
