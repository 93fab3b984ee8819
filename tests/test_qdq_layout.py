"""The 8-bit weight layout of the FQSR QDQ export: int8 (VNNI) or uint8 + 128 (exact on AVX2 without VNNI)."""

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
