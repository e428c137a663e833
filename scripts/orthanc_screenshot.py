"""Regenerate docs/orthanc-sr.png and docs/orthanc-overlay.png: triage's results as Orthanc shows them.

Usage: PYTHONPATH=. .venv/bin/python scripts/orthanc_screenshot.py [OUT_DIR]

A synthetic chest study (a made-up phantom, no patient data) goes to an
Orthanc started here on free ports, as a modality would send it, and to a
triage daemon (the shipped model) whose only destination is that Orthanc: a PA
image first, a lateral image later, so there are two result versions. Once
the outbox has sent both SRs and the overlays, Orthanc Explorer (Orthanc's own
web UI) is photographed in Debian's headless Chromium. The second SR's dsrdump
and the dciodvfy verdicts on it and on an overlay are printed, for
docs/conformance.md.
"""

from __future__ import annotations

import io
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's triage, whatever the environment points at

from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from playwright.sync_api import Page, sync_playwright  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests import synth  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.model_fixtures import synthetic_image  # noqa: E402
from tests.peers import Orthanc  # noqa: E402
from triage import config  # noqa: E402
from triage.service.daemon import build_daemon  # noqa: E402
from triage.store import outbox  # noqa: E402
from triage.store import schema as db  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def study(root: Path) -> tuple[list[Path], list[Path]]:
    """Write a synthetic PA image of a study, and a lateral image that arrives later; return
    ([PA], [lateral])."""
    uid = generate_uid()
    out = []
    for i, view in enumerate(("PA", "LL")):
        spec = synth.SynthSpec(rows=512, columns=512, bits_stored=8, patient_name="DEMO^ORTHANC",
                               patient_id="DEMO-0001", accession_number="ACC-DEMO-1",
                               study_description="CHEST PA AND LATERAL", view_position=view)
        ds = synth.make_dataset(spec, pixels=synthetic_image(1 - i, seed=7 + i, size=512),
                                study_uid=uid)
        ds.SeriesNumber = ds.InstanceNumber = i + 1
        out.append(synth.write(ds, root / f"{view}.dcm"))
    return out[:1], out[1:]


def storescu(port: int, called: str, paths: list[Path]) -> None:
    """Send ``paths`` with DCMTK's storescu; raise on failure."""
    subprocess.run(["storescu", "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port),
                    *map(str, paths)], check=True, capture_output=True, timeout=120)


def shoot(page: Page, url: str, out: Path, wait_text: str) -> None:
    """Open ``url`` in Orthanc Explorer, wait for ``wait_text`` and save a screenshot."""
    page.goto(url)
    page.get_by_text(wait_text).first.wait_for(timeout=30_000)
    page.wait_for_timeout(800)  # jQuery Mobile's page transition
    page.screenshot(path=str(out), full_page=False)
    shrink(out)
    print(out)


def shrink(path: Path) -> None:
    """Re-save a screenshot with a 128-colour palette (a fraction of the bytes, same look)."""
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=128)
    small.save(path, optimize=True)


def stitch(images: list[Image.Image], out: Path) -> None:
    """Stack ``images`` with a marked gap between them (the tree goes on there)."""
    gap = 28
    canvas = Image.new("RGB", (max(i.width for i in images),
                               sum(i.height for i in images) + gap * (len(images) - 1)),
                       (214, 214, 214))
    draw = ImageDraw.Draw(canvas)
    y = 0
    for n, im in enumerate(images):
        canvas.paste(im, (0, y))
        y += im.height
        if n < len(images) - 1:
            draw.text((20, y + 6), "[... algorithm name, version, manufacturer, model sha256, software ...]",
                      fill=(80, 80, 80), font=ImageFont.load_default(size=14))
            y += gap
    canvas.save(out)
    shrink(out)


def main(out_dir: Path) -> None:
    """Run the whole scene and write the two screenshots under ``out_dir``."""
    with tempfile.TemporaryDirectory(prefix="triage-orthanc-") as tmp:
        root = Path(tmp)
        pacs = Orthanc(root / "orthanc").start()
        try:
            cfg = config.override(config.load(), **{
                "storage.data_dir": str(root / "var"), "dicom.port": 0, "web.port": 0,
                "studies.quiet_period_s": 0.5, "storage.min_free_mb": 0,
                # The study is a made-up phantom, which the guard network may refuse as
                # "not like the radiographs the model learned from"; the picture is about the
                # results in the PACS, so only the header checks run here.
                "guard.path": "",
                "results.destinations": [{"ae_title": pacs.ae_title, "host": "127.0.0.1",
                                          "port": pacs.dicom_port, "name": "orthanc"}]})
            daemon = build_daemon(cfg)
            daemon.start()
            try:
                # v1: the PA image (an SR and an overlay); v2: a lateral image arrives
                # later, the study is scored again (a new SR referencing the first; the
                # lateral image is not scored, and says why)
                for paths, sent in zip(study(root / "study"), (2, 4), strict=True):
                    storescu(pacs.dicom_port, pacs.ae_title, paths)
                    storescu(daemon.dicom_port, "TRIAGE", paths)
                    wait_for(lambda n=sent: (t := outbox.totals(daemon.store).get("orthanc"))
                             and t[db.SENT] == n, timeout=300, interval=0.5)
            finally:
                daemon.stop()
            report(pacs, root, out_dir)
        finally:
            pacs.stop()


def report(pacs: Orthanc, root: Path, out_dir: Path) -> None:
    """Print dsrdump and dciodvfy of what Orthanc holds; photograph Orthanc Explorer."""
    [study_id] = pacs.get("/studies")
    series = {s["MainDicomTags"]["SeriesNumber"]: s for s in pacs.get(f"/studies/{study_id}/series")}
    sr_id = series["9002"]["Instances"][0]  # the second version's SR
    sc_id = series["9501"]["Instances"][0]
    for name, iid in (("sr.dcm", sr_id), ("overlay.dcm", sc_id)):
        (root / name).write_bytes(pacs.get_bytes(f"/instances/{iid}/file"))
        r = subprocess.run(["dciodvfy", str(root / name)], capture_output=True, text=True)
        print(f"$ dciodvfy {name}\n{(r.stdout + r.stderr).strip()}")
    print("$ dsrdump +Pl sr.dcm")
    print(subprocess.run(["dsrdump", "+Pl", str(root / "sr.dcm")], capture_output=True,
                         text=True).stdout)
    explorer = f"{pacs.url}/app/explorer.html"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        shoot(page, f"{explorer}#study?uuid={study_id}", out_dir / "orthanc-study.png",
              "triage result v2")
        # The SR's instance page: Orthanc lists its tags; the content tree is opened and
        # the picture holds the study-level measurement group (algorithm, thresholds and
        # their source, probability, priority) down to the first image's source reference.
        page.goto(f"{explorer}#instance?uuid={sr_id}")
        title = page.get_by_text("(ContentSequence)").first
        title.wait_for(timeout=30_000)
        page.wait_for_timeout(800)
        tree = title.locator("xpath=ancestor::div[1]/..")
        while tree.locator("a.toggler.closed").count():
            tree.locator("a.toggler.closed").first.click()
        top = "e => e.getBoundingClientRect().top + window.scrollY"

        def y(text: str, exact: bool = True) -> float:
            return float(page.get_by_text(text, exact=exact).first.evaluate(top))

        left, width = tree.evaluate("e => [e.getBoundingClientRect().left, e.offsetWidth]")
        full = Image.open(io.BytesIO(page.screenshot(full_page=True)))
        # two excerpts of the long tree: the group's head (template, tracking, finding),
        # then the thresholds, their source, the probability and the priority
        parts = [(y("Imaging Measurements") - 140, y("Pneumonia") + 21),
                 (y("threshold urgent:", exact=False) - 166, y("Priority") + 45)]
        stitch([full.crop((int(left), int(a), int(left + width), int(b))) for a, b in parts],
               out_dir / "orthanc-sr.png")
        print(out_dir / "orthanc-sr.png")
        # The overlays' series, previewed in Orthanc's own viewer (its lightbox).
        page.goto(f"{explorer}#series?uuid={series['9501']['ID']}")
        page.locator("#series-preview").wait_for(timeout=30_000)
        page.wait_for_timeout(800)
        page.locator("#series-preview").click()
        page.wait_for_timeout(2500)
        page.screenshot(path=str(out_dir / "orthanc-overlay.png"))
        shrink(out_dir / "orthanc-overlay.png")
        print(out_dir / "orthanc-overlay.png")
        browser.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs")
