"""Pure checks on a received data set, before anything is stored."""

from __future__ import annotations

import pytest

from dicom_io import store_status as status
from dicom_io.store_status import Refusal
from dicom_io.validate import check
from tests import synth


def _ds():  # type: ignore[no-untyped-def]
    return synth.make_dataset(synth.SynthSpec(rows=32, columns=32))


def test_a_good_instance_passes_and_yields_its_header() -> None:
    ds = _ds()
    h = check(ds, ds.SOPClassUID, ds.SOPInstanceUID, compressed=False)
    assert h.study_uid == ds.StudyInstanceUID and h.accession_number == "ACC0001"


@pytest.mark.parametrize("mutate, code, words", [
    (lambda d: delattr(d, "StudyInstanceUID"), status.BAD_UID, "StudyInstanceUID is missing"),
    (lambda d: setattr(d, "SeriesInstanceUID", "1.2.abc"), status.BAD_UID, "not a valid UID"),
    (lambda d: delattr(d, "PixelData"), status.DATASET_MISMATCH, "PixelData"),
    (lambda d: delattr(d, "Rows"), status.DATASET_MISMATCH, "Rows"),
    (lambda d: setattr(d, "PixelData", d.PixelData[:100]), status.DATASET_MISMATCH,
     "Pixel Data is 100 bytes"),
])
def test_defects_get_specific_statuses(mutate, code: int, words: str) -> None:  # type: ignore[no-untyped-def]
    ds = _ds()
    sop_class, sop_uid = ds.SOPClassUID, ds.SOPInstanceUID
    mutate(ds)
    with pytest.raises(Refusal) as e:
        check(ds, sop_class, sop_uid, compressed=False)
    assert e.value.status == code and words in e.value.reason


def test_request_and_data_set_must_agree() -> None:
    ds = _ds()
    with pytest.raises(Refusal) as e:
        check(ds, synth.CR_STORAGE, ds.SOPInstanceUID, compressed=False)
    assert e.value.status == status.DATASET_MISMATCH
    with pytest.raises(Refusal) as e:
        check(ds, ds.SOPClassUID, "1.2.3.4", compressed=False)
    assert e.value.status == status.BAD_UID


def test_compressed_pixel_length_is_not_judged_at_ingest() -> None:
    ds = _ds()
    ds.PixelData = ds.PixelData[:10]
    check(ds, ds.SOPClassUID, ds.SOPInstanceUID, compressed=True)
