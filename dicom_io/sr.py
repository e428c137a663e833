"""The result as a DICOM Structured Report: a TID 1500 Measurement Report in a Comprehensive 3D SR.

Built with highdicom from plain values (this package knows nothing about
models or databases). The content tree, with the codes it uses, is written out
in docs/conformance.md; in short:

- one study-level Measurement Group (TID 1501): the finding the algorithm looks
  for (Pneumonia), the algorithm (TID 4019: name, version, and as parameters
  the model's sha256, each threshold used and where the thresholds came from),
  the study's probability and its triage tier;
- one Measurement Group per image, referencing the source image (SOP Class and
  Instance UID): its probability and tier, or why it was not scored.

Every UID and time stamp is handed in, and tracking UIDs are derived from the
document's SOP Instance UID, so building the same content twice gives the same
document: a resend after a crash is the same object, not a look-alike.
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_io.stamps import stamp

PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
PRIORITY = hd.sr.CodedConcept("260870009", "SCT", "Priority")
NOT_PERFORMED = hd.sr.CodedConcept("262008008", "SCT", "Not performed")
CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain X-ray of chest")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")
DEVICE = codes.DCM.Device
MANUFACTURER = "triage"
DISCLAIMER = "not for diagnosis"

# Header attributes highdicom reads from the first evidence instance; a source
# image may lack the Type 2 ones, which the SR then carries empty.
_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                  "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                  "ReferringPhysicianName")


@dataclass(frozen=True)
class Reference:
    """An instance elsewhere: the UIDs a reference to it needs."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class Algorithm:
    """What produced the result: the model's name, version and sha256, and the software."""

    name: str
    version: str
    sha256: str
    software: str  # e.g. "triage 0.1.0"


@dataclass(frozen=True)
class ImageFinding:
    """One source image: its probability and tier, or the reason it was not scored."""

    sop_class_uid: str
    sop_instance_uid: str
    probability: float | None = None
    tier: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class ReportContent:
    """Everything the report says about one result version of one study."""

    algorithm: Algorithm
    version: int
    tier: str
    probability: float | None
    thresholds: Mapping[str, float | None]
    thresholds_source: str
    images: Sequence[ImageFinding]
    predecessor: Reference | None = None
    finding: hd.sr.CodedConcept = field(default=PNEUMONIA)


@dataclass(frozen=True)
class DocumentIds:
    """The document's identity, fixed before it is built (and before any send)."""

    series_uid: str
    sop_instance_uid: str
    series_number: int
    instance_number: int
    when: _dt.datetime


def name_uid(*parts: str) -> str:
    """Return a UUID-derived UID (2.25.x) that is a pure function of ``parts`` (UUID version 5)."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(parts)).int}"


def evidence_header(ds: Dataset) -> Dataset:
    """Return a copy of a source header without pixel data, with every attribute the SR copies.

    Missing Type 2 patient and study attributes are added empty, as the SR
    carries them.
    """
    out = deepcopy(ds)
    for tag in [t for t in out.keys() if t.group == 0x7FE0]:
        del out[tag]
    for kw in _PATIENT_STUDY:
        if kw not in out:
            setattr(out, kw, "")
    return out


def _threshold_text(thresholds: Mapping[str, float | None]) -> list[str]:
    items = sorted(thresholds.items(), key=lambda kv: -1.0 if kv[1] is None else kv[1],
                   reverse=True)
    return [f"threshold {name}: " + ("off" if t is None else f"P >= {t:.4f}") for name, t in items]


def algorithm_id(a: Algorithm, content: ReportContent | None = None) -> hd.sr.AlgorithmIdentification:
    """Return TID 4019; with ``content``, its parameters hold the model sha256 and the thresholds."""
    params = None
    if content is not None:
        params = [f"model sha256: {a.sha256}", f"software: {a.software}",
                  *_threshold_text(content.thresholds),
                  f"thresholds source: {content.thresholds_source}"]
    return hd.sr.AlgorithmIdentification(name=a.name, version=a.version, parameters=params,
                                         manufacturer=MANUFACTURER)


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024],
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _group(label: str, tracking_uid: str, content: ReportContent, probability: float | None,
           tier: str | None, full_algorithm: bool,
           source: ImageFinding | None = None) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = None
    if probability is not None:
        measurements = [hd.sr.Measurement(name=PROBABILITY, value=float(round(probability, 6)),
                                          unit=NO_UNITS)]
    sources = None
    if source is not None:
        sources = [hd.sr.SourceImageForMeasurementGroup(source.sop_class_uid,
                                                        source.sop_instance_uid)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=label),
        finding_type=content.finding,
        algorithm_id=algorithm_id(content.algorithm, content if full_algorithm else None),
        measurements=measurements, source_images=sources)
    items = group[0].ContentSequence
    if tier is not None:
        items.append(_text(PRIORITY, tier))  # TID 1501 row 12: a TEXT qualitative evaluation
    if source is not None and source.reason:
        items.append(_text(NOT_PERFORMED, source.reason))
    return group


def content_tree(content: ReportContent, sop_instance_uid: str) -> hd.sr.MeasurementReport:
    """Return the TID 1500 content tree of ``content`` (tracking UIDs derived from the SOP UID)."""
    groups = [_group(f"study result v{content.version}", name_uid(sop_instance_uid, "study"),
                     content, content.probability, content.tier, full_algorithm=True)]
    for i, im in enumerate(content.images, start=1):
        groups.append(_group(f"image {i}", name_uid(sop_instance_uid, "image", str(i)), content,
                             im.probability, im.tier, full_algorithm=False, source=im))
    observer = hd.sr.ObserverContext(
        observer_type=DEVICE,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=name_uid("triage-device", content.algorithm.sha256),
            name=content.algorithm.name, manufacturer_name=MANUFACTURER,
            model_name=content.algorithm.software))
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CHEST_XRAY, imaging_measurements=groups)


def _predecessor(ref: Reference) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = ref.study_uid, ref.series_uid
    ds.SOPInstanceUID, ds.SOPClassUID = ref.sop_instance_uid, ref.sop_class_uid
    return ds


def build_report(sources: Sequence[Dataset], content: ReportContent, ids: DocumentIds) -> Dataset:
    """Return the SR document (with file meta) for ``content``, in the sources' study.

    ``sources`` are the headers of the study's instances (the first one gives
    the patient and study modules); every image in ``content.images`` must be
    among them. Raises ValueError when the content cannot be encoded (no
    sources, or an image that is not among them).
    """
    if not sources:
        raise ValueError("a report needs at least one source instance")
    evidence = [evidence_header(s) for s in sources]
    known = {str(s.SOPInstanceUID) for s in evidence}
    missing = [im for im in content.images if im.sop_instance_uid not in known]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of the report are not among its sources")
    report = content_tree(content, ids.sop_instance_uid)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=ids.series_uid,
        series_number=ids.series_number, sop_instance_uid=ids.sop_instance_uid,
        instance_number=ids.instance_number, manufacturer=MANUFACTURER, is_complete=True,
        previous_versions=[_predecessor(content.predecessor)] if content.predecessor else None,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"triage result v{content.version} ({DISCLAIMER})"[:64],
        software_versions=content.algorithm.software,
        manufacturer_model_name=content.algorithm.name[:64])
    stamp(sr, ids.when)
    return sr
