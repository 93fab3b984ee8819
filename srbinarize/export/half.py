"""Float16 activations between chained binary convs (ONNX pass).

A ``BinaryConv2d`` 64->64 on 256x256 at float32 reads X and the residual and writes Y, 16.8 MB each: more than
the L3 cache of the CPUs it targets, so the op waits on DRAM. ``srbinarize::BinaryConv2d`` also takes float16
X / residual and writes float16 Y (``kernels/README.md``; the arithmetic stays float32, Y is rounded to
nearest even); this pass moves the binary convs that feed each other onto float16 tensors:

- chained ops: a BinaryConv2d whose X or residual is another BinaryConv2d's Y (both ends of the link count).
  A binary conv between standard ops stays float32: the Cast in and the Cast out would cost what it saves;
- a float32 tensor read as X or residual by a chained op gets one ``Cast`` to float16 (``NAME.f16``), shared
  by all the chained ops that read it; the other consumers keep reading the float32 tensor;
- a chained op's Y becomes ``NAME.f16``; where anything else reads it (a standard op, another input slot of
  a binary op, the graph output) one ``Cast`` back to float32 writes ``NAME`` after the op;
- everything else stays float32: the other inputs of the op, its ``channel_mean`` output, graph input x and
  output y. ``value_info`` follows: float16 entries for the new names, none left for a name that is gone.

Whether float16 holds the values is the caller's check (`srbinarize.export.onnx`: the calibration batch).
"""

from __future__ import annotations

from collections.abc import Collection

import onnx
from onnx import TensorProto, helper

from ..runtime import DOMAIN
from .onnx_graph import consumers as graph_consumers

X, RESIDUAL = 0, 7  # BinaryConv2d's input slots that may be float16 (kernels/README.md)
SUFFIX = ".f16"


def _activations(node: onnx.NodeProto) -> list[tuple[int, str]]:
    """(slot, tensor) of the node's X and, where given, its residual."""
    return [(i, node.input[i]) for i in (X, RESIDUAL) if i < len(node.input) and node.input[i]]


def chained(graph: onnx.GraphProto, keep: Collection[str] = ()) -> list[onnx.NodeProto]:
    """The BinaryConv2d nodes (other than those named in `keep`) linked to another one through X or residual, in
    graph order."""
    convs = [n for n in graph.node if n.domain == DOMAIN and n.op_type == "BinaryConv2d" and n.name not in keep]
    made = {n.output[0]: n for n in convs}
    linked: set[str] = set()
    for node in convs:
        for _, tensor in _activations(node):
            if tensor in made:
                linked |= {node.name, made[tensor].name}
    return [n for n in convs if n.name in linked]


def float16_tensors(graph: onnx.GraphProto, keep: Collection[str] = ()) -> dict[str, str]:
    """The tensors of the float32 ``graph`` that `to_float16` (with the same `keep`) would make float16, in graph
    order (where each is first written or read), each with its role ("output of body.0.conv1", "X of
    body.0.conv1, residual of conv_after_body")."""
    roles: dict[str, list[str]] = {}
    for node in chained(graph, keep):
        for slot, tensor in _activations(node):
            roles.setdefault(tensor, []).append(f"{'X' if slot == X else 'residual'} of {node.name}")
        roles.setdefault(node.output[0], []).insert(0, f"output of {node.name}")
    return {tensor: ", ".join(r) for tensor, r in roles.items()}


def touching(graph: onnx.GraphProto, tensor: str) -> set[str]:
    """The names of the BinaryConv2d nodes that write `tensor` or read it as X or residual."""
    return {n.name for n in graph.node if n.domain == DOMAIN and n.op_type == "BinaryConv2d"
            and (n.output[0] == tensor or tensor in dict(_activations(n)).values())}


def to_float16(graph: onnx.GraphProto, keep: Collection[str] = ()) -> list[str]:
    """Rewrite ``graph``: the `chained` BinaryConv2d nodes (but those named in `keep`, which stay float32) on
    float16 X / residual / Y, with the Casts at the boundaries (module docstring). Returns one line per float16
    tensor: "NAME.f16: what it is"."""
    nodes = chained(graph, keep)
    if not nodes:
        return []
    half = {n.name for n in nodes}
    users = graph_consumers(graph)
    outputs = {o.name for o in graph.output}
    renamed: dict[str, str] = {}  # float32 name -> float16 name
    lines = []

    def reads_half(user: onnx.NodeProto, tensor: str) -> bool:
        """Whether `user` reads `tensor` only where a chained op takes float16."""
        if user.domain != DOMAIN or user.op_type != "BinaryConv2d" or user.name not in half:
            return False
        return all(i in (X, RESIDUAL) for i, name in enumerate(user.input) if name == tensor)

    for node in nodes:
        y = node.output[0]
        renamed[y] = node.output[0] = y + SUFFIX
        line = f"{y}{SUFFIX}: output of {node.name}"
        if y in outputs or not all(reads_half(u, y) for u in users.get(y, [])):
            cast = helper.make_node("Cast", [y + SUFFIX], [y], name=f"{y}.to_float32", to=TensorProto.FLOAT)
            graph.node.insert(list(graph.node).index(node) + 1, cast)
            line += f"; Cast to float32 as {y} for its other consumers"
        lines.append(line)
    entering: dict[str, list[str]] = {}
    for node in nodes:
        for slot, tensor in _activations(node):
            if tensor not in renamed:  # a float32 tensor: one Cast, before its first chained reader
                renamed[tensor] = tensor + SUFFIX
                cast = helper.make_node("Cast", [tensor], [tensor + SUFFIX], name=f"{tensor}.to_float16",
                                        to=TensorProto.FLOAT16)
                graph.node.insert(list(graph.node).index(node), cast)
                entering[tensor] = []
            if tensor in entering:
                entering[tensor].append(f"{'X' if slot == X else 'residual'} of {node.name}")
            node.input[slot] = renamed[tensor]
    lines += [f"{t}{SUFFIX}: Cast of {t} for {', '.join(roles)}" for t, roles in entering.items()]
    _retype_value_info(graph, renamed)
    return lines


def _retype_value_info(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    """A float16 entry for each new name whose float32 tensor had one; entries of names no node writes go."""
    produced = {name for node in graph.node for name in node.output} | {i.name for i in graph.input}
    infos = {v.name: v for v in graph.value_info}
    for old, new in renamed.items():
        info = infos.get(old)
        if info is None or not info.type.HasField("tensor_type"):
            continue
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(info)
        copy.name = new
        copy.type.tensor_type.elem_type = TensorProto.FLOAT16
        graph.value_info.append(copy)
        if old not in produced:
            graph.value_info.remove(info)


__all__ = ["chained", "float16_tensors", "to_float16", "touching"]
