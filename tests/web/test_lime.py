"""LIME on demand, in a real browser: the study page offers it beside Grad-CAM, shows "computing"
while a helper process explains the real ONNX model, then both maps side by side. Real daemon,
DICOM association, onnxruntime and headless Chromium."""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests import synth
from tests.conftest import send, wait_for
from tests.model_fixtures import synthetic_image
from tests.web.test_web import ARTIFACTS, CHROMIUM_ARGS
from triage.service.daemon import Daemon
from triage.service.explain import lime_relpath
from triage.store.schema import ImageResult, Result, Study


def _post(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, headers=headers or {})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def _scored(d: Daemon, uid: str) -> tuple[int, int, int] | None:
    from sqlalchemy import select

    with d.store.read() as s:
        row = s.execute(select(Study.id, Result.version, ImageResult.instance_id)
                        .join(Result, Result.study_id == Study.id)
                        .join(ImageResult, ImageResult.result_id == Result.id)
                        .where(Study.study_uid == uid)).first()
        return None if row is None else (row[0], row[1], row[2])


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_lime_is_computed_on_demand_cached_and_shown_beside_gradcam(
        daemon_factory: Callable[..., Daemon], browser: Any) -> None:
    d = daemon_factory()
    ds = synth.make_dataset(synth.SynthSpec(rows=160, columns=160, bits_stored=8),
                            pixels=synthetic_image(1, 7))
    assert send(d.dicom_port, [ds]) == [0]
    sid, version, iid = wait_for(lambda: _scored(d, str(ds.StudyInstanceUID)), timeout=90)
    base = f"http://127.0.0.1:{d.web_port}"
    page = browser.new_context(viewport={"width": 1100, "height": 900}).new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.goto(f"{base}/study/{sid}")
    lime = page.locator("[data-testid=lime]")
    assert lime.get_attribute("data-state") == "none"
    assert page.locator(".map.gradcam img").count() == 1
    how = page.locator(".howto").all_inner_texts()
    assert how[0].startswith("Grad-CAM:") and how[1].startswith("LIME:")
    # An image that does not exist, or a cross-site request, starts nothing.
    assert _post(d.web_port, f"/study/{sid}/image/{iid + 999}/lime")[0] == 404
    assert _post(d.web_port, f"/study/{sid}/image/{iid}/lime",
                 {"Origin": "http://evil.example"})[0] == 403
    page.get_by_role("button", name="Explain with LIME").click()
    page.wait_for_url(f"{base}/study/{sid}#image-{iid}")
    # "computing" until the helper process is done (it needs seconds just to start and load
    # the chain); the page reloads itself meanwhile.
    assert lime.get_attribute("data-state") == "computing"
    assert "computing" in lime.inner_text()
    assert page.locator("body").get_attribute("data-refresh") == "3"
    page.wait_for_selector("[data-testid=lime][data-state=ready] img", timeout=180_000)
    assert page.evaluate("document.querySelector('.map.lime img').naturalWidth") > 0
    assert page.locator("body").get_attribute("data-refresh") == "0"
    rel = lime_relpath(str(ds.StudyInstanceUID), iid, version)
    path = d.cfg.storage.root / rel
    assert path.stat().st_mode & 0o077 == 0  # owner only, like the Grad-CAM overlays
    with Image.open(path) as im, Image.open(d.cfg.storage.root / _heatmap(d, iid)) as gc:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == gc.size
    mtime = path.stat().st_mtime_ns
    # Asked again: the cached file is the answer, nothing is recomputed.
    status, body = _post(d.web_port, f"/study/{sid}/image/{iid}/lime", {"Accept": "application/json"})
    assert status == 200 and json.loads(body)["lime"] == "ready" and path.stat().st_mtime_ns == mtime
    api = json.loads(_get(d.web_port, f"/api/study/{sid}"))
    assert api["images"][0]["lime"] == {"state": "ready", "reason": None, "url": f"/files/{rel}"}
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "study-lime.png"), full_page=True)
    assert problems == []


def _heatmap(d: Daemon, iid: int) -> Path:
    from sqlalchemy import select

    with d.store.read() as s:
        return Path(str(s.scalar(select(ImageResult.heatmap_path)
                                 .where(ImageResult.instance_id == iid))))


def _get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    body = conn.getresponse().read()
    conn.close()
    return body
