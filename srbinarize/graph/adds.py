"""Skip-connection adds: find them in a traced graph and turn each into a module call a recipe can replace.

A skip add is an element-wise add of two tensors (`is_add`: ``+``, ``+=``, ``torch.add``, ``Tensor.add``)
that sits in feature space: both operands are computed from the network input (not a constant such as
``self.mean``), some layer comes before it and some layer comes after it. The add that produces the final
output (MSRResNet's ``out += base``) has no layer after it and is left as it is, like the network input.

`insert_skip_adds` replaces each skip add by a call of a `SkipAdd` module (same function, now addressable
by name) and appends one `LayerRow` of kind ``"add"`` per add to the plan, so selection, calibration on FP
activations and swapping treat adds exactly like convs. `network_io_layers` tells which layers read the
network input or write the final output, for recipes that leave those two tensors as they are.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .partition import LayerRow, Plan, is_add
from .walk import ancestors, descendants

ADDS_PREFIX = "skip_adds"


class SkipAdd(nn.Module):
    """The FP element-wise add of a skip connection, as a module: ``x + z``."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return x + z


def _layer_nodes(gm: fx.GraphModule, plan: Plan) -> dict[fx.Node, LayerRow]:
    """Graph node of each plan row (a row inside a leaf maps to the leaf's node)."""
    by_target = {}
    for row in plan.rows:
        if row.kind != "add":
            by_target.setdefault(row.in_leaf or row.name, row)
    return {n: by_target[n.target] for n in gm.graph.nodes if n.op == "call_module" and n.target in by_target}


def classify_adds(gm: fx.GraphModule, plan: Plan) -> list[tuple[fx.Node, str | None]]:
    """Every element-wise add of two tensors in graph order, with None for a skip add or why it is not one."""
    layers = _layer_nodes(gm, plan)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    out = []
    for node in nodes:
        if not is_add(node):
            continue
        a, b = (x for x in node.args if isinstance(x, fx.Node))
        up_a, up_b = ancestors(a) | {a}, ancestors(b) | {b}
        if not any(n.op == "placeholder" for n in up_a) or not any(n.op == "placeholder" for n in up_b):
            out.append((node, "adds a constant, not a skip connection"))
        elif not (up_a | up_b) & layers.keys():
            out.append((node, "before the first layer (input preprocessing)"))
        elif not descendants(node) & layers.keys():
            out.append((node, "produces the final output: left as it is"))
        elif node.kwargs:
            out.append((node, f"add with keyword arguments {sorted(node.kwargs)}: kept FP"))
        elif _in_place(node) and any(order[u] > order[node] for u in node.args[0].users if u is not node):
            out.append((node, "in-place add whose first operand is read afterwards: kept FP"))
        else:
            out.append((node, None))
    return out


def _in_place(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.iadd) or (
        node.op == "call_method" and node.target == "add_"
    )


def insert_skip_adds(gm: fx.GraphModule, plan: Plan) -> list[LayerRow]:
    """Replace every skip add of ``gm`` by a `SkipAdd` call; add a row per add to ``plan``; return the rows.

    Adds that are not skip adds get a plan message. Rows take the role of the last layer before them.
    """
    layers = _layer_nodes(gm, plan)
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    rows, skipped = [], []
    for node, reason in classify_adds(gm, plan):
        if reason is not None:
            skipped.append(f"{node.name} ({reason})")
            continue
        before = [n for n in ancestors(node) if n in layers]
        role = layers[max(before, key=index.__getitem__)].role
        name = f"{ADDS_PREFIX}.{node.name}"
        gm.add_submodule(name, SkipAdd())
        a, b = (x for x in node.args if isinstance(x, fx.Node))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(name, (a, b))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        rows.append(LayerRow(name, "add", role, "add (skip connection)"))
    gm.graph.lint()
    gm.recompile()
    plan.rows.extend(rows)
    order = {n.target: i for i, n in enumerate(gm.graph.nodes) if n.op == "call_module"}
    plan.rows.sort(key=lambda r: order.get(r.in_leaf or r.name, len(order)))
    if skipped:
        plan.messages.append("element-wise adds left as they are: " + ", ".join(skipped))
    return rows


def network_io_layers(gm: fx.GraphModule, plan: Plan) -> dict[str, tuple[bool, bool]]:
    """``{row name: (reads the network input, writes the final output)}`` for conv/linear rows at either end.

    A layer reads the network input when no layer comes before it, and writes the final output when no
    layer comes after it (skip adds do not count as layers). Rows inside untraceable leaves are not judged.
    """
    layers = {n: row for n, row in _layer_nodes(gm, plan).items() if row.in_leaf is None}
    out = {}
    for node, row in layers.items():
        reads = not (ancestors(node) & layers.keys())
        writes = not (descendants(node) & layers.keys())
        if reads or writes:
            out[row.name] = (reads, writes)
    return out
