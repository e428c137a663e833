"""Make the registry's CUDA build of torchvision importable on CPU-only torch.

The torchvision wheel on the package index is compiled against a CUDA torch.
On the CPU build of torch 2.13.0 its compiled extension fails to load, and the
Python side then dies at import on ``torch.ops.torchvision.nms`` because the
operator schema was never registered. We only use ``torchvision.models`` and
``transforms.v2``, which never call those kernels, so registering the two
schemas is enough. ``torchvision.ops`` and ``torchvision.io`` stay unusable.

Import this module (or call :func:`ensure_torchvision`) before importing
torchvision, timm or monai.
"""

from __future__ import annotations

import torch

_LIBRARY: torch.library.Library | None = None


def _has_nms() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute probe
    except (AttributeError, RuntimeError):
        return False
    return True


def ensure_torchvision() -> bool:
    """Register the missing torchvision operator schemas if needed.

    Returns True when the schemas had to be defined here, False when the
    installed torchvision already provides them. Raises nothing.
    """
    global _LIBRARY
    if _has_nms():
        return False
    if _LIBRARY is None:
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define(
            "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
        )
        # Keep a reference: the schemas vanish when the Library is collected.
        _LIBRARY = lib
    return True


ensure_torchvision()
