"""The one preprocessing chain, used by ``train``, ``calibrate``, ``score``, the daemon and ``replay``.

:func:`build_transforms` returns a MONAI ``Compose`` from the ``[preprocess]``
config plus the model card's input spec. Its input is a float 2-D grey image
(MONOCHROME2 sense) as produced by :mod:`triage.imaging.loading`; its output is
a float32 tensor of shape (1, size, size).

The deterministic transforms come first and every random one (training
augmentation) after them, so :func:`split_cached` can cut the chain where a
training cache stops, exactly as MONAI's ``CacheDataset`` does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureType,
    HistogramNormalize,
    NormalizeIntensity,
    RandAdjustContrast,
    RandAffine,
    Randomizable,
    RandScaleIntensityFixedMean,
    RandShiftIntensity,
    Resize,
    ScaleIntensityRangePercentiles,
    Transform,
)

from dicom_io.pixels import shrink
from triage.config import PreprocessConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    """What the network takes: a (channels, size, size) float32 tensor per image."""

    size: int
    channels: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Return the spec as the model card stores it."""
        return {"size": self.size, "channels": self.channels, "layout": "NCHW",
                "dtype": "float32"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        """Build a spec from a model card's ``input`` object. Raises KeyError if ``size`` is missing."""
        return cls(size=int(d["size"]), channels=int(d.get("channels", 1)))


def clahe(img: np.ndarray, tiles: int = 8, clip_limit: float = 0.01, bins: int = 256) -> np.ndarray:
    """Return contrast-limited adaptive histogram equalisation of a [0, 1] image.

    ``clip_limit`` is the largest share of a tile's pixels one histogram bin may
    hold before the excess is spread evenly (as in scikit-image). Tile maps are
    blended bilinearly between tile centres. Raises nothing; output is float32 in [0, 1].
    """
    h, w = img.shape
    t_y, t_x = max(1, min(tiles, h)), max(1, min(tiles, w))
    q = np.clip(np.rint(img * (bins - 1)), 0, bins - 1).astype(np.intp)
    ey = np.linspace(0, h, t_y + 1).astype(int)
    ex = np.linspace(0, w, t_x + 1).astype(int)
    luts = np.empty((t_y, t_x, bins), dtype=np.float32)
    for i in range(t_y):
        for j in range(t_x):
            block = q[ey[i]:ey[i + 1], ex[j]:ex[j + 1]]
            hist = np.bincount(block.ravel(), minlength=bins).astype(np.float64)
            limit = max(clip_limit * block.size, 1.0)
            excess = np.clip(hist - limit, 0, None).sum()
            hist = np.minimum(hist, limit) + excess / bins
            cdf = np.cumsum(hist)
            luts[i, j] = cdf / cdf[-1]
    fy = _tile_coords(h, t_y)
    fx = _tile_coords(w, t_x)
    y0, x0 = np.floor(fy).astype(int), np.floor(fx).astype(int)
    y1, x1 = np.minimum(y0 + 1, t_y - 1), np.minimum(x0 + 1, t_x - 1)
    wy, wx = (fy - y0)[:, None], (fx - x0)[None, :]
    top = (1 - wx) * luts[y0[:, None], x0[None, :], q] + wx * luts[y0[:, None], x1[None, :], q]
    bot = (1 - wx) * luts[y1[:, None], x0[None, :], q] + wx * luts[y1[:, None], x1[None, :], q]
    return ((1 - wy) * top + wy * bot).astype(np.float32)


def _tile_coords(n: int, tiles: int) -> np.ndarray:
    """Return each pixel's fractional tile index, measured between tile centres."""
    size = n / tiles
    return np.clip((np.arange(n) + 0.5) / size - 0.5, 0, tiles - 1)


def box_reduce(img: np.ndarray, target: int, headroom: int = 2) -> np.ndarray:
    """Average k x k blocks so the short side stays at least ``headroom * target``.

    A 2048-pixel radiograph bound for a 144-pixel network is first box-averaged
    by an integer factor (edges padded by replication), so the anti-aliased
    resize that follows smooths a few hundred pixels, not four million: the
    Gaussian it applies costs about 0.7 s of CPU at full size. Images already
    small (as in training, or decoded reduced by :func:`dicom_io.pixels.decode`)
    pass through unchanged. Works on (C, H, W) arrays.
    """
    return shrink(np.asarray(img), headroom * target)


class PercentileWindow(ScaleIntensityRangePercentiles):
    """MONAI's percentile window with its two percentiles found by selection (numpy's
    ``percentile``) instead of a full sort (``torch.quantile``): the same linear-interpolated
    percentiles, eight times faster on a 512-pixel image (42 ms to 5 ms on one thread)."""

    def _normalize(self, img: Any) -> Any:
        from monai.transforms import ScaleIntensityRange
        from monai.utils import convert_to_tensor

        arr = img.detach().cpu().numpy() if hasattr(img, "detach") else np.asarray(img)
        lo, hi = np.percentile(arr, [self.lower, self.upper])
        scale = ScaleIntensityRange(a_min=float(lo), a_max=float(hi), b_min=self.b_min,
                                    b_max=self.b_max, clip=self.clip, dtype=self.dtype)
        return convert_to_tensor(scale(img), track_meta=False)


class BoxReduce(Transform):
    """MONAI wrapper of :func:`box_reduce` (channel-first arrays or tensors)."""

    def __init__(self, target: int) -> None:
        self.target = target

    def __call__(self, img: Any) -> Any:
        return box_reduce(np.asarray(img), self.target)


class Clahe(Transform):
    """Thin MONAI wrapper of :func:`clahe` for a (1, H, W) array or tensor."""

    def __init__(self, tiles: int = 8, clip_limit: float = 0.01) -> None:
        self.tiles = tiles
        self.clip_limit = clip_limit

    def __call__(self, img: Any) -> Any:
        """Return the equalised image as a float32 numpy array of the same shape."""
        arr = np.asarray(img.detach().cpu().numpy() if hasattr(img, "detach") else img)
        return clahe(arr[0], self.tiles, self.clip_limit)[None]


class RandResizedCrop(Randomizable, Transform):
    """Crop a random area fraction and aspect ratio of a (C, H, W) image, then resize it.

    The crop covers ``scale`` (low, high) of the image's area at an aspect ratio
    drawn log-uniformly from ``ratio``, placed uniformly; after ten tries that
    do not fit, the whole image is used. The crop is then resized (bilinear,
    anti-aliased) to ``size`` squared, so training sees parts of the chest at
    many magnifications (the augmentation of Szegedy et al., 2015, common to
    ImageNet recipes).
    """

    def __init__(self, size: int, scale: tuple[float, float], ratio: tuple[float, float]) -> None:
        self.size, self.scale, self.ratio = size, scale, ratio
        self._resize = Resize((size, size), mode="bilinear", anti_aliasing=True)
        self._box: tuple[int, int, int, int] | None = None

    def randomize(self, data: Any = None) -> None:
        """Choose the crop box for an image of shape ``data`` (H, W)."""
        h, w = data
        area = h * w
        for _ in range(10):
            target = area * self.R.uniform(*self.scale)
            aspect = math.exp(self.R.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                y, x = int(self.R.randint(0, h - ch + 1)), int(self.R.randint(0, w - cw + 1))
                self._box = (y, x, ch, cw)
                return
        self._box = (0, 0, h, w)

    def __call__(self, img: Any) -> Any:
        """Return a random crop of ``img`` resized to ``size`` squared."""
        self.randomize(tuple(img.shape[-2:]))
        assert self._box is not None
        y, x, ch, cw = self._box
        return self._resize(img[..., y:y + ch, x:x + cw])


def _denoiser(cfg: PreprocessConfig, size: int) -> list[Transform]:
    """Return the optional denoising step named by ``cfg.denoise`` (MONAI's smoothing filters).

    It runs after the box reduction, on an image at least twice the input size,
    so the filter's width is measured in pixels of that image: ``denoise_strength``
    is the Gaussian's sigma, or the median filter's radius (rounded).
    """
    from monai.transforms import GaussianSmooth, MedianSmooth

    if cfg.denoise == "gaussian":
        return [GaussianSmooth(sigma=cfg.denoise_strength)]
    if cfg.denoise == "median":
        return [MedianSmooth(radius=max(1, round(cfg.denoise_strength)))]
    return []


def _equaliser(cfg: PreprocessConfig) -> list[Transform]:
    """Return the optional equalisation step named by ``cfg.equalization``."""
    if cfg.equalization == "histogram":
        return [HistogramNormalize(num_bins=256, min=0, max=1)]
    if cfg.equalization == "clahe":
        return [Clahe(cfg.clahe_tiles, cfg.clahe_clip_limit)]
    return []


def crops(cfg: PreprocessConfig) -> bool:
    """True when training crops at random scales (``aug_crop_scale`` below 1)."""
    return cfg.aug_crop_scale[0] < 1.0


def cache_size(cfg: PreprocessConfig, spec: InputSpec) -> int:
    """Return the side training caches images at: the input size, or larger when cropping."""
    return max(spec.size, cfg.train_cache_px) if crops(cfg) else spec.size


def _augmentations(cfg: PreprocessConfig, size: int) -> list[Transform]:
    """Return the training-only random transforms: crop, flip, geometry, then intensity."""
    from monai.transforms import RandFlip

    lo, hi = cfg.aug_crop_scale
    first: list[Transform] = []
    if crops(cfg):
        first.append(RandResizedCrop(size, (lo, hi),
                                     (cfg.aug_crop_ratio[0], cfg.aug_crop_ratio[1])))
    if cfg.aug_flip > 0:
        first.append(RandFlip(prob=cfg.aug_flip, spatial_axis=1))
    return [
        *first,
        RandAffine(
            prob=0.9,
            rotate_range=math.radians(cfg.aug_rotate_deg),
            translate_range=(cfg.aug_translate * size, cfg.aug_translate * size),
            scale_range=(cfg.aug_scale, cfg.aug_scale),
            padding_mode="border",
        ),
        RandScaleIntensityFixedMean(prob=0.8, factors=cfg.aug_contrast),
        RandShiftIntensity(prob=0.8, offsets=cfg.aug_brightness),
        RandAdjustContrast(prob=0.3 if cfg.aug_gamma == (0.8, 1.25) else 0.5,
                           gamma=(cfg.aug_gamma[0], cfg.aug_gamma[1])),
    ]


def build_transforms(cfg: PreprocessConfig, spec: InputSpec, train: bool = False) -> Compose:
    """Return the preprocessing chain for a 2-D grey image.

    Deterministic part: add channel, box-reduce very large images (see
    :func:`box_reduce`), percentile window to [0, 1] (per-image
    intensity normalisation), optional histogram equalisation or CLAHE, resize
    with anti-aliasing to ``spec.size`` squared. With ``train`` the random
    augmentations follow; when they crop at random scales the deterministic
    part resizes to :func:`cache_size` instead and the crop brings the image to
    ``spec.size``. Last: normalise with the fixed mean/std and return a
    float32 tensor (channels, size, size). Raises nothing at build time.
    """
    lo, hi = cfg.window_percentiles
    side = cache_size(cfg, spec) if train else spec.size
    steps: list[Transform] = [
        EnsureChannelFirst(channel_dim="no_channel"),
        BoxReduce(spec.size),
        PercentileWindow(lo, hi, b_min=0.0, b_max=1.0, clip=True),
        *_denoiser(cfg, spec.size),
        *_equaliser(cfg),
        Resize((side, side), mode="bilinear", anti_aliasing=True),
    ]
    if train:
        steps += _augmentations(cfg, spec.size)
    steps += [
        NormalizeIntensity(subtrahend=cfg.mean, divisor=cfg.std),  # type: ignore[arg-type]
        EnsureType(data_type="tensor", dtype=np.float32, track_meta=False),
    ]
    if spec.channels > 1:
        from monai.transforms import RepeatChannel

        steps.append(RepeatChannel(spec.channels))
    return Compose(steps)


def one_thread() -> None:
    """Run this process's transforms on one torch thread (each decoder process is one worker)."""
    import torch

    torch.set_num_threads(1)


def preprocess_of(card: dict[str, Any]) -> PreprocessConfig:
    """Return the preprocessing a model was trained with, from its card or checkpoint.

    Raises ConfigError when the recorded values are invalid.
    """
    import json

    from triage.config import section_from_dict
    from triage.core.errors import ConfigError

    # A JSON round trip turns a checkpoint's tuples into the lists TOML would give.
    if "preprocess" not in card:
        raise ConfigError("model card has no 'preprocess' section")
    recorded = json.loads(json.dumps(card["preprocess"]))
    return section_from_dict(PreprocessConfig, recorded, "preprocess.")


def split_cached(chain: Compose) -> tuple[Compose, Compose]:
    """Split ``chain`` before its first random transform.

    Returns (deterministic prefix, rest); the prefix's output may be cached.
    A new MONAI ``Compose`` re-seeds its members from MONAI's global seed (by
    default from the operating system), which would make a seeded training run
    draw different augmentations every time; ``rest`` is therefore re-seeded
    from ``chain``'s own random state.
    """
    ts = list(chain.transforms)
    cut = next((i for i, t in enumerate(ts) if isinstance(t, Randomizable)), None)
    if cut is None:
        # Cache up to the final normalisation so eval and train caches agree.
        cut = next(i for i, t in enumerate(ts) if isinstance(t, NormalizeIntensity))
    seed = int(chain.R.randint(2**32 - 1, dtype="uint32"))
    prefix, rest = Compose(ts[:cut]), Compose(ts[cut:])
    rest.set_random_state(seed=seed)
    return prefix, rest
