"""dicom_io.pixels: modality LUT, VOI LUT/window, percentile fallback, MONOCHROME1, failures."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicom_io.pixels import PixelDecodeError, decode, window_percentile
from tests.synth import SynthSpec, make_dataset, phantom


def test_monochrome1_is_inverted_to_monochrome2_sense() -> None:
    mono2 = decode(make_dataset(SynthSpec(photometric="MONOCHROME2", window=(2048, 4096))))
    mono1 = decode(make_dataset(SynthSpec(photometric="MONOCHROME1", window=(2048, 4096))))
    # Same anatomy: after inversion the lungs are dark in both.
    np.testing.assert_allclose(mono1, mono2, atol=2 / 4096)


def test_window_is_applied_and_clipped() -> None:
    arr = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (256, 1))
    out = decode(make_dataset(SynthSpec(window=(1024, 512)), pixels=arr))
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert np.all(out[:, arr[0] <= 768] == 0.0)
    assert np.all(out[:, arr[0] >= 1280] == 1.0)
    mid = out[0, (arr[0] > 800) & (arr[0] < 1250)]
    assert np.all(np.diff(mid) > 0)


def test_rescale_slope_intercept_is_applied_before_window() -> None:
    arr = np.full((256, 256), 1000, dtype=np.uint16)
    arr[:, 128:] = 3000
    # Stored 1000 -> 2*1000-1000 = 1000 (below the window), 3000 -> 5000 (above it).
    ds = make_dataset(SynthSpec(rescale=(2.0, -1000.0), window=(3000, 2000)), pixels=arr)
    out = decode(ds)
    assert np.all(out[:, :128] == 0.0) and np.all(out[:, 128:] == 1.0)
    # Without the rescale, 3000 stored would land mid-window.
    ds2 = make_dataset(SynthSpec(window=(3000, 2000)), pixels=arr)
    assert 0.4 < decode(ds2)[0, 200] < 0.6


def test_voi_lut_sequence_is_used() -> None:
    ds = make_dataset(SynthSpec(bits_stored=12))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.LUTData = [min(4095, v * 2) for v in range(4096)]
    ds.VOILUTSequence = Sequence([item])
    out = decode(ds)
    raw = ds.pixel_array.astype(np.float32)
    expected = np.minimum(4095, raw * 2) / 4095
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_percentile_fallback_without_window() -> None:
    arr = phantom(256, 256)
    arr[0, 0] = 4095  # a single hot pixel must not flatten contrast
    out = decode(make_dataset(SynthSpec(), pixels=arr))
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.percentile(out, 50) > 0.1


RAMP = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (256, 1))


def _windowed(function: str | None, center: float, width: float) -> np.ndarray:
    ds = make_dataset(SynthSpec(window=(center, width)), pixels=RAMP)
    if function is not None:
        ds.VOILUTFunction = function
    return decode(ds)


def test_voi_lut_functions_follow_ps3_3() -> None:
    x = RAMP.astype(np.float64)
    c, w = 1500.0, 800.0
    # PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID),
    # each scaled to [0, 1] here.
    linear = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    exact = np.clip((x - c) / w + 0.5, 0, 1)
    sigmoid = 1 / (1 + np.exp(-4 * (x - c) / w))
    np.testing.assert_allclose(_windowed(None, c, w), linear, atol=1e-5)
    np.testing.assert_allclose(_windowed("LINEAR_EXACT", c, w), exact, atol=1e-5)
    np.testing.assert_allclose(_windowed("SIGMOID", c, w), sigmoid, atol=1e-5)


def test_unusable_window_falls_back_to_percentiles() -> None:
    out = _windowed(None, 0.0, 0.5)  # LINEAR needs a width >= 1
    np.testing.assert_allclose(out, window_percentile(RAMP.astype(np.float32)), atol=1e-6)
    assert window_percentile(np.zeros((4, 4))).max() == 0.0


def test_no_pixel_data_raises_with_reason() -> None:
    ds = make_dataset(SynthSpec())
    del ds.PixelData
    with pytest.raises(PixelDecodeError, match="no pixel data"):
        decode(ds)


def test_truncated_pixel_data_raises_with_reason() -> None:
    ds = make_dataset(SynthSpec())
    ds.PixelData = ds.PixelData[:100]
    with pytest.raises(PixelDecodeError, match="cannot be decoded"):
        decode(ds)


def rgb_dataset() -> Dataset:
    """Return a synthetic 8-bit RGB secondary capture."""
    ds = make_dataset(SynthSpec(bits_stored=8, modality="SC"))
    rgb = np.zeros((256, 256, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.PixelData = rgb.tobytes()
    return ds


def test_colour_raises() -> None:
    ds = rgb_dataset()
    with pytest.raises(PixelDecodeError, match="colour"):
        decode(ds)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm"])
def test_pydicom_test_files_decode(name: str) -> None:
    import pydicom

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    out = decode(pydicom.dcmread(path))
    assert out.ndim == 2 and out.dtype == np.float32
    assert 0.0 <= out.min() <= out.max() <= 1.0


# Reduced decoding: the oracle is the full-resolution decode, block-averaged by plain numpy.


def _blocks(img: np.ndarray, k: int) -> np.ndarray:
    h, w = img.shape
    return img[:h - h % k, :w - w % k].reshape(h // k, k, w // k, k).mean(axis=(1, 3))


def test_a_reduced_decode_equals_the_block_average_of_the_full_decode_when_nothing_clips() -> None:
    px = phantom(1030, 1100, bits_stored=12, seed=3)
    # A rescale and a window wide enough that no pixel clips: every step is linear.
    ds = make_dataset(SynthSpec(rows=1030, columns=1100, rescale=(2.0, -100.0),
                                window=(4000, 12000)), pixels=px)
    full = decode(ds)
    small = decode(ds, min_side=300)
    assert small.shape == (344, 367)  # factor 3 (1030 // 300), the ragged edge padded
    np.testing.assert_allclose(small[:-1, :-1], _blocks(full, 3)[:343, :366], atol=1e-5)


def test_without_min_side_or_for_a_small_image_nothing_is_reduced() -> None:
    ds = make_dataset(SynthSpec(rows=400, columns=400), pixels=phantom(400, 400))
    np.testing.assert_array_equal(decode(ds, min_side=300), decode(ds))


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80"])
def test_compressed_images_decode_reduced_close_to_the_full_decode(syntax: str) -> None:
    from pydicom.uid import UID

    from dicom_io.pixels import _j2k_reduced

    px = phantom(2048, 2048, bits_stored=12, seed=1)
    ds = make_dataset(SynthSpec(rows=2048, columns=2048, bits_stored=12, window=(2048, 4096)),
                      pixels=px)
    ds.compress(UID(syntax))
    full = decode(ds)
    small = decode(ds, min_side=512)
    assert small.shape == (512, 512)
    # JPEG 2000 stops at its third resolution level (a wavelet low-pass, not a box):
    # close to the block average, not equal; JPEG-LS decodes in full and averages.
    reduced = _j2k_reduced(ds, 512)
    assert (reduced is not None) == (syntax.endswith(".90"))
    diff = small - _blocks(full, 4)
    assert abs(float(diff.mean())) < 0.001  # no bias
    assert float(np.abs(diff).mean()) < 0.01 and float(np.percentile(np.abs(diff), 99)) < 0.03
    if reduced is not None:  # stored values, not Pillow's 16-bit widening
        assert abs(float(reduced.mean()) - float(px.mean())) < 0.01 * float(px.mean())


def test_a_signed_jpeg2000_image_is_decoded_in_full() -> None:
    from pydicom.uid import JPEG2000Lossless

    from dicom_io.pixels import _j2k_reduced

    px = (phantom(1024, 1024, bits_stored=12, seed=2).astype(np.int16) - 2048)
    ds = make_dataset(SynthSpec(rows=1024, columns=1024, bits_stored=12, window=(0, 8192)),
                      pixels=px)
    ds.PixelRepresentation = 1
    ds.compress(JPEG2000Lossless)
    assert _j2k_reduced(ds, 300) is None
    np.testing.assert_allclose(decode(ds, min_side=300)[:341, :341], _blocks(decode(ds), 3),
                               atol=1e-5)
