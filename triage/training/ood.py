"""The out-of-distribution check: how far an image's embedding lies from the training images'.

The main model's pooled features (its ``embedding`` output) of the training
images are summarised by their mean and principal components. An image's
distance is the Mahalanobis distance in the top ``k`` components (per
component, so about 1 on training images) plus the part of it outside those
components relative to the training images' (also about 1): a dog, a hip, a
photograph or an inverted radiograph land far on one or the other. The
distance is computed by a small ONNX graph (``<model>.ood.onnx``) shipped
beside the model, and the threshold is chosen on the validation images at a
stated false-refusal rate, recorded in the model card.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

COMPONENTS = 64
REFUSAL = 0.002  # validation images refused, at most (the guard's checks add up on one image)


class OodNet(nn.Module):
    """Embedding (N, D) in, distance (N,) out."""

    def __init__(self, mean: np.ndarray, components: np.ndarray, scales: np.ndarray,
                 residual_mean: float) -> None:
        super().__init__()
        self.mean: torch.Tensor
        self.components: torch.Tensor
        self.scales: torch.Tensor
        self.residual_mean: torch.Tensor
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("components", torch.as_tensor(components, dtype=torch.float32))
        self.register_buffer("scales", torch.as_tensor(scales, dtype=torch.float32))
        self.register_buffer("residual_mean", torch.tensor(float(residual_mean)))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        """Return each embedding's distance from the training distribution."""
        c = e - self.mean
        z = c @ self.components.T  # (N, k)
        inside = ((z / self.scales) ** 2).mean(dim=1)
        outside = (c ** 2).sum(dim=1) - (z ** 2).sum(dim=1)
        return inside + outside.clamp(min=0) / self.residual_mean


def fit(train_embeddings: np.ndarray, k: int = COMPONENTS) -> OodNet:
    """Return the distance of the training embeddings' distribution (scikit-learn's PCA)."""
    from sklearn.decomposition import PCA

    e = np.asarray(train_embeddings, dtype=np.float64)
    k = min(k, e.shape[0] - 1, e.shape[1])
    pca = PCA(n_components=k, svd_solver="full").fit(e)
    c = e - pca.mean_
    z = c @ pca.components_.T
    residual = np.maximum((c ** 2).sum(axis=1) - (z ** 2).sum(axis=1), 0)
    return OodNet(pca.mean_, pca.components_, np.sqrt(pca.explained_variance_),
                  max(float(residual.mean()), 1e-12))


def distances(net: OodNet, embeddings: np.ndarray) -> np.ndarray:
    """Return the distances of ``embeddings`` (torch; the ONNX graph computes the same)."""
    with torch.inference_mode():
        return net(torch.as_tensor(np.asarray(embeddings, dtype=np.float32))).numpy()


def threshold(val_distances: np.ndarray, rate: float = REFUSAL) -> float:
    """Return the distance above which at most ``rate`` of the validation images lie."""
    return float(np.nextafter(np.quantile(val_distances, 1 - rate, method="higher"), np.inf))


def export(net: OodNet, path: Path, dim: int) -> Path:
    """Write the distance as an ONNX graph: input ``embedding`` (N, dim), output ``distance`` (N)."""
    from triage.training.export import OPSET

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(net.eval(), (torch.zeros(1, dim),), str(path), dynamo=False,
                          opset_version=OPSET, input_names=["embedding"],
                          output_names=["distance"],
                          dynamic_axes={"embedding": {0: "batch"}, "distance": {0: "batch"}})
    return path


def card_entry(path: Path, thr: float, val: np.ndarray, train_n: int, k: int,
               sha256: str) -> dict[str, Any]:
    """Return what the model card records of the check."""
    return {"file": path.name, "sha256": sha256, "threshold": thr, "components": k,
            "fitted_on": f"embeddings of {train_n} training images",
            "validation": {"n": int(len(val)), "refused": int((val >= thr).sum()),
                           "target_refusal": REFUSAL,
                           "median_distance": float(np.median(val))}}
