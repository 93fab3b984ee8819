"""Fold the last upsampling stage's ``Conv -> PixelShuffle -> Conv`` into one low-resolution conv (ONNX pass).

SR networks of the EDSR / RCAN family end in ``u = conv_up(h)``, ``z = PixelShuffle_r(u)``, ``y = conv_out(z)``
with ``conv_out`` a k x k conv to a few colour channels at the output resolution. onnxruntime runs that
last conv as im2col + GEMM over every output pixel (a 64->3 3x3 conv on 512x512 takes longer than the
64->256 conv before it, FP32 or int8: measured in `benchmarks/results/e2e.md`), and the shuffle moves the
widest tensor of the network once more.

Both convs are linear and nothing sits between them, so per tap ``t`` of ``conv_out`` the product
``W_out[:, :, t] . z`` is a 1x1 conv of ``z``, which commutes with the shuffle; composed with ``conv_up``
it is one conv on the low-resolution ``h`` with ``k^2 * O * r^2`` outputs (``O`` colours). Then

    y = sum_t shift_t(DepthToSpace_r(conv_merged(h)))[tap t's O channels]

with zero padding (exactly ``conv_out``'s), and ``conv_out``'s bias added to the centre tap, which never
reads padding. The fold is applied where it lowers the MACs (``k^2 * O < C``, the shuffled channels): it
replaces the ``C * r^2``-channel tensor by a ``k^2 * O * r^2``-channel one and the output-resolution conv
by tap sums: standard Pad, Slice and Add ops, or the kernel library's ``ShuffleTaps`` op (the same floats in
one pass, without writing the shuffled tensor). Exact up to float rounding (merged weights in float64).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import consumers as graph_consumers

_END = np.iinfo(np.int64).max


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plain_same_conv(node: onnx.NodeProto, weight: np.ndarray) -> bool:
    """A stride-1, dilation-1, ungrouped conv with odd square kernel and 'same' zero padding."""
    a = _attrs(node)
    k = weight.shape[-1]
    return (weight.shape[-2] == k and k % 2 == 1 and a.get("group", 1) == 1
            and list(a.get("strides", [1, 1])) == [1, 1] and list(a.get("dilations", [1, 1])) == [1, 1]
            and list(a.get("pads", [0, 0, 0, 0])) == [k // 2] * 4 and a.get("auto_pad", b"NOTSET") == b"NOTSET")


def fold_shuffle_convs(graph: onnx.GraphProto, custom_domain: str | None = None) -> list[tuple[str, str]]:
    """Rewrite each foldable ``Conv -> DepthToSpace(CRD) -> Conv`` in ``graph``; returns the (first, second)
    conv weight names folded. Both convs need constant weights (and biases) and single consumers between them.

    The tap sums are standard ops (Pad, Slice, Add after the DepthToSpace), or with ``custom_domain`` (a file
    that loads the srbinarize kernel library anyway) one ``ShuffleTaps`` op of that domain, which reads the
    merged conv's output once and never writes the shuffled tensor.
    """
    inits = {i.name: i for i in graph.initializer}
    consumers = graph_consumers(graph)
    producer = {out: node for node in graph.node for out in node.output}
    graph_outputs = {o.name for o in graph.output}
    folded = []
    for shuffle in [n for n in graph.node if n.op_type == "DepthToSpace"]:
        a = _attrs(shuffle)
        if a.get("mode", b"DCR") != b"CRD":
            continue
        up, users = producer.get(shuffle.input[0]), consumers.get(shuffle.output[0], [])
        if up is None or up.op_type != "Conv" or len(users) != 1 or users[0].op_type != "Conv":
            continue
        out = users[0]
        if (len(consumers.get(up.output[0], [])) != 1 or up.output[0] in graph_outputs
                or shuffle.output[0] in graph_outputs or out.input[0] != shuffle.output[0]
                or not all(name in inits for name in [*up.input[1:], *out.input[1:]])
                or _attrs(up).get("group", 1) != 1):
            continue
        w_out = numpy_helper.to_array(inits[out.input[1]]).astype(np.float64)
        if not _plain_same_conv(out, w_out):
            continue
        r = int(a["blocksize"])
        w_up = numpy_helper.to_array(inits[up.input[1]]).astype(np.float64)
        colours, channels, k = w_out.shape[0], w_out.shape[1], w_out.shape[-1]
        if w_up.shape[0] != channels * r * r or k * k * colours >= channels:
            continue  # not this shuffle's shape, or the fold would not lower the MACs
        b_up = (numpy_helper.to_array(inits[up.input[2]]).astype(np.float64) if len(up.input) > 2
                else np.zeros(w_up.shape[0]))
        b_out = (numpy_helper.to_array(inits[out.input[2]]).astype(np.float64) if len(out.input) > 2
                 else np.zeros(colours))
        _merge(graph, up, out, inits, w_up, b_up, w_out, b_out, r)
        if custom_domain is None:
            _standard_taps(graph, shuffle, out, k, colours)
        else:
            _custom_taps(graph, shuffle, out, k, colours, r, custom_domain)
        folded.append((up.input[1], out.input[1]))
    return folded


def _merge(graph: onnx.GraphProto, up: onnx.NodeProto, out: onnx.NodeProto, inits: dict, w_up: np.ndarray,
           b_up: np.ndarray, w_out: np.ndarray, b_out: np.ndarray, r: int) -> None:
    """Give ``up`` the merged weights and bias; ``out``'s constants go."""
    colours, channels, k = w_out.shape[0], w_out.shape[1], w_out.shape[-1]
    taps = k * k
    # Merged output channel (t * O + o) * r^2 + phase: tap t of colour o at sub-pixel phase, DepthToSpace CRD order.
    wo = w_out.reshape(colours, channels, taps)
    wu = w_up.reshape(channels, r * r, *w_up.shape[1:])
    merged_w = np.einsum("oct,cp...->top...", wo, wu).reshape(taps * colours * r * r, *w_up.shape[1:])
    merged_b = np.einsum("oct,cp->top", wo, b_up.reshape(channels, r * r))
    merged_b[taps // 2] += b_out[:, None]  # the centre tap never reads the zero padding
    weight_name = up.input[1]
    bias_name = up.input[2] if len(up.input) > 2 else f"{weight_name}.folded_bias"
    for name in {up.input[1], *up.input[2:], *out.input[1:]}:
        graph.initializer.remove(inits[name])
    graph.initializer.extend([numpy_helper.from_array(merged_w.astype(np.float32), weight_name),
                              numpy_helper.from_array(merged_b.reshape(-1).astype(np.float32), bias_name)])
    del up.input[1:]
    up.input.extend([weight_name, bias_name])


def _standard_taps(graph: onnx.GraphProto, shuffle: onnx.NodeProto, out: onnx.NodeProto, k: int, colours: int) -> None:
    """``out`` replaced by Pad, one Slice per tap of the shuffled merged output, and Adds."""
    taps, p = k * k, k // 2
    index = list(graph.node).index(out)
    graph.node.remove(out)
    if k == 1:  # one tap: the shuffled merged conv is the output
        shuffle.output[0] = out.output[0]
        return
    base = out.name or out.output[0]
    nodes, padded = [], f"{base}.taps.padded"
    pads = f"{base}.taps.pads"
    graph.initializer.append(numpy_helper.from_array(np.array([0, 0, p, p, 0, 0, p, p], np.int64), pads))
    nodes.append(helper.make_node("Pad", [shuffle.output[0], pads], [padded], name=f"{base}.pad"))
    axes = f"{base}.taps.axes"
    graph.initializer.append(numpy_helper.from_array(np.array([1, 2, 3], np.int64), axes))
    total = None
    for t in range(taps):
        dy, dx = divmod(t, k)
        starts, ends = f"{base}.tap{t}.starts", f"{base}.tap{t}.ends"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([t * colours, dy, dx], np.int64), starts),
            numpy_helper.from_array(np.array([(t + 1) * colours, dy - 2 * p or _END, dx - 2 * p or _END],
                                             np.int64), ends)])
        tap = f"{base}.tap{t}"
        nodes.append(helper.make_node("Slice", [padded, starts, ends, axes], [tap], name=tap))
        if total is not None:
            last = t == taps - 1
            summed = out.output[0] if last else f"{base}.sum{t}"
            nodes.append(helper.make_node("Add", [total, tap], [summed], name=f"{base}.add{t}"))
            tap = summed
        total = tap
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)


def _custom_taps(graph: onnx.GraphProto, shuffle: onnx.NodeProto, out: onnx.NodeProto, k: int, colours: int, r: int,
                 domain: str) -> None:
    """``shuffle`` and ``out`` replaced by one ``ShuffleTaps`` op reading the merged conv's output."""
    node = helper.make_node("ShuffleTaps", [shuffle.input[0]], [out.output[0]], name=out.name or out.output[0],
                            domain=domain, blocksize=r, kernel=k, colours=colours)
    index = list(graph.node).index(shuffle)
    graph.node.remove(shuffle)
    graph.node.remove(out)
    graph.node.insert(index, node)
