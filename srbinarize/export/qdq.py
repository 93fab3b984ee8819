"""QDQ ONNX export of FQSR models: standard QuantizeLinear / DequantizeLinear, integer containers.

What each FQSR piece becomes (zero points are 0, scales are the quantizers' steps ``I / n``):

- an activation quantizer: ``QuantizeLinear -> DequantizeLinear`` in uint8, zero point 0 for unsigned
  codes and 128 for signed ones (the int8 code + 128, exactly); below 8 bits a ``Clip`` to the code's
  range comes first (the opsets onnxruntime fuses have no 2..7-bit type; the clip keeps the M-bit
  semantics in the 8-bit container);
- a conv's weights: up to 7 bits the int8 code itself (onnxruntime's fast u8s8 kernels), at 8 bits the
  int8 code + 128 as a uint8 initializer (zero point 128), and ``DequantizeLinear``, per tensor; its bias,
  when the input is quantized, an int32 initializer on the grid of input step x weight step (what
  onnxruntime's integer kernels add) and ``DequantizeLinear``;

Why (measured on this machine's CPU, AVX2 without AVX-512 or VNNI): onnxruntime's u8s8 kernels add pairs of
u8 x s8 products in saturating int16, so full-range 8-bit weights in int8 gave outputs off by many steps;
codes within [-64, 63] (7-bit weights) cannot saturate. 8-bit weights go to the exact u8u8 kernels,
which on this CPU are no faster than FP32. onnxruntime does not fuse int8 activations with uint8
weights, hence uint8 activations throughout.
- a skip add: both operands through the shared quantizer's Q/DQ, ``Add``, the result's Q/DQ.

So ``DQ -> Conv -> Q`` and ``DQ, DQ -> Add -> Q`` at 8 bits are exactly the patterns onnxruntime turns into
``QLinearConv`` / ``QLinearAdd`` (integer kernels). Batch, height and width are dynamic.

``int4=True`` stores codes of at most 4 bits in 4-bit containers (opset 21): weight codes as ``int4``,
activation codes as ``uint4`` (unsigned) or ``int4`` (signed, zero point 0) without the ``Clip``, since the
4-bit saturation is the clip. onnxruntime 1.32 runs such a graph with the same codes, but it has no
integer convolution for 4-bit types: it runs float ``Conv`` on the dequantized values, so the file and
the tensors between layers shrink while the convs are slower than the fused 8-bit containers. Rounding is half
to even on both sides; onnxruntime's requantization (fixed-point multiplier) can still move a code by one
step, which is the tolerance the tests hold the export to.
"""

from __future__ import annotations

import contextlib
import copy
import os
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from ..atomic import atomic_output
from ..errors import SrbinarizeError
from ..layers.fqsr import FqsrConv2d, IntervalQuantizer
from ..runtime import cpu_has_vnni
from .onnx_graph import consumers as graph_consumers

OPSET = 17
WEIGHT_LAYOUTS = ("auto", "s8", "u8")
INT4_OPSET = 21  # the first opset whose QuantizeLinear / DequantizeLinear take int4 and uint4


class QdqExportError(SrbinarizeError):
    """The model cannot be written as a QDQ graph (not converted, not calibrated, ...)."""


class _FakeQuant(torch.autograd.Function):
    """``clamp(round(x / scale), lo, hi) * scale``, exported as [Clip ->] QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale: float, lo: int, hi: int):
        return torch.clamp(torch.round(x / scale), lo, hi) * scale

    @staticmethod
    def symbolic(g, x, scale: float, lo: int, hi: int):
        zero_point = 128 if lo < 0 else 0  # signed codes as uint8 + 128, see the module doc
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=torch.uint8))
        if (lo, hi) != (-zero_point, 255 - zero_point):
            low = g.op("Constant", value_t=torch.tensor(lo * scale, dtype=torch.float32))
            high = g.op("Constant", value_t=torch.tensor(hi * scale, dtype=torch.float32))
            x = g.op("Clip", x, low, high)
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)


@dataclass(frozen=True)
class _Code:
    """An integer code held outside autograd, so the exporter writes it as an initializer, not as ops."""

    values: torch.Tensor
    scale: float
    dtype: torch.dtype
    zero_point: int = 0  # stored = code + zero_point


class _DequantConst(torch.autograd.Function):
    """A constant integer tensor times its scale, exported as an integer initializer and DequantizeLinear."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, code: _Code):
        return (code.values * code.scale).to(anchor.dtype)

    @staticmethod
    def symbolic(g, anchor, code: _Code):
        c = g.op("Constant", value_t=(code.values + code.zero_point).to(code.dtype))
        s = g.op("Constant", value_t=torch.tensor(code.scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(code.zero_point, dtype=code.dtype))
        return g.op("DequantizeLinear", c, s, z)


def _fake_quant(q: IntervalQuantizer, x: torch.Tensor) -> torch.Tensor:
    lo, hi = q.qrange()
    return _FakeQuant.apply(x, float(q.step()), lo, hi)


def _quantizer_forward(self: IntervalQuantizer, v: torch.Tensor) -> torch.Tensor:
    return _fake_quant(self, v)


def _conv_codes(
    conv: FqsrConv2d, s8_weights: bool = False
) -> tuple[_Code | torch.Tensor, _Code | torch.Tensor | None]:
    """The deployed weight (int8 code) and bias (int32 code on the input x weight grid, else FP)."""
    with torch.no_grad():
        weight: _Code | torch.Tensor = conv.weight.detach().clone()
        bias: _Code | torch.Tensor | None = None if conv.bias is None else conv.bias.detach().clone()
        if conv.weight_q is not None:
            w_step = float(conv.weight_q.step())
            code = conv.weight_q.integer(conv.weight)
            lo, hi = conv.weight_q.qrange()
            # codes within [-64, 63] cannot saturate the u8s8 kernels without VNNI: int8, the fast path; wider
            # codes int8 too where the target has VNNI (exact int32 sums), else uint8 + 128 (exact u8u8 kernels)
            fits = s8_weights or (lo >= -64 and hi <= 63)
            weight = _Code(code, w_step, torch.int8) if fits else _Code(code, w_step, torch.uint8, 128)
            if bias is not None and conv.input_q is not None:
                b_step = float(conv.input_q.step()) * w_step
                bias = _Code(torch.round(bias / b_step), b_step, torch.int32)
    return weight, bias


def _conv_forward(self: FqsrConv2d, x: torch.Tensor) -> torch.Tensor:
    if self.input_q is not None:
        x = self.input_q(x)
    weight, bias = self._deployed
    w = _DequantConst.apply(x, weight) if isinstance(weight, _Code) else weight
    b = _DequantConst.apply(x, bias) if isinstance(bias, _Code) else bias
    y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)
    return self.output_q(y) if self.output_q is not None else y


def _check_ready(model: nn.Module) -> None:
    quantizers = [(n, m) for n, m in model.named_modules() if isinstance(m, IntervalQuantizer)]
    if not quantizers:
        raise QdqExportError("the model has no FQSR quantizer: convert it with the fqsr recipe first")
    for name, q in quantizers:
        if q.bits > 8:
            raise QdqExportError(f"{name}: {q.bits}-bit codes do not fit the int8/uint8 containers of QDQ ONNX")
        if int(q.daia_seen) == 0:
            raise QdqExportError(f"{name} was never calibrated (DAIA): calibrate or load weights before export")


@contextlib.contextmanager
def deployed_forward(model: nn.Module, s8_weights: bool = False) -> Iterator[None]:
    """Inside: FQSR modules compute (and export as) their deployed QDQ form; restored on exit.

    ``s8_weights``: 8-bit weight codes as int8 too (the VNNI layout, see `export_qdq`'s ``weight_layout``).
    """
    patched = []
    for m in model.modules():
        if isinstance(m, IntervalQuantizer):
            patched.append(m)
            m.forward = types.MethodType(_quantizer_forward, m)
        elif isinstance(m, FqsrConv2d):
            patched.append(m)
            m._deployed = _conv_codes(m, s8_weights)
            m.forward = types.MethodType(_conv_forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
            if isinstance(m, FqsrConv2d):
                del m._deployed


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of ``name`` if a Constant node or an initializer holds it, else None."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def to_int4(model: onnx.ModelProto) -> int:
    """Rewrite codes of at most 4 bits into int4 / uint4 containers in place (opset 21); returns how many.

    Weights: a DequantizeLinear of a constant int8 code within [-8, 7] (zero point 0). Activations: a
    ``Clip -> QuantizeLinear`` whose clip bounds are codes within [0, 15] (zero point 0) or [-8, 7]
    (uint8 zero point 128): the Clip goes, the QuantizeLinear and its DequantizeLinear consumers get a
    4-bit zero point 0. Everything else is left as it is.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers = graph_consumers(graph)
    removed, count = [], 0

    def new_constant(values: np.ndarray, dtype: type, base: str) -> str:  # packed two codes a byte
        name = f"{base}_int4"
        graph.initializer.append(numpy_helper.from_array(values.astype(dtype), name))
        return name

    for node in list(graph.node):
        if node.op_type == "DequantizeLinear" and len(node.input) == 3:
            code, zero = _constant(graph, node.input[0]), _constant(graph, node.input[2])
            if code is not None and code.dtype == np.int8 and zero is not None and not zero.any() \
                    and code.min() >= -8 and code.max() <= 7 and len(consumers[node.input[0]]) == 1:
                node.input[0] = new_constant(code, ml_dtypes.int4, node.input[0])
                node.input[2] = new_constant(zero, ml_dtypes.int4, node.input[2])
                count += 1
        elif node.op_type == "QuantizeLinear" and producer.get(node.input[0]) is not None:
            clip, readers = producer[node.input[0]], consumers.get(node.output[0], [])
            if clip.op_type != "Clip" or len(consumers[clip.output[0]]) != 1 \
                    or any(r.op_type != "DequantizeLinear" for r in readers):
                continue
            scale, zero = _constant(graph, node.input[1]), _constant(graph, node.input[2])
            low, high = _constant(graph, clip.input[1]), _constant(graph, clip.input[2])
            if any(v is None for v in (scale, zero, low, high)) or zero.dtype != np.uint8:
                continue
            lo, hi = round(float(low) / float(scale)), round(float(high) / float(scale))
            if (lo, hi) == (0, 15) and int(zero) == 0:
                dtype = ml_dtypes.uint4
            elif (lo, hi) == (-8, 7) and int(zero) == 128:
                dtype = ml_dtypes.int4
            else:
                continue
            z4 = new_constant(np.zeros(()), dtype, node.output[0] + "_zero_point")
            node.input[0], node.input[2] = clip.input[0], z4
            for dq in readers:
                dq.input[2] = z4
            removed.append(clip)
            count += 1
    for clip in removed:
        graph.node.remove(clip)
    used = {name for node in graph.node for name in node.input}  # drop the 8-bit codes, zero points, clip bounds
    for node in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(node)
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    if count:
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid("", INT4_OPSET))
    return count


BOUNDARIES = ("fp32", "int8")


def _int8_boundaries(proto: onnx.ModelProto, batch: np.ndarray) -> list[str]:
    """Convs with quantized weights but an FP input or output (FQSR's first and last conv): Q / DQ added on
    that side (uint8 per tensor, min / max over `batch` run through the graph), the float bias requantized to
    int32, so that onnxruntime runs them as QLinearConv too. Returns the conv nodes changed."""
    from .onnx import _activation_qparams

    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}

    def from_dq(name: str) -> bool:
        return name in producer and producer[name].op_type == "DequantizeLinear"

    def to_q(name: str) -> bool:
        users = consumers.get(name, [])
        return bool(users) and name not in outputs and all(u.op_type == "QuantizeLinear" for u in users)

    targets = [n for n in graph.node if n.op_type == "Conv" and from_dq(n.input[1])
               and (not from_dq(n.input[0]) or not to_q(n.output[0]))]
    if not targets:
        return []
    tensors = list(dict.fromkeys([t for n in targets for t in
                                  ([n.input[0]] if not from_dq(n.input[0]) else []) +
                                  ([n.output[0]] if not to_q(n.output[0]) else [])]))
    probe = copy.deepcopy(proto)
    probe.graph.output.extend(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in tensors
                              if t not in outputs)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    lo, hi = dict.fromkeys(tensors, np.inf), dict.fromkeys(tensors, -np.inf)
    for start in range(0, len(batch), 4):
        values = dict(zip(names, session.run(None, {"x": batch[start:start + 4]}), strict=True))
        for t in tensors:
            lo[t], hi[t] = min(lo[t], float(values[t].min())), max(hi[t], float(values[t].max()))
    del session

    def qdq(tensor: str, source: str, out: str) -> list:
        scale, zero = _activation_qparams(lo[tensor], hi[tensor])
        s, z = f"{tensor}.b.scale", f"{tensor}.b.zero"
        graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), s),
                                  numpy_helper.from_array(np.array(zero, np.uint8), z)])
        return [helper.make_node("QuantizeLinear", [source, s, z], [f"{tensor}.b.q"], name=f"{tensor}.b.Q"),
                helper.make_node("DequantizeLinear", [f"{tensor}.b.q", s, z], [out], name=f"{tensor}.b.DQ")]

    done = []
    for node in targets:
        before, after = [], []
        x = node.input[0]
        if not from_dq(x):
            before += qdq(x, x, f"{x}.b.dq")
            node.input[0] = f"{x}.b.dq"
            if len(node.input) > 2 and node.input[2] and not from_dq(node.input[2]):
                bias = _constant(graph, node.input[2])
                w_scale = _constant(graph, producer[node.input[1]].input[1])
                if bias is None or w_scale is None:
                    raise QdqExportError(f"{node.name}: bias or weight scale is not a constant")
                b_scale = (np.float32(_activation_qparams(lo[x], hi[x])[0]) * w_scale.astype(np.float32))
                b_scale = np.broadcast_to(b_scale, bias.shape).astype(np.float32)
                name = f"{node.name}.bias"
                graph.initializer.extend([
                    numpy_helper.from_array(np.round(bias / b_scale).astype(np.int32), f"{name}.int32"),
                    numpy_helper.from_array(b_scale, f"{name}.scale"),
                    numpy_helper.from_array(np.zeros(bias.shape, np.int32), f"{name}.zero")])
                before.append(helper.make_node("DequantizeLinear", [f"{name}.int32", f"{name}.scale", f"{name}.zero"],
                                               [f"{name}.dq"], name=f"{name}.DQ", axis=0))
                node.input[2] = f"{name}.dq"
        y = node.output[0]
        if not to_q(y):
            node.output[0] = f"{y}.b.fp"
            after += qdq(y, f"{y}.b.fp", y)
        index = list(graph.node).index(node)
        for offset, new in enumerate(before):
            graph.node.insert(index + offset, new)
        index += len(before) + 1
        for offset, new in enumerate(after):
            graph.node.insert(index + offset, new)
        done.append(node.name)
    return done


def export_qdq(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    opset: int = OPSET,
    int4: bool = False,
    weight_layout: str = "auto",
    boundary: str = "fp32",
    calibration_data: torch.Tensor | None = None,
) -> Path:
    """Write an FQSR-converted ``model`` as QDQ ONNX to ``path`` (atomically); input ``x``, output ``y``.

    ``example_input`` (default: a 1xCx32x32 image, C from the conversion record) only fixes the
    rank and channels: batch, height and width are dynamic. ``int4=True`` stores codes of at most 4 bits
    in 4-bit containers (opset 21; see the module doc: smaller, but no integer convs in onnxruntime).

    ``weight_layout`` of 8-bit weight codes (7 bits and fewer are always int8): ``"s8"`` int8, exact and fast
    where the CPU running the file has VNNI (AVX512-VNNI / AVX-VNNI: int32 sums of u8 x s8 products), but
    saturating on AVX2 without it; ``"u8"`` the code + 128 as uint8, exact everywhere and on AVX2 no faster
    than FP32; ``"auto"`` (default) ``"s8"`` if the exporting CPU has VNNI, else ``"u8"``.

    ``boundary="int8"``: the convs FQSR keeps FP on one side (the first conv's input, the last conv's output)
    get Q / DQ there too, calibrated (min / max) on ``calibration_data`` (default: the conversion's default
    batch), so that onnxruntime runs every conv as QLinearConv; this adds one rounding at each boundary that
    the FQSR model does not have (tolerance in the README, Deploy). Default ``"fp32"``: the model as trained.
    """
    if boundary not in BOUNDARIES:
        raise QdqExportError(f"boundary={boundary!r}: expected one of {BOUNDARIES}")
    if weight_layout not in WEIGHT_LAYOUTS:
        raise QdqExportError(f"weight_layout={weight_layout!r}: expected one of {WEIGHT_LAYOUTS}")
    s8 = weight_layout == "s8" or (weight_layout == "auto" and cpu_has_vnni())
    _check_ready(model)
    work = copy.deepcopy(model).eval()
    if example_input is None:
        info = getattr(model, "srbinarize_info", None)
        if info is None:
            raise QdqExportError("pass example_input=...: the model carries no conversion record")
        example_input = torch.rand(1, info.in_channels, 32, 32)
    path = Path(path)
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_output(path) as tmp:
        with deployed_forward(work, s8), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                work, (example_input,), tmp, dynamo=False, opset_version=opset, input_names=["x"],
                output_names=["y"], dynamic_axes={"x": axes, "y": axes},
            )
        if boundary == "int8":
            from .onnx import OnnxExportError, _calibration_batch

            try:
                batch = _calibration_batch(model, example_input, calibration_data)
            except OnnxExportError as err:
                raise QdqExportError(str(err)) from None
            graph = onnx.load(tmp)
            _int8_boundaries(graph, batch)
            onnx.save(graph, tmp)
        if int4:
            graph = onnx.load(tmp)
            if not to_int4(graph):
                raise QdqExportError("int4=True, but no tensor of the model has a code of at most 4 bits")
            onnx.save(graph, tmp)
    return path


def fp32_onnx(model: nn.Module, path: str | os.PathLike, example_input: torch.Tensor, opset: int = OPSET) -> Path:
    """The FP32 reference export of any model (same names and dynamic axes as `export_qdq`)."""
    path = Path(path)
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_output(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            copy.deepcopy(model).eval(), (example_input,), tmp, dynamo=False, opset_version=opset,
            input_names=["x"], output_names=["y"], dynamic_axes={"x": axes, "y": axes},
        )
    return path


def deployed_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the exported graph computes, in PyTorch (the quantized model's deployed form)."""
    with deployed_forward(model), torch.no_grad():
        return model(x)


__all__ = [
    "BOUNDARIES", "WEIGHT_LAYOUTS", "QdqExportError", "deployed_forward", "deployed_output", "export_qdq", "fp32_onnx",
    "to_int4",
]
