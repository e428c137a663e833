"""The SR and overlay builders: real dciodvfy and dsrdump on what they build, highdicom to read back."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_io import overlay as ov
from dicom_io import sr
from dicom_io.writers import write_file
from tests import synth
from tests.dicom_tools import dciodvfy, dsrdump

WHEN = dt.datetime(2026, 11, 23, 10, 0, 0)
ALGO = sr.Algorithm("cxr-pneumonia-mnv2", "965aa233c401", "965aa233c401" + "0" * 52, "triage 0.1.0")
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _study(n: int = 2) -> list[Dataset]:
    study = generate_uid()
    spec = synth.SynthSpec(rows=160, columns=160, patient_name="DOE^JANE", patient_id="P-42",
                           accession_number="ACC-9")
    return [synth.make_dataset(spec, study_uid=study) for _ in range(n)]


def _content(src: list[Dataset], predecessor: sr.Reference | None = None) -> sr.ReportContent:
    return sr.ReportContent(
        algorithm=ALGO, version=2 if predecessor else 1, tier="urgent", probability=0.8712,
        thresholds={"abnormal": 0.41, "urgent": 0.81},
        thresholds_source="model card cxr-pneumonia-mnv2 (sha256 965aa233c401)",
        images=[sr.ImageFinding(src[0].SOPClassUID, src[0].SOPInstanceUID, 0.8712, "urgent"),
                sr.ImageFinding(src[1].SOPClassUID, src[1].SOPInstanceUID,
                                reason="lateral view: the model scores frontal radiographs")],
        predecessor=predecessor)


def _ids(series_number: int = 9001) -> sr.DocumentIds:
    return sr.DocumentIds(generate_uid(), generate_uid(), series_number, 1, WHEN)


def test_report_is_a_valid_tid1500_comprehensive_3d_sr_in_the_source_study(tmp_path: Path) -> None:
    src = _study()
    ids = _ids()
    path = write_file(sr.build_report(src, _content(src), ids), tmp_path / "sr.dcm")
    errors, out = dciodvfy(path)
    assert errors == [], out
    assert "Comprehensive3DSR" in out
    ds = dcmread(path)
    assert (ds.SOPClassUID, ds.Modality, ds.SOPInstanceUID) == (COMPREHENSIVE_3D_SR, "SR",
                                                                ids.sop_instance_uid)
    # the patient and study modules are the source study's
    assert ds.StudyInstanceUID == src[0].StudyInstanceUID and ds.SeriesInstanceUID == ids.series_uid
    assert (str(ds.PatientName), ds.PatientID, ds.AccessionNumber) == ("DOE^JANE", "P-42", "ACC-9")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert "not for diagnosis" in ds.SeriesDescription and ds.CompletionFlag == "COMPLETE"


def test_report_content_reads_back_with_highdicom(tmp_path: Path) -> None:
    src = _study()
    report = hd.sr.Comprehensive3DSR.from_dataset(sr.build_report(src, _content(src), _ids()))
    study, scored, unscored = report.content.get_image_measurement_groups()
    texts = {(i.name.meaning, i.value) for i in study[0].ContentSequence if i.ValueType == "TEXT"}
    assert {("Algorithm Name", "cxr-pneumonia-mnv2"), ("Algorithm Version", "965aa233c401"),
            ("Algorithm Parameters", f"model sha256: {ALGO.sha256}"),
            ("Algorithm Parameters", "threshold urgent: P >= 0.8100"),
            ("Algorithm Parameters", "threshold abnormal: P >= 0.4100"),
            ("Algorithm Parameters",
             "thresholds source: model card cxr-pneumonia-mnv2 (sha256 965aa233c401)"),
            ("Priority", "urgent")} <= texts
    assert study.finding_type == sr.PNEUMONIA
    assert [m.value for m in study.get_measurements(name=sr.PROBABILITY)] == [0.8712]
    assert [s.referenced_sop_instance_uid for s in scored.source_images] == [src[0].SOPInstanceUID]
    assert [m.value for m in scored.get_measurements(name=sr.PROBABILITY)] == [0.8712]
    assert [s.referenced_sop_instance_uid for s in unscored.source_images] == [src[1].SOPInstanceUID]
    assert unscored.get_measurements() == []
    reasons = [i.value for i in unscored[0].ContentSequence if i.name == sr.NOT_PERFORMED]
    assert reasons == ["lateral view: the model scores frontal radiographs"]
    evidence = {e[2] for e in report.get_evidence()}
    assert evidence == {s.SOPInstanceUID for s in src}


def test_a_later_version_references_its_predecessor(tmp_path: Path) -> None:
    src = _study()
    first_ids = _ids()
    first = sr.build_report(src, _content(src), first_ids)
    pred = sr.Reference(first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID,
                        first.SOPClassUID)
    path = write_file(sr.build_report(src, _content(src, pred), _ids(9002)), tmp_path / "v2.dcm")
    errors, out = dciodvfy(path)
    assert errors == [], out
    [item] = dcmread(path).PredecessorDocumentsSequence
    assert item.StudyInstanceUID == src[0].StudyInstanceUID
    [series] = item.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first_ids.series_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_ids.sop_instance_uid
    assert "Predecessor Docs    : 1" in dsrdump(path)


def test_same_content_and_ids_build_the_same_bytes(tmp_path: Path) -> None:
    src = _study()
    ids = _ids()
    a = write_file(sr.build_report(src, _content(src), ids), tmp_path / "a.dcm").read_bytes()
    b = write_file(sr.build_report(src, _content(src), ids), tmp_path / "b.dcm").read_bytes()
    assert a == b


def test_dsrdump_shows_the_content_tree(tmp_path: Path) -> None:
    src = _study()
    path = write_file(sr.build_report(src, _content(src), _ids()), tmp_path / "sr.dcm")
    text = dsrdump(path, "+Pl")
    for line in ('<contains CODE:(,,"Finding")=(233604007,SCT,"Pneumonia")>',
                 '<contains NUM:(,,"Probability")="0.8712" (1,UCUM,"no units")>',
                 '<contains TEXT:(,,"Priority")="urgent">',
                 '<contains IMAGE:(,,"Source of Measurement")=(DX image,)>',
                 '<contains TEXT:(,,"Not performed")="lateral view: the model scores frontal'):
        assert line in text, text


def test_report_refuses_images_that_are_not_among_its_sources() -> None:
    src = _study()
    with pytest.raises(ValueError, match="not among its sources"):
        sr.build_report(src[:1], _content(src), _ids())


def test_source_without_type2_patient_attributes_still_builds(tmp_path: Path) -> None:
    src = _study()
    for ds in src:
        del ds.PatientName, ds.AccessionNumber
    path = write_file(sr.build_report(src, _content(src), _ids()), tmp_path / "sr.dcm")
    assert dciodvfy(path)[0] == []
    assert dcmread(path).PatientName == ""


def test_overlay_is_a_valid_captioned_secondary_capture_referencing_its_source(tmp_path: Path) -> None:
    [src] = _study(1)
    rgb = np.zeros((160, 160, 3), np.uint8)
    rgb[40:120, 40:120] = (255, 0, 0)
    ids = ov.OverlayIds(generate_uid(), generate_uid(), 9501, 1, WHEN)
    ds = ov.build_overlay(src, rgb, ["P(abnormal) 0.87: urgent"], ids, "triage 0.1.0",
                          "triage Grad-CAM v1 (not for diagnosis)")
    path = write_file(ds, tmp_path / "sc.dcm")
    errors, out = dciodvfy(path)
    assert errors == [], out
    back = dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and back.SOPInstanceUID == ids.sop_instance_uid
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.PatientID == "P-42"
    assert back.BurnedInAnnotation == "YES" and back.PhotometricInterpretation == "RGB"
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert "NOT FOR DIAGNOSIS" in back.ImageComments
    px = back.pixel_array
    band = px.shape[0] - 160
    assert band > 0 and (px[band:] == rgb).all()  # the picture is intact below the caption
    r, g, b = (px[:band, :, c].astype(int) for c in range(3))
    assert ((r > 160) & (g > 160) & (b < 80)).sum() > 50  # the yellow "NOT FOR DIAGNOSIS"


def test_overlay_refuses_a_grey_array() -> None:
    [src] = _study(1)
    with pytest.raises(ValueError, match="RGB"):
        ov.build_overlay(src, np.zeros((8, 8), np.uint8), [], ov.OverlayIds(
            generate_uid(), generate_uid(), 1, 1, WHEN), "triage", "x")
