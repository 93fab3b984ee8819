"""The export pass that folds ``Conv -> PixelShuffle -> Conv`` into one low-resolution conv plus tap sums."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import edsr
from onnx import numpy_helper
from test_export import set5_crops, with_active_branches
from torch import nn

import srbinarize
from srbinarize.export.onnx import export_onnx
from srbinarize.runtime import ort_session


class ShuffleTail(nn.Module):
    """head -> conv_up -> PixelShuffle(r) [-> act] -> conv_out: the shape the fold looks for."""

    def __init__(self, feat: int, r: int, k_out: int, colours: int = 3, bias: bool = True, act: bool = False):
        super().__init__()
        self.head = nn.Conv2d(3, feat, 3, padding=1)
        self.up = nn.Conv2d(feat, feat * r * r, 3, padding=1, bias=bias)
        self.shuffle = nn.PixelShuffle(r)
        self.act = nn.LeakyReLU(0.1) if act else nn.Identity()
        self.out = nn.Conv2d(feat, colours, k_out, padding=k_out // 2, bias=bias)

    def forward(self, x):
        return self.out(self.act(self.shuffle(self.up(self.head(x)))))


def ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize(("r", "k_out", "bias"), [(2, 3, True), (3, 3, False), (4, 5, True), (2, 1, True)])
def test_fold_matches_the_model_at_sizes_other_than_the_export_size(r, k_out, bias, tmp_path):
    torch.manual_seed(0)
    model = ShuffleTail(feat=k_out * k_out * 3 + 5, r=r, k_out=k_out, bias=bias).eval()
    report = export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 8, 8))
    assert report.shuffle_folded == ["up + out"]
    graph = onnx.load(str(report.path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 2  # head and the merged conv; the output-resolution conv is gone
    merged = numpy_helper.to_array(next(i for i in graph.initializer if i.name == convs[1].input[1]))
    assert merged.shape == (k_out * k_out * 3 * r * r, model.up.in_channels, 3, 3)
    session = ort_session(report.path)
    for size in ((7, 11), (16, 16), (1, 5)):
        x = torch.rand(2, 3, *size)
        with torch.no_grad():
            ref = model(x).numpy()
        y = session.run(None, {"x": x.numpy()})[0]
        assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-5 * max(1.0, np.abs(ref).max()), size


@pytest.mark.parametrize(("feat", "act"), [(27, False), (40, True)])
def test_no_fold_where_it_would_not_pay_or_is_not_linear(feat, act, tmp_path):
    """27 features: 3x3 taps x 3 colours would be as wide as the shuffled tensor; a LeakyReLU after the
    shuffle (MSRResNet) makes the two convs not one linear map."""
    model = ShuffleTail(feat=feat, r=2, k_out=3, act=act).eval()
    report = export_onnx(model, tmp_path / "m.onnx", torch.rand(1, 3, 8, 8))
    assert report.shuffle_folded == [] and ops(report.path).count("Conv") == 3


def test_binary_edsr_with_int8_remainder_folds_and_shuffles_uint8(tmp_path):
    """EDSR x2 (32 features): conv_last folds into upsample.0, which runs as QLinearConv; the shuffle moves
    uint8 codes (dequantized after it), and the output stays within the int8 remainder's tolerance."""
    model = with_active_branches(srbinarize.convert(edsr(num_block=2, num_feat=32), "scales").eval())
    calib = set5_crops((24, 24), n=4)
    fp = export_onnx(model, tmp_path / "fp.onnx", torch.rand(1, 3, 16, 16))
    q = export_onnx(model, tmp_path / "q.onnx", torch.rand(1, 3, 16, 16), remainder="int8", calibration_data=calib)
    assert fp.shuffle_folded == q.shuffle_folded == ["upsample.0 + conv_last"]
    assert q.int8 == ["conv_first", "upsample.0"] and not any(line.startswith("conv_last:") for line in q.fp)
    graph = onnx.load(str(q.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    shuffle = next(n for n in graph.node if n.op_type == "DepthToSpace")
    assert producer[shuffle.input[0]].op_type == "QuantizeLinear"
    optimized = tmp_path / "q_opt.onnx"
    ort_session(q.path, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                optimized_model_filepath=str(optimized))
    assert ops(optimized).count("QLinearConv") == 2 and "Conv" not in ops(optimized)
    x = set5_crops((20, 28), n=2)
    with torch.no_grad():
        ref_torch = model(x).numpy()
    ref = ort_session(fp.path).run(None, {"x": x.numpy()})[0]
    assert np.abs(ref - ref_torch).max() <= 1e-4  # the FP32 fold is exact
    y = ort_session(q.path).run(None, {"x": x.numpy()})[0]
    err, span = np.abs(y - ref), float(ref.max() - ref.min())
    assert 0 < err.mean() <= 0.01 * span and np.sqrt((err**2).mean()) <= 0.02 * span and err.max() <= 0.25 * span
