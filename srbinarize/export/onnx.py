"""ONNX export of binary models: SCALES convs and linears become ``srbinarize`` domain ops with 1-bit weights.

What each piece becomes:

- a `ScalesConv2d` / `ScalesLinear` with binary weights and activations: one ``srbinarize::BinaryConv2d`` /
  ``BinaryLinear`` node (see ``kernels/README.md``) whose weight is a bitpacked uint64 initializer, with the
  threshold ``beta``, the per-output-channel scale, the bias and the identity skip as the op's inputs and
  attribute; its spatial map and channel vector are computed by standard ONNX ops from the FP input and feed
  the op's ``spatial`` / ``channel_scale`` inputs;
- a SCALES layer with FP weights or FP activations (a component switched off by the recipe): standard ONNX
  ops computing the same function (listed as FP in the export report);
- everything else: what torch's TorchScript-based exporter writes (standard ONNX, opset 17).

The graph is traced by ``torch.onnx.export(..., dynamo=False)``; the binary layers emit their op from an
``autograd.Function.symbolic`` (TorchScript has no uint64 constants, so the packed words travel as int64 and are
re-typed afterwards with the ``onnx`` API, bit for bit). Input ``x`` and output ``y`` have dynamic batch,
height and width axes. With ``activations="float16"`` the binary convs that feed each other run on float16
tensors (`srbinarize.export.half`). The file is checked with ``onnx.checker`` and written atomically.

SwinIR (basicsr): its blocks keep the attention mask of the size they were built for and use it whenever the
input has that size, which bakes one size into a traced graph; during export the blocks compute the mask from
the runtime size instead, and the batch is not baked either (`_swin_dynamic_shapes`).
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from ..atomic import atomic_output
from ..errors import SrbinarizeError
from ..layers.bam import BamConv2d, _statistic
from ..layers.base import QuantLayer
from ..layers.fqsr import FqsrAdd, FqsrConv2d
from ..layers.lmb import LmbConv2d, centered
from ..layers.ma import MaConv2d
from ..layers.scales import ScalesConv2d, _ScalesBase
from ..models.input_range import model_input_range
from ..runtime import DOMAIN, cpu_has_vnni, kernel_supported
from ..runtime.packing import pack_conv_weight, pack_linear_weight
from .half import float16_tensors, to_float16, touching
from .onnx_graph import consumers as graph_consumers
from .shuffle_fold import fold_shuffle_convs

OPSET = 17
# The op's inputs after X, in order (kernels/README.md); residual and prelu_slope are set by `_fuse_epilogues`.
_SLOTS = ("threshold", "weight", "scale", "bias", "spatial", "channel_scale", "residual", "prelu_slope",
          "spatial_weight", "spatial_bias")


class OnnxExportError(SrbinarizeError):
    """The model cannot be exported as a binary ONNX graph (unsupported layer type, ...)."""


@dataclass
class ExportReport:
    """What `export_onnx` wrote: the binary ops (packed) and the layers that stayed FP, with why."""

    path: Path
    packed: list[str] = field(default_factory=list)  # "name: BinaryConv2d 64->64 k3 [spatial, skip]"
    fp: list[str] = field(default_factory=list)  # "name: why it stays FP"
    file_bytes: int = 0
    fp_convs: list[str] = field(default_factory=list)  # module names of the plain convs the recipe left FP
    int8: list[str] = field(default_factory=list)  # of those, the ones written as int8 QDQ (remainder="int8")
    fused: list[str] = field(default_factory=list)  # "name: + residual, + relu" (ops folded into a binary op)
    qdq: list[str] = field(default_factory=list)  # FQSR layers, written as QuantizeLinear / DequantizeLinear
    shuffle_folded: list[str] = field(default_factory=list)  # "upsample.0 + conv_last": see `shuffle_fold`
    float16: list[str] = field(default_factory=list)  # "t15.f16: output of body.0.conv1": see `half`
    float32_kept: list[str] = field(default_factory=list)  # "binary convs: tensor above FLOAT16_BOUND" (default)
    int8_refused: str = ""  # why the default remainder stayed FP32, where it did

    def __str__(self) -> str:
        lines = [f"wrote {self.path} ({self.file_bytes / 1024:.1f} KiB)", f"packed (1-bit weights): {len(self.packed)}"]
        lines += [f"  {p}" for p in self.packed]
        if self.qdq:
            lines += [f"quantized (QDQ): {len(self.qdq)}", *(f"  {q}" for q in self.qdq)]
        if self.fused:
            lines.append(f"folded into the binary ops' epilogues: {'; '.join(self.fused)}")
        if self.shuffle_folded:
            lines.append("output conv folded through the pixel shuffle into the conv before it: "
                         + ", ".join(self.shuffle_folded))
        if self.int8:
            lines.append(f"int8 QDQ (onnxruntime QLinearConv): {', '.join(self.int8)}")
        if self.int8_refused:
            lines.append(f"remainder left FP32: {self.int8_refused}")
        if self.float16:
            lines += [f"float16 activations (chained binary convs): {len(self.float16)} tensors",
                      *(f"  {t}" for t in self.float16)]
        if self.float32_kept:
            lines += ["binary convs kept on float32 activations (values too large for float16):",
                      *(f"  {t}" for t in self.float32_kept)]
        lines.append("stayed FP (standard ONNX ops):")
        lines += [f"  {p}" for p in self.fp]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Deployed:
    """The constants of one binary op (held outside autograd, so they export as constants, not ops)."""

    name: str
    op: str  # "BinaryConv2d" | "BinaryLinear"
    threshold: torch.Tensor
    weight_pm1: torch.Tensor  # +-1 float, for the PyTorch side of the trace
    packed: np.ndarray  # uint64
    scale: torch.Tensor
    bias: torch.Tensor | None
    skip: bool
    kernel_size: int = 0
    spatial_weight: torch.Tensor | None = None  # [C]: the spatial map (1x1 conv C->1 + sigmoid) inside the op
    spatial_bias: torch.Tensor | None = None  # [1]

    def compute(self, x: torch.Tensor, spatial: torch.Tensor | None, channel: torch.Tensor | None) -> torch.Tensor:
        """The op's semantics in PyTorch (kernels/README.md), epilogue in the kernel's order."""
        if spatial is None and self.spatial_weight is not None:
            logit = torch.einsum("c,nchw->nhw", self.spatial_weight, x)[:, None] + self.spatial_bias
            spatial = torch.sigmoid(logit)
        if self.op == "BinaryConv2d":
            a = torch.where(x >= self.threshold.view(1, -1, 1, 1), 1.0, -1.0)
            t = F.conv2d(a, self.weight_pm1, padding=self.kernel_size // 2) * self.scale.view(1, -1, 1, 1)
        else:
            t = F.linear(torch.where(x >= self.threshold, 1.0, -1.0), self.weight_pm1) * self.scale
        if spatial is not None:
            t = t * spatial
        if channel is not None:
            t = t * channel[:, :, None, None]
        if self.bias is not None:
            t = t + (self.bias.view(1, -1, 1, 1) if self.op == "BinaryConv2d" else self.bias)
        return t + x if self.skip else t


class _BinaryOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spatial, channel, dep: _Deployed):
        return dep.compute(x, spatial, channel)

    @staticmethod
    def symbolic(g, x, spatial, channel, dep: _Deployed):
        # Present inputs in order; `_slots` records which optional ones they are (rewritten by `_finish`).
        slots, inputs = [], [x]
        consts = {"threshold": dep.threshold, "weight": torch.from_numpy(dep.packed.view(np.int64)),
                  "scale": dep.scale, "bias": dep.bias, "spatial_weight": dep.spatial_weight,
                  "spatial_bias": dep.spatial_bias}
        for slot in _SLOTS:
            value = {"spatial": spatial, "channel_scale": channel}.get(slot, consts.get(slot))
            if value is None:
                continue
            slots.append(slot)
            inputs.append(g.op("Constant", value_t=value.detach()) if slot in consts else value)
        attrs = {"skip_i": int(dep.skip), "_slots_s": ",".join(slots), "_name_s": dep.name}
        if dep.op == "BinaryConv2d":
            attrs |= {"kernel_shape_i": [dep.kernel_size] * 2, "in_channels_i": dep.threshold.numel()}
        else:
            attrs["in_features_i"] = dep.threshold.numel()
        y = g.op(f"{DOMAIN}::{dep.op}", *inputs, **attrs)
        sizes = x.type().varyingSizes()
        if sizes is not None:
            sizes = list(sizes)
            sizes[1 if dep.op == "BinaryConv2d" else -1] = dep.scale.numel()
            y.setType(x.type().with_sizes(sizes))
        else:
            y.setType(x.type())
        return y


@dataclass(frozen=True)
class _PackedBits:
    """+-1 weights stored as bits (numpy packbits, little bit order, C order of ``shape``)."""

    bits: np.ndarray  # uint8
    shape: tuple[int, ...]

    @classmethod
    def of(cls, weight_pm1: torch.Tensor) -> _PackedBits:
        flat = (weight_pm1.detach().numpy() >= 0).reshape(-1)
        return cls(np.packbits(flat, bitorder="little"), tuple(weight_pm1.shape))

    def unpack(self) -> torch.Tensor:
        n = int(np.prod(self.shape))
        flat = np.unpackbits(self.bits, count=n, bitorder="little").astype(np.float32) * 2 - 1
        return torch.from_numpy(flat.reshape(self.shape))


class _UnpackSigns(torch.autograd.Function):
    """The +-1 FP weight of a weight-only binary conv, stored as bits and unpacked by standard ONNX ops.

    The symbolic writes a placeholder node that `_expand_unpack` replaces (torch's constant folding would
    otherwise turn the unpacked weight into an FP32 initializer); onnxruntime folds the unpacking once, at
    session creation.
    """

    @staticmethod
    def forward(ctx, anchor, packed: _PackedBits):
        return packed.unpack().to(anchor.dtype)

    @staticmethod
    def symbolic(g, anchor, packed: _PackedBits):
        bits = g.op("Constant", value_t=torch.from_numpy(packed.bits.copy()))
        y = g.op(f"{DOMAIN}::_UnpackSigns", bits, shape_i=list(packed.shape))
        y.setType(anchor.type().with_sizes(list(packed.shape)))
        return y


def _conv_deployed(name: str, weight_pm1: torch.Tensor, scale, bias, kernel_size: int) -> _Deployed:
    """A binary conv on activations already thresholded at 0 (BAM, LMB: their FP pre-op comes first)."""
    w = weight_pm1.detach().float()
    return _Deployed(
        name=name, op="BinaryConv2d", threshold=torch.zeros(w.shape[1]), weight_pm1=w,
        packed=pack_conv_weight(w.numpy()), scale=scale.detach().float().clone(),
        bias=None if bias is None else bias.detach().float().clone(), skip=False, kernel_size=kernel_size,
    )


def _weight_only(x: torch.Tensor, packed: _PackedBits, dep, stride=1, padding=0, dilation=1, groups=1):
    """``conv(x, unpack(bits)) * scale + bias`` with FP activations (Ma; BAM / LMB with FP activations)."""
    y = F.conv2d(x, _UnpackSigns.apply(x, packed), None, stride, padding, dilation, groups)
    y = y * dep.scale.view(1, -1, 1, 1)
    return y if dep.bias is None else y + dep.bias.view(1, -1, 1, 1)


def _bam_forward(self: BamConv2d, x: torch.Tensor, *earlier: torch.Tensor) -> torch.Tensor:
    dep = self._deployed_form
    if not dep.binary_activations:
        return _weight_only(x, self._packed_bits, dep, padding=dep.padding)
    acc = sum(b * _statistic(t, dep.statistic) * t for b, t in zip(dep.beta, (*earlier, x), strict=True))
    z = acc * dep.bn_mul.view(1, -1, 1, 1) + dep.bn_add.view(1, -1, 1, 1)
    return _BinaryOp.apply(z, None, None, self._deployed)


def _lmb_forward(self: LmbConv2d, x: torch.Tensor) -> torch.Tensor:
    dep = self._deployed_form
    if not dep.binary_activations:
        return _weight_only(x, self._packed_bits, dep, padding=dep.padding)
    return _BinaryOp.apply(centered(x, dep.window), None, None, self._deployed)


def _ma_forward(self: MaConv2d, x: torch.Tensor) -> torch.Tensor:
    dep = self._deployed_form
    return _weight_only(x, self._packed_bits, dep, dep.stride, dep.padding, dep.dilation, dep.groups)


def _patch_deployed_conv(name: str, m: QuantLayer, report: ExportReport) -> None:
    """BAM / LMB / Ma: their ``deployed()`` form, with binary activations through BinaryConv2d."""
    try:
        dep = m.deployed()
    except ValueError as err:
        raise OnnxExportError(f"{name}: {err}") from None
    m._deployed_form = dep
    kind = type(m).__name__
    if getattr(dep, "binary_activations", False):
        m._deployed = _conv_deployed(name, dep.weight_pm1, dep.scale, dep.bias, m.kernel_size)
        pre = "accumulated activations, BN" if isinstance(m, BamConv2d) else "x - local mean (AveragePool)"
        report.packed.append(f"{name}: BinaryConv2d {m.in_channels}->{m.out_channels} k{m.kernel_size} "
                             f"({kind}; FP pre-op: {pre}; threshold 0)")
    else:
        m._packed_bits = _PackedBits.of(dep.weight_pm1)
        report.packed.append(f"{name}: Conv with 1-bit packed weights, FP activations ({kind}; weights unpacked"
                             " by standard ONNX ops, folded by onnxruntime at session creation)")
    forward = {BamConv2d: _bam_forward, LmbConv2d: _lmb_forward, MaConv2d: _ma_forward}[type(m)]
    m.forward = types.MethodType(forward, m)


def _deploy(name: str, layer: _ScalesBase, fold: bool = False) -> _Deployed:
    with torch.no_grad():
        w = layer.binary_weight().float()
        conv = isinstance(layer, ScalesConv2d)
        return _Deployed(
            name=name,
            op="BinaryConv2d" if conv else "BinaryLinear",
            threshold=layer.beta.detach().float().clone(),
            weight_pm1=w,
            packed=pack_conv_weight(w.numpy()) if conv else pack_linear_weight(w.numpy()),
            scale=layer.output_scale().detach().float().clone(),
            bias=None if layer.bias is None else layer.bias.detach().float().clone(),
            skip=layer.use_skip,
            kernel_size=layer.kernel_size if conv else 0,
            **(_fusable_spatial(layer) if conv and fold else {}),
        )


def _fusable_spatial(layer: ScalesConv2d) -> dict[str, torch.Tensor]:
    """A spatial map that is a 1x1 conv C->1 with bias goes into the op (spatial_weight / spatial_bias): the op
    computes it while binarizing X, instead of standard ops reading X once more."""
    conv = layer.spatial
    if conv is None or conv.kernel_size != (1, 1) or conv.bias is None or conv.out_channels != 1 or conv.groups != 1:
        return {}
    return {"spatial_weight": conv.weight.detach().float().reshape(-1).clone(),
            "spatial_bias": conv.bias.detach().float().reshape(1).clone()}


def _spatial_map(layer: _ScalesBase, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's spatial map; a 1x1 conv C->1 is written as a MatMul over the channels.

    onnxruntime runs a Conv in its blocked channel layout and reorders the C-channel input for each one (SCALES
    EDSR x2, 256x256, 1 thread: 1021 ms with Conv, 898 ms with MatMul, same output to 3e-7).
    """
    conv = layer.spatial
    if not isinstance(layer, ScalesConv2d) or conv is None or conv.kernel_size != (1, 1) or conv.bias is None:
        return layer.spatial_map(x)
    n, c, h, w = x.shape
    t = torch.matmul(conv.weight.view(1, c), x.reshape(n, c, h * w)).view(n, 1, h, w)
    return torch.sigmoid(t + conv.bias.view(1, 1, 1, 1))


def _binary_forward(self: _ScalesBase, x: torch.Tensor) -> torch.Tensor:
    channel = self.channel_vector(x) if isinstance(self, ScalesConv2d) else None
    fused = self._deployed.spatial_weight is not None  # computed inside the op from X
    return _BinaryOp.apply(x, None if fused else _spatial_map(self, x), channel, self._deployed)


def _fp_forward(self: _ScalesBase, x: torch.Tensor) -> torch.Tensor:
    """The layer's forward with plain ops (no straight-through autograd functions): what the graph computes."""
    a = x
    if self.config.binarize_activations:
        a = torch.where(x - self._per_in(self.beta) >= 0, 1.0, -1.0)
    w = self.binary_weight() if self.config.binarize_weights else self.weight
    t = self._rescale(self._product(a, w) * self._per_out(self.output_scale()), x)
    if self.bias is not None:
        t = t + self._per_out(self.bias)
    return t + x if self.use_skip else t


def _describe(dep: _Deployed, layer: _ScalesBase) -> str:
    spatial = "spatial (in the op)" if dep.spatial_weight is not None else "spatial"
    parts = [p for p, on in ((spatial, layer.spatial is not None), ("channel", layer.channel is not None),
                             ("bias", dep.bias is not None), ("skip", dep.skip)) if on]
    shape = f"{layer.in_channels}->{layer.out_channels}" + (f" k{dep.kernel_size}" if dep.kernel_size else "")
    return f"{dep.name}: {dep.op} {shape} [{', '.join(parts)}]"


@contextlib.contextmanager
def deployed_forward(model: nn.Module, report: ExportReport | None = None, fold: bool = False) -> Iterator[None]:
    """Inside: SCALES layers compute (and export as) their deployed form; restored on exit."""
    report = report if report is not None else ExportReport(Path())
    patched = []
    branches: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, _ScalesBase):
            grouped = getattr(m, "groups", 1) > 1  # no grouped binary kernel: +-1 values in a standard Conv
            if m.config.binarize_weights and m.config.binarize_activations and not grouped:
                m._deployed = _deploy(name, m, fold)
                m.forward = types.MethodType(_binary_forward, m)
                report.packed.append(_describe(m._deployed, m))
            else:
                m.forward = types.MethodType(_fp_forward, m)
                bits = f"w{m.weight_bits}a{m.act_bits}"
                why = f"groups={m.groups}, no grouped binary kernel" if grouped else "not both binary"
                report.fp.append(f"{name}: SCALES {bits} ({why}): standard ONNX ops")
            patched.append(m)
            branches |= {f"{name}.{sub}" for sub in ("spatial", "channel")}
        elif type(m) in (BamConv2d, LmbConv2d, MaConv2d):
            _patch_deployed_conv(name, m, report)
            patched.append(m)
        elif isinstance(m, (FqsrConv2d, FqsrAdd)):
            raise OnnxExportError(f"{name}: FQSR layers export as QDQ: use srbinarize.export.qdq.export_qdq")
        elif isinstance(m, QuantLayer):
            raise OnnxExportError(f"{name}: no ONNX export for {type(m).__name__} layers")
    side = 0
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Conv1d)) and not isinstance(m, QuantLayer):
            if name in branches:
                side += 1
            else:
                report.fp.append(f"{name}: {type(m).__name__} not converted by the recipe")
                if type(m) is nn.Conv2d and m.groups == 1:
                    report.fp_convs.append(name)
    if side:
        report.fp.append(f"{side} re-scaling branches of SCALES layers (spatial map / channel vector)")
    try:
        with _swin_dynamic_shapes(model):
            yield
    finally:
        for m in patched:
            del m.forward
            for attr in ("_deployed", "_deployed_form", "_packed_bits"):
                if hasattr(m, attr):
                    delattr(m, attr)


def _window_reverse(windows: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """basicsr's ``window_reverse`` without ``int()`` on a shape (which a trace keeps as a constant batch)."""
    x = windows.view(-1, h // window_size, w // window_size, window_size, window_size, windows.shape[-1])
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, h, w, windows.shape[-1])


@contextlib.contextmanager
def _swin_dynamic_shapes(model: nn.Module) -> Iterator[None]:
    """basicsr SwinTransformerBlocks: shape logic traced from the runtime size, not baked for the export size.

    A block uses its stored ``attn_mask`` when the input has the size it was built for, which a traced graph
    would keep as a constant for every size; with ``input_resolution`` set to a size no input has, the block
    takes its other branch, ``calculate_mask(x_size)``, traced as ops on the input's shape. Its module's
    ``window_reverse`` computes the batch with ``int()``, replaced by a ``view(-1, ...)`` that stays dynamic.
    """
    blocks = [m for m in model.modules() if type(m).__name__ == "SwinTransformerBlock" and hasattr(m, "calculate_mask")]
    saved = [b.input_resolution for b in blocks]
    modules = {sys.modules[type(b).__module__] for b in blocks}
    modules = {m: m.window_reverse for m in modules if hasattr(m, "window_reverse")}
    for b in blocks:
        b.input_resolution = (-1, -1)
    for m in modules:
        m.window_reverse = _window_reverse
    try:
        yield
    finally:
        for b, res in zip(blocks, saved, strict=True):
            b.input_resolution = res
        for m, fn in modules.items():
            m.window_reverse = fn


def _expand_unpack(graph: onnx.GraphProto) -> None:
    """Replace each ``_UnpackSigns(bits)`` placeholder by standard ops: bit i of byte j -> element 8j + i, +-1."""
    from onnx import TensorProto, helper

    for index in reversed(range(len(graph.node))):
        node = graph.node[index]
        if node.domain != DOMAIN or node.op_type != "_UnpackSigns":
            continue
        shape = list(onnx.helper.get_attribute_value(node.attribute[0]))
        p = f"{node.output[0]}.unpack"
        consts = {
            "shape2": np.array([-1, 1], np.int64), "shifts": np.arange(8, dtype=np.uint8),
            "two": np.array(2, np.uint8), "flat": np.array([-1], np.int64), "start": np.array([0], np.int64),
            "end": np.array([int(np.prod(shape))], np.int64), "shape": np.array(shape, np.int64),
            "twof": np.array(2.0, np.float32), "onef": np.array(1.0, np.float32),
        }
        graph.initializer.extend(numpy_helper.from_array(v, f"{p}.const.{k}") for k, v in consts.items())
        c = {k: f"{p}.const.{k}" for k in consts}
        nodes = [
            helper.make_node("Reshape", [node.input[0], c["shape2"]], [f"{p}.bytes"]),
            helper.make_node("BitShift", [f"{p}.bytes", c["shifts"]], [f"{p}.shifted"], direction="RIGHT"),
            helper.make_node("Mod", [f"{p}.shifted", c["two"]], [f"{p}.bits"]),
            helper.make_node("Cast", [f"{p}.bits"], [f"{p}.float"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{p}.float", c["flat"]], [f"{p}.flat"]),
            helper.make_node("Slice", [f"{p}.flat", c["start"], c["end"]], [f"{p}.used"]),
            helper.make_node("Reshape", [f"{p}.used", c["shape"]], [f"{p}.01"]),
            helper.make_node("Mul", [f"{p}.01", c["twof"]], [f"{p}.02"]),
            helper.make_node("Sub", [f"{p}.02", c["onef"]], [node.output[0]]),
        ]
        for i, new in enumerate(nodes):
            new.name = f"{p}.{i}"
        del graph.node[index]
        for offset, new in enumerate(nodes):
            graph.node.insert(index + offset, new)


def _compact_names(graph: onnx.GraphProto) -> None:
    """Short names for intermediate values and standard nodes (TorchScript's names took 13% of a SCALES EDSR
    file); initializers, graph inputs and outputs and the srbinarize nodes (named by module path) keep theirs."""
    keep = {v.name for v in (*graph.input, *graph.output, *graph.initializer)}
    short: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name and name not in keep:
                short[name] = f"t{len(short)}"
        if node.domain != DOMAIN:
            node.name = f"n{index}"
        node.input[:] = [short.get(n, n) for n in node.input]
        node.output[:] = [short.get(n, n) for n in node.output]
    for info in graph.value_info:
        info.name = short.get(info.name, info.name)


def _fuse_epilogues(graph: onnx.GraphProto) -> list[str]:
    """Fold a BinaryConv2d's only consumer into its epilogue: an ``Add`` (-> the op's ``residual`` input; through
    a ``Mul`` by exactly 1, which EDSR's ``res_scale`` traces to), then a ``Relu`` (-> ``relu=1``) or a
    ``PRelu`` / ``LeakyRelu`` (-> ``prelu_slope`` [O]), in the op's order (t += residual; then the activation).
    The fused node takes the consumer's place in the graph, so every input it reads is computed before it.
    Returns "name: + residual, + relu" lines."""
    from onnx import helper

    outputs = {o.name for o in graph.output}
    consts = {i.name: i for i in graph.initializer}
    consts |= {n.output[0]: n.attribute[0].t for n in graph.node if n.op_type == "Constant" and n.attribute}

    def only_consumer(name: str) -> onnx.NodeProto | None:
        users = [n for n in graph.node if name in n.input]
        return users[0] if len(users) == 1 and name not in outputs else None

    def is_one(name: str) -> bool:
        return name in consts and numpy_helper.to_array(consts[name]).size == 1 and \
            float(numpy_helper.to_array(consts[name]).reshape(())) == 1.0

    done = []
    for node in [n for n in graph.node if n.domain == DOMAIN and n.op_type == "BinaryConv2d"]:
        fused = []
        user = only_consumer(node.output[0])
        chain = []
        if user is not None and user.op_type == "Mul" and any(is_one(i) for i in user.input):
            chain, user = [user], only_consumer(user.output[0])
        if user is not None and user.op_type == "Add":
            tail = chain[-1].output[0] if chain else node.output[0]
            other = [i for i in user.input if i != tail]
            if len(other) == 1 and other[0] not in consts:
                _set_input(node, 1 + _SLOTS.index("residual"), other[0])
                for n in chain:
                    graph.node.remove(n)
                node = _move_into_place(graph, node, user)
                fused.append("+ residual")
        user = only_consumer(node.output[0])
        out_channels = int(numpy_helper.to_array(consts[node.input[3]]).size)
        if user is not None and user.op_type == "Relu":
            node.attribute.append(helper.make_attribute("relu", 1))
            node = _move_into_place(graph, node, user)
            fused.append("+ relu")
        elif user is not None and user.op_type in ("PRelu", "LeakyRelu"):
            if user.op_type == "LeakyRelu":
                alpha = next((a.f for a in user.attribute if a.name == "alpha"), 0.01)
                slope = np.full(out_channels, alpha, np.float32)
            else:
                given = numpy_helper.to_array(consts[user.input[1]]) if user.input[1] in consts else None
                # per channel ([O, 1, 1], [O]) or one slope ([1]): anything else is left to onnxruntime
                ok = given is not None and given.size in (1, out_channels) and given.squeeze().ndim <= 1 and (
                    given.ndim <= 1 or given.shape[1:] == (1,) * (given.ndim - 1))
                slope = np.broadcast_to(given.reshape(-1), (out_channels,)).astype(np.float32) if ok else None
            if slope is not None:
                name = f"{node.name}.prelu_slope"
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(slope), name))
                _set_input(node, 1 + _SLOTS.index("prelu_slope"), name)
                node = _move_into_place(graph, node, user)
                fused.append(f"+ {user.op_type}")
        if fused:
            done.append(f"{node.name}: {', '.join(fused)}")
    return done


def _fold_channel_means(graph: onnx.GraphProto) -> list[str]:
    """A ``ReduceMean`` over H, W (keepdims 0) of a BinaryConv2d's output -- the channel vector of the SCALES
    layer that reads it -- becomes the op's second output ``channel_mean``: the op sums its outputs while
    writing them, instead of a pass that reads the map again. Returns "name: + channel_mean" lines."""
    producers = {n.output[0]: n for n in graph.node if n.domain == DOMAIN and n.op_type == "BinaryConv2d"}
    outputs = {o.name for o in graph.output}
    done = []
    for node in [n for n in graph.node if n.op_type == "ReduceMean" and n.input[0] in producers]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if list(attrs.get("axes", [])) != [2, 3] or attrs.get("keepdims", 1) != 0 or len(node.input) > 1:
            continue
        if node.output[0] in outputs:
            continue
        conv = producers[node.input[0]]
        if len(conv.output) < 2:
            conv.output.append(f"{conv.name}.channel_mean")
            done.append(f"{conv.name}: + channel_mean")
        for user in graph.node:
            user.input[:] = [conv.output[1] if i == node.output[0] else i for i in user.input]
        graph.node.remove(node)
    return done


def _set_input(node: onnx.NodeProto, index: int, name: str) -> None:
    names = list(node.input) + [""] * max(0, index + 1 - len(node.input))
    names[index] = name
    del node.input[:]
    node.input.extend(names)


def _move_into_place(graph: onnx.GraphProto, node: onnx.NodeProto, consumer: onnx.NodeProto) -> onnx.NodeProto:
    """`node` takes over `consumer`'s output and its position; `consumer` is removed. Returns the moved node."""
    output = consumer.output[0]
    index = list(graph.node).index(consumer)
    fused = copy.deepcopy(node)
    fused.output[:] = [output]
    graph.node.remove(consumer)
    graph.node.insert(index, fused)
    graph.node.remove(node)
    return graph.node[index - 1]


def _finish(model: onnx.ModelProto, fold: bool = False) -> list[str]:
    """Rewrite the srbinarize nodes: optional inputs in their slots, constants as (uint64) initializers."""
    graph = model.graph
    _expand_unpack(graph)
    producers = {out: node for node in graph.node if node.op_type == "Constant" for out in node.output}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    dead = []
    for node in graph.node:
        if node.domain != DOMAIN:
            continue
        attrs = {a.name: a for a in node.attribute}
        slots = onnx.helper.get_attribute_value(attrs["_slots"]).decode().split(",")
        node.name = onnx.helper.get_attribute_value(attrs["_name"]).decode()
        for key in ("_slots", "_name"):
            node.attribute.remove(attrs[key])
        given = dict(zip(slots, list(node.input)[1:], strict=True))
        names = [node.input[0]]
        for slot in _SLOTS:
            source = given.get(slot, "")
            const = producers.get(source)
            if const is not None and users[source] == 1:
                array = numpy_helper.to_array(const.attribute[0].t)
                if slot == "weight":
                    array = array.view(np.uint64)
                source = f"{node.name}.{slot}"
                graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), source))
                dead.append(const)
            names.append(source)
        while names[-1] == "":
            names.pop()
        del node.input[:]
        node.input.extend(names)
    for const in dead:
        graph.node.remove(const)
    fused = _fuse_epilogues(graph) + _fold_channel_means(graph) if fold else []
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for const in [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]:
        graph.node.remove(const)  # the factors of folded Muls by 1
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    _compact_names(graph)
    return fused


REMAINDERS = ("fp32", "int8")
#: The default remainder is int8 where the int8 file's output on the calibration batch is at least this close to
#: the FP32 remainder's (PSNR, dB; RMS 1% of the range). Measured on the 12-minute finetunes of three shared
#: models: 43.6-49.3 dB, Set5 cost 0.03-0.07 dB (README, Deploy).
INT8_AGREEMENT_DB = 40.0
#: The export options of a file that computes the PyTorch model's function (to 1e-4): FP32 remainder, float32
#: activations. `export_onnx(model, path, **EXACT)`.
EXACT = {"remainder": "fp32", "activations": "float32"}
ACTIVATIONS = ("float32", "float16")
#: activations="float16" refuses a tensor whose max |value| over the calibration batch exceeds this. float16
#: overflows above 65504; the factor of 2 below it is headroom for inputs that drive the activations higher than
#: the calibration patches did (larger images, other content: the patches are a small sample).
FLOAT16_BOUND = 2.0**15
#: A remainder conv with fewer products per output (in channels x kernel area) stays FP32: quantizing its
#: input and dequantizing its output cost more than the integer GEMM saves. Measured, 1 thread, 256x256:
#: 3->64 3x3 (27) 2.8 ms FP32 vs 4.8 int8; 48->48 1x1 (48) 6.5 vs 3.3; 8->48 3x3 (72) 3.4 vs 2.6.
MIN_INT8_PRODUCTS = 32


def _activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric scale and zero point covering [min(lo, 0), max(hi, 0)]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return float(np.float32(scale)), int(np.clip(round(-lo / scale), 0, 255))


def _probe_ranges(proto: onnx.ModelProto, tensors: list[str],
                  batch: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Min and max of each float32 tensor named in `tensors` over `batch` (4 images a run), computed by the graph
    itself in onnxruntime (the named tensors added as outputs of a copy)."""
    from onnx import TensorProto, helper

    from ..runtime import ort_session

    probe = copy.deepcopy(proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors
                              if t not in known)
    session = ort_session(probe.SerializeToString(), config={"session.intra_op.allow_spinning": "0"})
    out_names = [o.name for o in session.get_outputs()]
    lo = dict.fromkeys(tensors, np.inf)
    hi = dict.fromkeys(tensors, -np.inf)
    for start in range(0, len(batch), 4):
        values = dict(zip(out_names, session.run(None, {"x": batch[start:start + 4]}), strict=True))
        for t in tensors:
            lo[t], hi[t] = min(lo[t], float(values[t].min())), max(hi[t], float(values[t].max()))
    return lo, hi


def _remainder_int8(proto: onnx.ModelProto, names: list[str], batch: np.ndarray, weight_bits: int) -> list[str]:
    """Rewrite the plain FP convs named `names` (module paths) as int8 QDQ that onnxruntime fuses to QLinearConv.

    Input and output activations: uint8, per tensor, min / max over `batch` (run through the graph itself);
    weights: int8 symmetric per output channel, codes within +-(2**(weight_bits-1) - 1); bias: int32 on the
    grid of input step x weight step. Returns the names rewritten.
    """
    from onnx import helper

    graph = proto.graph
    inits = {i.name: i for i in graph.initializer}
    wanted = {f"{n}.weight": n for n in names}
    targets = [n for n in graph.node if n.op_type == "Conv" and len(n.input) >= 2 and n.input[1] in wanted
               and all(a.name != "group" or a.i == 1 for a in n.attribute)
               and np.prod(inits[n.input[1]].dims[1:]) >= MIN_INT8_PRODUCTS]
    if not targets:
        return []
    tensors = list(dict.fromkeys([n.input[0] for n in targets] + [n.output[0] for n in targets]))
    lo, hi = _probe_ranges(proto, tensors, batch)

    qmax = 2 ** (weight_bits - 1) - 1
    new_inits: list[onnx.TensorProto] = []
    dequantized: dict[str, str] = {}

    def const(name: str, value: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(value, name))
        return name

    def qdq(tensor: str, nodes: list, source: str | None = None) -> str:
        """Q -> DQ of `source` (default `tensor`) with `tensor`'s range; returns the dequantized name."""
        scale, zero = _activation_qparams(lo[tensor], hi[tensor])
        s = const(f"{tensor}.q.scale", np.array(scale, np.float32))
        z = const(f"{tensor}.q.zero", np.array(zero, np.uint8))
        nodes.append(helper.make_node("QuantizeLinear", [source or tensor, s, z], [f"{tensor}.q"], name=f"{tensor}.Q"))
        out = f"{tensor}.dq" if source is None else tensor
        nodes.append(helper.make_node("DequantizeLinear", [f"{tensor}.q", s, z], [out], name=f"{tensor}.DQ"))
        return out

    done = []
    for node in targets:
        index = list(graph.node).index(node)
        before, after = [], []
        x = node.input[0]
        if x not in dequantized:
            dequantized[x] = qdq(x, before)
        w_name = node.input[1]
        w = numpy_helper.to_array(inits[w_name]).astype(np.float32)
        w_scale = (np.abs(w).reshape(len(w), -1).max(axis=1) / qmax).astype(np.float32)
        w_scale[w_scale == 0] = 1.0
        codes = np.clip(np.round(w / w_scale.reshape(-1, 1, 1, 1)), -qmax, qmax).astype(np.int8)
        graph.initializer.remove(inits[w_name])
        before.append(helper.make_node(
            "DequantizeLinear",
            [const(f"{w_name}.int8", codes), const(f"{w_name}.scale", w_scale),
             const(f"{w_name}.zero", np.zeros(len(w), np.int8))],
            [f"{w_name}.dq"], name=f"{w_name}.DQ", axis=0))
        inputs = [dequantized[x], f"{w_name}.dq"]
        if len(node.input) > 2 and node.input[2] in inits:
            b_name = node.input[2]
            b = numpy_helper.to_array(inits[b_name]).astype(np.float64)
            x_scale = _activation_qparams(lo[x], hi[x])[0]
            b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
            graph.initializer.remove(inits[b_name])
            before.append(helper.make_node(
                "DequantizeLinear",
                [const(f"{b_name}.int32", np.round(b / b_scale).astype(np.int32)), const(f"{b_name}.scale", b_scale),
                 const(f"{b_name}.zero", np.zeros(len(b), np.int32))],
                [f"{b_name}.dq"], name=f"{b_name}.DQ", axis=0))
            inputs.append(f"{b_name}.dq")
        y = node.output[0]
        node.input[:] = inputs
        node.output[:] = [f"{y}.fp"]
        qdq(y, after, source=f"{y}.fp")
        for offset, new in enumerate(before):
            graph.node.insert(index + offset, new)
        position = index + len(before) + 1
        for offset, new in enumerate(after):
            graph.node.insert(position + offset, new)
        done.append(wanted[w_name])
    graph.initializer.extend(new_inits)
    _shuffle_before_dequantizing(graph)
    return done


def _shuffle_before_dequantizing(graph: onnx.GraphProto) -> None:
    """A per-tensor ``DequantizeLinear`` commutes with a shuffle: ``DequantizeLinear -> DepthToSpace`` becomes
    ``DepthToSpace -> DequantizeLinear``, which moves uint8 instead of float (a third of the time, measured
    on the EDSR x2 upsampler), and ``ShuffleTaps`` reads the codes with their scale and zero point itself."""
    consumers = graph_consumers(graph)
    outputs = {o.name for o in graph.output}
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        users = consumers.get(dq.output[0], [])
        if (len(users) != 1 or dq.output[0] in outputs or any(a.name == "axis" for a in dq.attribute)
                or len(consumers.get(dq.input[0], [])) != 1):
            continue  # per-channel scales do not commute; a shared code tensor stays as it is
        user = users[0]
        if user.op_type == "ShuffleTaps" and user.domain == DOMAIN:
            del user.input[:]
            user.input.extend(dq.input)
            graph.node.remove(dq)
        elif user.op_type == "DepthToSpace" and not any(
                n.op_type == "QuantizeLinear" for n in consumers.get(user.output[0], [])):
            # (re-quantized after the shuffle, onnxruntime drops the pair itself)
            shuffled = user.output[0]
            user.input[0], user.output[0] = dq.input[0], f"{shuffled}.shuffled_codes"
            dq.input[0], dq.output[0] = f"{shuffled}.shuffled_codes", shuffled
            graph.node.remove(dq)
            graph.node.insert(list(graph.node).index(user) + 1, dq)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_input: torch.Tensor | None = None,
    opset: int = OPSET,
    remainder: str | None = None,
    calibration_data: torch.Tensor | None = None,
    remainder_weight_bits: int | None = None,
    fold: bool | None = None,
    activations: str | None = None,
) -> ExportReport:
    """Write a converted (or FP) ``model`` as ONNX to ``path`` (atomically): 1-bit ops, or QDQ for FQSR.

    ``example_input`` (default: a 1xCx32x32 image, C from the conversion record) fixes the rank and channels;
    batch, height and width of input ``x`` and output ``y`` are dynamic. Returns what was packed and what
    stayed FP. Run the file with `srbinarize.runtime.ort_session` (it registers the kernel library).
    The metadata records ``srbinarize.input_range``, the RGB range of the network inside (1 or 255); ``x``
    and ``y`` of the file are in [0, 1] either way (``srbinarize.io_range``), the scaling is in the graph.

    ``remainder="int8"`` writes the plain convs the recipe left FP (head, upsampler, tail, ``keep_fp``) with at
    least `MIN_INT8_PRODUCTS` products per output (not an RGB model's first 3x3 conv) as int8
    QDQ that onnxruntime runs as QLinearConv: activations uint8 per tensor, calibrated (min / max) on
    ``calibration_data`` (default: the batch `srbinarize.convert` calibrates on by default), weights int8
    per output channel. ``remainder_weight_bits`` (default: 8 where the exporting CPU has VNNI, else 7):
    onnxruntime's u8s8 kernels without VNNI (AVX2) add pairs of products in saturating int16, which 7-bit
    weights cannot overflow; pass 7 for an AVX2 target. Tolerance: see the README (Deploy). The default
    (``remainder=None``): int8 where there is a calibration batch and the int8 file's output on it stays within
    `INT8_AGREEMENT_DB` of the FP32 remainder's, else FP32 (``ExportReport.int8_refused`` says why).
    ``**EXACT`` (FP32 remainder, float32 activations) gives the file that matches PyTorch to 1e-4.

    ``fold`` (default: whether the exporting CPU runs the fused AVX-512 kernel): fold a binary conv's only
    Add / Relu / PRelu / LeakyRelu consumer, its 1x1 spatial map and the next channel vector's global mean
    into the op (`ExportReport.fused`); same outputs, faster with the AVX-512 kernel, slower with the AVX2
    and scalar ones (measured, README). Pass it for the CPU that runs the file.

    ``activations``: with ``"float16"`` the binary convs that feed each other (X or residual) read and write
    float16 tensors, with a Cast wherever a float32 tensor enters them or a float16 one leaves
    (`srbinarize.export.half`, `ExportReport.float16`); input ``x`` and output ``y`` stay float32. The float32
    graph runs once on the calibration batch (as for the int8 remainder; without a conversion record or
    ``calibration_data``: ``example_input``) and a tensor whose max |value| exceeds `FLOAT16_BOUND` is refused
    (`OnnxExportError`). The default, where ``fold`` is on: float16 where it holds, the binary convs around a
    tensor above the bound kept on float32 (`ExportReport.float32_kept`); where ``fold`` is off: ``"float32"``.
    """
    if remainder is not None and remainder not in REMAINDERS:
        raise OnnxExportError(f"remainder={remainder!r}: expected one of {REMAINDERS} (or None: int8 where it holds)")
    if activations is not None and activations not in ACTIVATIONS:
        raise OnnxExportError(f"activations={activations!r}: expected one of {ACTIVATIONS} (or None: float16 "
                              "where it holds, when fold is on)")
    if fold is None:  # the folds pay off with the fused AVX-512 kernel and cost time on the others (measured)
        try:
            fold = kernel_supported("avx512")
        except FileNotFoundError:  # no kernel library built here: export for the portable paths
            fold = False
    if activations is None and not fold:  # float16 pays where memory traffic is what is left: the AVX-512 rows
        activations = "float32"
    if remainder_weight_bits is None:
        remainder_weight_bits = 8 if cpu_has_vnni() else 7
    if remainder_weight_bits not in (7, 8):
        raise OnnxExportError(f"remainder_weight_bits={remainder_weight_bits}: expected 7 or 8")
    fqsr = [(n, m) for n, m in model.named_modules() if isinstance(m, (FqsrConv2d, FqsrAdd))]
    if fqsr:
        return _export_fqsr(model, fqsr, Path(path), example_input, opset)
    if example_input is None:
        info = getattr(model, "srbinarize_info", None)
        if info is None:
            raise OnnxExportError("pass example_input=...: the model carries no conversion record")
        example_input = torch.rand(1, info.in_channels, 32, 32)
    work = copy.deepcopy(model).eval()
    path = Path(path)
    report = ExportReport(path)
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_output(path) as tmp:
        with deployed_forward(work, report, fold), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                work, (example_input,), tmp, dynamo=False, opset_version=opset, input_names=["x"],
                output_names=["y"], dynamic_axes={"x": axes, "y": axes},
                custom_opsets={DOMAIN: 1} if report.packed else None,
            )
        proto = onnx.load(tmp)
        report.fused = _finish(proto, fold)
        _fold_upsampler(proto, report)
        if remainder != "fp32" and report.fp_convs:
            proto = _int8_remainder(proto, model, report, example_input, calibration_data, remainder_weight_bits,
                                    checked=remainder is None)
        if activations != "float32":
            report.float16, report.float32_kept = _float16_activations(
                proto, model, example_input, calibration_data, strict=activations == "float16")
        _document_range(proto, model)
        onnx.checker.check_model(proto)
        onnx.save(proto, tmp)
    report.file_bytes = path.stat().st_size
    return report


def _int8_remainder(proto: onnx.ModelProto, model: nn.Module, report: ExportReport, example: torch.Tensor,
                    given: torch.Tensor | None, weight_bits: int, checked: bool) -> onnx.ModelProto:
    """`proto` with its FP remainder as int8 QDQ (`_remainder_int8`), the report updated.

    `checked` (the default remainder): only with a calibration batch (``given`` or the conversion record's), and
    only where the int8 file's output on that batch stays within `INT8_AGREEMENT_DB` of the FP32 one; otherwise
    `proto` unchanged, and ``report.int8_refused`` says why."""
    from ..convert import conversion_info

    if checked and given is None and conversion_info(model) is None:
        report.int8_refused = "no calibration batch (no conversion record, no calibration_data)"
        return proto
    batch = _calibration_batch(model, example, given)
    quantized = copy.deepcopy(proto) if checked else proto
    names = _remainder_int8(quantized, report.fp_convs, batch, weight_bits)
    if checked and names:
        agreement = _agreement_db(proto, quantized, batch)
        if not agreement >= INT8_AGREEMENT_DB:
            report.int8_refused = (f"its output on the calibration batch is {agreement:.1f} dB from the FP32 "
                                   f"remainder's, under {INT8_AGREEMENT_DB:g} dB")
            return proto
    report.int8 = names
    left = set(report.fp_convs) - set(names)
    report.fp = [line + (f"; FP32 in the int8 remainder (grouped, or under {MIN_INT8_PRODUCTS} products "
                         "per output: faster in FP32)" if line.split(":", 1)[0] in left else "")
                 for line in report.fp if line.split(":", 1)[0] not in names]
    return quantized


def _agreement_db(reference: onnx.ModelProto, other: onnx.ModelProto, batch: np.ndarray) -> float:
    """PSNR (dB, peak 1: ``y`` is in [0, 1]) of `other`'s output against `reference`'s on `batch`."""
    from ..runtime import ort_session

    outputs = []
    for proto in (reference, other):
        session = ort_session(proto.SerializeToString(), config={"session.intra_op.allow_spinning": "0"})
        outputs.append(np.concatenate([session.run(None, {"x": batch[i:i + 4]})[0] for i in range(0, len(batch), 4)]))
    mse = float(np.mean((outputs[0].astype(np.float64) - outputs[1]) ** 2))
    return float("inf") if mse == 0 else 10 * float(np.log10(1 / mse))


def _fold_upsampler(proto: onnx.ModelProto, report: ExportReport) -> None:
    """`fold_shuffle_convs` (its tap sums one srbinarize op where the file has binary ops, else standard
    ops), with the folded output conv taken off the report's FP lists."""
    module = {f"{name}.weight": name for name in report.fp_convs}
    for first, second in fold_shuffle_convs(proto.graph, DOMAIN if report.packed else None):
        up, out = module.get(first, first), module.get(second, second)
        report.shuffle_folded.append(f"{up} + {out}")
        report.fp_convs = [name for name in report.fp_convs if name != out]
        report.fp = [line for line in report.fp if line.split(":", 1)[0] != out]


def _document_range(proto: onnx.ModelProto, model: nn.Module) -> None:
    for key, value in (("srbinarize.input_range", f"{model_input_range(model):g}"), ("srbinarize.io_range", "1")):
        proto.metadata_props.add(key=key, value=value)


def _export_fqsr(model: nn.Module, layers: list, path: Path, example_input: torch.Tensor | None,
                 opset: int) -> ExportReport:
    """FQSR models: `srbinarize.export.qdq.export_qdq`, plus the range metadata."""
    from .qdq import export_qdq

    report = ExportReport(path, qdq=[f"{n}: {type(m).__name__} {m.extra_repr()}" for n, m in layers])
    with atomic_output(path) as tmp, _swin_dynamic_shapes(model):
        export_qdq(model, tmp, example_input, opset)
        proto = onnx.load(tmp)
        _document_range(proto, model)
        onnx.save(proto, tmp)
    report.file_bytes = path.stat().st_size
    return report


def _float16_activations(proto: onnx.ModelProto, model: nn.Module, example: torch.Tensor,
                         given: torch.Tensor | None, strict: bool) -> tuple[list[str], list[str]]:
    """`to_float16` on `proto` once the float32 graph's values on the calibration batch (else `example`) are
    checked against `FLOAT16_BOUND`; returns the report lines (float16 tensors, binary convs kept float32).

    A tensor above the bound raises when `strict` (float16 asked for); otherwise the binary convs that write or
    read it stay float32, and the chains are worked out again without them."""
    tensors = float16_tensors(proto.graph)
    if not tensors:
        return [], []
    lo, hi = _probe_ranges(proto, list(tensors), _calibration_batch(model, example, given, fallback=True))
    peak = {t: max(-lo[t], hi[t]) for t in tensors}
    too_large = {t for t, p in peak.items() if not p <= FLOAT16_BOUND}  # (NaN too)
    keep: set[str] = set()
    refused = []
    while bad := [t for t in float16_tensors(proto.graph, keep) if t in too_large]:
        if strict:
            raise OnnxExportError(
                f'activations="float16": tensor {bad[0]} ({tensors[bad[0]]}) reaches max |value| {peak[bad[0]]:.4g} on'
                f" the calibration batch, above {FLOAT16_BOUND:.0f} (float16 overflows above 65504; the bound leaves"
                ' headroom for larger inputs): export with activations="float32"')
        for t in bad:
            nodes = sorted(touching(proto.graph, t) - keep)
            keep.update(nodes)
            refused.append(f"{', '.join(nodes)}: {t} reaches max |value| {peak[t]:.4g} > {FLOAT16_BOUND:.0f}")
    return to_float16(proto.graph, keep), refused


def _calibration_batch(model: nn.Module, example: torch.Tensor, given: torch.Tensor | None,
                       fallback: bool = False) -> np.ndarray:
    """The batch the int8 remainder / float16 check run on: `given`, else the conversion's default batch, else
    (with `fallback`) `example`."""
    if given is None:
        from ..convert import conversion_info, default_calibration_batch

        info = conversion_info(model)
        if info is not None:
            given = default_calibration_batch(info.recipe.calibration, info.in_channels)
        elif fallback:
            given = example
        else:
            raise OnnxExportError('remainder="int8" needs calibration_data=...: the model carries no conversion record')
    if given.ndim != 4 or given.shape[1] != example.shape[1]:
        raise OnnxExportError(f"calibration_data must be (N, {example.shape[1]}, H, W), got {tuple(given.shape)}")
    return given.detach().float().contiguous().numpy()


def deployed_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the exported graph computes, in PyTorch (binary layers in their deployed form)."""
    work = copy.deepcopy(model).eval()
    with deployed_forward(work), torch.no_grad():
        return work(x)


__all__ = ["ACTIVATIONS", "EXACT", "FLOAT16_BOUND", "INT8_AGREEMENT_DB", "REMAINDERS", "ExportReport",
           "OnnxExportError", "deployed_forward", "deployed_output", "export_onnx"]
