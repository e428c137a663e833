"""DICOMweb STOW-RS into triage: instances posted to /dicomweb/studies take the listener's
durable path (stored, validated, refused with the C-STORE's reason), behind the web's access
rules; dicomweb-client and Orthanc's own DICOMweb client are the senders, and a kill -9 right
after a 200 loses nothing."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from requests.exceptions import HTTPError
from sqlalchemy import func, select

from tests import synth
from tests.conftest import free_port, serve_config, wait_for
from tests.peers import Orthanc
from triage.service.daemon import Daemon
from triage.store.schema import Instance, Rejection, Result

pytestmark = pytest.mark.slow

TOKEN = "stow-test-token-0123456789abcdef"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def web_client(d: Daemon, token: str | None = TOKEN) -> DICOMwebClient:
    """dicomweb-client pointed at the daemon's DICOMweb root, with the web token."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return DICOMwebClient(url=f"http://127.0.0.1:{d.web_port}/dicomweb", headers=headers)


def study(n: int, seed: int) -> list[Dataset]:
    """``n`` instances of one new study (read back as files, as a client would send them)."""
    uid, series = generate_uid(), generate_uid()
    spec = synth.SynthSpec(rows=128, columns=128, seed=seed, accession_number=f"ACC-STOW{seed}")
    return [synth.make_dataset(spec, study_uid=uid, series_uid=series) for _ in range(n)]


def decided(d: Daemon) -> int:
    with d.store.read() as s:
        return int(s.scalar(select(func.count(func.distinct(Result.study_id)))) or 0)


def held(d: Daemon) -> set[str]:
    with d.store.read() as s:
        return set(s.scalars(select(Instance.sop_instance_uid)))


def as_file(ds: Dataset, tmp: Path) -> Dataset:
    """``ds`` as a Part 10 file would give it (with its File Meta)."""
    return dcmread(synth.write(ds, tmp / f"{ds.SOPInstanceUID}.dcm"))


def test_four_studies_from_dicomweb_client_are_stored_and_decided(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory(**{"web.token": TOKEN})
    sent: set[str] = set()
    for i in range(4):
        instances = [as_file(ds, tmp_path) for ds in study(2 if i % 2 else 1, seed=i)]
        answer = web_client(d).store_instances(instances)
        refs = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
        assert refs == {str(ds.SOPInstanceUID) for ds in instances}
        assert "FailedSOPSequence" not in answer
        # A 200 means durable: the instances are recorded when the answer arrives.
        assert refs <= held(d)
        sent |= refs
    wait_for(lambda: decided(d) == 4, timeout=120)
    assert held(d) == sent
    with d.store.read() as s:
        assert set(s.scalars(select(Instance.calling_ae))) == {"STOW-RS"}


def test_without_the_token_stow_is_refused_and_nothing_is_stored(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    d = daemon_factory(**{"web.token": TOKEN})
    for token in (None, "wrong-token"):
        with pytest.raises(HTTPError) as e:
            web_client(d, token).store_instances([as_file(study(1, 7)[0], tmp_path)])
        assert e.value.response.status_code == 401
    assert held(d) == set()


def _post(d: Daemon, body: bytes, content_type: str, path: str = "/dicomweb/studies"
          ) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{d.web_port}{path}", data=body,
                                 method="POST", headers={"Content-Type": content_type,
                                                         "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def multipart(parts: list[bytes], boundary: str = "triage-test-boundary") -> tuple[bytes, str]:
    """A multipart/related body of application/dicom parts, and its Content-Type."""
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
                    + p + b"\r\n" for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def test_refused_parts_get_the_listeners_failure_reasons_in_a_202(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    import json

    d = daemon_factory(**{"web.token": TOKEN})
    good = synth.write(study(1, 1)[0], tmp_path / "good.dcm")
    ct = study(1, 2)[0]
    ct.SOPClassUID = CT_IMAGE
    ct.file_meta.MediaStorageSOPClassUID = CT_IMAGE
    ct_path = synth.write(ct, tmp_path / "ct.dcm")
    body, ctype = multipart([good.read_bytes(), ct_path.read_bytes(), b"not DICOM at all"])
    status, raw = _post(d, body, ctype)
    assert status == 202, raw
    answer = Dataset.from_json(json.loads(raw))
    assert [str(i.ReferencedSOPInstanceUID) for i in answer.ReferencedSOPSequence] == [
        str(dcmread(good).SOPInstanceUID)]
    reasons = sorted(int(i.FailureReason) for i in answer.FailedSOPSequence)
    assert reasons == [0x0122, 0xC210]  # SOP class not supported; cannot understand
    assert held(d) == {str(dcmread(good).SOPInstanceUID)}
    with d.store.read() as s:
        assert {r.status for r in s.scalars(select(Rejection))} == {0x0122, 0xC210}
    # None stored: 409; another study than the URL's: 0xA900; another media type: 415.
    body, ctype = multipart([b"junk"])
    assert _post(d, body, ctype)[0] == 409
    other = synth.write(study(1, 3)[0], tmp_path / "other.dcm")
    body, ctype = multipart([other.read_bytes()])
    status, raw = _post(d, body, ctype, f"/dicomweb/studies/{generate_uid()}")
    assert status == 409
    assert int(Dataset.from_json(json.loads(raw)).FailedSOPSequence[0].FailureReason) == 0xA900
    assert _post(d, good.read_bytes(), "application/dicom")[0] == 415
    body, ctype = multipart([])
    assert _post(d, body, ctype)[0] == 400
    assert str(dcmread(other).SOPInstanceUID) not in held(d)


def test_a_part_over_the_size_limit_is_refused_without_holding_the_body(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    import json

    d = daemon_factory(**{"web.token": TOKEN, "dicom.max_dataset_mb": 1})
    big = synth.SynthSpec(rows=1024, columns=1024, seed=4)  # 2 MiB of pixels
    path = synth.write(synth.make_dataset(big), tmp_path / "big.dcm")
    body, ctype = multipart([path.read_bytes()])
    status, raw = _post(d, body, ctype)
    assert status == 409
    assert int(Dataset.from_json(json.loads(raw)).FailedSOPSequence[0].FailureReason) == 0xA701
    assert held(d) == set() and not list((d.spool.tmp).iterdir())


def test_kill_9_right_after_a_200_loses_nothing(tmp_path: Path) -> None:
    port, data = free_port(), tmp_path / "var"
    cfg = serve_config(tmp_path / "c.toml", data, port)
    cfg.write_text(cfg.read_text().replace("[web]\n", f'[web]\ntoken = "{TOKEN}"\n'))
    web_port = tomllib.loads(cfg.read_text())["web"]["port"]
    log = (tmp_path / "serve.log").open("ab")
    proc = subprocess.Popen([sys.executable, "-m", "triage", "serve", "--config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        client = DICOMwebClient(url=f"http://127.0.0.1:{web_port}/dicomweb",
                                headers={"Authorization": f"Bearer {TOKEN}"})

        def up() -> bool:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=2)
                return True
            except urllib.error.HTTPError:
                return True  # it answers (401 without the token)
            except OSError:
                return False

        wait_for(up, timeout=90)
        instances = [as_file(ds, tmp_path) for ds in study(3, 9)]
        answer = client.store_instances(instances)
        proc.send_signal(signal.SIGKILL)  # at once: no shutdown, no flush
        proc.wait(30)
        assert len(answer.ReferencedSOPSequence) == 3
        with sqlite3.connect(data / "triage.sqlite") as c:
            rows = c.execute("SELECT sop_instance_uid, relpath FROM instances").fetchall()
        assert {u for u, _ in rows} == {str(ds.SOPInstanceUID) for ds in instances}
        for _uid, rel in rows:
            assert dcmread(data / "spool" / rel).SOPInstanceUID in {
                ds.SOPInstanceUID for ds in instances}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    peer = Orthanc(tmp_path / "orthanc", dicomweb=True).start()
    yield peer
    peer.stop()


def test_orthanc_pushes_a_study_to_triage_over_stow_rs(
        daemon_factory: Callable[..., Daemon], orthanc: Orthanc, tmp_path: Path) -> None:
    d = daemon_factory(**{"web.token": TOKEN})
    paths = [synth.write(ds, tmp_path / f"{i}.dcm") for i, ds in enumerate(study(2, 5))]
    orthanc.upload(paths)
    orthanc.call("PUT", "/dicom-web/servers/triage", {
        "Url": f"http://127.0.0.1:{d.web_port}/dicomweb/",
        "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"}})
    [sid] = orthanc.get("/studies")
    orthanc.call("POST", "/dicom-web/servers/triage/stow", {"Resources": [sid]})
    assert held(d) == {str(dcmread(p).SOPInstanceUID) for p in paths}
    wait_for(lambda: decided(d) == 1, timeout=120)


def test_stow_rs_send_dead_letters_a_refusal_and_retries_a_server_that_is_away(
        daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    from tests.service.test_outbox import deliveries

    # The receiver is another triage: it stores radiographs only, so it refuses an SR with
    # FailureReason 0x0122 (SOP class not supported) in a 409.
    receiver = daemon_factory(tmp_path / "receiver", **{"web.token": TOKEN})
    away = free_port()  # nothing listens there
    dests = [{"kind": "dicomweb", "url": f"http://127.0.0.1:{receiver.web_port}/dicomweb",
              "bearer_token": TOKEN, "send": ["sr"], "name": "refuses"},
             {"kind": "dicomweb", "url": f"http://127.0.0.1:{away}/dicomweb", "send": ["sr"],
              "name": "away"}]
    d = daemon_factory(tmp_path / "sender", **{
        "results.destinations": dests, "results.retry_initial_s": 0.2,
        "results.retry_max_s": 0.5, "results.poll_interval_s": 0.2, "results.max_attempts": 50})
    from tests.conftest import send

    assert send(d.dicom_port, study(1, 11)) == [0]

    def states() -> dict[str, tuple[str, int, int | None]]:
        return {dl.destination: (dl.state, dl.attempts, dl.last_status)
                for dl, _ in deliveries(d)}

    wait_for(lambda: states().get("refuses", ("",))[0] == "dead"
             and states().get("away", ("", 0))[1] >= 3, timeout=120)
    st = states()
    assert st["refuses"] == ("dead", 1, 0x0122)  # refused once, not retried
    assert st["away"][0] == "pending" and st["away"][2] is None
