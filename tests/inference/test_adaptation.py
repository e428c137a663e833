"""AdaBN on the ONNX file: after adaptation every convolution's output statistics on the
site's images are the training images', for float and int8-weights graphs alike.

The oracle is independent of the code under test: the statistics are measured by running
the adapted file in onnxruntime with each convolution's output exposed by the ``onnx``
package here, not by the module's own helpers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from triage.core.errors import InputError
from triage.inference import adaptation

SIZE = 24


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
                                  nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 6, 1, bias=False),
                                  nn.BatchNorm2d(6))
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.body(x).mean(dim=(2, 3)))[:, 0])


def _images(rng: np.random.Generator, n: int, gain: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """Smooth random images; a "site" renders them with another gain and offset."""
    base = rng.normal(size=(n, 1, SIZE // 4, SIZE // 4)).repeat(4, axis=2).repeat(4, axis=3)
    return (gain * (base + 0.3 * rng.normal(size=(n, 1, SIZE, SIZE))) + offset).astype(np.float32)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """An exported network whose BatchNorm statistics are the training images' (folded)."""
    torch.manual_seed(0)
    net = Net()
    train = _images(np.random.default_rng(1), 256)
    net.train()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a plain average over the batches
    with torch.no_grad():
        for i in range(0, 256, 32):
            net(torch.as_tensor(train[i:i + 32]))
    net.eval()
    path = tmp_path_factory.mktemp("adabn") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.zeros(1, 1, SIZE, SIZE),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["probability"],
                          dynamic_axes={"image": {0: "batch"}, "probability": {0: "batch"}})
    return path, train


def conv_stats(path: Path, images: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, std) of every Conv output, measured with its own session."""
    model = onnx.load(str(path))
    names = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    for n in names:
        model.graph.output.append(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(names, {"image": images})
    return [(o.mean(axis=(0, 2, 3)), o.std(axis=(0, 2, 3))) for o in outs]


def _gap(a: list[tuple[np.ndarray, np.ndarray]], b: list[tuple[np.ndarray, np.ndarray]]
         ) -> tuple[float, float]:
    """Largest |mean difference| in b's std, and largest |log std ratio|, over every channel."""
    shift = max(float(np.max(np.abs(ma - mb) / sb)) for (ma, _), (mb, sb) in zip(a, b, strict=True))
    ratio = max(float(np.max(np.abs(np.log(sa / sb)))) for (_, sa), (_, sb) in zip(a, b, strict=True))
    return shift, ratio


def test_the_site_variant_sees_training_statistics_on_the_site_images(
        fp32: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, train = fp32
    ref = adaptation.channel_moments(path, train)
    site = _images(np.random.default_rng(2), 200, gain=0.55, offset=0.8)
    trained = conv_stats(path, train)
    shift, ratio = _gap(conv_stats(path, site), trained)
    assert shift > 0.5 and ratio > 0.2  # the site really is different before adaptation
    info = adaptation.adapt(path, ref, site, tmp_path / "site.onnx", threads=1)
    assert info["images"] == 200 and info["convolutions"] == 3
    assert info["mean_shift_max_sd"] == pytest.approx(shift, rel=0.05)
    shift, ratio = _gap(conv_stats(tmp_path / "site.onnx", site), trained)
    assert shift < 0.02 and ratio < 0.02
    # The variant is a different file; the original is untouched.
    assert (tmp_path / "site.onnx").read_bytes() != path.read_bytes()
    assert _gap(conv_stats(path, site), trained)[0] > 0.5


def test_int8_weights_stay_int8_and_are_adapted_too(fp32: tuple[Path, np.ndarray],
                                                      tmp_path: Path) -> None:
    from triage.training.quantize import quantize

    path, train = fp32
    q = quantize(path, tmp_path / "w8.onnx", train[:64], "int8-weights")
    ref = adaptation.channel_moments(q, train)
    site = _images(np.random.default_rng(3), 160, gain=1.8, offset=-0.5)
    adaptation.adapt(q, ref, site, tmp_path / "w8-site.onnx", threads=1)
    model = onnx.load(str(tmp_path / "w8-site.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    for conv in (n for n in model.graph.node if n.op_type == "Conv"):
        assert conv.input[1] in dq and inits[dq[conv.input[1]].input[0]].dtype == np.int8
        assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    shift, ratio = _gap(conv_stats(tmp_path / "w8-site.onnx", site), conv_stats(q, train))
    assert shift < 0.05 and ratio < 0.05  # int8 rounding of the rescaled weights


def test_refusals(fp32: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    path, train = fp32
    ref = adaptation.channel_moments(path, train)
    with pytest.raises(InputError, match="too few"):
        adaptation.adapt(path, ref, train[:adaptation.MIN_IMAGES - 1], tmp_path / "x.onnx")
    other = {k.replace("Conv", "Other"): v for k, v in ref.items()}
    with pytest.raises(InputError, match="do not fit this model"):
        adaptation.adapt(path, other, train, tmp_path / "x.onnx")
    saved = tmp_path / "m.npz"
    adaptation.save_moments(saved, ref)
    back = adaptation.load_moments(saved)
    assert set(back) == set(ref) and all(np.allclose(back[k], ref[k], rtol=1e-6) for k in ref)
    with pytest.raises(InputError, match="cannot read"):
        adaptation.load_moments(tmp_path / "missing.npz")
    assert not (tmp_path / "x.onnx").exists()
