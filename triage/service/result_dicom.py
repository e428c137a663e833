"""From a recorded result to the DICOM objects the outbox sends (a thin adapter over dicom_io).

Everything an object says comes from the database and the spool: the result
row (tier, probability, model, thresholds and their source, its time), its
per-image rows, the source images' headers (patient and study modules, SOP
Class and Instance UIDs) and the overlay PNGs the worker wrote. The UIDs were
fixed when the result was recorded. So an object can be built again at any
time and comes out the same.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_io import overlay as dicom_overlay
from dicom_io import sr as dicom_sr
from dicom_io.ids import uid_key
from triage import __version__
from triage.core.errors import InputError
from triage.core.tiers import priority
from triage.files import write_atomic
from triage.store import schema as db
from triage.store.schema import ImageResult, Instance, Result, ResultObject, Study

SOFTWARE = f"triage {__version__}"


@dataclass
class _Loaded:
    obj: ResultObject
    result: Result
    study: Study
    images: list[tuple[ImageResult, Instance]]
    predecessor: dicom_sr.Reference | None


def _load(s: Any, object_id: int) -> _Loaded:
    obj = s.get(ResultObject, object_id)
    if obj is None:
        raise InputError(f"result object #{object_id} does not exist")
    result = s.get(Result, obj.result_id)
    study = s.get(Study, result.study_id)
    images = list(s.execute(select(ImageResult, Instance)
                            .join(Instance, Instance.id == ImageResult.instance_id)
                            .where(ImageResult.result_id == result.id)
                            .order_by(ImageResult.id)).tuples())
    prev = s.scalar(select(ResultObject).join(Result, Result.id == ResultObject.result_id)
                    .where(Result.study_id == study.id, Result.version < result.version,
                           ResultObject.kind == db.SR)
                    .order_by(Result.version.desc()).limit(1))
    pred = None if prev is None else dicom_sr.Reference(
        study.study_uid, prev.series_uid, prev.sop_instance_uid, prev.sop_class_uid)
    return _Loaded(obj, result, study, images, pred)


def _header(spool_root: Path, inst: Instance) -> Dataset:
    try:
        return dcmread(spool_root / inst.relpath, stop_before_pixels=True)
    except Exception as e:  # any unreadable file is one reason, not a crash
        raise InputError(f"source image #{inst.id} cannot be read from the spool "
                         f"({type(e).__name__})") from e


def _when(result: Result) -> dt.datetime:
    return dt.datetime.fromtimestamp(result.created_at)


def _report(x: _Loaded, spool_root: Path) -> Dataset:
    res = x.result
    thresholds = json.loads(res.thresholds)
    findings = [dicom_sr.ImageFinding(
        inst.sop_class_uid, inst.sop_instance_uid, ir.probability,
        priority(ir.probability, thresholds) if ir.probability is not None else None,
        None if ir.probability is not None else (ir.reason or "not scored"))
        for ir, inst in x.images]
    content = dicom_sr.ReportContent(
        algorithm=dicom_sr.Algorithm(res.model_name, res.model_sha256[:12], res.model_sha256,
                                     SOFTWARE),
        version=res.version, tier=res.tier, probability=res.probability, thresholds=thresholds,
        thresholds_source=res.thresholds_source, images=findings, predecessor=x.predecessor)
    ids = dicom_sr.DocumentIds(x.obj.series_uid, x.obj.sop_instance_uid, x.obj.series_number,
                               x.obj.instance_number, _when(res))
    return dicom_sr.build_report([_header(spool_root, inst) for _, inst in x.images], content, ids)


def _overlay(x: _Loaded, spool_root: Path, data_root: Path) -> Dataset:
    res = x.result
    pairs = [(ir, inst) for ir, inst in x.images if ir.id == x.obj.image_result_id]
    if not pairs or not pairs[0][0].heatmap_path:
        raise InputError("the overlay's image has no heatmap")
    ir, inst = pairs[0]
    try:
        with Image.open(data_root / str(ir.heatmap_path)) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise InputError(f"heatmap of image #{inst.id} cannot be read ({e.strerror or e})") from e
    tier = priority(ir.probability, json.loads(res.thresholds))
    p = "-" if ir.probability is None else f"{ir.probability:.2f}"
    lines = [f"Grad-CAM: {res.model_name} {res.model_sha256[:12]}",
             f"P(abnormal) {p}, tier {tier} (result v{res.version})"]
    ids = dicom_overlay.OverlayIds(x.obj.series_uid, x.obj.sop_instance_uid,
                                   x.obj.series_number, x.obj.instance_number, _when(res))
    return dicom_overlay.build_overlay(
        _header(spool_root, inst), rgb, lines, ids, SOFTWARE,
        f"triage Grad-CAM v{res.version} (not for diagnosis)")


def build(store: Any, object_id: int, spool_root: Path, data_root: Path) -> Dataset:
    """Return the DICOM object of one result object, built from the database and the spool.

    Raises InputError when a source it needs (spool file, heatmap) is missing
    or unreadable, and ValueError when the content cannot be encoded.
    """
    with store.read() as s:
        x = _load(s, object_id)
    if x.obj.kind == db.SR:
        return _report(x, spool_root)
    return _overlay(x, spool_root, data_root)


def object_path(study_uid: str, sop_instance_uid: str) -> str:
    """Return where an object's file lives, relative to the data directory (digests, no UIDs)."""
    key = uid_key(study_uid)
    return f"outbox/{key[:2]}/{key}/{uid_key(sop_instance_uid)}.dcm"


def write(ds: Dataset, data_root: Path, relpath: str) -> Path:
    """Write ``ds`` as a Part 10 file at ``data_root / relpath``, durably (fsync, rename)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return write_atomic(data_root / relpath, buf.getvalue(), fsync=True)


def study_uid_of(store: Any, object_id: int) -> str:
    """Return the Study Instance UID an object belongs to. Raises InputError if there is none."""
    with store.read() as s:
        uid = s.scalar(select(Study.study_uid).join(Result, Result.study_id == Study.id)
                       .join(ResultObject, ResultObject.result_id == Result.id)
                       .where(ResultObject.id == object_id))
    if uid is None:
        raise InputError(f"result object #{object_id} does not exist")
    return str(uid)
