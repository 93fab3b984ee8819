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
from srbinarize.export.onnx import EXACT, export_onnx
from srbinarize.runtime import DOMAIN, ort_session


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


def test_binary_edsr_with_int8_remainder_folds_into_shuffle_taps(tmp_path):
    """EDSR x2 (32 features): conv_last folds into upsample.0, which runs as QLinearConv, and its uint8 output
    goes straight into ShuffleTaps; the output stays within the int8 remainder's tolerance."""
    model = with_active_branches(srbinarize.convert(edsr(num_block=2, num_feat=32), "scales").eval())
    calib = set5_crops((24, 24), n=4)
    fp = export_onnx(model, tmp_path / "fp.onnx", torch.rand(1, 3, 16, 16), **EXACT)
    q = export_onnx(model, tmp_path / "q.onnx", torch.rand(1, 3, 16, 16), remainder="int8", calibration_data=calib,
                    activations="float32")
    assert fp.shuffle_folded == q.shuffle_folded == ["upsample.0 + conv_last"]
    assert q.int8 == ["upsample.0"] and not any(line.startswith("conv_last:") for line in q.fp)
    assert "DepthToSpace" not in ops(q.path) and ops(q.path).count("ShuffleTaps") == 1
    optimized = tmp_path / "q_opt.onnx"
    ort_session(q.path, graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                optimized_model_filepath=str(optimized))
    assert ops(optimized).count("QLinearConv") == 1
    x = set5_crops((20, 28), n=2)
    with torch.no_grad():
        ref_torch = model(x).numpy()
    ref = ort_session(fp.path).run(None, {"x": x.numpy()})[0]
    assert np.abs(ref - ref_torch).max() <= 1e-4  # the FP32 fold is exact
    y = ort_session(q.path).run(None, {"x": x.numpy()})[0]
    err, span = np.abs(y - ref), float(ref.max() - ref.min())
    assert 0 < err.mean() <= 0.01 * span and np.sqrt((err**2).mean()) <= 0.02 * span and err.max() <= 0.25 * span


class ShuffleOut(nn.Module):
    """A network that ends in conv -> PixelShuffle (EFDN, FMEN, ...): nothing to fold, the shuffle is the output."""

    def __init__(self, feat: int = 16, r: int = 2):
        super().__init__()
        self.head = nn.Conv2d(3, feat, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(feat, feat, 3, padding=1), nn.ReLU(), nn.Conv2d(feat, feat, 3, padding=1))
        self.up = nn.Conv2d(feat, 3 * r * r, 3, padding=1)
        self.shuffle = nn.PixelShuffle(r)

    def forward(self, x):
        h = self.head(x)
        return self.shuffle(self.up(h + self.body(h)))


def test_int8_remainder_shuffles_uint8_codes_and_dequantizes_after(tmp_path):
    model = srbinarize.convert(ShuffleOut().eval(), "scales")
    calib = set5_crops((24, 24), n=4)
    q = export_onnx(model, tmp_path / "q.onnx", torch.rand(1, 3, 16, 16), remainder="int8", calibration_data=calib)
    assert "up" in q.int8 and not q.shuffle_folded
    graph = onnx.load(str(q.path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    shuffle = next(n for n in graph.node if n.op_type == "DepthToSpace")
    assert producer[shuffle.input[0]].op_type == "QuantizeLinear"
    assert [n.op_type for n in graph.node if shuffle.output[0] in n.input] == ["DequantizeLinear"]
    fp = export_onnx(model, tmp_path / "fp.onnx", torch.rand(1, 3, 16, 16), remainder="fp32")
    x = set5_crops((20, 28), n=2).numpy()
    ref = ort_session(fp.path).run(None, {"x": x})[0]
    err, span = np.abs(ort_session(q.path).run(None, {"x": x})[0] - ref), float(ref.max() - ref.min())
    assert 0 < err.mean() <= 0.01 * span and err.max() <= 0.25 * span


def _custom_form(fp_path, tmp_path, name: str):
    """The FP file with its tap sums as the srbinarize ShuffleTaps op; returns (path, folded pairs)."""
    from srbinarize.export.shuffle_fold import fold_shuffle_convs

    proto = onnx.load(str(fp_path))
    folded = fold_shuffle_convs(proto.graph, DOMAIN)
    proto.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    path = tmp_path / name
    onnx.save(proto, str(path))
    return path, folded


@pytest.mark.parametrize(("r", "k_out"), [(2, 3), (3, 5), (4, 1)])
def test_shuffle_taps_op_equals_the_standard_ops(r, k_out, tmp_path):
    """The op sums the taps in the standard form's order: the same floats, at any size and batch."""
    from srbinarize.export.qdq import fp32_onnx

    torch.manual_seed(1)
    model = ShuffleTail(feat=k_out * k_out * 3 + 2, r=r, k_out=k_out).eval()
    standard = export_onnx(model, tmp_path / "standard.onnx", torch.rand(1, 3, 8, 8))
    assert standard.shuffle_folded and "ShuffleTaps" not in ops(standard.path)  # no binary op: standard ops
    custom, folded = _custom_form(fp32_onnx(model, tmp_path / "fp.onnx", torch.rand(1, 3, 8, 8)), tmp_path, "c.onnx")
    assert len(folded) == 1 and ops(custom).count("ShuffleTaps") == 1 and "DepthToSpace" not in ops(custom)
    a, b = ort_session(standard.path), ort_session(custom)
    for shape in ((1, 3, 7, 11), (2, 3, 16, 16), (1, 3, 1, 5)):
        x = np.random.default_rng(0).random(shape, dtype=np.float32)
        assert np.array_equal(a.run(None, {"x": x})[0], b.run(None, {"x": x})[0]), shape


def test_shuffle_taps_reads_uint8_codes_as_their_dequantized_values(tmp_path):
    model = with_active_branches(srbinarize.convert(edsr(num_block=1, num_feat=32), "scales").eval())
    q = export_onnx(model, tmp_path / "q.onnx", torch.rand(1, 3, 16, 16), remainder="int8",
                    calibration_data=set5_crops((24, 24), n=4))
    proto = onnx.load(str(q.path))
    taps = next(n for n in proto.graph.node if n.op_type == "ShuffleTaps")
    assert len(taps.input) == 3  # codes, scale, zero point: no DequantizeLinear before it
    codes, scale, zero = list(taps.input)
    proto.graph.node.insert(list(proto.graph.node).index(taps), onnx.helper.make_node(
        "DequantizeLinear", [codes, scale, zero], ["dequantized"], name="explicit_dq"))
    del taps.input[:]
    taps.input.append("dequantized")
    onnx.save(proto, str(tmp_path / "dq.onnx"))
    x = set5_crops((20, 28), n=2).numpy()
    y = ort_session(q.path).run(None, {"x": x})[0]
    assert np.array_equal(y, ort_session(tmp_path / "dq.onnx").run(None, {"x": x})[0])


@pytest.mark.parametrize(("dtype", "channels", "inputs", "needle"), [
    (onnx.TensorProto.FLOAT, 10, 1, "input 'V' must be [N, 108, h, w]"),
    (onnx.TensorProto.UINT8, 108, 1, "needs inputs 'scale' (float32) and 'zero_point' (uint8)"),
    (onnx.TensorProto.INT32, 108, 1, "must be float32 or uint8 codes, got int32"),
])
def test_shuffle_taps_bad_input_names_the_node(dtype, channels, inputs, needle, tmp_path):
    from onnx import helper

    node = helper.make_node("ShuffleTaps", ["v"][:inputs], ["y"], name="tail_taps", domain=DOMAIN, blocksize=2,
                            kernel=3, colours=3)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("v", dtype, [1, channels, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(Exception, match=r"ShuffleTaps node 'tail_taps'") as err:
        session = ort_session(tmp_path / "bad.onnx")
        np_type = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        session.run(None, {"v": np.zeros((1, channels, 4, 4), np_type)})
    assert needle in str(err.value)
