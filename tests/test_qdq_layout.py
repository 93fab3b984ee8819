"""FQSR QDQ export options: the 8-bit weight layout (int8 with VNNI, uint8 + 128 exact on AVX2 without it) and
int8 boundaries (every conv a QLinearConv)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import edsr
from onnx import numpy_helper

import srbinarize
from srbinarize.export.qdq import QdqExportError, export_qdq
from srbinarize.runtime import cpu_has_vnni


def _weight_types(path) -> set[np.dtype]:
    """Element types of the 4-D integer constants that DequantizeLinear reads (the conv weights)."""
    graph = onnx.load(str(path)).graph
    dq_inputs = {n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    arrays = [numpy_helper.to_array(i) for i in graph.initializer if i.name in dq_inputs]
    arrays += [numpy_helper.to_array(n.attribute[0].t) for n in graph.node
               if n.op_type == "Constant" and n.output[0] in dq_inputs]
    return {a.dtype for a in arrays if a.ndim == 4}


@pytest.mark.parametrize("layout", ["s8", "u8"])
def test_8_bit_weight_layouts(tmp_path, layout):
    q = srbinarize.convert(edsr(num_block=1).eval(), "fqsr", bits_w=8)
    path = export_qdq(q, tmp_path / "m.onnx", weight_layout=layout)
    assert _weight_types(path) == {np.dtype(np.int8 if layout == "s8" else np.uint8)}
    if layout == "s8" and not cpu_has_vnni():
        pytest.skip("int8 8-bit weights are exact only with VNNI (u8s8 kernels saturate int16 on AVX2)")
    last = q.conv_last
    one_step = (last.weight_q.integer(last.weight).abs().sum((1, 2, 3)).max() * last.weight_q.step()
                * last.input_q.step() / 255).item()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 13, 27)
    with torch.no_grad():
        want = q(x).numpy()
    got = session.run(None, {"x": x.numpy()})[0]
    assert np.abs(got - want).max() <= one_step and np.abs(got - want).mean() < one_step / 5


def test_auto_layout_follows_the_cpu_and_bad_layout_fails(tmp_path):
    q = srbinarize.convert(edsr(num_block=1).eval(), "fqsr", bits_w=8)
    path = export_qdq(q, tmp_path / "m.onnx")
    assert _weight_types(path) == {np.dtype(np.int8 if cpu_has_vnni() else np.uint8)}
    with pytest.raises(QdqExportError, match="weight_layout='s16'"):
        export_qdq(q, tmp_path / "x.onnx", weight_layout="s16")


def test_int8_boundaries_make_every_conv_a_qlinearconv(tmp_path):
    """boundary="int8": the first conv's input and the last conv's output get Q / DQ too. Tolerance against the
    FP-boundary export on natural images, relative to the output's range: mean |error| <= 1%, RMS <= 2%."""
    from test_export import set5_crops

    q = srbinarize.convert(edsr(num_block=1).eval(), "fqsr", bits_w=8)
    calib = set5_crops((24, 24), n=4)
    plain = export_qdq(q, tmp_path / "plain.onnx")
    both = export_qdq(q, tmp_path / "both.onnx", boundary="int8", calibration_data=calib)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    fused = ort.InferenceSession(str(both), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert ops.count("QLinearConv") == 6 and "Conv" not in ops and "FusedConv" not in ops
    x = set5_crops((20, 28), n=2).numpy()
    ref = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err = np.abs(fused.run(None, {"x": x})[0] - ref)
    span = float(ref.max() - ref.min())
    assert 0 < err.mean() <= 0.01 * span and np.sqrt((err**2).mean()) <= 0.02 * span
    with pytest.raises(QdqExportError, match="boundary='int4'"):
        export_qdq(q, tmp_path / "x.onnx", boundary="int4")
