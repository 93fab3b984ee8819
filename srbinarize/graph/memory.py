"""Activation memory of one inference, from a liveness walk over the traced graph.

Every op writes its output to a buffer of its own (no in-place reuse), live from the op that writes it to
the last op that reads it. Two peaks over the ops are reported: all live activations, and the part held
for a later op (tensors neither read nor written by the op running: what skip connections keep alive,
the paper's memory column). A tensor has the bits of the layer that wrote it (``output_bits`` of a
replacement layer), keeps them through ops that only move or clip values (ReLU, pixel shuffle, views,
scaling by a constant), and is FP32 otherwise; the network input counts as FP32 before and after.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

FP_BITS = 32
_KEEP_CODE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.PixelShuffle, nn.PixelUnshuffle, nn.Identity, nn.Flatten)
_KEEP_CODE_FUNCTIONS = {
    F.relu, F.leaky_relu, F.pixel_shuffle, F.pixel_unshuffle, torch.relu, torch.pixel_shuffle, torch.flatten,
    torch.reshape, torch.permute, operator.mul, operator.truediv, operator.neg, operator.getitem,
}
_KEEP_CODE_METHODS = {"relu", "view", "reshape", "permute", "flatten", "contiguous", "mul", "div", "type_as",
                      "squeeze", "unsqueeze", "transpose"}


@dataclass(frozen=True)
class ActivationMemory:
    """Peak bytes of live activations and of those held for later ops, FP32 and as converted."""

    peak_fp: float
    peak: float
    held_fp: float
    held: float


def _keeps_code(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if len(node.all_input_nodes) != 1 or node.all_input_nodes[0].op == "get_attr":
        return False
    if node.op == "call_module":
        return isinstance(modules[node.target], _KEEP_CODE_MODULES)
    if node.op == "call_function":
        return node.target in _KEEP_CODE_FUNCTIONS
    return node.op == "call_method" and node.target in _KEEP_CODE_METHODS


def _tensor_bits(gm: fx.GraphModule) -> dict[fx.Node, int]:
    modules = dict(gm.named_modules())
    bits: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and hasattr(modules[node.target], "output_bits"):
            bits[node] = int(modules[node.target].output_bits)
        elif _keeps_code(node, modules):
            bits[node] = bits.get(node.all_input_nodes[0], FP_BITS)
        else:
            bits[node] = FP_BITS
    return bits


def activation_memory(gm: fx.GraphModule, example: torch.Tensor) -> ActivationMemory:
    """Liveness of every activation of ``gm`` on ``example`` (run once to get the shapes)."""
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    bits = _tensor_bits(gm)
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    numel = {}
    for n in nodes:
        meta = n.meta.get("tensor_meta")
        numel[n] = int(torch.Size(meta.shape).numel()) if hasattr(meta, "shape") else 0
    last_use = {}
    for i, n in enumerate(gm.graph.nodes):
        for inp in n.all_input_nodes:
            last_use[inp] = i
    peak_fp = peak = held_fp = held = 0.0
    live: set[fx.Node] = set()
    for i, n in enumerate(gm.graph.nodes):
        if n.op in ("get_attr", "output"):
            continue
        live.add(n)
        touched = {n, *n.all_input_nodes}
        peak_fp = max(peak_fp, sum(numel[t] * 4 for t in live))
        peak = max(peak, sum(numel[t] * bits[t] / 8 for t in live))
        held_fp = max(held_fp, sum(numel[t] * 4 for t in live - touched))
        held = max(held, sum(numel[t] * bits[t] / 8 for t in live - touched))
        live = {t for t in live if last_use.get(t, -1) > i}
    return ActivationMemory(peak_fp, peak, held_fp, held)
