"""triage.core.gating: every rejection reason, and what passes (on headers read by dicom_io)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_io.header import read_header as header_from_dataset
from tests.synth import DX_PROCESSING, SynthSpec, make_dataset
from triage.core.gating import gate_header, gate_pixels


def _reason(spec: SynthSpec) -> str | None:
    return gate_header(header_from_dataset(make_dataset(spec)))


@pytest.mark.parametrize("view", ["PA", "AP", None])
def test_frontal_views_pass(view: str | None) -> None:
    assert _reason(SynthSpec(view_position=view)) is None


@pytest.mark.parametrize("view", ["LL", "RL", "LAT"])
def test_lateral_views_are_rejected(view: str) -> None:
    reason = _reason(SynthSpec(view_position=view))
    assert reason is not None and reason.startswith("lateral view")


def test_lateral_view_code_is_rejected() -> None:
    ds = make_dataset(SynthSpec(view_position=None))
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator = "399067008", "SCT"
    code.CodeMeaning = "Lateral projection"
    ds.ViewCodeSequence = Sequence([code])
    assert gate_header(header_from_dataset(ds)).startswith("lateral view")


def test_oblique_is_not_frontal() -> None:
    assert _reason(SynthSpec(view_position="RLO")).startswith("not a frontal view")


def test_for_processing_is_rejected() -> None:
    assert _reason(SynthSpec(sop_class_uid=DX_PROCESSING)) == "For Processing image"


@pytest.mark.parametrize("modality", ["CT", "MR", ""])
def test_other_modalities_are_rejected(modality: str) -> None:
    reason = _reason(SynthSpec(modality=modality))
    assert reason is not None and reason.startswith("modality")


@pytest.mark.parametrize("modality", ["CR", "DX", "SC"])
def test_allowed_modalities_pass(modality: str) -> None:
    assert _reason(SynthSpec(modality=modality)) is None


def test_colour_is_rejected() -> None:
    from tests.dicom_io.test_pixels import rgb_dataset

    ds = rgb_dataset()
    assert gate_header(header_from_dataset(ds)).startswith("colour image")


def test_no_pixel_data_is_rejected() -> None:
    ds = make_dataset(SynthSpec())
    del ds.PixelData
    assert gate_header(header_from_dataset(ds)) == "no pixel data"


def test_too_small_and_blank_images() -> None:
    assert gate_pixels(np.random.rand(16, 16)).startswith("image too small")
    assert gate_pixels(np.zeros((256, 256))).startswith("blank image")
    assert gate_pixels(np.random.rand(256, 200)) is None
    assert gate_pixels(np.random.rand(100, 100), min_size=64) is None


def test_header_size_and_body_part() -> None:
    small = make_dataset(SynthSpec(rows=16, columns=16, view_position="LL"))
    assert gate_header(header_from_dataset(small)).startswith("image too small")
    hip = make_dataset(SynthSpec())
    hip.BodyPartExamined = "HIP"
    assert gate_header(header_from_dataset(hip)) == "body part HIP is not the chest"
    for part in ("CHEST", "THORAX", ""):
        ds = make_dataset(SynthSpec())
        ds.BodyPartExamined = part
        assert gate_header(header_from_dataset(ds)) is None
