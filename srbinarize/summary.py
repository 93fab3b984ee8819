"""`summary`: what a conversion did, layer by layer, with parameter memory and operation counts.

Operation counts follow the binary SR papers: one multiply-accumulate is one operation (FLOP), a layer
with both weights and activations quantized counts ``MACs * w_bits * a_bits`` bit operations (BOPs), and
``OPs = BOPs / 64 + FLOPs``. Only convolutions and linears (and the FP side branches of replaced layers)
are counted. Skip-connection adds are listed (kind ``add``: bits of their operands and result) and the
activation memory of one inference at the input size comes from a liveness walk over the graph.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn

from .convert import conversion_info, record_shapes
from .graph.adds import insert_skip_adds
from .graph.memory import ActivationMemory, activation_memory
from .graph.partition import LayerRow, Plan, partition_exported, partition_graph
from .graph.trace import TraceFailure, trace
from .layers import QuantLayer
from .models.probe import example_input


@dataclass
class LayerStats:
    row: LayerRow
    became: str
    weight_bits: int
    act_bits: int
    params: int
    param_bits: int  # storage of the layer's parameters after conversion
    macs: int  # multiply-accumulates of the layer's main product
    bops: int
    flops: int

    @property
    def quantized(self) -> bool:
        return self.act_bits < 32 if self.row.kind == "add" else self.weight_bits < 32


@dataclass
class Summary:
    layers: list[LayerStats]
    input_shape: tuple[int, ...]
    total_params: int
    param_bytes_before: float
    param_bytes_after: float
    ops_before: float
    ops_after: float
    messages: list[str]
    memory: ActivationMemory | None = None  # None when the model did not trace

    def count(self, role: str | None = None, quantized: bool | None = None, kind: str | None = None) -> int:
        """Rows of a role / quantized or not / of a kind; conv and linear rows only unless ``kind="add"``."""
        return sum(
            1 for s in self.layers
            if (role is None or s.row.role == role) and (quantized is None or s.quantized == quantized)
            and (s.row.kind == kind if kind else s.row.kind != "add")
        )

    def __str__(self) -> str:
        head = ("layer", "role", "original", "became", "w/a bits", "params", "MACs", "note")
        body = [
            (s.row.name, s.row.role, s.row.module, s.became,
             f"-/{s.act_bits}" if s.row.kind == "add" else f"{s.weight_bits}/{s.act_bits}", f"{s.params:,}",
             _si(s.macs), s.row.note)
            for s in self.layers
        ]
        widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r).rstrip() for r in body]
        shape = "x".join(map(str, self.input_shape))
        lines += [
            "",
            f"input {shape}: {self.count(quantized=True)} of {self.count()} conv/linear layers quantized"
            + (f", {self.count(quantized=True, kind='add')} of {self.count(kind='add')} skip adds"
               if self.count(kind="add") else ""),
            f"parameter memory: {_bytes(self.param_bytes_before)} FP32 -> {_bytes(self.param_bytes_after)} "
            f"({self.param_bytes_before / max(self.param_bytes_after, 1):.1f}x smaller; "
            f"{self.total_params:,} parameters with the added scales and maps)",
            f"OPs (BOPs/64 + FLOPs): {_si(self.ops_before)} -> {_si(self.ops_after)} "
            f"({self.ops_before / max(self.ops_after, 1):.1f}x fewer)",
        ]
        if self.memory is not None:
            m = self.memory
            lines.append(
                f"activation memory per inference (peak live): {_bytes(m.peak_fp)} FP32 -> {_bytes(m.peak)}; "
                f"held by skip connections: {_bytes(m.held_fp)} -> {_bytes(m.held)}"
            )
        lines += [f"note: {m}" for m in self.messages]
        return "\n".join(lines)


def summary(model: nn.Module, input_size: tuple[int, int] = (64, 64)) -> Summary:
    """Table of every conv/linear (role, replacement, bits, parameters, MACs) and model totals.

    Works on a converted model (reads its plan) and on an FP model (plans it as `convert` would).
    """
    info = conversion_info(model)
    channels = info.in_channels if info else example_input(model).shape[1]
    example = torch.rand(1, channels, *input_size)
    if info:
        plan = copy.deepcopy(info.plan)
    else:  # plan the FP model on a traced copy, where skip adds are modules too
        model, plan = _plan(model, example)
    record_shapes(model, plan, example)
    memory = activation_memory(model, example) if isinstance(model, fx.GraphModule) else None
    modules = dict(model.named_modules())
    stats = [_layer_stats(row, modules[row.name]) for row in plan.rows]
    total = sum(p.numel() for p in model.parameters())
    counted = {id(p) for row in plan.rows for p in modules[row.name].parameters()}
    other_bits = sum(p.numel() * 32 for p in model.parameters() if id(p) not in counted)
    fp_macs = sum(s.macs for s in stats)
    params_before = total - sum(s.params for s in stats) + sum(row.params for row in plan.rows)
    return Summary(
        layers=stats,
        input_shape=tuple(example.shape),
        total_params=total,
        param_bytes_before=params_before * 4,
        param_bytes_after=(other_bits + sum(s.param_bits for s in stats)) / 8,
        ops_before=fp_macs,
        ops_after=sum(s.bops for s in stats) / 64 + sum(s.flops for s in stats),
        messages=plan.messages,
        memory=memory,
    )


def _plan(model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, Plan]:
    try:
        traced = trace(copy.deepcopy(model).eval(), example)
        plan = partition_graph(traced.module, traced.leaves, example)
        insert_skip_adds(traced.module, plan)
        return traced.module, plan
    except TraceFailure as err:
        return model, partition_exported(model, example, str(err))


def _layer_stats(row: LayerRow, module: nn.Module) -> LayerStats:
    params = sum(p.numel() for p in module.parameters())
    if row.kind == "add":
        quantized = isinstance(module, QuantLayer)
        bits = module.act_bits if quantized else 32
        return LayerStats(row, type(module).__name__ if quantized else "FP", 32, bits, params, params * 32, 0, 0, 0)
    macs = _macs(module, row)
    if isinstance(module, QuantLayer):
        wb, ab = module.weight_bits, module.act_bits
        weight = module.weight.numel()
        param_bits = weight * wb + (params - weight) * 32
        side = module.extra_fp_macs(torch.Size(row.out_shape)) if row.out_shape else 0
        quantized_product = wb < 32 and ab < 32
        bops = macs * wb * ab if quantized_product else 0
        flops = side + (0 if quantized_product else macs)
        return LayerStats(row, type(module).__name__, wb, ab, params, param_bits, macs, bops, flops)
    return LayerStats(row, "FP", 32, 32, params, params * 32, macs, 0, macs)


def _macs(module: nn.Module, row: LayerRow) -> int:
    if row.out_shape is None:
        return 0
    out = row.out_shape
    weight = module.weight
    if weight.dim() == 4:  # conv: every output element takes in/groups * kh * kw products
        if isinstance(module, nn.ConvTranspose2d):
            in_elems = 1
            for d in row.in_shape:
                in_elems *= d
            return in_elems * weight.shape[1] * weight.shape[2] * weight.shape[3]
        return _numel(out) * weight.shape[1] * weight.shape[2] * weight.shape[3]
    return _numel(out) * weight.shape[1]  # linear


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _bytes(x: float) -> str:
    for unit, scale in (("MB", 2**20), ("KB", 2**10)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"
