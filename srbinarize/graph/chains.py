"""Layers that know each other: residual blocks, chains of same-shape layers, and extra graph inputs.

Generic graph analysis, no method in it (BAM's bit-accumulation chains are built on it):

- a *residual region* is the part of the graph between a tensor ``s`` and an add ``s + f(s)``: the nodes
  on the paths from ``s`` to the add. Each layer belongs to the smallest region containing it (its
  *block*); layers in no region (a plain conv cascade such as VDSR) are cut into blocks of
  ``plain_length`` consecutive layers;
- a *short chain* is a run of consecutive same-shape layers of one block, in dataflow order;
- a *long chain* is a run of same-shape first layers of sibling blocks (blocks directly inside the same
  enclosing region, or all top-level blocks), in dataflow order;
- a layer that can join neither is single, with the reason.

`wire_extra_inputs` gives a replacement layer the input tensors of other layers as extra forward
arguments (``QuantLayer.extra_inputs``) by editing the fx graph.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import fx, nn

from .partition import Plan, is_add
from .walk import ancestors, descendants

_INPLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


@dataclass
class Chain:
    label: str  # "S1", "L1", ...
    kind: str  # "short" (within a block) or "long" (first layers of sibling blocks)
    block: str  # the block (short) or the blocks' enclosing region (long)
    members: list[str]

    def position(self, name: str) -> int:
        """1-based position of ``name`` in the chain."""
        return self.members.index(name) + 1


@dataclass
class ChainSet:
    short: list[Chain] = field(default_factory=list)
    long: list[Chain] = field(default_factory=list)
    block_of: dict[str, str] = field(default_factory=dict)  # layer -> its block's label
    single: dict[str, str] = field(default_factory=dict)  # layer in no chain -> why
    unreadable_inputs: set[str] = field(default_factory=set)  # layers whose input cannot be read later

    def short_of(self, name: str) -> Chain | None:
        return next((c for c in self.short if name in c.members), None)

    def long_of(self, name: str) -> Chain | None:
        return next((c for c in self.long if name in c.members), None)


@dataclass
class _Region:
    add: fx.Node
    nodes: frozenset[fx.Node]


def find_chains(
    model: nn.Module,
    plan: Plan,
    names: Sequence[str],
    *,
    plain_length: int,
    short_range: bool = True,
    long_range: bool = True,
) -> ChainSet:
    """Chains among the layers ``names`` (in plan order) of a converted model's graph."""
    order = {row.name: i for i, row in enumerate(plan.rows)}
    names = sorted(names, key=lambda n: order[n])
    result = ChainSet()
    if not isinstance(model, fx.GraphModule):
        result.single = {n: "the model was not traced: no graph to form chains on" for n in names}
        return result
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in model.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    node_of: dict[str, fx.Node] = {}
    for name in names:
        row = plan.row(name)
        if row.in_leaf:
            result.single[name] = f"inside untraced block {row.in_leaf}"
        elif len(calls.get(name, [])) != 1:
            result.single[name] = f"called {len(calls.get(name, []))} times in the graph"
        else:
            node_of[name] = calls[name][0]
            if _rewritten_in_place(node_of[name].args[0], modules):
                result.unreadable_inputs.add(name)
    candidates = [n for n in names if n in node_of]
    regions = _residual_regions(model.graph, {node_of[n] for n in candidates})

    def innermost(name: str) -> _Region | None:
        holding = [r for r in regions if node_of[name] in r.nodes]
        return min(holding, key=lambda r: len(r.nodes)) if holding else None

    def parent(region: _Region) -> _Region | None:
        larger = [r for r in regions if r.nodes > region.nodes]
        return min(larger, key=lambda r: len(r.nodes)) if larger else None

    def shape(name: str) -> tuple[int, ...]:
        return tuple(modules[name].weight.shape)

    # Blocks in dataflow order: (members, label, key of the enclosing region for sibling grouping).
    blocks: list[tuple[list[str], str, object]] = []
    by_region: dict[int, int] = {}
    plain: list[str] = []
    for name in candidates:
        region = innermost(name)
        if region is None:
            plain.append(name)
            continue
        if id(region) not in by_region:
            by_region[id(region)] = len(blocks)
            outer = parent(region)
            blocks.append(([], "", outer.add.name if outer else None))
        blocks[by_region[id(region)]][0].append(name)
    blocks = [(members, _label(members), outer) for members, _, outer in blocks]
    for run in _runs(plain, shape):
        for i in range(0, len(run), plain_length):
            chunk = run[i : i + plain_length]
            blocks.append((chunk, f"{chunk[0]}..{chunk[-1]}" if len(chunk) > 1 else chunk[0], None))
    blocks.sort(key=lambda b: order[b[0][0]])

    for members, label, _ in blocks:
        for name in members:
            result.block_of[name] = label
        for run in _runs(members, shape):
            if len(run) > 1 and short_range:
                result.short.append(Chain(f"S{len(result.short) + 1}", "short", label, run))
    if long_range:
        groups: dict[object, list[str]] = {}
        for members, _, outer in blocks:
            groups.setdefault(outer, []).append(members[0])
        for outer, firsts in groups.items():
            for run in _runs(firsts, shape):
                if len(run) > 1:
                    where = "top level" if outer is None else f"inside the region ending at {outer}"
                    result.long.append(Chain(f"L{len(result.long) + 1}", "long", where, run))
    for members, label, _ in blocks:
        for name in members:
            if result.short_of(name) or result.long_of(name):
                continue
            if len(members) == 1:
                result.single[name] = f"only layer of block {label}"
            elif not short_range:
                result.single[name] = "not first in its block and short range is off"
            else:
                result.single[name] = f"weight shape {list(shape(name))} differs from its neighbours in block {label}"
    return result


def residual_blocks(model: nn.Module, plan: Plan, names: Sequence[str]) -> dict[str, str] | None:
    """The layers of ``names`` that sit in a residual block holding no smaller one -> that block's label.

    Layers only in an enclosing region (EDSR's conv after the body, inside the global residual) are not
    in a block. None when the model was not traced (blocks unknown).
    """
    if not isinstance(model, fx.GraphModule):
        return None
    calls: dict[str, list[fx.Node]] = {}
    for node in model.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    node_of = {n: calls[n][0] for n in names if len(calls.get(n, [])) == 1}
    regions = _residual_regions(model.graph, set(node_of.values()))
    leaves = [r for r in regions if not any(other.nodes < r.nodes for other in regions)]
    members = [[n for n in names if n in node_of and node_of[n] in r.nodes] for r in leaves]
    return {n: _label(group) for group in members for n in group}


def wire_extra_inputs(model: nn.Module, replacements: dict[str, nn.Module]) -> None:
    """Pass each replacement the input tensors of the layers its ``extra_inputs()`` names, in that order."""
    wanted = {name: layer.extra_inputs() for name, layer in replacements.items() if layer.extra_inputs()}
    if not wanted:
        return
    if not isinstance(model, fx.GraphModule):
        raise ValueError(f"layers {sorted(wanted)} need the inputs of other layers, which needs a traced model")
    calls = {n.target: n for n in model.graph.nodes if n.op == "call_module"}
    for name, sources in wanted.items():
        missing = [s for s in [name, *sources] if s not in calls]
        if missing:
            raise ValueError(f"{name}: no call of {missing} in the graph to take inputs from")
        node = calls[name]
        node.args = (*node.args, *(calls[s].args[0] for s in sources))
    model.graph.lint()
    model.recompile()


def _residual_regions(graph: fx.Graph, layers: set[fx.Node]) -> list[_Region]:
    """Regions ``s -> ... -> s + f(s)`` holding at least one of ``layers``."""
    regions = []
    for node in graph.nodes:
        if not is_add(node):
            continue
        a, b = (x for x in node.args if isinstance(x, fx.Node))
        upstream = ancestors(node)
        source = a if a in ancestors(b) else b if b in ancestors(a) else None
        if source is None:
            continue
        nodes = frozenset((descendants(source) & upstream) | {node})
        if nodes & layers:
            regions.append(_Region(node, nodes))
    return regions


def _rewritten_in_place(value: object, modules: dict[str, nn.Module]) -> bool:
    """Whether ``value`` is not a graph tensor or some op rewrites it in place (later reads would be wrong)."""
    if not isinstance(value, fx.Node):
        return True
    for user in value.users:
        if user.op == "call_function" and user.target in _INPLACE_FUNCTIONS and user.args[0] is value:
            return True
        if user.op == "call_method" and str(user.target).endswith("_") and user.args[0] is value:
            return True
        if user.op == "call_module" and getattr(modules[user.target], "inplace", False):
            return True
    return False


def _runs(names: list[str], shape) -> list[list[str]]:
    """Split ``names`` into maximal runs of consecutive equal ``shape(name)``."""
    runs: list[list[str]] = []
    for name in names:
        if runs and shape(runs[-1][-1]) == shape(name):
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


def _label(members: list[str]) -> str:
    """The common dotted prefix of the members' names (the block's module path), or the first name."""
    parts = [m.split(".") for m in members]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    if len(members) == 1 or len(common) == len(parts[0]):
        return members[0].rsplit(".", 1)[0] if "." in members[0] else members[0]
    return ".".join(common) if common else members[0]
