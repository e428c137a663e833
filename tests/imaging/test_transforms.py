"""triage.preprocess: the one chain, its cache split, image and DICOM loaders, equalisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Randomizable
from PIL import Image
from pydicom.data import get_testdata_file

from tests import synth
from triage.config import PreprocessConfig
from triage.core.errors import UnscorableError
from triage.imaging.loading import load_any, load_dicom, load_image
from triage.imaging.transforms import InputSpec, build_transforms, clahe, split_cached

CFG = PreprocessConfig()


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("equalization", ["none", "histogram", "clahe"])
def test_chain_output_shape_and_type(size: int, equalization: str) -> None:
    cfg = PreprocessConfig(equalization=equalization)
    img = np.random.default_rng(0).random((300, 250)).astype(np.float32)
    out = build_transforms(cfg, InputSpec(size))(img)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert out.shape == (1, size, size)
    assert torch.isfinite(out).all()


def test_eval_chain_is_deterministic_and_train_chain_is_not() -> None:
    img = synth.phantom(128, 128).astype(np.float32)
    ev = build_transforms(CFG, InputSpec(48))
    assert torch.equal(ev(img), ev(img))
    tr = build_transforms(CFG, InputSpec(48), train=True)
    tr.set_random_state(seed=0)
    assert not torch.equal(tr(img), tr(img))


def test_split_cached_puts_every_random_transform_after_the_cut() -> None:
    prefix, rest = split_cached(build_transforms(CFG, InputSpec(48), train=True))
    assert not any(isinstance(t, Randomizable) for t in prefix.transforms)
    assert isinstance(rest.transforms[0], Randomizable)
    img = synth.phantom(128, 128).astype(np.float32)
    ev_prefix, ev_rest = split_cached(build_transforms(CFG, InputSpec(48)))
    assert torch.equal(ev_rest(ev_prefix(img)), build_transforms(CFG, InputSpec(48))(img))


def test_percentile_window_makes_intensity_scale_irrelevant() -> None:
    img = synth.phantom(128, 128).astype(np.float32)
    chain = build_transforms(CFG, InputSpec(32))
    torch.testing.assert_close(chain(img), chain(img * 7 + 100), atol=1e-4, rtol=1e-4)


def test_png_and_dicom_of_the_same_image_agree(tmp_path: Path) -> None:
    arr8 = (synth.phantom(200, 200, bits_stored=8)).astype(np.uint8)
    Image.fromarray(arr8).convert("RGB").save(tmp_path / "a.png")
    ds = synth.make_dataset(synth.SynthSpec(rows=200, columns=200, bits_stored=8), pixels=arr8)
    chain = build_transforms(CFG, InputSpec(64))
    a = chain(load_image(tmp_path / "a.png"))
    b = chain(load_dicom(ds))
    torch.testing.assert_close(a, b, atol=1e-3, rtol=0)


def test_monochrome1_dicom_matches_monochrome2_through_the_chain() -> None:
    chain = build_transforms(CFG, InputSpec(64))
    m1 = chain(load_dicom(synth.make_dataset(synth.SynthSpec(photometric="MONOCHROME1"))))
    m2 = chain(load_dicom(synth.make_dataset(synth.SynthSpec(photometric="MONOCHROME2"))))
    torch.testing.assert_close(m1, m2, atol=1e-2, rtol=0)


def test_clahe_stretches_a_low_contrast_image() -> None:
    rng = np.random.default_rng(0)
    img = (0.45 + 0.1 * rng.random((64, 64))).astype(np.float32)
    out = clahe(img, tiles=4, clip_limit=0.05)
    assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    assert out.std() > 2 * img.std()
    # A constant image stays constant (no spurious texture).
    flat = clahe(np.full((32, 32), 0.5, dtype=np.float32), tiles=4)
    assert flat.max() - flat.min() < 1e-6


def test_colour_png_is_rejected(tmp_path: Path) -> None:
    rgb = np.zeros((200, 200, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "c.png")
    with pytest.raises(UnscorableError, match="colour image"):
        load_image(tmp_path / "c.png")


def test_undecodable_image_file(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UnscorableError, match="cannot be decoded"):
        load_image(tmp_path / "x.jpg")


def test_load_any_dicom_reasons(tmp_path: Path) -> None:
    with pytest.raises(UnscorableError, match="modality CT"):
        load_any(get_testdata_file("CT_small.dcm"))
    lateral = synth.write(synth.make_dataset(synth.SynthSpec(view_position="LL")), tmp_path / "l.dcm")
    with pytest.raises(UnscorableError, match="lateral"):
        load_any(lateral)
    (tmp_path / "junk.dcm").write_bytes(b"\x00" * 10)
    with pytest.raises(UnscorableError):
        load_any(tmp_path / "junk.dcm")
    ok = synth.write(synth.make_dataset(synth.SynthSpec()), tmp_path / "ok.dcm")
    assert load_any(ok).shape == (256, 256)


def test_box_reduce_keeps_small_images_and_matches_the_full_resize_on_large_ones() -> None:
    import numpy as np
    from monai.transforms import Resize

    from tests.synth import phantom
    from triage.imaging.transforms import box_reduce

    small = np.random.default_rng(0).random((1, 224, 224), dtype=np.float32)
    assert box_reduce(small, 144) is small or np.array_equal(box_reduce(small, 144), small)
    big = phantom(2000, 1800, bits_stored=12, seed=3).astype(np.float32)[None] / 4095
    reduced = box_reduce(big, 144)
    assert reduced.shape == (1, 334, 300)  # factor 1800 // 288 = 6, edges padded
    resize = Resize((144, 144), mode="bilinear", anti_aliasing=True)
    direct = np.asarray(resize(big))[0]
    via = np.asarray(resize(reduced))[0]
    assert np.corrcoef(direct.ravel(), via.ravel())[0, 1] > 0.999
    assert np.abs(direct - via).mean() < 0.01


def test_a_seeded_training_chain_draws_the_same_augmentations_every_time() -> None:
    cfg = PreprocessConfig(min_size_px=32, aug_crop_scale=(0.3, 1.0), train_cache_px=80)
    img = np.random.default_rng(0).random((100, 100)).astype(np.float32)
    draws = []
    for _ in range(2):
        chain = build_transforms(cfg, InputSpec(64), train=True)
        chain.set_random_state(seed=5)
        prefix, rest = split_cached(chain)
        x = prefix(img)
        draws.append([np.asarray(rest(x)) for _ in range(3)])
    for a, b in zip(*draws, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(draws[0][0], draws[0][1])  # and they do vary


def test_random_resized_crop_covers_the_asked_area_and_resizes() -> None:
    from triage.imaging.transforms import RandResizedCrop

    t = RandResizedCrop(32, (0.2, 0.5), (0.75, 1.3333))
    t.set_random_state(seed=1)
    img = np.random.default_rng(1).random((1, 100, 120)).astype(np.float32)
    for _ in range(50):
        out = t(img)
        assert tuple(out.shape) == (1, 32, 32)
        _, _, ch, cw = t._box  # type: ignore[misc]
        assert 0.2 * 0.8 <= ch * cw / (100 * 120) <= 0.5 * 1.2  # rounding of the sides
        assert 0.75 * 0.9 <= cw / ch <= 1.3333 * 1.1


@pytest.mark.parametrize("kind", ["gaussian", "median"])
def test_denoising_removes_pixel_noise_and_keeps_the_shape(kind: str) -> None:
    rng = np.random.default_rng(0)
    clean = np.tile(np.linspace(0, 1, 200, dtype=np.float32), (200, 1))
    noisy = clean + rng.normal(0, 0.1, clean.shape).astype(np.float32)
    spec = InputSpec(64)
    plain = np.asarray(build_transforms(PreprocessConfig(), spec)(noisy))
    smooth = np.asarray(build_transforms(PreprocessConfig(denoise=kind), spec)(noisy))
    target = np.asarray(build_transforms(PreprocessConfig(), spec)(clean))
    assert smooth.shape == plain.shape == (1, 64, 64)
    # Closer to the clean image than without denoising (away from the borders).
    inner = (slice(None), slice(4, -4), slice(4, -4))
    assert np.abs(smooth - target)[inner].mean() < np.abs(plain - target)[inner].mean()


@pytest.mark.parametrize("syntax", [None, "1.2.840.10008.1.2.4.90"])
def test_decoding_reduced_changes_the_shipped_models_input_very_little(syntax: str | None) -> None:
    """The daemon decodes at the working side (512 px) instead of full resolution; the oracle
    is the full-resolution decode put through the same chain (its own box reduction). (On real
    radiographs the score moves by 0.005 on average: scripts/decode_agreement.py, docs/benchmarks.md;
    this phantom is no radiograph, so its score is not compared.)"""
    from pydicom.uid import UID

    from triage.imaging.prepare import working_side
    from triage.imaging.transforms import preprocess_of

    repo = Path(__file__).resolve().parents[2]
    model = json.loads((repo / "models/cxr-pneumonia-mnv2.json").read_text())
    spec = InputSpec.from_dict(model["input"])
    chain = build_transforms(preprocess_of(model), spec)
    px = synth.phantom(2048, 2048, bits_stored=12, seed=4)
    ds = synth.make_dataset(synth.SynthSpec(rows=2048, columns=2048, bits_stored=12), pixels=px)
    if syntax:
        ds.compress(UID(syntax))
    reduced = load_dicom(ds, min_side=working_side(spec.size))
    assert min(reduced.shape) == 512
    full_x = np.asarray(chain(load_dicom(ds)), dtype=np.float32)
    red_x = np.asarray(chain(reduced), dtype=np.float32)
    assert red_x.shape == full_x.shape
    assert float(np.abs(red_x - full_x).mean()) < 0.05  # the input is normalised: std about 1
    assert float(np.corrcoef(red_x.ravel(), full_x.ravel())[0, 1]) > 0.995


def test_the_percentile_window_matches_monais() -> None:
    from monai.transforms import ScaleIntensityRangePercentiles

    from triage.imaging.transforms import PercentileWindow

    rng = np.random.default_rng(5)
    for img in (rng.random((1, 300, 257)).astype(np.float32),
                synth.phantom(512, 512).astype(np.float32)[None] * 3 - 7,
                np.full((1, 64, 64), 0.25, dtype=np.float32)):
        ours = PercentileWindow(0.5, 99.5, b_min=0.0, b_max=1.0, clip=True)(img)
        theirs = ScaleIntensityRangePercentiles(0.5, 99.5, b_min=0.0, b_max=1.0, clip=True)(img)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=1e-5)
