"""Single-op ONNX models of the srbinarize ops and their FP32 counterparts (tests and benchmarks).

Every function returns a serialized ``onnx.ModelProto`` with symbolic batch and spatial axes.
Arrays given for an input become initializers; ``*_input=True`` makes it a graph input instead.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from srbinarize.runtime import DOMAIN

OPSET = 17
IR_VERSION = 10


def _model(node: onnx.NodeProto, inputs, initializers: dict, output: onnx.ValueInfoProto, *extra_outputs) -> bytes:
    graph = helper.make_graph(
        [node],
        f"{node.op_type}_graph",
        inputs,
        [output, *extra_outputs],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in initializers.items()],
    )
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION)
    return model.SerializeToString()


def _elem(dtype) -> int:
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def conv_model(
    threshold,
    weight,
    scale,
    bias=None,
    *,
    kernel_shape,
    in_channels,
    skip=0,
    spatial=False,
    channel_scale=False,
    residual=False,
    prelu_slope=None,
    spatial_weight=None,
    spatial_bias=None,
    channel_mean=False,
    weight_input=False,
    x_dtype=np.float32,
    x_shape=None,
    name="bconv",
    **attributes,
) -> bytes:
    """``BinaryConv2d``: inputs X [N, C, H, W] (+ spatial [N, 1, H, W], channel_scale [N, O], residual
    [N, O, H, W] when asked). Residual and Y have X's type where it is float16, else float32."""
    o = np.asarray(weight).shape[0]
    x_shape = x_shape or ["N", in_channels, "H", "W"]
    activation = TensorProto.FLOAT16 if np.dtype(x_dtype) == np.float16 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("X", _elem(x_dtype), x_shape)]
    init = {"threshold": threshold, "scale": scale}
    if weight_input:
        inputs.append(helper.make_tensor_value_info("weight", TensorProto.UINT64, list(np.asarray(weight).shape)))
    else:
        init["weight"] = weight
    names = ["X", "threshold", "weight", "scale", "", "", "", "", "", "", ""]
    if bias is not None:
        init["bias"] = bias
        names[4] = "bias"
    if spatial:
        inputs.append(helper.make_tensor_value_info("spatial", TensorProto.FLOAT, ["N", 1, "H", "W"]))
        names[5] = "spatial"
    if channel_scale:
        inputs.append(helper.make_tensor_value_info("channel_scale", TensorProto.FLOAT, ["N", o]))
        names[6] = "channel_scale"
    if residual:
        inputs.append(helper.make_tensor_value_info("residual", activation, ["N", o, "H", "W"]))
        names[7] = "residual"
    if prelu_slope is not None:
        init["prelu_slope"] = prelu_slope
        names[8] = "prelu_slope"
    if spatial_weight is not None:  # the spatial map computed inside the op
        init["spatial_weight"], init["spatial_bias"] = spatial_weight, spatial_bias
        names[9], names[10] = "spatial_weight", "spatial_bias"
    while names[-1] == "":
        names.pop()
    attrs = {"kernel_shape": list(kernel_shape), "in_channels": in_channels, "skip": int(skip), **attributes}
    outputs = ["Y", "channel_mean"] if channel_mean else ["Y"]  # channel_mean: second output [N, O]
    node = helper.make_node("BinaryConv2d", names, outputs, name=name, domain=DOMAIN, **attrs)
    types = [activation, TensorProto.FLOAT][: len(outputs)]
    return _model(node, inputs, init,
                  *(helper.make_tensor_value_info(o, t, None) for o, t in zip(outputs, types, strict=True)))


def linear_model(
    threshold,
    weight,
    scale,
    bias=None,
    *,
    in_features,
    skip=0,
    spatial=False,
    weight_input=False,
    x_dtype=np.float32,
    x_shape=None,
    name="blinear",
    **attributes,
) -> bytes:
    """``BinaryLinear``: input X [B, T, K] (+ spatial [B, T, 1] when asked)."""
    x_shape = x_shape or ["B", "T", in_features]
    inputs = [helper.make_tensor_value_info("X", _elem(x_dtype), x_shape)]
    init = {"threshold": threshold, "scale": scale}
    if weight_input:
        inputs.append(helper.make_tensor_value_info("weight", TensorProto.UINT64, list(np.asarray(weight).shape)))
    else:
        init["weight"] = weight
    names = ["X", "threshold", "weight", "scale", "", ""]
    if bias is not None:
        init["bias"] = bias
        names[4] = "bias"
    if spatial:
        inputs.append(helper.make_tensor_value_info("spatial", TensorProto.FLOAT, [*x_shape[:-1], 1]))
        names[5] = "spatial"
    while names[-1] == "":
        names.pop()
    attrs = {"in_features": in_features, "skip": int(skip), **attributes}
    node = helper.make_node("BinaryLinear", names, ["Y"], name=name, domain=DOMAIN, **attrs)
    return _model(node, inputs, init, helper.make_tensor_value_info("Y", TensorProto.FLOAT, None))


def fp32_conv_model(weight, bias=None) -> bytes:
    """Standard ONNX ``Conv`` (stride 1, same padding) with FP32 weight [O, C, KH, KW]."""
    _, c, kh, kw = np.asarray(weight).shape
    init = {"W": np.asarray(weight, np.float32)}
    if bias is not None:
        init["B"] = np.asarray(bias, np.float32)
    node = helper.make_node(
        "Conv", ["X", *init], ["Y"], name="conv", kernel_shape=[kh, kw], pads=[kh // 2, kw // 2] * 2
    )
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", c, "H", "W"])
    return _model(node, [x], init, helper.make_tensor_value_info("Y", TensorProto.FLOAT, None))


def fp32_linear_model(weight, bias=None) -> bytes:
    """Standard ONNX ``MatMul`` (+ ``Add`` fused by onnxruntime into one op) of X [B, T, K] by weight [O, K]."""
    _, k = np.asarray(weight).shape
    init = {"Wt": np.ascontiguousarray(np.asarray(weight, np.float32).T)}
    nodes = [helper.make_node("MatMul", ["X", "Wt"], ["XW" if bias is not None else "Y"], name="matmul")]
    if bias is not None:
        init["B"] = np.asarray(bias, np.float32)
        nodes.append(helper.make_node("Add", ["XW", "B"], ["Y"], name="add"))
    graph = helper.make_graph(
        nodes,
        "linear_graph",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "T", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, n) for n, v in init.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    return model.SerializeToString()
